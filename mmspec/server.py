"""An OpenAI-compatible HTTP server on the batched engine: ``mmspec serve [--host 127.0.0.1] [--port 8000]``.

Endpoints: ``POST /v1/chat/completions`` (OpenAI's chat format with one image per request, as a ``data:`` URL;
``http(s)`` URLs only with ``--allow-remote-images``; ``stream: true`` as server-sent events ending with
``data: [DONE]``), ``GET /v1/models``, ``GET /v1/models/{id}`` and ``GET /health``.

Every request becomes one ``pipe.submit(...)`` on the pipeline's shared engine, so concurrent clients share
one continuous batch; the answer is the text ``pipe.generate`` gives for the same image and prompt (greedy:
the target's own output). The prompt is the whole conversation (system, user and assistant turns) rendered
with the target's chat template, the image where its ``image_url`` part is. A client that goes away, or an
answer that reaches a ``stop`` string, frees its row at the next round (``job.cancelled``).

Bad input gets OpenAI's error object ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status
and never stops the server. Safe by default: binds 127.0.0.1, and ``--api-key`` (or ``MMSPEC_API_KEY``)
makes every request need ``Authorization: Bearer <key>``.

``mmspec serve --load-test`` (also ``python -m mmspec.server --load-test``) measures throughput and latency
percentiles at 1, 4 and 16 concurrent clients on loopback, drafting on and off, and prints a markdown table.

Heavy imports (torch, transformers, fastapi, uvicorn) happen inside functions, so ``mmspec --help`` stays fast
(and this module has no ``from __future__ import annotations``: FastAPI reads the endpoints' annotations, whose
classes are imported inside ``build_app``).
"""


import argparse
import base64
import binascii
import hmac
import ipaddress
import json
import os
import queue
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmspec.errors import MMSpecError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
API_KEY_ENV = "MMSPEC_API_KEY"
BUNDLED_MODEL_ID = "mmspec-bundled"
MAX_BODY_BYTES = 16 * 2**20
MAX_IMAGE_BYTES = 10 * 2**20
REMOTE_TIMEOUT_S = 10.0
MAX_STOP_STRINGS = 4              # as OpenAI
MAX_TEMPERATURE = 2.0             # as OpenAI
POLL_S = 0.25                     # how often a waiting request checks that its client is still there
INTERRUPT_HINT = "the server stopped"

# OpenAI parameters this server does not implement, with the values that mean "not used"
UNSUPPORTED = {"logprobs": (None, False), "top_logprobs": (None, 0), "tools": (None, []), "functions": (None, []),
               "tool_choice": (None, "none"), "function_call": (None, "none"), "logit_bias": (None, {}),
               "frequency_penalty": (None, 0, 0.0), "presence_penalty": (None, 0, 0.0), "audio": (None,),
               "prediction": (None,), "modalities": (None, ["text"])}


# ----------------------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------------------
class APIError(Exception):
    """A request refused with OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


# ----------------------------------------------------------------------------------------------------------
# settings and parsed requests
# ----------------------------------------------------------------------------------------------------------
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


@dataclass
class ChatRequest:
    """A validated ``/v1/chat/completions`` body."""

    messages: list[dict]          # chat-template messages: {"role", "content": [{"type": "text"|"image"}...]}
    image_url: str
    settings: dict                # pipe.submit keywords: max_new_tokens, temperature, top_p, seed, ...
    stream: bool = False
    include_usage: bool = False
    stops: list[str] = field(default_factory=list)


def _number(body: dict, name: str, lo: float, hi: float, lo_open: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise _bad(f"{name} must be a number, got {value!r}", name, "invalid_type")
    if value < lo or (lo_open and value == lo) or value > hi:
        raise _bad(f"{name} must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {value!r}", name,
                   "invalid_value")
    return float(value)


def _integer(body: dict, name: str, lo: int, hi: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"{name} must be an integer, got {value!r}", name, "invalid_type")
    if value < lo or (hi is not None and value > hi):
        bound = f"at least {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise _bad(f"{name} must be {bound}, got {value}", name, "invalid_value")
    return value


def _parse_stop(value) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _bad("stop must be a string or a list of strings", "stop", "invalid_type")
    if len(stops) > MAX_STOP_STRINGS:
        raise _bad(f"stop holds {len(stops)} strings; at most {MAX_STOP_STRINGS} are allowed", "stop",
                   "invalid_value")
    if any(not s for s in stops):
        raise _bad("stop strings must not be empty", "stop", "invalid_value")
    return list(dict.fromkeys(stops))


def _parse_messages(messages, image_token: str | None) -> tuple[list[dict], str]:
    """Chat-template messages and the one image's URL, or an ``APIError`` naming the part that is wrong."""
    if messages is None:
        raise _bad("messages is required: a list of {role, content} objects", "messages", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list of {role, content} objects", "messages", "invalid_value")
    out, images, has_text = [], [], False
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(f"{where} must be an object with role and content", where, "invalid_type")
        role = m.get("role")
        role = "system" if role == "developer" else role
        if role not in ("system", "user", "assistant"):
            raise _bad(f"{where}.role must be system, developer, user or assistant, got {m.get('role')!r} "
                       f"(tool messages are not supported)", f"{where}.role", "invalid_value")
        if m.get("tool_calls") or m.get("function_call"):
            raise _bad(f"{where}: tool calls are not supported", where, "unsupported_parameter")
        content = m.get("content")
        parts: list[dict] = []
        if content is None:
            if role != "assistant":
                raise _bad(f"{where}.content is required", f"{where}.content", "missing_required_parameter")
        elif isinstance(content, str):
            parts.append({"type": "text", "text": content})
        elif isinstance(content, list):
            for j, part in enumerate(content):
                pwhere = f"{where}.content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    text = part.get("text")
                    if not isinstance(text, str):
                        raise _bad(f"{pwhere}.text must be a string", f"{pwhere}.text", "invalid_type")
                    parts.append({"type": "text", "text": text})
                elif kind == "image_url":
                    if role != "user":
                        raise _bad(f"{pwhere}: images belong in user messages", pwhere, "invalid_value")
                    ref = part.get("image_url")
                    url = ref.get("url") if isinstance(ref, dict) else ref
                    if not isinstance(url, str) or not url:
                        raise _bad(f"{pwhere}.image_url.url must be a string (a data: URL)", f"{pwhere}.image_url",
                                   "invalid_type")
                    images.append((pwhere, url))
                    parts.append({"type": "image"})
                else:
                    raise _bad(f"{pwhere}: content parts must be of type text or image_url, got {kind!r}", pwhere,
                               "invalid_value")
        else:
            raise _bad(f"{where}.content must be a string or a list of parts", f"{where}.content", "invalid_type")
        for p in parts:
            if p["type"] != "text":
                continue
            if image_token and image_token in p["text"]:
                raise _bad(f"{where}: the text holds the model's image token {image_token!r}; send the image as an "
                           f"image_url part instead", where, "invalid_value")
            has_text = has_text or (role == "user" and bool(p["text"].strip()))
        out.append({"role": role, "content": parts})
    if not images:
        raise _bad("the request has no image: add one {\"type\": \"image_url\", \"image_url\": {\"url\": "
                   "\"data:image/png;base64,...\"}} part to a user message", "messages", "missing_image")
    if len(images) > 1:
        raise _bad(f"the request has {len(images)} images ({', '.join(w for w, _ in images)}); this server takes "
                   f"exactly one image per request", "messages", "too_many_images")
    if not has_text:
        raise _bad("the user messages hold no text; ask something about the image, e.g. 'Describe the image.'",
                   "messages", "empty_prompt")
    return out, images[0][1]


def parse_chat_request(body, model_ids: tuple[str, ...], image_token: str | None = None,
                       defaults: dict | None = None) -> ChatRequest:
    """Validate a chat-completions body (already JSON-decoded) into a ``ChatRequest``, or raise ``APIError``."""
    if not isinstance(body, dict):
        raise _bad(f"the request body must be a JSON object, got {type(body).__name__}", None, "invalid_type")
    model = body.get("model")
    if model is None:
        raise _bad(f"model is required; this server serves {model_ids[0]!r}", "model", "missing_required_parameter")
    if model not in model_ids:
        raise APIError(404, f"the model {model!r} does not exist here; this server serves {model_ids[0]!r} "
                            f"(GET /v1/models)", "model", "model_not_found")
    messages, image_url = _parse_messages(body.get("messages"), image_token)
    n = _integer(body, "n", 1)
    if n is not None and n != 1:
        raise _bad(f"n must be 1 (one choice per request), got {n}", "n", "invalid_value")
    for name, neutral in UNSUPPORTED.items():
        if name in body and body[name] not in neutral:
            raise _bad(f"{name} is not supported by this server", name, "unsupported_parameter")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise _bad("response_format is not supported by this server (only {\"type\": \"text\"})", "response_format",
                   "unsupported_parameter")
    max_tokens = _integer(body, "max_tokens", 1)
    max_completion = _integer(body, "max_completion_tokens", 1)
    settings = dict(defaults or {})
    if max_completion is not None or max_tokens is not None:
        settings["max_new_tokens"] = max_completion if max_completion is not None else max_tokens
    temperature = _number(body, "temperature", 0.0, MAX_TEMPERATURE)
    if temperature is not None:
        settings["temperature"] = temperature
    top_p = _number(body, "top_p", 0.0, 1.0, lo_open=True)
    if top_p is not None:
        settings["top_p"] = top_p
    seed = body.get("seed")
    if seed is not None:
        settings["seed"] = _integer(body, "seed", 0, 2**64 - 1)
    k = body.get("num_draft_tokens")   # mmspec's own: a fixed draft length (None: adaptive)
    if k is not None:
        from mmspec.config import MAX_DRAFT_TOKENS

        settings["num_draft_tokens"] = _integer(body, "num_draft_tokens", 0, MAX_DRAFT_TOKENS)
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _bad(f"stream must be true or false, got {stream!r}", "stream", "invalid_type")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _bad("stream_options must be an object", "stream_options", "invalid_type")
    include_usage = bool((options or {}).get("include_usage", False))
    return ChatRequest(messages=messages, image_url=image_url, settings=settings, stream=bool(stream),
                       include_usage=include_usage, stops=_parse_stop(body.get("stop")))


# ----------------------------------------------------------------------------------------------------------
# images
# ----------------------------------------------------------------------------------------------------------
def decode_data_url(url: str, max_bytes: int) -> bytes:
    """The bytes of a base64 ``data:`` URL, or an ``APIError`` (400 malformed, 413 over ``max_bytes``)."""
    param = "messages"
    head, sep, data = url.partition(",")
    if not sep or ";base64" not in head.lower():
        raise _bad("the image data: URL must be base64, e.g. data:image/png;base64,iVBOR...", param, "invalid_image")
    data = "".join(data.split())
    if len(data) // 4 * 3 > max_bytes + 2:
        raise APIError(413, f"the image is about {len(data) // 4 * 3} bytes; the limit is {max_bytes} bytes",
                       param, "image_too_large")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise _bad(f"the image data: URL is not valid base64 ({e})", param, "invalid_image") from None
    if len(raw) > max_bytes:
        raise APIError(413, f"the image is {len(raw)} bytes; the limit is {max_bytes} bytes", param, "image_too_large")
    if not raw:
        raise _bad("the image data: URL holds no bytes", param, "invalid_image")
    return raw


def fetch_remote_image(url: str, max_bytes: int, timeout_s: float) -> bytes:
    """GET an ``http(s)`` image with a size limit and a timeout, or raise ``APIError``."""
    import httpx

    param = "messages"
    try:
        with httpx.Client(timeout=timeout_s, follow_redirects=True, max_redirects=3) as client:
            with client.stream("GET", url, headers={"Accept": "image/*"}) as resp:
                if resp.status_code != 200:
                    raise _bad(f"fetching the image {url!r} gave HTTP {resp.status_code}", param, "image_fetch_failed")
                size = resp.headers.get("content-length")
                if size and size.isdigit() and int(size) > max_bytes:
                    raise APIError(413, f"the image at {url!r} is {size} bytes; the limit is {max_bytes} bytes",
                                   param, "image_too_large")
                chunks, n, deadline = [], 0, time.monotonic() + timeout_s
                for chunk in resp.iter_bytes():
                    n += len(chunk)
                    if n > max_bytes:
                        raise APIError(413, f"the image at {url!r} is over the limit of {max_bytes} bytes", param,
                                       "image_too_large")
                    if time.monotonic() > deadline:
                        raise _bad(f"fetching the image {url!r} took over {timeout_s:g} s", param,
                                   "image_fetch_failed")
                    chunks.append(chunk)
                return b"".join(chunks)
    except httpx.HTTPError as e:
        raise _bad(f"cannot fetch the image {url!r}: {type(e).__name__}: {e}", param, "image_fetch_failed") from None


def image_bytes(url: str, config: ServerConfig) -> bytes:
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return decode_data_url(url, config.max_image_bytes)
    if scheme in ("http", "https"):
        if not config.allow_remote_images:
            raise _bad("remote image URLs are off on this server; send the image as a data: URL "
                       "(data:image/png;base64,...), or start it with --allow-remote-images", "messages",
                       "remote_images_disabled")
        return fetch_remote_image(url, config.max_image_bytes, config.remote_timeout_s)
    raise _bad(f"the image URL must be a data: URL{' or http(s)' if config.allow_remote_images else ''}, got "
               f"{url[:40]!r}", "messages", "invalid_image")


def data_url(image, mime: str = "image/png") -> str:
    """A ``data:`` URL for a path, bytes or ``PIL.Image`` (PNG), as clients send images."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        raw = path.read_bytes()
        mime = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}.get(path.suffix.lower(), mime)
    elif isinstance(image, (bytes, bytearray)):
        raw = bytes(image)
    else:
        import io

        buf = io.BytesIO()
        image.save(buf, format="PNG")
        raw = buf.getvalue()
    return f"data:{mime};base64,{base64.b64encode(raw).decode('ascii')}"


# ----------------------------------------------------------------------------------------------------------
# the answer's text: stop strings and what is safe to send yet
# ----------------------------------------------------------------------------------------------------------
class AnswerText:
    """The answer as rounds arrive: cut at the first ``stop`` string (which is not sent), with the tail that may
    still turn into a stop string, or an incomplete character (U+FFFD), held back until the end."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.sent = ""
        self.final = ""           # the whole answer, once done (or stopped)
        self.stopped = False

    def update(self, text: str, done: bool) -> str:
        """The new text to send, given the whole decoded text so far."""
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            text, self.stopped, done = text[:min(hits)], True, True
        if done:
            self.final = text
        safe = len(text)
        if not done:
            safe -= self._partial_stop(text)
            while safe > 0 and text[safe - 1] == "\ufffd":
                safe -= 1
        if safe <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta = text[len(self.sent):safe]
        self.sent = text[:safe]
        return delta

    def _partial_stop(self, text: str) -> int:
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best


def tokens_through_stop(decode, token_ids: list[int], stops: list[str]) -> int:
    """How many of ``token_ids`` it takes for the decoded text to reach a stop string (all when none is reached)."""
    n = len(token_ids)
    for _ in range(64):  # a stop is found in the round it appears, so only that round's tokens are walked back
        if n == 0 or not any(s in decode(token_ids[:n - 1]) for s in stops):
            break
        n -= 1
    return n


def finish_reason(stop_reason: str, stopped: bool) -> str:
    if stopped or stop_reason == "eos":
        return "stop"
    return "length"


# ----------------------------------------------------------------------------------------------------------
# the app
# ----------------------------------------------------------------------------------------------------------
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


@dataclass
class ServerState:
    """What the running app keeps: its settings and counters (``app.state.mmspec``; tests read them)."""

    pipe: Any
    config: ServerConfig
    model_ids: tuple[str, ...]
    defaults: dict
    created: int = field(default_factory=lambda: int(time.time()))
    in_flight: set = field(default_factory=set)
    disconnects: int = 0          # requests whose client went away before the answer was done
    requests: int = 0
    limiter: Any = None           # anyio.CapacityLimiter for the threads that wait on engine events

    def release(self, job) -> None:
        """The request is over: a row still running (client gone) leaves the batch at the next round."""
        if not job.done and not job.cancelled:
            job.cancelled = True
            self.disconnects += 1
        self.in_flight.discard(id(job))


def build_app(pipe, api_key: str | None = None, allow_remote_images: bool = False, model_id: str | None = None,
              max_body_bytes: int = MAX_BODY_BYTES, max_image_bytes: int = MAX_IMAGE_BYTES,
              remote_timeout_s: float = REMOTE_TIMEOUT_S):
    """A FastAPI app serving ``pipe`` with OpenAI's chat-completions protocol (see the module docstring).

    ``api_key``: every request must carry ``Authorization: Bearer <api_key>`` (401 otherwise). ``model_id``:
    the id served (default: ``served_model_id(pipe)``); requests name it, or the target's path or hub id.
    """
    import anyio
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from vision.images import load_image

    config = ServerConfig(model_id=model_id or served_model_id(pipe), api_key=api_key or None,
                          allow_remote_images=allow_remote_images, max_body_bytes=max_body_bytes,
                          max_image_bytes=max_image_bytes, remote_timeout_s=remote_timeout_s)
    aliases = {config.model_id, str(getattr(pipe.target.config, "_name_or_path", "") or config.model_id)}
    state = ServerState(pipe=pipe, config=config, model_ids=(config.model_id, *sorted(aliases - {config.model_id})),
                        defaults=_sampling_defaults(pipe))
    image_token = getattr(pipe.processor, "image_token", None)
    decode = pipe.adapter.decode

    app = FastAPI(title="mmspec", description="OpenAI-compatible chat completions with lossless speculative "
                  "decoding", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.mmspec = state
    if config.api_key:
        app.add_middleware(_bearer_auth_middleware(), api_key=config.api_key)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        message = {404: f"no such endpoint: {request.method} {request.url.path}",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code,
                                                                                           str(exc.detail))
        return JSONResponse(error_body(message, "invalid_request_error", None, None), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _server_error(request, exc):
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"), 500)

    def model_card() -> dict:
        return {"id": config.model_id, "object": "model", "created": state.created, "owned_by": "mmspec",
                "drafter_kind": pipe.drafter_kind}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": config.model_id, "drafter_kind": pipe.drafter_kind,
                "device": str(pipe.adapter.device), "requests_in_flight": len(state.in_flight)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        if model not in state.model_ids:
            raise APIError(404, f"the model {model!r} does not exist here; this server serves {config.model_id!r}",
                           "model", "model_not_found")
        return model_card()

    async def read_json(request: Request):
        limit = config.max_body_bytes
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
            raise _bad(f"the request body is not valid JSON ({e})", None, "invalid_json") from None

    def prepare_image(url: str):
        try:
            return load_image(image_bytes(url, config))
        except MMSpecError as e:
            raise _bad(f"cannot use the image: {e}", "messages", "invalid_image") from None

    def render_prompt(messages: list[dict]) -> str:
        try:
            return pipe.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # a template that refuses a role or an order of turns
            raise _bad(f"the model's chat template refuses these messages: {type(e).__name__}: {e}", "messages",
                       "invalid_value") from None

    def submit(image, prompt: str, settings: dict):
        try:
            return pipe.submit(image, prompt, raw_prompt=True, **settings)
        except MMSpecError as e:
            code = "context_length_exceeded" if "context" in str(e) else "invalid_value"
            raise _bad(str(e), "messages" if code == "context_length_exceeded" else None, code) from None

    async def next_event(job, request: Request | None):
        """The job's next engine event; with ``request``, a client that went away raises ``_ClientGone``."""
        if state.limiter is None:
            state.limiter = anyio.CapacityLimiter(4096)
        while True:
            if request is not None and await request.is_disconnected():
                raise _ClientGone()
            try:
                return await anyio.to_thread.run_sync(job.events.get, True, POLL_S, abandon_on_cancel=True,
                                                      limiter=state.limiter)
            except queue.Empty:
                continue

    def failed(result) -> APIError:
        message = result.error or "the request failed"
        if message.startswith("MMSpecError: "):
            return _bad(message[len("MMSpecError: "):], None, "invalid_value")
        return APIError(500, f"the engine failed on this request: {message}", None, None, "server_error")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_json(request)
        chat = parse_chat_request(body, state.model_ids, image_token, state.defaults)
        image = await run_in_threadpool(prepare_image, chat.image_url)
        prompt = render_prompt(chat.messages)
        job = await run_in_threadpool(submit, image, prompt, chat.settings)
        state.requests += 1
        state.in_flight.add(id(job))
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        answer = AnswerText(chat.stops)
        streaming = False
        try:
            # the first round comes before any response, so a request the engine refuses is still an HTTP error
            event = await next_event(job, request)
            if event.done and event.result.error:
                raise failed(event.result)
            if chat.stream:
                streaming = True
                return _stream_response(stream_events(job, event, chat, answer, rid, created),
                                        lambda: state.release(job))
            answer.update(event.text, event.done)
            while not (event.done or answer.stopped):
                event = await next_event(job, request)
                if event.done and event.result.error:
                    raise failed(event.result)
                answer.update(event.text, event.done)
            stats = stats_extra(event.stats, pipe.drafter_kind)
            if answer.stopped:
                job.cancelled = True
            completion = tokens_through_stop(decode, event.token_ids, chat.stops) if answer.stopped \
                else len(event.token_ids)
            prompt_tokens = len(job.request.prompt_ids)
            return {"id": rid, "object": "chat.completion", "created": created, "model": config.model_id,
                    "system_fingerprint": None,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.final,
                                                         "refusal": None},
                                 "logprobs": None,
                                 "finish_reason": finish_reason(event.stats.stop_reason, answer.stopped)}],
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                              "total_tokens": prompt_tokens + completion},
                    "mmspec": stats}
        except _ClientGone:
            return JSONResponse(error_body("the client went away", "invalid_request_error", None, "client_gone"),
                                status_code=499)
        finally:
            if not streaming:
                state.release(job)

    async def stream_events(job, event, chat: ChatRequest, answer: AnswerText, rid: str, created: int):
        def chunk(delta: dict, finish: str | None = None, **extra) -> str:
            payload = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": config.model_id,
                       "system_fingerprint": None,
                       "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}
            return f"data: {json.dumps(payload)}\n\n"

        yield chunk({"role": "assistant", "content": ""})
        while True:
            if event.done and event.result.error:
                err = failed(event.result)
                yield f"data: {json.dumps(err.body())}\n\n"
                yield "data: [DONE]\n\n"
                return
            delta = answer.update(event.text, event.done)
            if delta:
                yield chunk({"content": delta})
            if event.done or answer.stopped:
                break
            event = await next_event(job, None)   # Starlette notices a client that goes away and closes us
        if answer.stopped:
            job.cancelled = True
        stats = stats_extra(event.stats, pipe.drafter_kind)
        completion = tokens_through_stop(decode, event.token_ids, chat.stops) if answer.stopped \
            else len(event.token_ids)
        prompt_tokens = len(job.request.prompt_ids)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                 "total_tokens": prompt_tokens + completion}
        yield chunk({}, finish_reason(event.stats.stop_reason, answer.stopped), mmspec=stats)
        if chat.include_usage:
            payload = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": config.model_id,
                       "system_fingerprint": None, "choices": [], "usage": usage, "mmspec": stats}
            yield f"data: {json.dumps(payload)}\n\n"
        yield "data: [DONE]\n\n"

    def _stream_response(body, on_close):
        class JobStream(StreamingResponse):
            """Server-sent events; whatever ends the stream (done, client gone, error) releases the job's row."""

            async def __call__(self, scope, receive, send):
                try:
                    await super().__call__(scope, receive, send)
                finally:
                    await self.body_iterator.aclose()
                    on_close()

        return JobStream(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def _bearer_auth_middleware():
    """An ASGI middleware class: every HTTP request needs ``Authorization: Bearer <api_key>``."""
    from starlette.responses import JSONResponse

    class BearerAuth:
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

    return BearerAuth


# ----------------------------------------------------------------------------------------------------------
# running it
# ----------------------------------------------------------------------------------------------------------
class RunningServer:
    """A uvicorn server on a background thread (tests, the load test): ``url``, ``stop()``."""

    def __init__(self, app, host: str = DEFAULT_HOST, port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off",
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, name="mmspec-server", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise MMSpecError(f"the server did not start on {host}:{port}")
            time.sleep(0.01)
        bound = self.server.servers[0].sockets[0].getsockname()
        self.host, self.port = bound[0], bound[1]
        self.url = f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_port(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise MMSpecError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port or --host") \
                from None


def _percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else float("nan")


def _one_streamed_request(client, url: str, body: dict) -> dict:
    """POST one streamed chat completion; latency, time to the first content and the final usage/stats."""
    t0 = time.perf_counter()
    first = None
    usage, extra = {}, {}
    with client.stream("POST", url, json=body) as resp:
        if resp.status_code != 200:
            raise MMSpecError(f"the server answered {resp.status_code}: {resp.read()[:300]!r}")
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if "error" in data:
                raise MMSpecError(f"the server failed a request: {data['error']['message']}")
            if first is None and data["choices"] and data["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - t0
            usage = data.get("usage") or usage
            extra = data.get("mmspec") or extra
    latency = time.perf_counter() - t0
    return {"latency": latency, "ttft": first if first is not None else latency,
            "tokens": usage.get("completion_tokens", 0), "stats": extra}


def load_test(pipe=None, concurrency=(1, 4, 16), drafting=(True, False), requests_per_level: int = 64,
              max_tokens: int = 64, prompt: str = "Describe the image.", images=None, out=print) -> list[dict]:
    """Throughput and latency of the server on loopback at each number of concurrent clients, drafting on (the
    pipeline's drafter) and off (``drafter_kind="none"`` on the same target), as a markdown table.

    Each setting gets its own server on a free port; one warm-up request per image first (so the image cache is
    warm on both sides: this measures decoding, not image encoding), then ``requests_per_level`` streamed,
    greedy requests spread over the clients. Returns one row (dict) per (drafting, clients)."""
    import platform
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    import torch

    import mmspec

    if requests_per_level < 1 or max_tokens < 1 or not concurrency or any(c < 1 for c in concurrency):
        raise MMSpecError("load_test needs requests_per_level >= 1, max_tokens >= 1 and client counts >= 1")
    pipe = pipe or mmspec.load()
    if images is None:
        images = sorted(str(p) for p in (Path(__file__).resolve().parent.parent / "assets" / "images").glob("*.png"))
    urls = [data_url(p) for p in images]
    rows = []
    for on in drafting:
        side = pipe if on else pipe.with_drafter_kind("none", own_vision_cache=True)
        app = build_app(side)
        model = app.state.mmspec.config.model_id
        with RunningServer(app) as server, httpx.Client(timeout=600) as client:
            endpoint = f"{server.url}/v1/chat/completions"

            def body(i: int) -> dict:
                return {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                        "stream_options": {"include_usage": True},
                        "messages": [{"role": "user", "content": [
                            {"type": "image_url", "image_url": {"url": urls[i % len(urls)]}},
                            {"type": "text", "text": prompt}]}]}

            for i in range(len(urls)):
                _one_streamed_request(client, endpoint, dict(body(i), max_tokens=2))
            for c in concurrency:
                t0 = time.perf_counter()
                with ThreadPoolExecutor(c) as pool:
                    done = list(pool.map(lambda i: _one_streamed_request(client, endpoint, body(i)),
                                         range(requests_per_level)))
                wall = time.perf_counter() - t0
                lat, ttft = [d["latency"] for d in done], [d["ttft"] for d in done]
                tokens = sum(d["tokens"] for d in done)
                forwards = sum(d["stats"].get("target_forwards", 0) for d in done)
                rows.append({"drafting": side.drafter_kind, "clients": c, "requests": len(done), "tokens": tokens,
                             "wall_s": wall, "tokens_per_s": tokens / wall, "requests_per_s": len(done) / wall,
                             "p50_s": _percentile(lat, 50), "p90_s": _percentile(lat, 90),
                             "p99_s": _percentile(lat, 99), "ttft_p50_s": _percentile(ttft, 50),
                             "mean_accepted": tokens / forwards if forwards else 0.0})
    out(f"mmspec serve load test: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__} ({torch.get_num_threads()} threads), device {pipe.adapter.device}, target "
        f"{served_model_id(pipe)}, {requests_per_level} streamed greedy requests per level, max_tokens "
        f"{max_tokens}, prompt {prompt!r}, {len(urls)} images, engine batch {pipe.default_batch_size}")
    out("")
    out("| drafting | clients | requests | tokens | tokens/s | requests/s | latency p50 (s) | p90 (s) | p99 (s) "
        "| first token p50 (s) | tokens per target forward |")
    out("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        out(f"| {r['drafting']} | {r['clients']} | {r['requests']} | {r['tokens']} | {r['tokens_per_s']:.1f} | "
            f"{r['requests_per_s']:.2f} | {r['p50_s']:.3f} | {r['p90_s']:.3f} | {r['p99_s']:.3f} | "
            f"{r['ttft_p50_s']:.3f} | {r['mean_accepted']:.2f} |")
    return rows


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"client counts must be positive integers, got {text!r}")
    return values


def resolve_api_key(flag: str | None) -> str | None:
    """``--api-key`` if given, else ``$MMSPEC_API_KEY``; empty means none."""
    return flag or os.environ.get(API_KEY_ENV, "").strip() or None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mmspec.cli import add_model_arguments

    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default: {DEFAULT_HOST}, this "
                                                             "machine only; 0.0.0.0 exposes it, set --api-key)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    parser.add_argument("--api-key", default=None, help=f"require 'Authorization: Bearer <key>' on every request "
                                                        f"(default: the {API_KEY_ENV} environment variable, if set)")
    parser.add_argument("--served-model-name", default=None, help="the model id clients name (default: "
                                                                  f"{BUNDLED_MODEL_ID} for the bundled pair, else "
                                                                  "the target's folder name or hub id)")
    parser.add_argument("--allow-remote-images", action="store_true",
                        help="also fetch http(s) image URLs (the server then makes requests to any address a "
                             "client names; off by default: clients send data: URLs)")
    parser.add_argument("--max-body-bytes", type=_positive_int, default=MAX_BODY_BYTES,
                        help=f"largest request body (default: {MAX_BODY_BYTES})")
    parser.add_argument("--max-image-bytes", type=_positive_int, default=MAX_IMAGE_BYTES,
                        help=f"largest image, decoded or fetched (default: {MAX_IMAGE_BYTES})")
    parser.add_argument("--remote-timeout", type=float, default=REMOTE_TIMEOUT_S,
                        help=f"seconds to fetch a remote image (default: {REMOTE_TIMEOUT_S:g})")
    parser.add_argument("--batch-size", type=_positive_int, default=None,
                        help="rows in flight in the shared engine (default: the pipeline's, 16)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                        help="uvicorn's log level (default: info)")
    g = parser.add_argument_group("load test (loopback only; prints a markdown table and exits)")
    g.add_argument("--load-test", action="store_true", help="measure throughput and latency instead of serving")
    g.add_argument("--load-clients", type=_int_list, default=(1, 4, 16), help="concurrent clients (default: 1,4,16)")
    g.add_argument("--load-requests", type=_positive_int, default=64, help="requests per level (default: 64)")
    g.add_argument("--load-max-tokens", type=_positive_int, default=64, help="max_tokens per request (default: 64)")
    g.add_argument("--load-drafting", choices=["both", "on", "off"], default="both",
                   help="drafting on (the loaded drafter), off (drafter kind none) or both (default)")
    add_model_arguments(parser)


def run(args) -> int:
    from mmspec.cli import load_from_args

    if not 0 <= args.port <= 65535:
        raise MMSpecError(f"--port must be in [0, 65535], got {args.port}")
    if not args.remote_timeout > 0:
        raise MMSpecError(f"--remote-timeout must be positive, got {args.remote_timeout}")
    if not args.load_test:
        _check_port(args.host, args.port)
    pipe = load_from_args(args)
    if args.batch_size is not None:
        pipe.default_batch_size = args.batch_size   # read when the shared engine starts, at the first request
    if args.load_test:
        drafting = {"both": (True, False), "on": (True,), "off": (False,)}[args.load_drafting]
        load_test(pipe, concurrency=args.load_clients, drafting=drafting, requests_per_level=args.load_requests,
                  max_tokens=args.load_max_tokens)
        return 0
    import uvicorn

    api_key = resolve_api_key(args.api_key)
    app = build_app(pipe, api_key=api_key, allow_remote_images=args.allow_remote_images,
                    model_id=args.served_model_name, max_body_bytes=args.max_body_bytes,
                    max_image_bytes=args.max_image_bytes, remote_timeout_s=args.remote_timeout)
    model_id = app.state.mmspec.config.model_id
    if not _is_loopback(args.host) and not api_key:
        print(f"mmspec serve: warning: listening on {args.host} without an API key: anyone who can reach this "
              f"port can use the model (set --api-key or {API_KEY_ENV})", file=sys.stderr)
    print(f"mmspec serve: model {model_id!r} (drafter {pipe.drafter_kind}) on http://{args.host}:{args.port}/v1"
          f"{' (API key required)' if api_key else ''}; Ctrl-C stops", file=sys.stderr, flush=True)
    # uvicorn.Server, not uvicorn.run (which swallows Ctrl-C): Ctrl-C stops the server gracefully, then exits 130
    uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                  timeout_graceful_shutdown=5)).run()
    return 0


if __name__ == "__main__":
    from mmspec.cli import main

    sys.exit(main(["serve", *sys.argv[1:]]))
