"""The FastAPI app: ``build_app(pipe, ...)`` registers this module's handlers and keeps its settings and counters
in ``app.state.mmspec`` (a ``ServerState``), where every handler finds them.

A chat completion is validated (``protocol``), its image loaded (``images``), its prompt rendered with the
target's chat template and submitted to the pipeline's shared engine; the first round is awaited before any
response, so a request the engine refuses is still an HTTP error. Then the rounds become one JSON answer or a
stream of server-sent events, both built by ``_Reply``.

FastAPI itself is imported in ``build_app`` (Starlette, which it is built on, is light), so ``mmspec serve --help``
stays fast. No ``from __future__ import annotations``: FastAPI reads the handlers' annotations.
"""

import hmac
import json
import os
import queue
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from mmspec.errors import MMSpecError
from mmspec.server.images import request_image
from mmspec.server.protocol import (APIError, AnswerText, ChatRequest, bad_request, error_body, finish_reason,
                                    parse_chat_request, refused, tokens_through_stop)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
BUNDLED_MODEL_ID = "mmspec-bundled"
MAX_BODY_BYTES = 16 * 2**20
MAX_IMAGE_BYTES = 10 * 2**20
REMOTE_TIMEOUT_S = 10.0
POLL_S = 0.25                     # how often a waiting request checks that its client is still there
DONE = "data: [DONE]\n\n"


@dataclass(frozen=True)
class ServerConfig:
    """What ``build_app`` serves and how strictly; ``mmspec serve``'s flags map onto it by keyword."""

    model_id: str
    api_key: str | None = None
    allow_remote_images: bool = False
    max_body_bytes: int = MAX_BODY_BYTES
    max_image_bytes: int = MAX_IMAGE_BYTES
    remote_timeout_s: float = REMOTE_TIMEOUT_S

    def __post_init__(self):
        if not isinstance(self.model_id, str) or not self.model_id.strip():
            raise MMSpecError("the served model id must be a non-empty string")
        for name in ("max_body_bytes", "max_image_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MMSpecError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.remote_timeout_s, (int, float)) or not self.remote_timeout_s > 0:
            raise MMSpecError(f"remote_timeout_s must be a positive number, got {self.remote_timeout_s!r}")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key):
            raise MMSpecError("api_key must be a non-empty string or None")


def served_model_id(pipe) -> str:
    """The id clients name: ``mmspec-bundled`` for the bundled pair, a local target's folder name, or its hub id."""
    from mmspec.pipeline import BUNDLED_TARGET

    name = str(getattr(pipe.target.config, "_name_or_path", "") or getattr(pipe.target, "name_or_path", ""))
    if name and os.path.isdir(name):
        path = Path(name).resolve()
        return BUNDLED_MODEL_ID if path == BUNDLED_TARGET.resolve() else path.name
    return name or "mmspec"


def _sampling_defaults(pipe) -> dict:
    """What a request that does not say gets: the target's generation_config sampling (greedy when it does not
    sample, as for the bundled pair and llava-1.5), and answers up to the context's end."""
    cfg = pipe.target.generation_config
    out = {"max_new_tokens": int(pipe.adapter.context_length), "temperature": 0.0, "top_p": 1.0}
    if getattr(cfg, "do_sample", False):
        out["temperature"] = float(getattr(cfg, "temperature", None) or 1.0)
        out["top_p"] = float(getattr(cfg, "top_p", None) or 1.0)
    return out


def stats_extra(stats, drafter_kind: str) -> dict:
    """mmspec's extra response field: how the answer was made."""
    return {"drafter_kind": drafter_kind, "target_forwards": stats.target_forwards,
            "draft_forwards": stats.draft_forwards, "drafted_tokens": stats.drafted_tokens,
            "accepted_tokens": stats.accepted_tokens, "mean_accepted": round(stats.mean_accepted, 4),
            "acceptance_rate": round(stats.acceptance_rate, 4), "wall_s": round(stats.wall_s, 4),
            "time_to_first_token_s": round(stats.time_to_first_token_s, 4),
            "vision_cache_hit": stats.vision_cache_hit}


class _ClientGone(Exception):
    pass


def _failed(result) -> APIError:
    """The error of a request the engine failed while running it."""
    message = result.error or "the request failed"
    # the engine keeps only "<exception type>: <message>", so the type is read back from the text
    if message.startswith("MMSpecError: "):
        return bad_request(message[len("MMSpecError: "):], None, "invalid_value")
    return APIError(500, f"the engine failed on this request: {message}", None, None, "server_error")


@dataclass
class ServerState:
    """What the running app keeps: its settings and counters (``app.state.mmspec``; tests read them)."""

    pipe: Any
    config: ServerConfig
    model_ids: tuple[str, ...]
    defaults: dict
    image_token: str | None = None   # the target's image placeholder, refused in a message's text
    created: int = field(default_factory=lambda: int(time.time()))
    in_flight: set = field(default_factory=set)
    disconnects: int = 0          # requests whose client went away before the answer was done
    requests: int = 0
    limiter: Any = None           # anyio.CapacityLimiter for the threads that wait on engine events

    def model_card(self) -> dict:
        return {"id": self.config.model_id, "object": "model", "created": self.created, "owned_by": "mmspec",
                "drafter_kind": self.pipe.drafter_kind}

    def render_prompt(self, messages: list[dict]) -> str:
        try:
            return self.pipe.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # a template that refuses a role or an order of turns
            raise bad_request(f"the model's chat template refuses these messages: {type(e).__name__}: {e}",
                              "messages", "invalid_value") from None

    def submit(self, image, prompt: str, settings: dict):
        try:
            return self.pipe.submit(image, prompt, raw_prompt=True, **settings)
        except MMSpecError as e:
            raise refused(e) from None

    async def next_round(self, job, request: Request | None):
        """The job's next engine event; with ``request``, a client that went away raises ``_ClientGone``. A
        request the engine failed raises its ``APIError``."""
        if self.limiter is None:
            self.limiter = anyio.CapacityLimiter(4096)
        while True:
            if request is not None and await request.is_disconnected():
                raise _ClientGone()
            try:
                event = await anyio.to_thread.run_sync(job.events.get, True, POLL_S, abandon_on_cancel=True,
                                                       limiter=self.limiter)
            except queue.Empty:
                continue
            if event.done and event.result.error:
                raise _failed(event.result)
            return event

    def release(self, job) -> None:
        """The request is over: a row still running (client gone) leaves the batch at the next round."""
        if not job.done and not job.cancelled:
            job.cancelled = True
            self.disconnects += 1
        self.in_flight.discard(id(job))


@dataclass
class _Reply:
    """One answer in the making: ``payload`` builds the plain response and every streamed chunk alike."""

    state: ServerState
    job: Any
    chat: ChatRequest
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex[:24]}")
    created: int = field(default_factory=lambda: int(time.time()))
    answer: AnswerText = field(init=False)

    def __post_init__(self):
        self.answer = AnswerText(self.chat.stops)

    def payload(self, object: str, choices: list[dict], **extra) -> dict:
        return {"id": self.id, "object": object, "created": self.created, "model": self.state.config.model_id,
                "system_fingerprint": None, "choices": choices, **extra}

    def chunk(self, delta: dict | None, finish: str | None = None, **extra) -> str:
        """One server-sent event; ``delta=None`` is the usage chunk, which has no choices."""
        choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        return f"data: {json.dumps(self.payload('chat.completion.chunk', choices, **extra))}\n\n"

    def outcome(self, event) -> tuple[str, dict, dict]:
        """The finished answer's finish_reason, usage and mmspec stats; a stopped answer's row leaves the batch."""
        if self.answer.stopped:
            self.job.cancelled = True
            completion = tokens_through_stop(self.state.pipe.adapter.decode, event.token_ids, self.chat.stops)
        else:
            completion = len(event.token_ids)
        prompt_tokens = len(self.job.request.prompt_ids)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                 "total_tokens": prompt_tokens + completion}
        return (finish_reason(event.stats.stop_reason, self.answer.stopped), usage,
                stats_extra(event.stats, self.state.pipe.drafter_kind))


async def _stream(reply: _Reply, event):
    """The answer as server-sent events, from the first round's ``event`` to ``data: [DONE]``."""
    yield reply.chunk({"role": "assistant", "content": ""})
    try:
        while True:
            delta = reply.answer.update(event.text, event.done)
            if delta:
                yield reply.chunk({"content": delta})
            if event.done or reply.answer.stopped:
                break
            event = await reply.state.next_round(reply.job, None)   # Starlette notices a client that goes away
    except APIError as err:   # the status line has gone out: the error travels as the last event
        yield f"data: {json.dumps(err.body())}\n\n"
        yield DONE
        return
    finish, usage, stats = reply.outcome(event)
    yield reply.chunk({}, finish, mmspec=stats)
    if reply.chat.include_usage:
        yield reply.chunk(None, usage=usage, mmspec=stats)
    yield DONE


class _JobStream(StreamingResponse):
    """Server-sent events; whatever ends the stream (done, client gone, error) releases the job's row."""

    def __init__(self, content, on_close):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            self.on_close()


# ----------------------------------------------------------------------------------------------------------
# handlers
# ----------------------------------------------------------------------------------------------------------
async def health(request: Request):
    state: ServerState = request.app.state.mmspec
    return {"status": "ok", "model": state.config.model_id, "drafter_kind": state.pipe.drafter_kind,
            "device": str(state.pipe.adapter.device), "requests_in_flight": len(state.in_flight)}


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
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            if n > 8 * limit or (size.isdigit() and int(size) > 8 * limit):
                raise too_big   # stop reading a huge upload: the connection closes
            continue            # read the rest so that the client hears the 413 instead of a reset
        chunks.append(chunk)
    if n > limit:
        raise too_big
    try:
        return json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON ({e})", None, "invalid_json") from None


async def chat_completions(request: Request):
    state: ServerState = request.app.state.mmspec
    body = await _read_json(request, state.config.max_body_bytes)
    chat = parse_chat_request(body, state.model_ids, state.image_token, state.defaults)
    image = await run_in_threadpool(request_image, chat.image_url, state.config)
    prompt = state.render_prompt(chat.messages)
    job = await run_in_threadpool(state.submit, image, prompt, chat.settings)
    state.requests += 1
    state.in_flight.add(id(job))
    reply = _Reply(state, job, chat)
    streaming = False
    try:
        # the first round comes before any response, so a request the engine refuses is still an HTTP error
        event = await state.next_round(job, request)
        if chat.stream:
            streaming = True
            return _JobStream(_stream(reply, event), on_close=lambda: state.release(job))
        reply.answer.update(event.text, event.done)
        while not (event.done or reply.answer.stopped):
            event = await state.next_round(job, request)
            reply.answer.update(event.text, event.done)
        finish, usage, stats = reply.outcome(event)
        message = {"role": "assistant", "content": reply.answer.final, "refusal": None}
        return reply.payload("chat.completion", [{"index": 0, "message": message, "logprobs": None,
                                                  "finish_reason": finish}], usage=usage, mmspec=stats)
    except _ClientGone:
        return JSONResponse(error_body("the client went away", "invalid_request_error", None, "client_gone"),
                            status_code=499)
    finally:
        if not streaming:
            state.release(job)


async def _api_error(request: Request, exc: APIError):
    return JSONResponse(exc.body(), status_code=exc.status)


async def _http_error(request: Request, exc: StarletteHTTPException):
    message = {404: f"no such endpoint: {request.method} {request.url.path}",
               405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code,
                                                                                       str(exc.detail))
    return JSONResponse(error_body(message, "invalid_request_error", None, None), status_code=exc.status_code)


async def _server_error(request: Request, exc: Exception):
    return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"), 500)


class BearerAuth:
    """ASGI middleware: every HTTP request needs ``Authorization: Bearer <api_key>`` (401 otherwise)."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                message = ("this server needs an API key: send Authorization: Bearer <key>" if not given else
                           "the API key is not valid")
                response = JSONResponse(error_body(message, "invalid_request_error", None, "invalid_api_key"),
                                        status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(pipe, api_key: str | None = None, allow_remote_images: bool = False, model_id: str | None = None,
              max_body_bytes: int = MAX_BODY_BYTES, max_image_bytes: int = MAX_IMAGE_BYTES,
              remote_timeout_s: float = REMOTE_TIMEOUT_S):
    """A FastAPI app serving ``pipe`` with OpenAI's chat-completions protocol (see ``mmspec.server``).

    ``api_key``: every request must carry ``Authorization: Bearer <api_key>`` (401 otherwise). ``model_id``:
    the id served (default: ``served_model_id(pipe)``); requests name it, or the target's path or hub id.
    """
    from fastapi import FastAPI

    config = ServerConfig(model_id=model_id or served_model_id(pipe), api_key=api_key or None,
                          allow_remote_images=allow_remote_images, max_body_bytes=max_body_bytes,
                          max_image_bytes=max_image_bytes, remote_timeout_s=remote_timeout_s)
    aliases = {config.model_id, str(getattr(pipe.target.config, "_name_or_path", "") or config.model_id)}
    state = ServerState(pipe=pipe, config=config, model_ids=(config.model_id, *sorted(aliases - {config.model_id})),
                        defaults=_sampling_defaults(pipe), image_token=getattr(pipe.processor, "image_token", None))

    app = FastAPI(title="mmspec", description="OpenAI-compatible chat completions with lossless speculative "
                  "decoding", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.mmspec = state
    if config.api_key:
        app.add_middleware(BearerAuth, api_key=config.api_key)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _server_error)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/v1/models", list_models, methods=["GET"])
    app.add_api_route("/v1/models/{model:path}", get_model, methods=["GET"])
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    return app
