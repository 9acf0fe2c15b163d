"""`alignkit serve` for real: uvicorn on 127.0.0.1 (in a thread, or the `alignkit serve` command in a
subprocess) on the tiny model, called with the official `openai` client and with plain HTTP."""

import json
import re
import signal
import statistics
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from alignkit.config import ServeConfig  # noqa: E402
from alignkit.examples import good_word_share  # noqa: E402
from alignkit.serve.app import Server, bind, build_app, load_engine  # noqa: E402
from alignkit.serve.engine import best_of_n_select  # noqa: E402
from conftest import Harness  # noqa: E402

KEY = "test-key-123"
ENV_KEY = "env-key-456"  # the command's key, from ALIGNKIT_API_KEY
PROMPT = [{"role": "user", "content": "describe the red cat ->"}]


class ThreadedServer:
    """uvicorn serving `build_app(server)` on a free 127.0.0.1 port from a background thread."""

    def __init__(self, server: Server):
        self.server = server
        sock = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.uvicorn = uvicorn.Server(uvicorn.Config(build_app(server), log_level="warning"))
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.uvicorn.started:
            assert time.time() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.01)

    def stop(self):
        self.uvicorn.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    cfg = ServeConfig(model=tiny_model_dir, max_tokens=32, max_n=4, max_prompt_tokens=40, max_body_bytes=20_000,
                      batch_window_ms=15, max_batch_size=64)
    running = ThreadedServer(Server(load_engine(cfg), cfg, api_key=KEY))
    yield running
    running.stop()
    assert not running.server.engine.running  # the lifespan stopped the worker


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def post(served, path, body, key=KEY, raw=False):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if raw else json.dumps(body)
    return httpx.post(served.url + path, content=content, headers={**headers, "Content-Type": "application/json"},
                      timeout=60)


def assert_error(response, status, param=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if status == 400:
        assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param
    return error


def test_chat_with_the_openai_client(client, tokenizer):
    reply = client.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=6, temperature=0)
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.finish_reason in ("stop", "length")
    from alignkit.data.tokenize import Encoder

    assert reply.usage.prompt_tokens == len(Encoder(tokenizer).prompt_ids(PROMPT))
    assert 1 <= reply.usage.completion_tokens <= 6
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert (choice.finish_reason == "length") == (reply.usage.completion_tokens == 6)
    again = client.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=6, temperature=0)
    assert again.choices[0].message.content == choice.message.content  # temperature 0 is greedy
    three = client.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=4, n=3, seed=7)
    assert [c.index for c in three.choices] == [0, 1, 2]
    seeded = client.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=4, n=3, seed=7)
    assert [c.message.content for c in seeded.choices] == [c.message.content for c in three.choices]


def test_streaming_chat(client):
    plain = client.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=8, temperature=0)
    stream = client.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    assert len([d for d in deltas if d.content]) >= 2  # the text arrives in pieces
    assert "".join(d.content or "" for d in deltas) == plain.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == plain.choices[0].finish_reason and not any(finishes[:-1])
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    two = client.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=8, temperature=0, stream=True, n=2)
    texts = ["", ""]
    for chunk in two:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert texts == [plain.choices[0].message.content] * 2
    words = plain.choices[0].message.content.split()
    if len(words) >= 3:  # a stop string: the stream holds back what could be its start, then cuts there
        stop = " " + " ".join(words[1:3])
        cut = client.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=8, temperature=0, stop=stop,
                                             stream=True)
        pieces = [c.choices[0] for c in cut if c.choices]
        assert "".join(p.delta.content or "" for p in pieces) == words[0]
        assert pieces[-1].finish_reason == "stop"


def test_stream_is_server_sent_events(served):
    """The raw stream: `data: {json}` events separated by blank lines, ending with `data: [DONE]`."""
    with httpx.stream("POST", served.url + "/v1/chat/completions", timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"},
                      json={"messages": PROMPT, "max_tokens": 4, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        body = response.read().decode()
    events = body.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_stream_pieces_arrive_while_sampling(served, monkeypatch):
    """A streamed choice's pieces reach the request during the generate call, not after it."""
    from alignkit.serve.engine import Job

    engine = served.server.engine
    state = {"generating": False}
    real = engine.generate_fn  # the engine's sampler (alignkit's, or vLLM's)

    def watched(*args, **kwargs):
        state["generating"] = True
        try:
            return real(*args, **kwargs)
        finally:
            state["generating"] = False

    monkeypatch.setattr(engine, "generate_fn", watched)
    pieces = []
    ids = served.server.encoder.prompt_ids(PROMPT)
    job = Job(PROMPT, ids, max_tokens=8, temperature=0,
              on_piece=lambda i, text: pieces.append((i, text, state["generating"])))
    choices = engine.submit(job).result(timeout=60)
    assert pieces[-1][0] is None  # the end of the job comes last
    assert "".join(text for i, text, _ in pieces[:-1]) == choices[0].text
    during = [text for i, text, generating in pieces if generating]
    assert len(during) >= min(2, len(choices[0].text.split()) - 1)


def test_completions(client):
    reply = client.completions.create(model="tiny", prompt="copy red cat ->", max_tokens=5, temperature=0)
    assert reply.object == "text_completion" and isinstance(reply.choices[0].text, str)
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens <= 5
    two = client.completions.create(model="tiny", prompt=["copy red cat ->", "copy blue dog ->"], max_tokens=3,
                                    n=2, temperature=0)
    assert [c.index for c in two.choices] == [0, 1, 2, 3]
    assert two.choices[0].text == two.choices[1].text == reply.choices[0].text[:len(two.choices[0].text)]
    streamed = client.completions.create(model="tiny", prompt="copy red cat ->", max_tokens=5, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == reply.choices[0].text
    words = reply.choices[0].text.split()
    if len(words) >= 2:  # a stop string cuts the text before it and ends with "stop"
        cut = client.completions.create(model="tiny", prompt="copy red cat ->", max_tokens=5, temperature=0,
                                        stop=[" " + words[1]])
        assert cut.choices[0].text == words[0] and cut.choices[0].finish_reason == "stop"


def test_seeds_do_not_split_batches(client, served):
    """16 concurrent requests with 16 different seeds share generations (seed is best effort, as OpenAI's)."""
    ask = lambda seed: client.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=4, seed=seed)
    before = served.server.engine.batches
    with ThreadPoolExecutor(16) as pool:
        assert len(list(pool.map(ask, range(16)))) == 16
    assert served.server.engine.batches - before <= 6


def test_models_and_health(client, served):
    assert [m.id for m in client.models.list().data] == [served.server.model_name]
    health = httpx.get(served.url + "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_api_key(served, client):
    assert_error(post(served, "/v1/chat/completions", {"messages": PROMPT}, key=None), 401)
    assert_error(post(served, "/v1/chat/completions", {"messages": PROMPT}, key="wrong"), 401)
    assert_error(httpx.get(served.url + "/v1/models"), 401)
    wrong = openai.OpenAI(base_url=served.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=2)


def test_malformed_requests_get_400(served, client):
    chat = "/v1/chat/completions"
    assert_error(post(served, chat, '{"messages": [', raw=True), 400)
    assert_error(post(served, chat, "[1, 2]", raw=True), 400)
    assert_error(post(served, chat, {"model": "tiny"}), 400, "messages")
    assert_error(post(served, chat, {"messages": "hello"}), 400, "messages")
    assert_error(post(served, chat, {"messages": [{"role": "wizard", "content": "x"}]}), 400, "messages[0]")
    assert_error(post(served, chat, {"messages": [{"role": "user", "content": 3}]}), 400, "messages[0].content")
    for field, value in [("temperature", "hot"), ("temperature", 3), ("top_p", 0), ("max_tokens", 2.5),
                         ("max_tokens", True), ("n", 0), ("stream", "yes"), ("stop", 5), ("seed", "x")]:
        assert_error(post(served, chat, {"messages": PROMPT, field: value}), 400, field)
    assert_error(post(served, "/v1/completions", {"prompt": [1, 2, 3]}), 400, "prompt")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=PROMPT, temperature=-1)


def test_limits(served, client):
    chat = "/v1/chat/completions"
    assert_error(post(served, chat, {"messages": PROMPT, "n": 5}), 400, "n")  # max_n 4
    assert_error(post(served, chat, {"messages": PROMPT, "max_tokens": 33}), 400, "max_tokens")  # max_tokens 32
    error = assert_error(post(served, chat, {"messages": [{"role": "user", "content": "cat " * 60}]}), 400)
    assert error["code"] == "context_length_exceeded"  # max_prompt_tokens 40
    assert_error(post(served, chat, {"messages": [{"role": "user", "content": "x" * 30_000}]}), 413)
    assert_error(post(served, chat, {"messages": PROMPT, "best_of": 4}), 400, "best_of")  # no reward here
    assert_error(httpx.get(served.url + "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"}), 404)


@pytest.fixture(scope="module")
def command(tiny_model_dir):
    """`alignkit serve --reward-fn … --n 8` in a subprocess (its own interpreter, as in production):
    (process, base URL). The last test sends it SIGTERM."""
    proc = subprocess.Popen(Harness.command(["serve", "--model", tiny_model_dir, "--port", "0", "--n", "8",
                                             "--reward-fn", "python:alignkit.examples:good_word_share"]),
                            env={**Harness.env(), "ALIGNKIT_API_KEY": ENV_KEY}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    match = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
    if not match or "API key required" not in line:
        proc.kill()
        pytest.fail(f"alignkit serve did not start: {line}{proc.stderr.read()}")
    yield proc, match.group(0)
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_best_of_n(command):
    """Each choice is the best of 8 samples under the rule; the response says so."""
    client = openai.OpenAI(base_url=command[1], api_key=ENV_KEY, max_retries=0, timeout=60)
    reply = client.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=6, n=2, temperature=1.0)
    assert len(reply.choices) == 2
    for choice in reply.choices:
        info = choice.model_extra["alignkit"]
        assert info["best_of"] == 8 and len(info["candidate_scores"]) == 8
        assert info["score"] == max(info["candidate_scores"])
        assert good_word_share([""], [choice.message.content])[0] == pytest.approx(info["score"])
    ask = lambda _: client.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=6)
    with ThreadPoolExecutor(8) as pool:  # 8 requests × 8 candidates, batched and scored together
        for reply in pool.map(ask, range(8)):
            info = reply.choices[0].model_extra["alignkit"]
            assert good_word_share([""], [reply.choices[0].message.content])[0] == pytest.approx(info["score"])
            assert info["score"] == max(info["candidate_scores"])
    stream = client.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=6, stream=True)
    chunks = [c.choices[0] for c in stream if c.choices]
    text = "".join(c.delta.content or "" for c in chunks)
    info = chunks[-1].model_extra["alignkit"]  # on the choice's last chunk
    assert good_word_share([""], [text])[0] == pytest.approx(info["score"]) == max(info["candidate_scores"])
    plain = client.completions.create(model="tiny", prompt="copy red cat ->", max_tokens=3, extra_body={"best_of": 1})
    assert "alignkit" not in (plain.choices[0].model_extra or {})


def test_64_concurrent_clients_are_batched(command):
    """64 clients at once: no error, and far less than 64 times one request's wall time."""
    url = command[1]
    client = openai.OpenAI(base_url=url, api_key=ENV_KEY, max_retries=0, timeout=120)
    ask = lambda _: client.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=16, temperature=0,
                                                   extra_body={"best_of": 1})
    ask(0)  # warm-up
    singles = []
    for _ in range(3):
        start = time.perf_counter()
        ask(0)
        singles.append(time.perf_counter() - start)
    one = statistics.median(singles)
    health = url.removesuffix("/v1") + "/health"  # no key needed
    batches_before = httpx.get(health).json()["batches"]
    with ThreadPoolExecutor(64) as pool:
        start = time.perf_counter()
        replies = list(pool.map(ask, range(64)))
        wall = time.perf_counter() - start
    assert len(replies) == 64 and len({r.choices[0].message.content for r in replies}) == 1
    batches = httpx.get(health).json()["batches"] - batches_before
    ratio = wall / one
    print(f"\none request {one * 1000:.0f} ms; 64 concurrent {wall * 1000:.0f} ms = {ratio:.1f}x one "
          f"(in {batches} generate calls)")
    assert batches <= 16
    assert ratio < 16


def test_sigterm_stops_the_server_cleanly(command):
    proc = command[0]
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    out, err = proc.stdout.read(), proc.stderr.read()
    assert rc == 0, err
    assert "generator stopped" in out
    assert ENV_KEY not in out + err  # the key is never printed or logged


def test_best_of_n_select_keeps_the_top_score():
    scorer = lambda prompts, texts, finished: (torch.tensor([float(len(t)) for t in texts]), None)
    picks = best_of_n_select(scorer, ["p"] * 7, ["a", "ccc", "bb", "dd", "e", "dd", "ffff"], [True] * 7, [3, 3, 1])
    assert picks == [(1, [1.0, 3.0, 2.0]), (3, [2.0, 1.0, 2.0]), (6, [4.0])]  # a tie keeps the first


def test_best_of_n_with_a_reward_model(tiny_model_dir):
    """The Scorer's reward-model path on the worker thread: a causal LM loaded as a reward model gets a zero
    head, so every candidate scores 0 (in both members of the ensemble) and the first one is kept."""
    from alignkit.serve.engine import Job

    cfg = ServeConfig(model=tiny_model_dir, reward_models=(f"{tiny_model_dir},{tiny_model_dir}",), n=4)
    assert cfg.reward_paths == [tiny_model_dir, tiny_model_dir]  # R1,R2 as SPEC §10 writes it: an ensemble
    engine = load_engine(cfg)
    engine.start()
    try:
        ids = Server(engine, cfg).encoder.prompt_ids(PROMPT)
        choices = engine.submit(Job(PROMPT, ids, max_tokens=4, n=2, best_of=4)).result(timeout=60)
    finally:
        engine.close()
    assert len(choices) == 2
    for choice in choices:
        assert choice.candidate_scores == [0.0] * 4 and choice.score == 0.0


def test_serve_config_errors():
    from alignkit.cli import main

    assert main(["serve"]) == 2
    assert main(["serve", "--model", "m", "--n", "4"]) == 2  # Best-of-N without a reward
    assert main(["serve", "--model", "m", "--max-tokens", "0"]) == 2
