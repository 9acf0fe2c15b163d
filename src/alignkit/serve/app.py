"""The HTTP side of `alignkit serve`: an OpenAI-compatible FastAPI app over an `Engine` (SPEC §10).

`/v1/chat/completions` (messages → the chat template; `stream: true` as server-sent events),
`/v1/completions` (prompt strings), `/v1/models`, `/health`. Requests are parsed by hand, so that every
malformed one gets the OpenAI error shape with status 400 (FastAPI's own validation answers 422), and the
body is read with a size bound. With a key set, /v1/* needs `Authorization: Bearer KEY` (constant-time
comparison); /health does not. The key is never printed or logged.

(No `from __future__ import annotations` here: FastAPI reads the endpoints' `Request` annotations at runtime.)
"""


import asyncio
import functools
import hmac
import json
import math
import os
import signal
import socket
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from alignkit.config import ServeConfig
from alignkit.data.tokenize import Encoder
from alignkit.serve.engine import Choice, Engine, EngineStopped, Job

ROLES = ("system", "developer", "user", "assistant", "tool")


class RequestError(Exception):
    """A request the server refuses: becomes {"error": {...}} with `status`."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.kind = message, param, code, status, kind


def error_body(message: str, kind: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# -- parsing ------------------------------------------------------------------------------------------------

def _integer(body: dict, name: str, default, low: int, high: int):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"'{name}' must be an integer, got {json.dumps(value)[:40]}", name, "invalid_type")
    if not low <= value <= high:
        raise RequestError(f"'{name}' must be between {low} and {high}, got {value}", name, "invalid_value")
    return value


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"'{name}' must be a number, got {json.dumps(value)[:40]}", name, "invalid_type")
    if not (low < value if low_open else low <= value) or value > high:
        raise RequestError(f"'{name}' must be in {'(' if low_open else '['}{low}, {high}], got {value}", name,
                           "invalid_value")
    return float(value)


def _boolean(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(f"'{name}' must be true or false", name, "invalid_type")
    return value


def _stop(body: dict) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    values = [value] if isinstance(value, str) else value
    if not (isinstance(values, list) and len(values) <= 4 and all(isinstance(v, str) and v for v in values)):
        raise RequestError("'stop' must be a non-empty string or a list of up to 4 of them", "stop", "invalid_type")
    return tuple(values)


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' is required: a non-empty list of {role, content}", "messages",
                           "missing_required_parameter" if messages is None else "invalid_type")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise RequestError(f"{where} must be an object with a 'role' among {', '.join(ROLES)}", where,
                               "invalid_value")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise RequestError(f"{where}.content: only text parts are supported", f"{where}.content",
                                   "invalid_value")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise RequestError(f"{where}.content must be a string", f"{where}.content", "invalid_type")
        out.append({"role": m["role"], "content": content})
    return out


def _prompts(body: dict) -> list[str]:
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not (isinstance(prompts, list) and prompts and all(isinstance(p, str) for p in prompts)):
        raise RequestError("'prompt' is required: a string or a non-empty list of strings (token-id prompts are "
                           "not supported)", "prompt",
                           "missing_required_parameter" if prompt is None else "invalid_type")
    return prompts


def _unsupported(body: dict, names: tuple[str, ...]) -> None:
    for name in names:
        if body.get(name):
            raise RequestError(f"'{name}' is not supported by alignkit serve", name, "unsupported_parameter")


# -- the app ------------------------------------------------------------------------------------------------

class Server:
    """Holds what every request needs: the engine, the limits, the encoder and the key."""

    def __init__(self, engine: Engine, cfg: ServeConfig, api_key: str = "", model_name: str = ""):
        self.engine, self.cfg = engine, cfg
        self._key = api_key.encode()
        self.model_name = model_name or cfg.served_model_name or Path(cfg.model.rstrip("/")).name or "alignkit"
        self.encoder = Encoder(engine.tokenizer, 10**9, 10**9 - 1)  # no truncation: too long is a 400 here
        self.has_scorer = engine.scorer is not None
        self.created = int(time.time())

    def authorize(self, request) -> None:
        if not self._key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if not (scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self._key)):
            raise RequestError("missing or wrong API key: send 'Authorization: Bearer KEY'", None,
                               "invalid_api_key", status=401)

    async def read_json(self, request) -> dict:
        limit = self.cfg.max_body_bytes
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise RequestError(f"request body over {limit} bytes", None, "request_too_large", status=413)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise RequestError(f"request body over {limit} bytes", None, "request_too_large", status=413)
        try:
            data = json.loads(bytes(body))
        except (ValueError, RecursionError):
            raise RequestError("the body is not valid JSON", None, "invalid_json") from None
        if not isinstance(data, dict):
            raise RequestError("the body must be a JSON object", None, "invalid_json")
        model = data.get("model")
        if model is not None and not isinstance(model, str):
            raise RequestError("'model' must be a string", "model", "invalid_type")
        return data

    def jobs(self, body: dict, prompts: list, param: str) -> list[Job]:
        """The request's sampling settings, checked against the limits, and one job per prompt."""
        cfg = self.cfg
        n = _integer(body, "n", 1, 1, cfg.max_n)
        best_of = _integer(body, "best_of", cfg.n, 1, cfg.max_best_of)
        if best_of > 1 and not self.has_scorer:
            raise RequestError("'best_of' > 1 needs a server started with --reward-models or --reward-fn",
                               "best_of", "invalid_value")
        rows = n * best_of * len(prompts)
        if rows > cfg.max_batch_size:
            raise RequestError(f"n × best_of × prompts = {rows} sequences, over this server's {cfg.max_batch_size}",
                               "n", "invalid_value")
        temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
        top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
        seed = _integer(body, "seed", None, -(2**63), 2**63 - 1)
        stop = _stop(body)
        asked = body.get("max_completion_tokens", body.get("max_tokens"))
        name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _integer({name: asked}, name, None, 1, cfg.max_tokens)
        context = self.engine.context_length
        prompt_limit = min(cfg.max_prompt_tokens or context, context - 1)
        with self.engine.tokenizer_lock:
            ids = [self.encoder.prompt_ids(p) for p in prompts]
        jobs = []
        for prompt, prompt_ids in zip(prompts, ids):
            if not prompt_ids:
                raise RequestError("the prompt is empty (no tokens)", param, "invalid_value")
            if len(prompt_ids) > prompt_limit:
                raise RequestError(f"the prompt is {len(prompt_ids)} tokens, over the limit of {prompt_limit}",
                                   param, "context_length_exceeded")
            room = context - len(prompt_ids)
            if max_tokens is not None and max_tokens > room:
                raise RequestError(f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_tokens}) exceed "
                                   f"the model's context of {context} tokens", name, "context_length_exceeded")
            jobs.append(Job(prompt, prompt_ids, max_tokens or min(cfg.max_tokens, room), n, best_of,
                            temperature, top_p, seed, stop))
        return jobs

    def submit(self, jobs: list[Job], stream: bool = False) -> tuple[list, asyncio.Queue | None]:
        """Queue the jobs: (their asyncio futures, and for a stream a queue of (choice index, text) pieces with
        one None per finished job; choice indices count across the jobs, prompt-major)."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue | None = asyncio.Queue() if stream else None
        futures, offset = [], 0
        try:
            for job in jobs:
                if pieces is not None:
                    job.on_piece = functools.partial(_put_piece, loop, pieces, offset)
                offset += job.n
                futures.append(asyncio.wrap_future(self.engine.submit(job)))
        except EngineStopped as e:
            raise RequestError(str(e), None, "unavailable", status=503, kind="server_error") from None
        return futures, pieces

    @staticmethod
    async def results(futures: list) -> list[list[Choice]]:
        try:
            return list(await asyncio.gather(*futures))
        except EngineStopped as e:
            raise RequestError(str(e), None, "unavailable", status=503, kind="server_error") from None

    @staticmethod
    async def pieces(jobs: list[Job], queue: asyncio.Queue):
        """(choice index, text) as the worker samples them, until every job is done."""
        remaining = len(jobs)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            else:
                yield item

    def usage(self, jobs: list[Job], results: list[list[Choice]]) -> dict:
        prompt = sum(len(job.prompt_ids) for job in jobs)
        completion = sum(c.completion_tokens for choices in results for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _put_piece(loop, queue: asyncio.Queue, offset: int, index: int | None, text: str) -> None:
    """Called on the worker thread: hand a piece (or a job's end, None) to the request's event loop."""
    try:
        loop.call_soon_threadsafe(queue.put_nowait, None if index is None else (offset + index, text))
    except RuntimeError:  # the loop has closed (shutdown): nobody is listening, and the batch goes on
        pass


def _alignkit_field(job: Job, choice: Choice) -> dict | None:
    if job.best_of == 1:
        return None
    return {"best_of": job.best_of, "score": choice.score, "candidate_scores": choice.candidate_scores}


def _sse(data) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


def build_app(server: Server):
    """The FastAPI app; the engine's worker starts and stops with it (lifespan)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    @asynccontextmanager
    async def lifespan(app):
        server.engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(server.engine.close)

    app = FastAPI(title="alignkit serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RequestError)
    async def request_error(request, e: RequestError):
        return JSONResponse(error_body(e.message, e.kind, e.param, e.code), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(e.detail), kind), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def server_error(request, e: Exception):
        return JSONResponse(error_body(f"internal error: {type(e).__name__}", "server_error"), status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": server.model_name, "batches": server.engine.batches}

    def model_card() -> dict:
        return {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "alignkit"}

    @app.get("/v1/models")
    async def models(request: Request):
        server.authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        server.authorize(request)
        if model_id != server.model_name:
            raise RequestError(f"no model {model_id!r}; this server has {server.model_name!r}", "model",
                               "model_not_found", status=404)
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        server.authorize(request)
        body = await server.read_json(request)
        _unsupported(body, ("logprobs", "tools", "functions"))
        jobs = server.jobs(body, [_messages(body)], "messages")
        stream = _boolean(body, "stream")
        futures, pieces = server.submit(jobs, stream)
        job = jobs[0]
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": server.model_name}
        if not stream:
            choices = (await server.results(futures))[0]
            out = [{"index": i, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason,
                    "logprobs": None} for i, c in enumerate(choices)]
            for entry, c in zip(out, choices):
                if (extra := _alignkit_field(job, c)) is not None:
                    entry["alignkit"] = extra
            return {**base, "object": "chat.completion", "choices": out, "usage": server.usage(jobs, [choices])}
        include_usage = isinstance(body.get("stream_options"), dict) and body["stream_options"].get("include_usage")

        async def events():
            chunk = {**base, "object": "chat.completion.chunk"}
            for i in range(job.n):
                yield _sse({**chunk, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                  "finish_reason": None, "logprobs": None}]})
            async for i, piece in server.pieces(jobs, pieces):
                yield _sse({**chunk, "choices": [{"index": i, "delta": {"content": piece}, "finish_reason": None,
                                                  "logprobs": None}]})
            try:
                results = await server.results(futures)
            except Exception as e:  # the status line is sent: the error goes in the stream, as OpenAI does
                yield _sse(error_body(getattr(e, "message", f"internal error: {type(e).__name__}"), "server_error"))
                return
            for i, c in enumerate(results[0]):
                last = {"index": i, "delta": {}, "finish_reason": c.finish_reason, "logprobs": None}
                if (extra := _alignkit_field(job, c)) is not None:
                    last["alignkit"] = extra
                yield _sse({**chunk, "choices": [last]})
            if include_usage:
                yield _sse({**chunk, "choices": [], "usage": server.usage(jobs, results)})
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions")
    async def completions(request: Request):
        server.authorize(request)
        body = await server.read_json(request)
        _unsupported(body, ("logprobs", "echo", "suffix"))
        jobs = server.jobs(body, _prompts(body), "prompt")
        stream = _boolean(body, "stream")
        futures, pieces = server.submit(jobs, stream)
        base = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": server.model_name}

        def finals(results):  # prompt-major, as OpenAI: prompt 0's n choices, then prompt 1's
            out = []
            for job, choices in zip(jobs, results):
                for c in choices:
                    out.append({"index": len(out), "text": c.text, "finish_reason": c.finish_reason, "logprobs": None})
                    if (extra := _alignkit_field(job, c)) is not None:
                        out[-1]["alignkit"] = extra
            return out

        if not stream:
            results = await server.results(futures)
            return {**base, "choices": finals(results), "usage": server.usage(jobs, results)}
        include_usage = isinstance(body.get("stream_options"), dict) and body["stream_options"].get("include_usage")

        async def events():
            async for i, piece in server.pieces(jobs, pieces):
                yield _sse({**base, "choices": [{"index": i, "text": piece, "finish_reason": None, "logprobs": None}]})
            try:
                results = await server.results(futures)
            except Exception as e:
                yield _sse(error_body(getattr(e, "message", f"internal error: {type(e).__name__}"), "server_error"))
                return
            for last in finals(results):
                yield _sse({**base, "choices": [{**last, "text": ""}]})
            if include_usage:
                yield _sse({**base, "choices": [], "usage": server.usage(jobs, results)})
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


# -- the command ---------------------------------------------------------------------------------------------

def load_engine(cfg: ServeConfig) -> Engine:
    """The policy (frozen, in cfg.dtype), its tokenizer and, for Best-of-N, the scorer; the worker not started."""
    from alignkit.models.load import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    model = load_causal_lm(cfg.model, cfg.dtype, cfg.trust_remote_code, for_training=False).requires_grad_(False)
    scorer = None
    if cfg.reward_paths or cfg.reward_fn or cfg.reward_judge:
        from alignkit.rewards import Scorer

        scorer = Scorer(cfg, paths=cfg.reward_paths, policy_tokenizer=tokenizer)
    from alignkit.rl.vllm_backend import generate_fn_for

    return Engine(model, tokenizer, scorer, window_s=cfg.batch_window_ms / 1000, max_batch_size=cfg.max_batch_size,
                  seed=cfg.seed, generate_fn=generate_fn_for(cfg, cfg.model))


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0 = a free one): bound before uvicorn starts, so the address printed is real."""
    info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(info[0], socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(info[4])
    sock.listen(2048)
    return sock


def serve(cfg: ServeConfig) -> None:
    """`alignkit serve`: load, bind, print the address, serve until SIGINT/SIGTERM (then exit 0)."""
    import torch
    import uvicorn

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    api_key = cfg.api_key or os.environ.get("ALIGNKIT_API_KEY", "")
    server = Server(load_engine(cfg), cfg, api_key)
    sock = bind(cfg.host, cfg.port)
    host, port = sock.getsockname()[:2]
    best = f", best of {cfg.n}" if cfg.n > 1 else ""
    print(f"alignkit serve: {server.model_name}{best} on http://{host}:{port}/v1 "
          f"(API key {'required' if api_key else 'not required'})", flush=True)
    # uvicorn handles SIGTERM (graceful shutdown: the lifespan stops the engine), then re-raises it to the
    # handler it found; this one makes the re-raise a normal return, so the command exits 0
    signal.signal(signal.SIGTERM, lambda *_: None)
    config = uvicorn.Config(build_app(server), log_level="warning", timeout_graceful_shutdown=10)
    uvicorn.Server(config).run(sockets=[sock])
    state = "still running" if server.engine.running else "stopped"
    print(f"alignkit serve: stopped; generator {state} after {server.engine.batches} batched generations", flush=True)
