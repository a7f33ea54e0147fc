"""Image loading and validation: every input becomes an upright 8-bit RGB ``PIL.Image`` or an ``MMSpecError``.

Handles paths, bytes and ``PIL.Image`` objects; grayscale, palette, RGBA, CMYK and 16-bit images; EXIF
rotation; and refuses corrupt, truncated, empty, non-image and decompression-bomb sized inputs.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mmspec.errors import MMSpecError

# 64 megapixels: far above what any VLM processor uses, far below what exhausts memory when decoded.
MAX_PIXELS = 64_000_000

ImageInput = "Image.Image | str | os.PathLike | bytes"


def _describe(source) -> str:
    if isinstance(source, (bytes, bytearray)):
        return f"image bytes ({len(source)} bytes)"
    return str(source)


def _open(source) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise MMSpecError(f"image not found: {path}")
        data = path.read_bytes()
    else:
        raise MMSpecError(f"image must be a PIL.Image, a path or bytes, not {type(source).__name__}")
    if not data:
        raise MMSpecError(f"{_describe(source)}: the file is empty")
    try:
        with _bomb_guard():
            img = Image.open(io.BytesIO(data))
            _check_size(img, source)
            img.load()
    except MMSpecError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise MMSpecError(f"{_describe(source)}: image too large to decode safely ({e})") from None
    except UnidentifiedImageError:
        raise MMSpecError(f"{_describe(source)}: not an image file (or an unsupported format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise MMSpecError(f"{_describe(source)}: corrupt or truncated image ({e})") from None
    return img


def _check_size(img: Image.Image, source) -> None:
    w, h = img.size
    if w < 1 or h < 1:
        raise MMSpecError(f"{_describe(source)}: image has no pixels ({w}x{h})")
    if w * h > MAX_PIXELS:
        raise MMSpecError(f"{_describe(source)}: image is {w}x{h} = {w * h / 1e6:.0f} MP; "
                          f"the limit is {MAX_PIXELS / 1e6:.0f} MP (resize it first)")


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale the real range to 8 bits instead of clipping at 255.
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.size else 0.0
        arr = (arr / hi * 255.0) if hi > 255 else arr
        img = Image.fromarray(arr.clip(0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(arr.astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        # Transparent pixels become white, as an image viewer would show them on a page.
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB") if img.mode != "RGB" else img


@contextlib.contextmanager
def _bomb_guard():
    """Pillow's decompression-bomb warning raised as an error: a huge image or frame is refused, never decoded."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def load_image(source) -> Image.Image:
    """Return ``source`` as an upright RGB image, or raise ``MMSpecError`` saying what is wrong with it."""
    img = _open(source)
    _check_size(img, source)
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block should not lose an otherwise readable image
        pass
    return _to_rgb(img)


# ----- video ------------------------------------------------------------------------------------------------
# frames a video file may decode to, all frames' pixels together (a long GIF must not exhaust memory)
MAX_VIDEO_PIXELS = MAX_PIXELS


def video_decoder_available() -> bool:
    """Whether transformers' video processors can read video files (mp4, webm, ...) here: they decode with
    torchcodec, which needs FFmpeg; mmspec does not depend on it."""
    try:
        from transformers.utils.import_utils import is_torchcodec_usable
    except ImportError:
        return False
    return bool(is_torchcodec_usable(decode="video"))


def load_video(source) -> "list[Image.Image] | str":
    """A video file (path or bytes) as its frames (upright RGB ``PIL.Image`` s) where Pillow reads it (animated
    GIF, WebP, PNG; any image: one frame), else the path itself for the target's processor to read (with
    torchcodec, as ``apply_chat_template`` hands it over), or an ``MMSpecError`` saying what to do."""
    if isinstance(source, (str, os.PathLike)) and not Path(source).is_file():
        raise MMSpecError(f"video not found: {source}")
    if not isinstance(source, (str, os.PathLike, bytes, bytearray, memoryview)):
        raise MMSpecError(f"a video must be a list of frames, a path or bytes, not {type(source).__name__}")
    data = bytes(source) if not isinstance(source, (str, os.PathLike)) else Path(source).read_bytes()
    what = f"video bytes ({len(data)} bytes)" if not isinstance(source, (str, os.PathLike)) else str(source)
    if not data:
        raise MMSpecError(f"{what}: the video file is empty")
    try:
        with _bomb_guard():
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        img = None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise MMSpecError(f"{what}: video frames too large to decode safely ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise MMSpecError(f"{what}: corrupt or truncated video ({e})") from None
    if img is None:
        is_path = isinstance(source, (str, os.PathLike))
        if is_path and video_decoder_available():
            return str(source)
        why = ("other video files (mp4, webm, ...) are read by the target's processor with torchcodec "
               "(`pip install torchcodec`, with FFmpeg), which is not installed here" if is_path else
               "other encoded videos (mp4, webm, ...) are not decoded from bytes (the Python API hands a video file's "
               "path to the target's processor, which reads it with torchcodec)")
        raise MMSpecError(f"{what}: cannot read this video. Animated GIF/WebP/PNG files are read with Pillow; "
                          f"{why}; or send the frames as a list of images")
    frames, pixels = [], 0
    try:
        for i in range(getattr(img, "n_frames", 1)):
            img.seek(i)
            _check_size(img, source)
            pixels += img.size[0] * img.size[1]
            if pixels > MAX_VIDEO_PIXELS:
                raise MMSpecError(f"{what}: the video's frames hold over {MAX_VIDEO_PIXELS / 1e6:.0f} MP "
                                  f"together (at frame {i}); send fewer or smaller frames")
            frames.append(_to_rgb(img.copy()))
    except MMSpecError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise MMSpecError(f"{what}: corrupt or truncated video ({e})") from None
    return frames
