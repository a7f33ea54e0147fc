"""A request's image: a base64 ``data:`` URL, or an ``http(s)`` URL fetched with a size limit and a timeout when
the server allows remote images (other schemes, ``file:`` included, are refused); a request's video: its frames'
URLs, or one URL of an animated GIF/WebP/PNG (same sources and limits as an image); and ``data_url``, which makes
the ``data:`` URL a client sends. Every refusal is an ``APIError`` (400, or 413 over the size limit).
"""

from __future__ import annotations

import base64
import binascii
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from mmspec.errors import MMSpecError
from mmspec.server.protocol import APIError, bad_request

if TYPE_CHECKING:
    from mmspec.server.config import ServerConfig

PARAM = "messages"                # where the image is, in OpenAI's error object


def _too_large(message: str) -> APIError:
    return APIError(413, message, PARAM, "image_too_large")


def decode_data_url(url: str, max_bytes: int) -> bytes:
    """The bytes of a base64 ``data:`` URL, or an ``APIError`` (400 malformed, 413 over ``max_bytes``)."""
    head, sep, data = url.partition(",")
    if not sep or ";base64" not in head.lower():
        raise bad_request("the image data: URL must be base64, e.g. data:image/png;base64,iVBOR...", PARAM,
                          "invalid_image")
    data = "".join(data.split())
    if len(data) // 4 * 3 > max_bytes + 2:   # refuse before decoding a huge upload
        raise _too_large(f"the image is about {len(data) // 4 * 3} bytes; the limit is {max_bytes} bytes")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad_request(f"the image data: URL is not valid base64 ({e})", PARAM, "invalid_image") from None
    if len(raw) > max_bytes:
        raise _too_large(f"the image is {len(raw)} bytes; the limit is {max_bytes} bytes")
    if not raw:
        raise bad_request("the image data: URL holds no bytes", PARAM, "invalid_image")
    return raw


def fetch_remote_image(url: str, max_bytes: int, timeout_s: float) -> bytes:
    """GET an ``http(s)`` image with a size limit and a timeout, or raise ``APIError``."""
    import httpx

    try:
        with httpx.Client(timeout=timeout_s, follow_redirects=True, max_redirects=3) as client:
            with client.stream("GET", url, headers={"Accept": "image/*"}) as resp:
                if resp.status_code != 200:
                    raise bad_request(f"fetching the image {url!r} gave HTTP {resp.status_code}", PARAM,
                                      "image_fetch_failed")
                size = resp.headers.get("content-length")
                if size and size.isdigit() and int(size) > max_bytes:
                    raise _too_large(f"the image at {url!r} is {size} bytes; the limit is {max_bytes} bytes")
                # httpx's timeout is per read: the deadline bounds a server that trickles bytes
                chunks, n, deadline = [], 0, time.monotonic() + timeout_s
                for chunk in resp.iter_bytes():
                    n += len(chunk)
                    if n > max_bytes:
                        raise _too_large(f"the image at {url!r} is over the limit of {max_bytes} bytes")
                    if time.monotonic() > deadline:
                        raise bad_request(f"fetching the image {url!r} took over {timeout_s:g} s", PARAM,
                                          "image_fetch_failed")
                    chunks.append(chunk)
                return b"".join(chunks)
    except httpx.HTTPError as e:
        raise bad_request(f"cannot fetch the image {url!r}: {type(e).__name__}: {e}", PARAM,
                          "image_fetch_failed") from None


def image_bytes(url: str, config: ServerConfig) -> bytes:
    """The bytes behind an image part's URL, as far as ``config`` allows."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return decode_data_url(url, config.max_image_bytes)
    if scheme in ("http", "https"):
        if not config.allow_remote_images:
            raise bad_request("remote image URLs are off on this server; send the image as a data: URL "
                              "(data:image/png;base64,...), or start it with --allow-remote-images", PARAM,
                              "remote_images_disabled")
        return fetch_remote_image(url, config.max_image_bytes, config.remote_timeout_s)
    raise bad_request(f"the image URL must be a data: URL{' or http(s)' if config.allow_remote_images else ''}, got "
                      f"{url[:40]!r}", PARAM, "invalid_image")


def request_image(url: str, config: ServerConfig, where: str = PARAM):
    """The ``PIL.Image`` behind an image part's URL; bytes that are no image are a 400 ``invalid_image``. A
    refusal names the part (``where``: ``messages[0].content[1]``) in its message and ``param``."""
    from vision.images import load_image

    try:
        raw = image_bytes(url, config)
    except APIError as e:
        if where == PARAM:
            raise
        raise APIError(e.status, f"{where}: {e.message}", where, e.code, e.type, e.headers) from None
    try:
        return load_image(raw)
    except MMSpecError as e:
        prefix = "" if where == PARAM else f"{where}: "
        raise bad_request(f"{prefix}cannot use the image: {e}", where, "invalid_image") from None


def request_video(source, config: ServerConfig, where: str = PARAM) -> list:
    """A video part's frames: its frames' URLs (``{"type": "video", "video": [...]}``) each as an image, or one
    URL (``video_url``) of an animated GIF/WebP/PNG read with Pillow. Other encoded videos (mp4, ...) are a 400:
    the server does not decode them (that needs torchcodec and a file)."""
    from vision.images import load_video

    if isinstance(source, list):
        return [request_image(url, config, where) for url in source]
    try:
        raw = image_bytes(source, config)
    except APIError as e:
        raise APIError(e.status, f"{where}: {e.message}", where, e.code, e.type, e.headers) from None
    try:
        return load_video(raw)
    except MMSpecError as e:
        raise bad_request(f"{where}: cannot use the video: {e}", where, "invalid_video") from None


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
