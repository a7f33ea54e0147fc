"""OpenAI's chat-completions protocol, as far as this server speaks it: the error object, the validation of a
request body into a ``ChatRequest``, and the answer's text as ``stop`` strings cut it.

Nothing here imports a web framework: a body arrives already JSON-decoded, and a refusal is an ``APIError``
that the app turns into ``{"error": {"message", "type", "param", "code"}}`` with its status.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mmspec.conversation import VIDEO_TARGETS
from mmspec.errors import MMSpecError

MAX_STOP_STRINGS = 4              # as OpenAI
MAX_TEMPERATURE = 2.0             # as OpenAI

# OpenAI parameters this server does not implement, with the values that mean "not used"
UNSUPPORTED = {"logprobs": (None, False), "top_logprobs": (None, 0), "tools": (None, []), "functions": (None, []),
               "tool_choice": (None, "none"), "function_call": (None, "none"), "logit_bias": (None, {}),
               "frequency_penalty": (None, 0, 0.0), "presence_penalty": (None, 0, 0.0), "audio": (None,),
               "prediction": (None,), "modalities": (None, ["text"])}

# MMSpecError.param (the Python API's setting names) -> the request field a client sent
REQUEST_PARAMS = {"max_new_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p", "seed": "seed",
                  "num_draft_tokens": "num_draft_tokens", "messages": "messages"}


# ----------------------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------------------
class APIError(Exception):
    """A request refused with OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def as_dict(self) -> dict:
        """The error as plain data (it crosses process boundaries this way); ``APIError(**d)`` rebuilds it."""
        return {"status": self.status, "message": self.message, "param": self.param, "code": self.code,
                "type": self.type, "headers": self.headers}


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


def unavailable(message: str, code: str, retry_after_s: int = 1) -> APIError:
    """A 503 the client may retry after ``retry_after_s`` (queue full, shutting down, a replica lost)."""
    return APIError(503, message, None, code, "server_error", {"Retry-After": str(retry_after_s)})


def refused(e: MMSpecError) -> APIError:
    """A 400 for what the engine refuses, classified by the error's own ``code`` and ``param`` (a part of the
    conversation, ``messages[1].content[0]``, is named as it is)."""
    param = e.param if isinstance(e.param, str) and e.param.startswith("messages[") else REQUEST_PARAMS.get(e.param)
    return bad_request(str(e), param, e.code or "invalid_value")


# ----------------------------------------------------------------------------------------------------------
# the request
# ----------------------------------------------------------------------------------------------------------
@dataclass
class ChatRequest:
    """A validated ``/v1/chat/completions`` body."""

    messages: list[dict]          # chat-template messages: {"role", "content": [{"type": "text"|"image"|"video"}...]}
    images: list[tuple[str, str]]  # (where, url) of each image part, in order: ("messages[0].content[1]", "data:...")
    settings: dict                # pipe.submit keywords: max_new_tokens, temperature, top_p, seed, ...
    stream: bool = False
    include_usage: bool = False
    stops: list[str] = field(default_factory=list)
    # (where, url of the video file | [url of each frame]) of each video part, in order
    videos: list[tuple[str, str | list[str]]] = field(default_factory=list)


def _number(body: dict, name: str, lo: float, hi: float, lo_open: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise bad_request(f"{name} must be a number, got {value!r}", name, "invalid_type")
    if value < lo or (lo_open and value == lo) or value > hi:
        raise bad_request(f"{name} must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {value!r}", name,
                          "invalid_value")
    return float(value)


def _integer(body: dict, name: str, lo: int, hi: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"{name} must be an integer, got {value!r}", name, "invalid_type")
    if value < lo or (hi is not None and value > hi):
        bound = f"at least {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise bad_request(f"{name} must be {bound}, got {value}", name, "invalid_value")
    return value


def _parse_stop(value) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad_request("stop must be a string or a list of strings", "stop", "invalid_type")
    if len(stops) > MAX_STOP_STRINGS:
        raise bad_request(f"stop holds {len(stops)} strings; at most {MAX_STOP_STRINGS} are allowed", "stop",
                          "invalid_value")
    if any(not s for s in stops):
        raise bad_request("stop strings must not be empty", "stop", "invalid_value")
    return list(dict.fromkeys(stops))


def _url(value, pwhere: str, field_name: str) -> str:
    """The ``url`` of an ``image_url`` / ``video_url`` object (or the bare string)."""
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise bad_request(f"{pwhere}.{field_name}.url must be a string (a data: URL)", f"{pwhere}.{field_name}",
                          "invalid_type")
    return url


def _parse_video(part: dict, kind: str, pwhere: str, role: str, takes_video: bool):
    """A video part's URL (``video_url``: one file) or its frames' URLs (``video``: a list), or an ``APIError``."""
    if not takes_video:
        raise bad_request(f"{pwhere}: this model takes no video; send the frames as image_url parts (video parts "
                          f"work with {VIDEO_TARGETS} targets)", pwhere,
                          "unsupported_value")
    if role != "user":
        raise bad_request(f"{pwhere}: videos belong in user messages", pwhere, "invalid_value")
    if kind == "video_url":
        return _url(part.get("video_url"), pwhere, "video_url")
    frames = part.get("video")
    if not isinstance(frames, list) or not frames or not all(isinstance(f, str) and f for f in frames):
        raise bad_request(f"{pwhere}.video must be a non-empty list of frame URLs (data: URLs, one image each)",
                          f"{pwhere}.video", "invalid_type")
    return list(frames)


def _parse_parts(content: list, where: str, role: str, images: list, videos: list | None = None,
                 takes_video: bool = False) -> list[dict]:
    """One message's content parts as chat-template parts; image URLs go to ``images`` as (where, url), video
    parts to ``videos`` as (where, url or list of frame URLs)."""
    parts = []
    for j, part in enumerate(content):
        pwhere = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise bad_request(f"{pwhere}.text must be a string", f"{pwhere}.text", "invalid_type")
            parts.append({"type": "text", "text": text})
        elif kind == "image_url":
            if role != "user":
                raise bad_request(f"{pwhere}: images belong in user messages", pwhere, "invalid_value")
            images.append((pwhere, _url(part.get("image_url"), pwhere, "image_url")))
            parts.append({"type": "image"})
        elif kind in ("video_url", "video"):
            videos = [] if videos is None else videos
            videos.append((pwhere, _parse_video(part, kind, pwhere, role, takes_video)))
            parts.append({"type": "video"})
        else:
            raise bad_request(f"{pwhere}: content parts must be of type text, image_url, video_url or video, got "
                              f"{kind!r}", pwhere, "invalid_value")
    return parts


def _parse_messages(messages, image_token: str | None, max_images: int | None = None, videos: list | None = None,
                    takes_video: bool = False) -> tuple[list[dict], list]:
    """Chat-template messages and each image part's (where, URL), or an ``APIError`` naming the part that is
    wrong. Any number of images (0 included, at most ``max_images``, each video frame counting as one) in any user
    turns; video parts go to ``videos`` (refused when not ``takes_video``)."""
    if messages is None:
        raise bad_request("messages is required: a list of {role, content} objects", "messages",
                          "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list of {role, content} objects", "messages", "invalid_value")
    out, images, has_text = [], [], False
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"{where} must be an object with role and content", where, "invalid_type")
        role = m.get("role")
        role = "system" if role == "developer" else role
        if role not in ("system", "user", "assistant"):
            raise bad_request(f"{where}.role must be system, developer, user or assistant, got {m.get('role')!r} "
                              f"(tool messages are not supported)", f"{where}.role", "invalid_value")
        if m.get("tool_calls") or m.get("function_call"):
            raise bad_request(f"{where}: tool calls are not supported", where, "unsupported_parameter")
        content = m.get("content")
        if content is None:
            if role != "assistant":
                raise bad_request(f"{where}.content is required", f"{where}.content", "missing_required_parameter")
            parts = []
        elif isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        elif isinstance(content, list):
            parts = _parse_parts(content, where, role, images, videos, takes_video)
        else:
            raise bad_request(f"{where}.content must be a string or a list of parts", f"{where}.content",
                              "invalid_type")
        for p in parts:
            if p["type"] != "text":
                continue
            if image_token and image_token in p["text"]:
                raise bad_request(f"{where}: the text holds the model's image token {image_token!r}; send the image "
                                  f"as an image_url part instead", where, "invalid_value")
            has_text = has_text or (role == "user" and bool(p["text"].strip()))
        out.append({"role": role, "content": parts})
    # a frame counts as an image; a video file counts once here (and its frames once decoded: ``check_frames``)
    check_frames(len(images), [len(v) if isinstance(v, list) else 1 for _, v in videos or []], max_images)
    if out[-1]["role"] != "user":
        raise bad_request(f"messages[{len(out) - 1}]: the conversation ends on a {out[-1]['role']} turn; it must end "
                          f"on the user's turn that the answer replies to", f"messages[{len(out) - 1}]",
                          "invalid_value")
    if not has_text:
        raise bad_request("the user messages hold no text; ask something, e.g. 'Describe the image.'", "messages",
                          "empty_prompt")
    return out, images


def check_frames(images: int, frames: list[int], max_images: int | None) -> None:
    """A 400 ``too_many_images`` when the images and the videos' frames are more than ``max_images``."""
    total = images + sum(frames)
    if max_images is not None and total > max_images:
        what = f"{images} images and {sum(frames)} video frames" if frames else f"{images} images"
        raise bad_request(f"the request has {what}; this server takes at most {max_images} per request, a video "
                          f"frame counting as an image (--max-images)", "messages", "too_many_images")


def _parse_settings(body: dict, defaults: dict | None) -> dict:
    """``pipe.submit``'s keywords from the sampling fields, over ``defaults``."""
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
    return settings


def parse_chat_request(body, model_ids: tuple[str, ...], image_token: str | None = None,
                       defaults: dict | None = None, max_images: int | None = None,
                       takes_video: bool = False) -> ChatRequest:
    """Validate a chat-completions body (already JSON-decoded) into a ``ChatRequest``, or raise ``APIError``.
    ``takes_video``: whether the target takes video parts (else they are a 400 naming the part)."""
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(body).__name__}", None, "invalid_type")
    model = body.get("model")
    if model is None:
        raise bad_request(f"model is required; this server serves {model_ids[0]!r}", "model",
                          "missing_required_parameter")
    if model not in model_ids:
        raise APIError(404, f"the model {model!r} does not exist here; this server serves {model_ids[0]!r} "
                            f"(GET /v1/models)", "model", "model_not_found")
    videos: list = []
    messages, images = _parse_messages(body.get("messages"), image_token, max_images, videos, takes_video)
    n = _integer(body, "n", 1)
    if n is not None and n != 1:
        raise bad_request(f"n must be 1 (one choice per request), got {n}", "n", "invalid_value")
    for name, neutral in UNSUPPORTED.items():
        if name in body and body[name] not in neutral:
            raise bad_request(f"{name} is not supported by this server", name, "unsupported_parameter")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise bad_request("response_format is not supported by this server (only {\"type\": \"text\"})",
                          "response_format", "unsupported_parameter")
    settings = _parse_settings(body, defaults)
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad_request(f"stream must be true or false, got {stream!r}", "stream", "invalid_type")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("stream_options must be an object", "stream_options", "invalid_type")
    include_usage = bool((options or {}).get("include_usage", False))
    return ChatRequest(messages=messages, images=images, settings=settings, stream=bool(stream),
                       include_usage=include_usage, stops=_parse_stop(body.get("stop")), videos=videos)


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
