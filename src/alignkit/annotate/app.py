"""The web side of `alignkit annotate`: a FastAPI app with server-rendered pages (Jinja2, autoescaped) and a small
script (static/annotate.js) that ranks, submits and shows the next item without reloading the page.

Routes:
- ``GET /?token=T``: the annotation page (401 and no content without a valid token). The item on screen and
  the progress are embedded as JSON (Jinja's ``tojson``, which escapes ``<``, ``>`` and ``&``); the script
  draws model text with ``textContent`` only, so a response holding HTML or ``<script>`` shows as text.
- ``GET /progress?token=T``: each annotator's progress (admin tokens only).
- ``GET /api/state``, ``GET /api/last`` (the last judgement, to revise), ``POST /api/judgements``,
  ``POST /api/skip``: JSON, with the token in an ``Authorization: Bearer`` header. A malformed request gets
  400 and writes nothing; one about an item that is not the annotator's to change gets 409.

How the token travels: the link carries it once (``/?token=``, as SPEC §14 prints it); the page keeps it in
memory and sends it in the ``Authorization`` header of every API call, so it is in no other URL. The server
keeps no access log (URLs would hold tokens), pages send ``Referrer-Policy: no-referrer`` (no token leaks to
another site in a Referer) and a Content-Security-Policy that allows this server's own script and styles
only. There are no cookies, so there is nothing for cross-site request forgery to ride on.

(No ``from __future__ import annotations``: FastAPI reads the endpoints' ``Request`` annotations at runtime.)
"""

import json
import socket
from pathlib import Path

from alignkit.annotate.db import MAX_COMMENT_LENGTH, Annotator, Conflict, Store
from alignkit.annotate.ranking import InvalidRanking, groups_from_ranks

HERE = Path(__file__).parent
MAX_BODY_BYTES = 64 * 1024
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message, self.status = message, status


class Annotation:
    """What the routes share: the store, the overlap k, and the JSON the page draws."""

    def __init__(self, store: Store, overlap: int):
        self.store, self.overlap = store, overlap

    def state(self, annotator: Annotator) -> dict:
        """The page's state: the item on screen (None when the queue is empty) and the progress."""
        judgement = self.store.current(annotator.id, self.overlap)
        return self._state(annotator, judgement, revising=False)

    def last(self, annotator: Annotator) -> dict:
        judgement = self.store.last_done(annotator.id)
        if judgement is None:
            raise BadRequest("there is no judgement to revise yet", 409)
        return self._state(annotator, judgement, revising=True)

    def _state(self, annotator: Annotator, judgement, revising: bool) -> dict:
        item = None
        if judgement is not None:
            stored = self.store.item(judgement.item_id)
            item = {"id": stored.id, "prompt": stored.prompt,
                    "responses": [stored.responses[i] for i in judgement.order],  # as shown: the page never
                    "revising": revising,                                          # sees the data's order
                    "ranking": groups_from_ranks(judgement.ranks, judgement.order) if revising else None,
                    "comment": judgement.comment if revising else "", "unsafe": judgement.unsafe}
        return {"annotator": annotator.name, "admin": annotator.admin, "item": item,
                "progress": self.store.progress(annotator.id, self.overlap),
                "can_revise": self.store.last_done(annotator.id) is not None}


# -------------------------------------------------------------------------------------------- requests
def bearer_token(request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


async def read_body(request, allowed: dict) -> dict:
    """The JSON object of a request, its fields checked against `allowed` ({name: (type, required)})."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise BadRequest(f"request body over {MAX_BODY_BYTES} bytes", 413)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise BadRequest(f"request body over {MAX_BODY_BYTES} bytes", 413)
    try:
        data = json.loads(bytes(body))
    except (ValueError, RecursionError):
        raise BadRequest("the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object")
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(unknown)}")
    for name, (kind, required) in allowed.items():
        if name not in data:
            if required:
                raise BadRequest(f"'{name}' is missing")
            continue
        value = data[name]
        if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
            raise BadRequest(f"'{name}' must be {_kind_name(kind)}")
    if len(data.get("comment", "")) > MAX_COMMENT_LENGTH:
        raise BadRequest(f"'comment' is over {MAX_COMMENT_LENGTH} characters")
    return data


def _kind_name(kind) -> str:
    return {int: "an integer", str: "a string", bool: "true or false", list: "a list"}[kind]


# ------------------------------------------------------------------------------------------------- app
def build_app(store: Store, overlap: int):
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
    from fastapi.staticfiles import StaticFiles
    from jinja2 import Environment, FileSystemLoader
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    annotation = Annotation(store, overlap)
    store.set_setting("overlap", overlap)  # for stats and the progress page
    templates = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=True)
    app = FastAPI(title="alignkit annotate", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    @app.middleware("http")
    async def security_headers(request, call_next):
        response = await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        if request.url.path.startswith("/static/"):
            response.headers["Cache-Control"] = "no-cache"
        return response

    @app.exception_handler(BadRequest)
    async def bad_request(request, e: BadRequest):
        return JSONResponse({"error": e.message}, status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code)

    @app.exception_handler(Exception)
    async def server_error(request, e: Exception):
        return JSONResponse({"error": f"internal error: {type(e).__name__}"}, status_code=500)

    def page(name: str, status: int = 200, **context):
        return HTMLResponse(templates.get_template(name).render(**context), status_code=status)

    async def who(token: str | None) -> Annotator | None:
        return await run_in_threadpool(store.authenticate, token)

    async def api_user(request) -> Annotator:
        annotator = await who(bearer_token(request))
        if annotator is None:
            raise BadRequest("missing or wrong token: send 'Authorization: Bearer TOKEN' (the token of your link)",
                             401)
        return annotator

    @app.get("/")
    async def index(request: Request):
        annotator = await who(request.query_params.get("token") or bearer_token(request))
        if annotator is None:
            return page("denied.html", 401, reason="This page needs your annotator link (the one with "
                        "?token=… that `alignkit annotate add-annotator` printed).")
        state = await run_in_threadpool(annotation.state, annotator)
        return page("page.html", state=state)

    @app.get("/progress")
    async def progress(request: Request):
        annotator = await who(request.query_params.get("token") or bearer_token(request))
        if annotator is None or not annotator.admin:
            status = 401 if annotator is None else 403
            return page("denied.html", status, reason="The progress page needs an admin link "
                        "(`alignkit annotate add-annotator NAME --admin`).")
        from alignkit.annotate.stats import progress_table

        table = await run_in_threadpool(progress_table, store, overlap)
        return page("progress.html", table=table)

    @app.get("/api/state")
    async def api_state(request: Request):
        annotator = await api_user(request)
        return await run_in_threadpool(annotation.state, annotator)

    @app.get("/api/last")
    async def api_last(request: Request):
        annotator = await api_user(request)
        return await run_in_threadpool(annotation.last, annotator)

    @app.post("/api/judgements")
    async def api_judge(request: Request):
        annotator = await api_user(request)
        body = await read_body(request, {"item": (int, True), "ranking": (list, True), "comment": (str, False),
                                         "unsafe": (bool, False)})
        try:
            outcome = await run_in_threadpool(store.submit, annotator.id, body["item"], body["ranking"],
                                              body.get("comment", "").strip(), body.get("unsafe", False))
        except InvalidRanking as e:
            raise BadRequest(str(e)) from None
        except Conflict as e:
            raise BadRequest(str(e), 409) from None
        return {"outcome": outcome, **await run_in_threadpool(annotation.state, annotator)}

    @app.post("/api/skip")
    async def api_skip(request: Request):
        annotator = await api_user(request)
        body = await read_body(request, {"item": (int, True)})
        try:
            await run_in_threadpool(store.skip, annotator.id, body["item"])
        except Conflict as e:
            raise BadRequest(str(e), 409) from None
        return {"outcome": "skipped", **await run_in_threadpool(annotation.state, annotator)}

    @app.get("/health")
    async def health():
        return PlainTextResponse("ok")

    return app


# ---------------------------------------------------------------------------------------------- server
def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0 = a free one), bound before uvicorn starts so that the printed link works."""
    info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(info[0], socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(info[4])
    sock.listen(512)
    return sock


def uvicorn_server(app, **kwargs):
    """uvicorn without an access log: a request's URL can hold a token."""
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, **kwargs))
