"""Conversations in the message format of transformers' chat templates, checked and with their images loaded.

A conversation is a list of ``{"role": "system"|"user"|"assistant", "content": str | [parts]}``; a part is
``{"type": "text", "text": ...}``, ``{"type": "image", <source>}`` with the source under ``"image"`` (a
``PIL.Image``, a path or bytes), ``"path"``, ``"url"`` (a path, ``file://`` or a base64 ``data:`` URL) or
``"base64"``, the keys ``apply_chat_template`` reads, or ``{"type": "video", <source>}`` (for targets that take
video) with the source under ``"video"``, ``"path"``, ``"url"`` or ``"base64"``: a list of frames (each an image
source as above), or one file -- an animated GIF/WebP/PNG is read into its frames with Pillow; another video file
(mp4, ...) given as a path is left for the target's processor to read, which needs torchcodec.

``parse_conversation`` returns the messages the chat template renders (each image part reduced to
``{"type": "image"}``, each video part to ``{"type": "video"}``), the images and the video clips in placeholder
order, or an ``MMSpecError`` whose ``param`` names the message or part at fault (``messages[1].content[0]``).
The structure is checked before any image or video is decoded. Against ``max_images`` a clip counts as its
frames (a video file the processor reads counts as one: its frames are known only once it is read).
"""

from __future__ import annotations

import base64
import binascii

from PIL import Image

from mmspec.errors import MMSpecError
from vision.images import load_image, load_video

ROLES = ("system", "user", "assistant")
IMAGE_KEYS = ("image", "url", "path", "base64")
# the families whose adapters take video parts (``TargetAdapter.video_inputs``), for error messages
VIDEO_TARGETS = "Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5, GLM-4.1V/4.5V, InternVL, LLaVA-OneVision, SmolVLM"
VIDEO_KEYS = ("video", "url", "path", "base64")


def _refuse(message: str, param: str, code: str = "invalid_value") -> MMSpecError:
    return MMSpecError(f"{param}: {message}", code=code, param=param)


def _source(part: dict, where: str, keys=IMAGE_KEYS, what: str = "image"):
    """What an image (or video) part points at, as ``load_image`` takes it (PIL.Image, path or bytes)."""
    key = next((k for k in keys if part.get(k) is not None), None)
    if key is None:
        raise _refuse(f"an {what} part needs one of {', '.join(keys)}", where, f"invalid_{what}")
    return _resolve(part[key], key, where, what)


def _resolve(value, key: str, where: str, what: str = "image"):
    """A source value as ``load_image`` / ``load_video`` take it: base64 and ``data:`` URLs decoded, ``file://``
    stripped, http(s) refused."""
    if key == "base64" or (isinstance(value, str) and value.startswith("data:")):
        data = value.partition(",")[2] if value.startswith("data:") else value
        try:
            return base64.b64decode("".join(data.split()), validate=True)
        except (binascii.Error, ValueError) as e:
            raise _refuse(f"the {what} is not valid base64 ({e})", where, f"invalid_{what}") from None
    if isinstance(value, str):
        if value.startswith("file://"):
            return value[len("file://"):]
        if value.split(":", 1)[0].lower() in ("http", "https"):
            raise _refuse(f"http(s) {what}s are not fetched here: pass the bytes, a path or a data: URL (`mmspec "
                          "serve --allow-remote-images` fetches them for server clients)", where, f"invalid_{what}")
    return value


def _video_source(part: dict, where: str):
    """A video part's source: a list of frame sources, or one file (path or bytes)."""
    key = next((k for k in VIDEO_KEYS if part.get(k) is not None), None)
    if key is None:
        raise _refuse(f"a video part needs one of {', '.join(VIDEO_KEYS)}", where, "invalid_video")
    value = part[key]
    if isinstance(value, (list, tuple)):
        if not value:
            raise _refuse("the video has no frames", where, "invalid_video")
        frames = []
        for i, frame in enumerate(value):
            try:
                frames.append(_resolve(frame, key, where))
            except MMSpecError as e:
                raise _refuse(f"frame {i}: {str(e).removeprefix(where + ': ')}", where, "invalid_video") from None
        return frames
    return _resolve(value, key, where, "video")


def parse_conversation(messages, max_images: int | None = None, takes_video: bool = True,
                       target: str = "this target") -> tuple[list[dict], list[Image.Image], list]:
    """(messages for the chat template, images in order, video clips in order), or ``MMSpecError`` naming the
    part at fault. A clip is a list of RGB frames, or the path of a video file the target's processor reads.
    ``takes_video=False`` refuses every video part (``target`` names the model in the message)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise MMSpecError("the conversation is empty: give a list of {role, content} messages ending on a user "
                          "turn", code="invalid_value", param="messages")
    out, sources, clips = [], [], []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _refuse("a message must be a dict with role and content", where, "invalid_type")
        role = m.get("role")
        if role not in ROLES:
            raise _refuse(f"role must be one of {', '.join(ROLES)}, got {role!r}", f"{where}.role")
        content = m.get("content")
        if isinstance(content, str) or (content is None and role == "assistant"):
            out.append(dict(m, content=content or ""))
            continue
        if not isinstance(content, (list, tuple)):
            raise _refuse("content must be a string or a list of parts", f"{where}.content", "invalid_type")
        parts = []
        for j, part in enumerate(content):
            pwhere = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise _refuse("a text part needs a string under 'text'", pwhere, "invalid_type")
                parts.append(part)
            elif kind == "image":
                if role != "user":
                    raise _refuse(f"images belong in user turns, not in a {role} turn", pwhere)
                sources.append((pwhere, _source(part, pwhere)))
                parts.append({k: v for k, v in part.items() if k not in IMAGE_KEYS})
            elif kind == "video":
                if not takes_video:
                    raise _refuse(f"{target} takes no video; send the frames as image parts (or use a target "
                                  f"that takes video: {VIDEO_TARGETS})", pwhere,
                                  "unsupported_value")
                if role != "user":
                    raise _refuse(f"videos belong in user turns, not in a {role} turn", pwhere)
                clips.append((pwhere, _video_source(part, pwhere)))
                parts.append({k: v for k, v in part.items() if k not in VIDEO_KEYS})
            else:
                raise _refuse(f"a part's type must be text, image or video, got {kind!r}", pwhere)
        out.append(dict(m, content=parts))
    if out[-1]["role"] != "user":
        raise _refuse(f"the conversation ends on a {out[-1]['role']} turn; it must end on the user's turn that "
                      "the answer replies to", f"messages[{len(out) - 1}]")
    last = out[-1]["content"]
    if not (last.strip() if isinstance(last, str) else last):
        raise _refuse("the last user turn is empty", f"messages[{len(out) - 1}].content")
    def check_count(frames: int) -> None:
        count = len(sources) + frames
        if max_images is not None and count > max_images:
            what = f"{len(sources)} images and {frames} video frames" if clips else f"{len(sources)} images"
            raise MMSpecError(f"the conversation has {what}; the limit is {max_images} (a video frame counts as an "
                              "image)", code="too_many_images", param="messages")

    check_count(sum(len(c) if isinstance(c, list) else 1 for _, c in clips))
    images = []
    for where, source in sources:   # decoded only once the whole conversation is known to be well formed
        try:
            images.append(load_image(source))
        except MMSpecError as e:
            raise _refuse(str(e), where, "invalid_image") from None
    videos = []
    for where, source in clips:
        if isinstance(source, list):
            frames = []
            for i, frame in enumerate(source):
                try:
                    frames.append(load_image(frame))
                except MMSpecError as e:
                    raise _refuse(f"frame {i}: {e}", where, "invalid_video") from None
            videos.append(frames)
            continue
        try:
            videos.append(load_video(source))
        except MMSpecError as e:
            raise _refuse(str(e), where, "invalid_video") from None
    check_count(sum(len(v) if isinstance(v, list) else 1 for v in videos))   # a file's frames, now known
    return out, images, videos


def load_images(image, max_images: int | None = None) -> list[Image.Image]:
    """``generate``'s image argument (None, one image, or a list of them) as a list of RGB images."""
    items = [] if image is None else list(image) if isinstance(image, (list, tuple)) else [image]
    if max_images is not None and len(items) > max_images:
        raise MMSpecError(f"the request has {len(items)} images; the limit is {max_images}", code="too_many_images",
                          param="image")
    images = []
    for i, item in enumerate(items):
        try:
            images.append(load_image(item))
        except MMSpecError as e:
            where = "image" if not isinstance(image, (list, tuple)) else f"image[{i}]"
            raise MMSpecError(str(e), code="invalid_image", param=where) from None
    return images
