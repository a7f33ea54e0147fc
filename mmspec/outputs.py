"""Files mmspec writes are its own or new: an existing file or folder that mmspec did not write is refused
before any work starts, and left as it was (``mmspec caption`` has its own, stricter rules for its JSONL)."""

from __future__ import annotations

import json
from pathlib import Path

from mmspec.errors import MMSpecError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _refuse(path: Path, what: str, why: str) -> None:
    raise MMSpecError(f"{what} {str(path)!r} {why}; mmspec only replaces files it wrote itself: give a new path "
                      "or remove that file")


def check_own_file(path, what: str, kind: str) -> None:
    """``path`` may be written as ``kind`` ("bench-json" or "png"): it is new, or a file of that kind."""
    path = Path(path)
    if not path.exists():
        if path.parent.exists() and not path.parent.is_dir():
            _refuse(path, what, "is inside something that is not a folder")
        return
    if not path.is_file():
        _refuse(path, what, "exists and is not a regular file")
    head = path.open("rb").read(1 << 20)
    if kind == "png":
        ours = head.startswith(PNG_MAGIC)
    else:
        try:
            data = json.loads(head.decode("utf-8"))
            ours = isinstance(data, dict) and {"machine", "config", "modes"} <= set(data)
        except (UnicodeDecodeError, ValueError):
            ours = False
    if not ours:
        _refuse(path, what, f"exists and is not a {'PNG image' if kind == 'png' else 'mmspec bench report'}")


def check_own_folder(path, what: str, markers: tuple[str, ...]) -> None:
    """``path`` is new, empty, or a folder mmspec wrote (it holds one of ``markers``)."""
    path = Path(path)
    if not path.exists():
        return
    if not path.is_dir():
        _refuse(path, what, "exists and is not a folder")
    if any(path.iterdir()) and not any((path / m).exists() for m in markers):
        _refuse(path, what, "is a folder with other files in it")
