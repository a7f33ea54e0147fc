"""What to caption: image files, folders (searched recursively for image extensions), glob patterns, and list
files (``.txt``: one path per line; ``.jsonl``: one ``{"path": ..., "prompt": ...}`` per line, or
``{"images": [path, ...], "prompt": ...}`` for a request about several images), expanded into ``Task``s in order,
each (path, prompt) once. A several-image task's ``path`` names its images joined by `` + `` (what its record says
and what identifies it when a run resumes)."""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from mmspec.errors import MMSpecError

DEFAULT_PROMPT = "Describe the image."
IMAGE_EXTENSIONS = frozenset(".png .jpg .jpeg .jpe .jfif .bmp .gif .webp .tif .tiff .ppm .pgm .pbm .pnm .ico "
                             ".tga .dib .avif .heic .heif".split())
LIST_EXTENSIONS = (".txt", ".jsonl")


IMAGES_JOINER = " + "


@dataclass(frozen=True)
class Task:
    path: str
    prompt: str
    images: tuple[str, ...] = ()          # a several-image request's paths, in order (``path`` then joins them)

    @property
    def image(self):
        """What the pipeline takes: the one path, or the list of paths of a several-image task."""
        return list(self.images) if self.images else self.path

    @property
    def key(self) -> tuple[str, str]:
        return record_key({"path": self.path, "prompt": self.prompt})


def record_key(rec: dict) -> tuple[str, str]:
    """What identifies an input: its absolute path (relative paths are taken from the current folder) and prompt."""
    return os.path.abspath(os.path.expanduser(str(rec["path"]))), str(rec["prompt"])


def _walk_images(folder: str) -> Iterator[str]:
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                yield os.path.join(root, name)


def _expand_one(arg: str, prompt: str, allow_lists: bool = True) -> list[Task]:
    path = os.path.expanduser(arg)
    if os.path.isdir(path):
        return [Task(p, prompt) for p in _walk_images(path)]
    if os.path.isfile(path):
        if allow_lists and path.lower().endswith(LIST_EXTENSIONS):
            return _read_list(path, prompt)
        return [Task(os.path.normpath(path), prompt)]  # given explicitly: tried whatever its extension
    if glob.has_magic(path):
        out: list[Task] = []
        for match in sorted(glob.glob(path, recursive=True)):
            if os.path.isdir(match):
                out.extend(Task(p, prompt) for p in _walk_images(match))
            elif os.path.splitext(match)[1].lower() in IMAGE_EXTENSIONS:
                out.append(Task(os.path.normpath(match), prompt))
        if out:
            return out
    # Not there: still an input, so it gets an error line ("image not found") instead of vanishing silently.
    return [Task(os.path.normpath(path), prompt)]


def _read_list(list_path: str, default_prompt: str) -> list[Task]:
    """Entries of a .txt/.jsonl list; relative paths are taken from the list file's folder."""
    base = os.path.dirname(os.path.abspath(list_path))
    is_jsonl = list_path.lower().endswith(".jsonl")
    try:
        text = Path(list_path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise MMSpecError(f"cannot read the input list {list_path}: {e}") from None
    tasks: list[Task] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        prompt = default_prompt
        if is_jsonl:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise MMSpecError(f"{list_path} line {lineno}: not valid JSON ({e.msg})") from None
            images = entry.get("images") if isinstance(entry, dict) else None
            if images is not None:
                if "path" in entry or not isinstance(images, list) or not images or not all(
                        isinstance(p, str) and p for p in images):
                    raise MMSpecError(f'{list_path} line {lineno}: "images" must be a non-empty list of paths (and '
                                      'no "path" beside it)')
            elif not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not entry["path"]:
                raise MMSpecError(f'{list_path} line {lineno}: expected {{"path": "...", "prompt": "..."}} or '
                                  f'{{"images": ["...", ...], "prompt": "..."}}')
            if entry.get("prompt") is not None:
                if not isinstance(entry["prompt"], str) or not entry["prompt"].strip():
                    raise MMSpecError(f"{list_path} line {lineno}: the prompt must be a non-empty string")
                prompt = entry["prompt"]
            if images is not None:
                paths = tuple(os.path.normpath(os.path.join(base, os.path.expanduser(p))) for p in images)
                tasks.append(Task(IMAGES_JOINER.join(paths), prompt, paths))
                continue
            entry_path = entry["path"]
        else:
            entry_path = line
        entry_path = os.path.expanduser(entry_path)
        if not os.path.isabs(entry_path):
            entry_path = os.path.join(base, entry_path)
        tasks.extend(_expand_one(entry_path, prompt, allow_lists=False))
    return tasks


def expand_inputs(args: Iterable[str], prompt: str = DEFAULT_PROMPT) -> list[Task]:
    """Every input in order, each (path, prompt) once."""
    seen: set[tuple[str, str]] = set()
    out: list[Task] = []
    for arg in args:
        for task in _expand_one(str(arg), prompt):
            if task.key not in seen:
                seen.add(task.key)
                out.append(task)
    return out
