"""The image-embedding cache: features computed once per (model, image or video clip content), kept in an LRU
bounded by bytes."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Any, Callable

import torch
from PIL import Image


def image_digest(image: Image.Image) -> str:
    """Content key of an RGB image: same pixels, same key, whatever file or object they came from."""
    h = hashlib.blake2b(digest_size=20)
    h.update(f"{image.mode}:{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def video_digest(video) -> str:
    """Content key of a video clip: its frames' digests in order (a list of RGB images), or the bytes of the file
    the target's processor reads (a path)."""
    h = hashlib.blake2b(digest_size=20)
    if isinstance(video, str) or hasattr(video, "__fspath__"):
        with open(video, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return "file:" + h.hexdigest()
    for frame in video:
        h.update(image_digest(frame).encode())
    return f"{len(video)}f:" + h.hexdigest()


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


class EmbeddingCache:
    """Thread-safe LRU of tensors (or dicts/lists of tensors) keyed by strings, bounded by total bytes."""

    def __init__(self, max_bytes: int = 512 * 2**20):
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: str) -> bool:
        return key in self._items

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, key: str):
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: str, value: Any) -> None:
        size = _nbytes(value)
        with self._lock:
            if key in self._items:
                self._bytes -= self._items.pop(key)[1]
            if size > self.max_bytes:
                return  # larger than the whole cache: compute it each time rather than evict everything
            self._items[key] = (value, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, old) = self._items.popitem(last=False)
                self._bytes -= old

    def get_or_compute(self, key: str, compute: Callable[[], Any]) -> tuple[Any, bool]:
        """Return ``(value, hit)``; on a miss, ``compute()`` runs once and its result is stored."""
        value = self.get(key)
        if value is not None:
            self.hits += 1
            return value, True
        self.misses += 1
        value = compute()
        self.put(key, value)
        return value, False

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0
