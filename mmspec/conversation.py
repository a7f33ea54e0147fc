"""Conversations in the message format of transformers' chat templates, checked and with their images loaded.

A conversation is a list of ``{"role": "system"|"user"|"assistant", "content": str | [parts]}``; a part is
``{"type": "text", "text": ...}`` or ``{"type": "image", <source>}`` with the source under ``"image"`` (a
``PIL.Image``, a path or bytes), ``"path"``, ``"url"`` (a path, ``file://`` or a base64 ``data:`` URL) or
``"base64"``, the keys ``apply_chat_template`` reads. ``parse_conversation`` returns the messages the chat
template renders (each image part reduced to ``{"type": "image"}``) and the images in placeholder order, or an
``MMSpecError`` whose ``param`` names the message or part at fault (``messages[1].content[0]``). The structure
is checked before any image is decoded.
"""

from __future__ import annotations

import base64
import binascii

from PIL import Image

from mmspec.errors import MMSpecError
from vision.images import load_image

ROLES = ("system", "user", "assistant")
IMAGE_KEYS = ("image", "url", "path", "base64")


def _refuse(message: str, param: str, code: str = "invalid_value") -> MMSpecError:
    return MMSpecError(f"{param}: {message}", code=code, param=param)


def _source(part: dict, where: str):
    """What an image part points at, as ``load_image`` takes it (PIL.Image, path or bytes)."""
    key = next((k for k in IMAGE_KEYS if part.get(k) is not None), None)
    if key is None:
        raise _refuse(f"an image part needs one of {', '.join(IMAGE_KEYS)}", where, "invalid_image")
    value = part[key]
    if key == "base64" or (key == "url" and isinstance(value, str) and value.startswith("data:")):
        data = value.partition(",")[2] if value.startswith("data:") else value
        try:
            return base64.b64decode("".join(data.split()), validate=True)
        except (binascii.Error, ValueError) as e:
            raise _refuse(f"the image is not valid base64 ({e})", where, "invalid_image") from None
    if key == "url" and isinstance(value, str):
        if value.startswith("file://"):
            return value[len("file://"):]
        if value.split(":", 1)[0].lower() in ("http", "https"):
            raise _refuse("http(s) images are not fetched here: pass the bytes, a path or a data: URL (`mmspec "
                          "serve --allow-remote-images` fetches them for server clients)", where, "invalid_image")
    return value


def parse_conversation(messages, max_images: int | None = None) -> tuple[list[dict], list[Image.Image]]:
    """(messages for the chat template, images in order), or ``MMSpecError`` naming the part at fault."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise MMSpecError("the conversation is empty: give a list of {role, content} messages ending on a user "
                          "turn", code="invalid_value", param="messages")
    out, sources = [], []
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
                raise _refuse("video parts are not supported yet; send the frames as image parts", pwhere,
                              "unsupported_value")
            else:
                raise _refuse(f"a part's type must be text or image, got {kind!r}", pwhere)
        out.append(dict(m, content=parts))
    if out[-1]["role"] != "user":
        raise _refuse(f"the conversation ends on a {out[-1]['role']} turn; it must end on the user's turn that "
                      "the answer replies to", f"messages[{len(out) - 1}]")
    last = out[-1]["content"]
    if not (last.strip() if isinstance(last, str) else last):
        raise _refuse("the last user turn is empty", f"messages[{len(out) - 1}].content")
    if max_images is not None and len(sources) > max_images:
        raise MMSpecError(f"the conversation has {len(sources)} images; the limit is {max_images}",
                          code="too_many_images", param="messages")
    images = []
    for where, source in sources:   # decoded only once the whole conversation is known to be well formed
        try:
            images.append(load_image(source))
        except MMSpecError as e:
            raise _refuse(str(e), where, "invalid_image") from None
    return out, images


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
