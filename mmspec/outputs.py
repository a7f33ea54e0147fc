"""Files mmspec writes are its own or new: an existing file or folder that mmspec did not write is refused
before any work starts, and left as it was. One mechanism for every subcommand that writes files:

- ``check_writable``: this run can write the path (a regular file this user may read and write, or a new file
  in a folder that exists, or may be created, and takes new files);
- a ``FileKind`` tells from a file's first bytes whether an existing file is one mmspec wrote (``recognise``);
  ``check_own_file`` is the two together;
- ``check_own_folder``: a folder is new, empty, or one mmspec wrote: ``claim_folder`` records that in it (the
  ``.mmspec-output`` marker), and only such folders are written into again;
- every refusal of a file that is not ours says the same thing (``refuse``).

The kinds ``mmspec bench`` writes are here (``KINDS``); ``mmspec caption`` defines its JSONL and CSV next to
their formats (demos/caption/files.py) and, besides, takes a lock and trusts only its own lines inside its JSONL.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mmspec.errors import MMSpecError

HEAD_BYTES = 1 << 20  # bytes read to recognise a file: far more than any first line or report mmspec writes
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class NotOurs(Exception):
    """Raised by ``FileKind.recognise``: ``why`` the file is not one mmspec wrote; ``what`` replaces the kind's
    name in the message where that says more (a file of ours in a format this version cannot continue)."""

    def __init__(self, why: str, what: str | None = None):
        super().__init__(why)
        self.why, self.what = why, what


@dataclass(frozen=True)
class FileKind:
    """A kind of file mmspec writes. ``recognise(head)`` gets the file's first ``HEAD_BYTES`` bytes and returns
    when the file is one mmspec wrote (or holds nothing to lose), else raises ``NotOurs``."""

    name: str                          # refusals say "<path> exists and is not <name> (<why>)"
    recognise: Callable[[bytes], None]
    example: str                       # a file name to suggest where a folder was given


def refuse(flag: str, path, problem: str, thing: str = "file") -> MMSpecError:
    """The refusal of a path that is not mmspec's: what is wrong with it, and that it is left as it was."""
    return MMSpecError(f"{flag} {path} {problem}; mmspec only writes into its own files, so it is left untouched. "
                       f"Choose another {flag}, or move that {thing} away")


def first_line(head: bytes) -> tuple[bytes, bool]:
    """The first line of ``head`` and whether it ended with a newline."""
    nl = head.find(b"\n")
    return (head, False) if nl < 0 else (head[:nl], True)


def recognise(path, flag: str, kind: FileKind) -> None:
    """Refuse the existing file ``path`` unless it is a ``kind`` file mmspec wrote."""
    with open(path, "rb") as f:
        head = f.read(HEAD_BYTES)
    try:
        kind.recognise(head)
    except NotOurs as e:
        raise refuse(flag, path, f"exists and is not {e.what or kind.name} ({e.why})") from None


def _file_type(mode: int) -> str:
    return ("a folder" if stat.S_ISDIR(mode) else "a character device" if stat.S_ISCHR(mode)
            else "a block device" if stat.S_ISBLK(mode) else "a pipe" if stat.S_ISFIFO(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")


def check_writable(flag: str, path: str, example: str, create_folder: bool = True, why_regular: str = "",
                   hint: str = "") -> None:
    """``path`` can be written by this run: a regular file this user may read and write, or a new file in a
    folder this user can create files in. ``create_folder``: missing folders above it will be created (else
    refused, with ``hint`` on where to put it instead); ``why_regular`` says why it must be a regular file."""
    if os.path.lexists(path) and not os.path.exists(path):
        raise MMSpecError(f"{flag} {path} is a symbolic link to nothing; give a file name")
    if os.path.exists(path):
        mode = os.stat(path).st_mode
        if stat.S_ISDIR(mode):
            raise MMSpecError(f"{flag} {path} is a folder; give a file name, e.g. {os.path.join(path, example)}")
        if not stat.S_ISREG(mode):
            raise MMSpecError(f"{flag} {path} is {_file_type(mode)}; {flag} must be a regular file"
                              + (f" ({why_regular})" if why_regular else ""))
        if not os.access(path, os.R_OK | os.W_OK):
            raise MMSpecError(f"{flag} {path} is not writable (or not readable) by this user; choose another {flag}")
        return
    folder = os.path.dirname(os.path.abspath(path))
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise MMSpecError(f"{flag} {path}: {existing} is a file, not a folder")
    if existing != folder and not create_folder:
        raise MMSpecError(f"{flag} {path}: the folder {folder} does not exist; create it first"
                          + (f" ({hint})" if hint else ""))
    try:  # a real probe: permissions, read-only file systems, /proc ... (os.access says yes to root everywhere)
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".mmspec-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise MMSpecError(f"{flag} {path}: cannot create files in {existing} ({e.strerror or e})") from None


def _png(head: bytes) -> None:
    if not head.startswith(PNG_MAGIC):
        raise NotOurs("it does not start with the PNG signature")


def _bench_report(head: bytes) -> None:
    try:
        data = json.loads(head.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise NotOurs("it is not JSON") from None
    # a bench report has timed modes; a --verify-cost report, timed forwards
    if not (isinstance(data, dict) and {"machine", "config"} <= set(data) and {"modes", "verify_cost"} & set(data)):
        raise NotOurs("it has no machine, config and modes (or verify_cost)")


KINDS = {"png": FileKind("a PNG image", _png, "bench.png"),
         "bench-json": FileKind("an mmspec bench report", _bench_report, "bench.json")}


def check_own_file(path, flag: str, kind: str | FileKind) -> None:
    """``path`` may be written as ``kind`` (a ``FileKind``, or its name in ``KINDS``): it can be written
    (``check_writable``, missing folders created) and is new or a file of that kind."""
    kind = KINDS[kind] if isinstance(kind, str) else kind
    check_writable(flag, str(path), kind.example)
    if os.path.exists(path):
        recognise(path, flag, kind)


MARKER = ".mmspec-output"   # in every folder mmspec writes (engines ignore dot files: a head stays loadable)


def claim_folder(path, what: str) -> None:
    """Create ``path`` (if needed) and record it as mmspec's own, so a later run may write into it again."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    marker = path / MARKER
    if not marker.exists():
        marker.write_text(json.dumps({"written_by": "mmspec", "what": what}) + "\n")


def is_own_folder(path) -> bool:
    return (Path(path) / MARKER).is_file()


def check_own_folder(path, flag: str) -> None:
    """``path`` is new, empty, or a folder mmspec wrote (``claim_folder`` recorded it): anything else -- a
    downloaded model, an earlier head mmspec did not record, the user's own files -- is refused untouched."""
    path = Path(path)
    if not path.exists():
        return
    if not path.is_dir():
        raise refuse(flag, path, "exists and is not a folder")
    if any(path.iterdir()) and not is_own_folder(path):
        raise refuse(flag, path, f"is a folder mmspec did not write (it has files and no {MARKER} record)",
                     thing="folder")
