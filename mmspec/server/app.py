"""The FastAPI app: ``build_app(pipe, ...)`` serves one pipeline in this process; ``backend_app(backend,
config)`` serves any backend (``mmspec.server.replicas`` passes its Ray Serve replicas). The app keeps its
settings, counters and metrics in ``app.state.mmspec`` (a ``ServerState``), where every handler finds them.

A chat completion is validated (``protocol``), admitted (or refused with 503 past ``--max-waiting``), and handed
to the backend, which answers in *pieces* (``backend``); the first piece is awaited before any response, so a
request the engine refuses is still an HTTP error. Then the pieces become one JSON answer or a stream of
server-sent events, both built by ``_Reply``. ``_Call`` follows one request from admission to its end: the
client going away, ``--request-timeout`` and the answer's end all pass through its ``close``, which stops the
job (its row leaves the batch at the next round) and records the request in the metrics.

FastAPI itself is imported in ``backend_app`` (Starlette, which it is built on, is light), so ``mmspec serve
--help`` stays fast. No ``from __future__ import annotations``: FastAPI reads the handlers' annotations.
"""

import asyncio
import dataclasses
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import anyio
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from mmspec.server.backend import BUNDLED_MODEL_ID, LocalBackend, served_model_id  # noqa: F401 (re-exported)
from mmspec.server.config import (DEFAULT_HOST, DEFAULT_PORT, MAX_BODY_BYTES, MAX_IMAGE_BYTES, MAX_IMAGES,  # noqa: F401
                                  REMOTE_TIMEOUT_S, ServerConfig)
from mmspec.server.metrics import ServerMetrics
from mmspec.server.protocol import APIError, ChatRequest, bad_request, error_body, parse_chat_request, unavailable

POLL_S = 0.25                     # how often a waiting request checks that its client is still there
DONE = "data: [DONE]\n\n"
LOG = logging.getLogger("uvicorn.error")   # the server's own log, at uvicorn's --log-level


class _ClientGone(Exception):
    pass


class _BodyDropped(Exception):
    """The client went away in the middle of sending the request body."""

    def __init__(self, received: int, expected: str):
        super().__init__(f"{received} of {expected or 'unknown'} bytes")
        self.received, self.expected = received, expected


def bearer_matches(header: bytes | str | None, api_key: str) -> bool:
    """``Authorization: Bearer <api_key>``, the scheme name in any case (RFC 9110), compared in constant time."""
    if not header:
        return False
    raw = header.encode("latin-1") if isinstance(header, str) else header
    scheme, _, token = raw.strip().partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), api_key.encode())


@dataclass
class ServerState:
    """What the running app keeps: its backend, settings, counters and metrics (``app.state.mmspec``)."""

    backend: Any
    config: ServerConfig            # model_id resolved
    model_ids: tuple[str, ...]
    card: dict                      # the backend's model card (``backend.model_card``)
    created: int = field(default_factory=lambda: int(time.time()))
    in_flight: set = field(default_factory=set)   # the ``_Call`` of every admitted request not yet over
    disconnects: int = 0            # requests whose client went away before the answer was done
    requests: int = 0               # requests admitted
    draining: bool = False          # shutting down: new requests get 503, /health says so
    metrics: Any = None

    @property
    def pipe(self):
        return getattr(self.backend, "pipe", None)

    @property
    def capacity(self) -> int:
        return int(self.backend.capacity)

    def load(self) -> tuple[int, int, list[dict]]:
        """Requests decoding (up to the rows of the batches), requests waiting beyond them, replica snapshots."""
        n, cap = len(self.in_flight), self.capacity
        return min(n, cap), max(0, n - cap), self.backend.replicas()

    def model_card(self) -> dict:
        return {"id": self.config.model_id, "object": "model", "created": self.created, "owned_by": "mmspec",
                "drafter_kind": self.card["drafter_kind"]}

    def authorized(self, request: Request) -> bool:
        return not self.config.api_key or bearer_matches(request.headers.get("authorization"), self.config.api_key)

    def admit(self) -> None:
        """Refuse a request (503, ``Retry-After``) while draining, or when ``max_waiting`` requests already wait
        beyond the rows of the batches."""
        if self.draining:
            raise unavailable("the server is shutting down; retry on another instance", "shutting_down", 5)
        bound = self.config.max_waiting
        if bound is not None and len(self.in_flight) - self.capacity >= bound:
            raise unavailable(f"the server is at capacity ({self.capacity} requests decoding and {bound} waiting, "
                              f"--max-waiting); retry shortly", "queue_full")


@dataclass
class _Reply:
    """One answer's envelope: ``payload`` builds the plain response and every streamed chunk alike."""

    state: ServerState
    chat: ChatRequest
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex[:24]}")
    created: int = field(default_factory=lambda: int(time.time()))

    def payload(self, object: str, choices: list[dict], **extra) -> dict:
        return {"id": self.id, "object": object, "created": self.created, "model": self.state.config.model_id,
                "system_fingerprint": None, "choices": choices, **extra}

    def chunk(self, delta: dict | None, finish: str | None = None, **extra) -> str:
        """One server-sent event; ``delta=None`` is the usage chunk, which has no choices."""
        choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        return f"data: {json.dumps(self.payload('chat.completion.chunk', choices, **extra))}\n\n"


async def _next_piece(pieces) -> dict:
    try:
        return await pieces.__anext__()
    except StopAsyncIteration:
        raise APIError(500, "the answer ended before its last piece", None, None, "server_error") from None


class _Call:
    """One admitted request: its backend pieces, its deadline and timings, and how it ended."""

    def __init__(self, state: ServerState, chat: ChatRequest, t0: float):
        self.state, self.chat, self.t0 = state, chat, t0
        self.pieces = state.backend.answer(chat)
        self.task: asyncio.Task | None = None
        timeout = state.config.request_timeout_s
        self.deadline = None if timeout is None else t0 + timeout
        self.first_s: float | None = None       # time to the first piece (the first round's tokens)
        self.end_s: float | None = None
        self.outcome: str | None = None
        self.usage: dict | None = None
        self.closed = False

    async def next(self, request: Request | None = None) -> dict:
        """The next piece; with ``request``, a client that goes away raises ``_ClientGone``. Past the deadline:
        the 504 ``request_timeout`` error."""
        if self.task is None:
            self.task = asyncio.ensure_future(_next_piece(self.pieces))
        while True:
            wait = POLL_S
            if self.deadline is not None:
                left = self.deadline - time.perf_counter()
                if left <= 0:
                    limit = self.state.config.request_timeout_s
                    raise APIError(504, f"the request ran past this server's limit of {limit:g} s "
                                        f"(--request-timeout); it was stopped", None, "request_timeout",
                                   "server_error")
                wait = min(wait, left)
            done, _ = await asyncio.wait({self.task}, timeout=wait)
            if done:
                break
            if request is not None and await request.is_disconnected():
                raise _ClientGone()
        task, self.task = self.task, None
        piece = task.result()
        if self.first_s is None:
            self.first_s = time.perf_counter() - self.t0
        self.state.metrics.spec(piece.get("spec"))
        return piece

    def finish(self, piece: dict) -> None:
        self.outcome, self.usage, self.end_s = piece["finish"], piece["usage"], time.perf_counter() - self.t0

    def fail(self, err: APIError) -> None:
        self.outcome = ("timeout" if err.code == "request_timeout" else "failed" if err.status >= 500
                        else "invalid")

    async def close(self) -> None:
        """The request is over: stop its job if it still runs (its row leaves the batch at the next round) and
        record it. Shielded: this runs when a cancelled stream is being torn down too."""
        if self.closed:
            return
        self.closed = True
        if self.outcome is None:
            self.outcome = "client_gone"
            self.state.disconnects += 1
        with anyio.CancelScope(shield=True):
            if self.task is not None:
                self.task.cancel()
                await asyncio.wait({self.task})
                if not self.task.cancelled():
                    self.task.exception()    # retrieved: a failure after the client left is not worth a log line
                self.task = None
            await self.pieces.aclose()
        self.state.in_flight.discard(self)
        e2e = self.end_s if self.end_s is not None else time.perf_counter() - self.t0
        self.state.metrics.finished(self.outcome, e2e, self.first_s, self.usage)


async def _stream(reply: _Reply, call: _Call, piece: dict):
    """The answer as server-sent events, from the first ``piece`` to ``data: [DONE]``."""
    yield reply.chunk({"role": "assistant", "content": ""})
    try:
        while True:
            if piece["delta"]:
                yield reply.chunk({"content": piece["delta"]})
            if piece["done"]:
                break
            piece = await call.next(None)   # Starlette notices a client that goes away
    except APIError as err:   # the status line has gone out: the error travels as the last event
        call.fail(err)
        yield f"data: {json.dumps(err.body())}\n\n"
        yield DONE
        return
    call.finish(piece)
    yield reply.chunk({}, piece["finish"], mmspec=piece["mmspec"])
    if reply.chat.include_usage:
        yield reply.chunk(None, usage=piece["usage"], mmspec=piece["mmspec"])
    yield DONE


class _CallStream(StreamingResponse):
    """Server-sent events; whatever ends the stream (done, client gone, error, timeout) closes the call."""

    def __init__(self, content, call: _Call):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.call = call

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        except ClientDisconnect:
            pass      # the client went away mid-stream: close() counts it, nothing to log
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
                await self.call.close()


# ----------------------------------------------------------------------------------------------------------
# handlers
# ----------------------------------------------------------------------------------------------------------
async def health(request: Request):
    """Liveness and readiness without the API key (as vLLM's): the details only for a caller who may see them."""
    state: ServerState = request.app.state.mmspec
    status = "draining" if state.draining else "ok"
    body: dict = {"status": status}
    if state.authorized(request):
        body.update(model=state.config.model_id, drafter_kind=state.card["drafter_kind"], device=state.card["device"],
                    requests_in_flight=len(state.in_flight), replicas=state.backend.replica_count)
    return JSONResponse(body, status_code=503 if state.draining else 200)


async def metrics(request: Request):
    from prometheus_client import CONTENT_TYPE_LATEST

    body = await anyio.to_thread.run_sync(request.app.state.mmspec.metrics.render)
    return Response(body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def list_models(request: Request):
    return {"object": "list", "data": [request.app.state.mmspec.model_card()]}


async def get_model(model: str, request: Request):
    state: ServerState = request.app.state.mmspec
    if model not in state.model_ids:
        raise APIError(404, f"the model {model!r} does not exist here; this server serves "
                            f"{state.config.model_id!r}", "model", "model_not_found")
    return state.model_card()


async def _read_json(request: Request, limit: int):
    size = request.headers.get("content-length", "")
    too_big = APIError(413, f"the request body is over the limit of {limit} bytes (images count at 4/3 of their "
                            f"size in base64)", None, "request_too_large")
    chunks, n = [], 0
    try:
        async for chunk in request.stream():
            n += len(chunk)
            if n > limit:
                if n > 8 * limit or (size.isdigit() and int(size) > 8 * limit):
                    raise too_big   # stop reading a huge upload: the connection closes
                continue            # read the rest so that the client hears the 413 instead of a reset
            chunks.append(chunk)
    except ClientDisconnect:
        raise _BodyDropped(n, size) from None
    if n > limit:
        raise too_big
    try:
        return json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON ({e})", None, "invalid_json") from None


async def chat_completions(request: Request):
    state: ServerState = request.app.state.mmspec
    t0 = time.perf_counter()
    try:
        body = await _read_json(request, state.config.max_body_bytes)
        chat = parse_chat_request(body, state.model_ids, state.card["image_token"], state.card["defaults"],
                                  state.config.max_images, state.card.get("takes_video", False))
        state.admit()
    except APIError as e:
        state.metrics.finished("rejected" if e.status == 503 else "invalid", time.perf_counter() - t0)
        raise
    except _BodyDropped:
        state.metrics.finished("client_gone", time.perf_counter() - t0)
        raise
    state.requests += 1
    call = _Call(state, chat, t0)
    state.in_flight.add(call)
    reply = _Reply(state, chat)
    streaming = False
    try:
        # the first piece comes before any response, so a request the engine refuses is still an HTTP error
        piece = await call.next(request)
        if chat.stream:
            streaming = True
            return _CallStream(_stream(reply, call, piece), call)
        while not piece["done"]:
            piece = await call.next(request)
        call.finish(piece)
        message = {"role": "assistant", "content": piece["text"], "refusal": None}
        return reply.payload("chat.completion", [{"index": 0, "message": message, "logprobs": None,
                                                  "finish_reason": piece["finish"]}],
                             usage=piece["usage"], mmspec=piece["mmspec"])
    except _ClientGone:
        return JSONResponse(error_body("the client went away", "invalid_request_error", None, "client_gone"),
                            status_code=499)
    except APIError as e:
        call.fail(e)
        raise
    except Exception:
        call.outcome = "failed"
        raise
    finally:
        if not streaming:
            await call.close()


async def _api_error(request: Request, exc: APIError):
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _body_dropped(request: Request, exc: _BodyDropped):
    client = f"{request.client.host}:{request.client.port}" if request.client else "a client"
    LOG.info("%s went away while sending the body of %s %s (%s); nothing was answered", client, request.method,
             request.url.path, exc)
    return Response(status_code=400)   # nobody is left to read it


async def _http_error(request: Request, exc: StarletteHTTPException):
    message = {404: f"no such endpoint: {request.method} {request.url.path}",
               405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code,
                                                                                       str(exc.detail))
    return JSONResponse(error_body(message, "invalid_request_error", None, None), status_code=exc.status_code)


async def _server_error(request: Request, exc: Exception):
    return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"), 500)


def _route_path(scope) -> str:
    """The path the app routes on (behind Ray Serve's route prefix, ``root_path`` is not part of it)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] or "/" if root and path.startswith(root) else path


class BearerAuth:
    """ASGI middleware: HTTP requests need ``Authorization: Bearer <api_key>`` (401 otherwise), except on
    ``open_paths``."""

    def __init__(self, app, api_key: str, open_paths: frozenset = frozenset({"/health"})):
        self.app, self.api_key, self.open_paths = app, api_key, open_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and _route_path(scope) not in self.open_paths:
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not bearer_matches(given, self.api_key):
                message = ("this server needs an API key: send Authorization: Bearer <key>" if not given else
                           "the API key is not valid")
                response = JSONResponse(error_body(message, "invalid_request_error", None, "invalid_api_key"),
                                        status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def backend_app(backend, config: ServerConfig):
    """A FastAPI app serving ``backend`` (a ``LocalBackend``, or the replicas' ingress backend) with OpenAI's
    chat-completions protocol, ``/health`` and ``/metrics``."""
    from fastapi import FastAPI

    card = backend.card
    config = dataclasses.replace(config, model_id=config.model_id or card["model_id"])
    aliases = [a for a in (card["model_id"], *card["aliases"]) if a != config.model_id]
    if config.model_id != card["model_id"]:   # a --served-model-name replaces the default id, not the path
        aliases = [a for a in aliases if a != card["model_id"]]
    state = ServerState(backend=backend, config=config, model_ids=(config.model_id, *aliases), card=card)
    state.metrics = ServerMetrics(config.model_id, state.load)

    app = FastAPI(title="mmspec", description="OpenAI-compatible chat completions with lossless speculative "
                  "decoding", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.mmspec = state
    if config.api_key:
        open_paths = {"/health"} | ({"/metrics"} if config.metrics_public else set())
        app.add_middleware(BearerAuth, api_key=config.api_key, open_paths=frozenset(open_paths))
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(_BodyDropped, _body_dropped)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _server_error)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
    app.add_api_route("/v1/models", list_models, methods=["GET"])
    app.add_api_route("/v1/models/{model:path}", get_model, methods=["GET"])
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    return app


def build_app(pipe, api_key: str | None = None, allow_remote_images: bool = False, model_id: str | None = None,
              max_body_bytes: int = MAX_BODY_BYTES, max_image_bytes: int = MAX_IMAGE_BYTES,
              remote_timeout_s: float = REMOTE_TIMEOUT_S, max_waiting: int | None = None,
              request_timeout_s: float | None = None, metrics_public: bool = False, max_images: int = MAX_IMAGES):
    """A FastAPI app serving ``pipe`` in this process with OpenAI's chat-completions protocol (see
    ``mmspec.server``); the keywords are ``ServerConfig``'s.

    ``api_key``: ``/v1/*`` and ``/metrics`` need ``Authorization: Bearer <api_key>`` (401 otherwise; ``/health``
    is open, ``metrics_public`` opens ``/metrics``). ``model_id``: the id served (default:
    ``served_model_id(pipe)``); requests name it, or the target's path or hub id. ``max_waiting``: requests past
    the engine's batch that may wait (more: 503). ``request_timeout_s``: a longer request is stopped (504).
    ``max_images``: image parts one request may hold (more: 400).
    """
    config = ServerConfig(model_id=model_id, api_key=api_key or None, allow_remote_images=allow_remote_images,
                          max_body_bytes=max_body_bytes, max_image_bytes=max_image_bytes,
                          remote_timeout_s=remote_timeout_s, max_waiting=max_waiting,
                          request_timeout_s=request_timeout_s, metrics_public=metrics_public,
                          max_images=max_images)
    return backend_app(LocalBackend(pipe, config), config)
