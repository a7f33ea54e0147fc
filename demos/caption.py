"""Batch captioning that never loses work: ``mmspec caption PATHS... --out captions.jsonl``.

Inputs are image files, folders (searched recursively for image extensions), glob patterns, or list files
(``.txt``: one path per line; ``.jsonl``: one ``{"path": ..., "prompt": ...}`` per line). Each input gets
exactly one JSON line in ``--out``::

    {"mmspec": "caption/1", "path", "prompt", "caption", "tokens", "mean_accepted", "acceptance_rate",
     "time_s", "error", ...}

Guarantees (see docs/CAPTIONING.md):

- mmspec writes only files of its own (the first line is a caption record) or new ones: any other existing
  ``--out``/``--csv`` is refused before work starts (exit status 2) and left byte-for-byte as it was; inside
  our file only our lines are trusted. Flag values, prompts and output paths are all checked before the first
  input, so a value wrong for every input never turns into an error line per input;
- up to ``--batch-size`` inputs are decoded together (continuous batching); each line is written with one
  ``write`` and ``fsync``-ed as its row finishes, so a crash loses at most the inputs in flight (with
  ``--compare``, the few batches being compared); lines come in completion order;
- a rerun with the same ``--out`` skips the inputs already done (same path and prompt) and finishes the rest;
  a last line cut by a crash is detected, removed, and that input is redone;
- one process at a time writes an output file (an exclusive ``flock``), so two runs cannot interleave;
- inputs whose line records an error count as done (the error is the answer for a corrupt file);
  ``--retry-errors`` redoes them, replacing their error lines so that each input still has one line;
- a bad image never stops the batch: it gets an error line and the exit status is 1;
- a write that fails (disk full) is taken back and stops the run (exit status 2), the file still ending in a
  complete line; rerunning finishes it.

The captions are exactly what ``pipe.generate(image, prompt)`` returns, at any batch size. ``--backend ray`` runs
the same captioner on Ray Data, one model replica per worker, each worker decoding its batches with
``generate_batch``; the driver alone writes the file, with the same guarantees.
Also runnable as ``python -m demos.caption``.
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import glob
import io
import json
import os
import queue
import stat
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from mmspec.errors import MMSpecError

DEFAULT_PROMPT = "Describe the image."
FIELDS = ("path", "prompt", "caption", "tokens", "mean_accepted", "acceptance_rate", "time_s", "error")
EXTRA_FIELDS = ("target", "drafted", "accepted", "target_forwards", "plain_time_s", "speedup", "plain_matches")
IMAGE_EXTENSIONS = frozenset(".png .jpg .jpeg .jpe .jfif .bmp .gif .webp .tif .tiff .ppm .pgm .pbm .pnm .ico "
                             ".tga .dib .avif .heic .heif".split())
LIST_EXTENSIONS = (".txt", ".jsonl")
MAX_ERROR_CHARS = 300


# ----------------------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    path: str
    prompt: str

    @property
    def key(self) -> tuple[str, str]:
        return record_key({"path": self.path, "prompt": self.prompt})


def record_key(rec: dict) -> tuple[str, str]:
    """What identifies an input: its absolute path (relative paths are taken from the current folder) and prompt."""
    return os.path.abspath(os.path.expanduser(str(rec["path"]))), str(rec["prompt"])


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
FULL_HASH_BYTES = 256 << 20  # weight files up to this size are hashed whole; larger: size + first/last MiB


def _file_fingerprint(path: Path, h) -> None:
    size = path.stat().st_size
    h.update(f"{path.name}:{size}:".encode())
    with open(path, "rb") as f:
        if size <= FULL_HASH_BYTES:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        else:  # a multi-GB checkpoint: its header (names, shapes) and both ends are enough to tell versions apart
            h.update(f.read(1 << 20))
            f.seek(size - (1 << 20))
            h.update(f.read(1 << 20))


def target_identity(args) -> str:
    """Which target writes the captions: ``name@hash`` (a local folder's weights, a hub snapshot's commit),
    plus ``/dtype`` when the target runs in another dtype than float32.

    Captions depend on the target and its numbers only (the drafter never changes the output), so resuming
    an output file is safe exactly when this string is the same. Float32 runs keep the bare ``name@hash`` that
    files written before the dtype was recorded hold; the device is left out (a float32 caption file may be
    finished on another machine).
    """
    from mmspec.pipeline import load_dtype

    target, preset = getattr(args, "target", None), getattr(args, "preset", None)
    if target is None and preset:
        from mmspec.presets import resolve_preset

        target = resolve_preset(preset).target
    resolved = str(load_dtype(getattr(args, "dtype", None), model_device(args), preset)).removeprefix("torch.")
    name = _weights_identity(target)
    return name if resolved == "float32" else f"{name}/{resolved}"


def _weights_identity(target) -> str:
    import hashlib

    from mmspec.pipeline import BUNDLED_TARGET

    folder = Path(os.path.expanduser(str(target))) if target is not None else BUNDLED_TARGET
    if folder.is_dir():
        h = hashlib.sha256()
        for f in sorted(folder.iterdir()):
            if f.suffix in WEIGHT_SUFFIXES or f.name == "config.json":
                _file_fingerprint(f, h)
        name = "bundled" if target is None else str(folder.resolve())
        return f"{name}@{h.hexdigest()[:16]}"
    try:  # a hub id: the commit of the cached snapshot, found offline
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(str(target), "config.json")
        if isinstance(cached, str):
            return f"{target}@{Path(cached).parent.name[:16]}"
    except Exception:  # noqa: BLE001 - an identity without a commit is still the id
        pass
    return str(target)


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
            if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not entry["path"]:
                raise MMSpecError(f'{list_path} line {lineno}: expected {{"path": "...", "prompt": "..."}}')
            if entry.get("prompt") is not None:
                if not isinstance(entry["prompt"], str) or not entry["prompt"].strip():
                    raise MMSpecError(f"{list_path} line {lineno}: the prompt must be a non-empty string")
                prompt = entry["prompt"]
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


# ----------------------------------------------------------------------------------------------------------
# the output files: mmspec writes only files it wrote before (recognised by their first line) or new ones
# ----------------------------------------------------------------------------------------------------------
FORMAT = "caption/1"                      # every line this tool writes starts with {"mmspec": FORMAT, ...}
OWN_PREFIX = b'{"mmspec": "caption/'      # how the start of one of our lines looks, even when cut by a crash
LEGACY_PREFIX = b'{"path": '              # lines of the previous release (no "mmspec" field) started so
FIRST_LINE_LIMIT = 1 << 20                # bytes read to recognise a file; a caption line is far shorter


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _is_own(rec) -> bool:
    """A caption record of ours: marked with this format, or a previous release's line (every field of FIELDS)."""
    if not isinstance(rec, dict) or not isinstance(rec.get("path"), str) or not isinstance(rec.get("prompt"), str):
        return False
    if "mmspec" in rec:
        return rec["mmspec"] == FORMAT
    return all(f in rec for f in FIELDS)


def _parse_line(line: bytes) -> dict | None:
    """The record on ``line`` if it is one of ours, else None (a line this tool did not write is never trusted)."""
    try:
        rec = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return rec if _is_own(rec) else None


def _first_line(path: str) -> tuple[bytes, bool]:
    """The first line of ``path`` (at most FIRST_LINE_LIMIT bytes) and whether it ended with a newline."""
    with open(path, "rb") as f:
        head = f.read(FIRST_LINE_LIMIT)
    nl = head.find(b"\n")
    return (head, False) if nl < 0 else (head[:nl], True)


def _foreign(flag: str, path: str, what: str, why: str) -> MMSpecError:
    return MMSpecError(f"{flag} {path} exists and is not {what} ({why}); mmspec only writes into its own files, so "
                       f"it is left untouched. Choose another {flag}, or move that file away")


def check_own_jsonl(path: str, flag: str = "--out") -> None:
    """Refuse an existing, non-empty ``path`` whose first line is not a caption record of ours."""
    line, complete = _first_line(path)
    if not line and complete:
        raise _foreign(flag, path, "a caption file written by mmspec caption", "its first line is empty")
    if not line:
        return  # empty: nothing to lose
    if not complete:
        if line.startswith(OWN_PREFIX) and len(line) < FIRST_LINE_LIMIT:
            return  # our first line, cut by a crash: repaired on open
        raise _foreign(flag, path, "a caption file written by mmspec caption", "it has no complete first line")
    try:
        rec = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _foreign(flag, path, "a caption file written by mmspec caption",
                       "its first line is not JSON") from None
    if isinstance(rec, dict) and "mmspec" in rec and rec.get("mmspec") != FORMAT:
        raise _foreign(flag, path, f"a caption file this version can resume",
                       f"it was written in format {rec.get('mmspec')!r}; this version writes {FORMAT!r}")
    if not _is_own(rec):
        raise _foreign(flag, path, "a caption file written by mmspec caption",
                       "its first line is not a caption record")


def csv_columns(records: list[dict]) -> list[str]:
    return list(FIELDS) + [f for f in EXTRA_FIELDS if any(f in r for r in records)]


def check_own_csv(path: str, flag: str = "--csv") -> None:
    """Refuse an existing, non-empty ``path`` that is not a CSV this tool wrote (recognised by its header row)."""
    line, complete = _first_line(path)
    if not line and not complete:
        return
    try:
        header = next(csv.reader([line.decode("utf-8").rstrip("\r")]))
    except (UnicodeDecodeError, csv.Error, StopIteration):
        header = []
    extra = header[len(FIELDS):]
    if header[: len(FIELDS)] != list(FIELDS) or extra != [f for f in EXTRA_FIELDS if f in extra]:
        raise _foreign(flag, path, "a CSV written by mmspec caption",
                       f"its header is not {','.join(FIELDS)},...")


def _same_file(a: str, b: str) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _kind(mode: int) -> str:
    return ("a folder" if stat.S_ISDIR(mode) else "a character device" if stat.S_ISCHR(mode)
            else "a block device" if stat.S_ISBLK(mode) else "a pipe" if stat.S_ISFIFO(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")


def _check_output_path(flag: str, path: str, create_folder: bool, why_regular: str) -> None:
    """``path`` can be written by this run: a regular file we may write, or a new file in a writable folder."""
    if os.path.lexists(path) and not os.path.exists(path):
        raise MMSpecError(f"{flag} {path} is a symbolic link to nothing; give a file name")
    if os.path.exists(path):
        mode = os.stat(path).st_mode
        if stat.S_ISDIR(mode):
            raise MMSpecError(f"{flag} {path} is a folder; give a file name, e.g. "
                              f"{os.path.join(path, 'captions.jsonl' if flag == '--out' else 'captions.csv')}")
        if not stat.S_ISREG(mode):
            raise MMSpecError(f"{flag} {path} is {_kind(mode)}; {flag} must be a regular file ({why_regular})")
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
        raise MMSpecError(f"{flag} {path}: the folder {folder} does not exist; create it first (or put the file "
                          f"next to --out, whose folder is created)")
    try:  # a real probe: permissions, read-only file systems, /proc ... (os.access says yes to root everywhere)
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".mmspec-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise MMSpecError(f"{flag} {path}: cannot create files in {existing} ({e.strerror or e})") from None


def check_outputs(args, tasks: list[Task]) -> None:
    """Every output path of this run is checked before any work: a regular file that is ours or new, in a
    folder this user can write, not a folder, not an input, and no two outputs the same file."""
    out = os.path.expanduser(args.out)
    csv_path = os.path.expanduser(args.csv) if args.csv else None
    _check_output_path("--out", out, create_folder=True, why_regular="a rerun reads it back to resume; use a "
                       "file name, and e.g. `tail -f` it to watch")
    if csv_path is not None:
        if _same_file(out, csv_path):
            raise MMSpecError(f"--csv and --out are the same file ({args.out}); the CSV would overwrite the captions "
                              f"a rerun resumes from. Give the CSV its own name, e.g. "
                              f"{os.path.splitext(args.out)[0]}.csv")
        out_folder = os.path.dirname(os.path.abspath(out))
        _check_output_path("--csv", csv_path,
                           create_folder=os.path.dirname(os.path.abspath(csv_path)) == out_folder,
                           why_regular="it is replaced atomically at the end of the run")
    given = [os.path.expanduser(str(p)) for p in args.paths if os.path.isfile(os.path.expanduser(str(p)))]
    for flag, path in (("--out", out), ("--csv", csv_path)):
        if path is None:
            continue
        name = os.path.basename(path)
        # the files named on the command line (list files above all: any spelling, hard links), and the images
        # found (by name first: a batch may hold a million of them)
        for inp in given + [t.path for t in tasks if os.path.basename(t.path) == name]:
            if _same_file(inp, path):
                raise MMSpecError(f"{flag} {path} is also an input of this run ({inp}); mmspec never writes over "
                                  f"its inputs. Choose another {flag}")
    if os.path.exists(out):
        check_own_jsonl(out)
    if csv_path is not None and os.path.exists(csv_path):
        check_own_csv(csv_path)


class WriteFailed(MMSpecError):
    """A write to an output file failed (disk full, I/O error); the lines written before it are intact."""


class CaptionLog:
    """The JSONL output: exclusive while open, repaired on open, appended to durably one line at a time.

    Only a file of ours is opened (its first line is a caption record) or a new one; a new file that ends up
    with no line (a run refused or stopped before its first caption) is removed on close."""

    def __init__(self, path: str | os.PathLike, warn: Callable[[str], None] = lambda msg: None):
        self.path = str(path)
        self.warn = warn
        self.fd = -1
        if os.path.isdir(self.path):
            raise MMSpecError(f"--out {self.path} is a folder; give a file name, e.g. "
                              f"{os.path.join(self.path, 'captions.jsonl')}")
        if os.path.exists(self.path) and not stat.S_ISREG(os.stat(self.path).st_mode):
            raise MMSpecError(f"--out {self.path} is {_kind(os.stat(self.path).st_mode)}; it must be a regular file "
                              f"(a rerun reads it back to resume)")
        parent = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(parent, exist_ok=True)
            self.created = not os.path.exists(self.path)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as e:
            raise MMSpecError(f"cannot open --out {self.path} for writing ({e.strerror or e})") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            self.fd = -1
            raise MMSpecError(f"{self.path} is being written by another 'mmspec caption' run; wait for it to end "
                              f"or choose another --out") from None
        if self.created:
            _fsync_dir(self.path)
        self.records: dict[tuple[str, str], dict] = {}
        self.repaired_bytes = 0
        try:
            if not self.created:
                check_own_jsonl(self.path)
            self._load()
        except BaseException:
            self.close()
            raise

    def _load(self) -> None:
        with open(self.path, "rb") as f:
            data = f.read()
        end = data.rfind(b"\n") + 1          # bytes after the last newline: a line cut by a crash, if ours
        tail = data[end:]
        if tail:
            ours = tail.startswith(OWN_PREFIX) or (end > 0 and (tail.startswith(LEGACY_PREFIX)
                                                                or not tail.strip(b"\0")))
            if not ours:
                raise MMSpecError(f"{self.path} ends with an unfinished line that mmspec caption did not write "
                                  f"({len(tail)} bytes without a newline); it is left as it is. End it with a "
                                  f"newline or remove it, then rerun")
            self.repaired_bytes = len(tail)
            self.warn(f"{self.path}: removed an incomplete last line ({self.repaired_bytes} bytes, left by an "
                      f"interrupted run); that input is captioned again")
            os.ftruncate(self.fd, end)
            os.fsync(self.fd)
        lines = data[:end].split(b"\n")[:-1] if end else []
        parsed = [_parse_line(line) for line in lines]
        bad = [i + 1 for i, rec in enumerate(parsed) if rec is None]
        if bad:
            self.warn(f"{self.path}: ignoring {len(bad)} line(s) not written by mmspec caption (line "
                      f"{', '.join(map(str, bad[:5]))}{' ...' if len(bad) > 5 else ''}); they are kept as they are")
        for rec in parsed:
            if rec is not None:
                self.records[record_key(rec)] = rec  # the last line for an input wins

    def is_done(self, key: tuple[str, str], retry_errors: bool = False) -> bool:
        rec = self.records.get(key)
        return rec is not None and (rec.get("error") is None or not retry_errors)

    def append(self, rec: dict) -> None:
        """Write one line with a single write, then fsync: it is on disk before the next input starts.

        A failed write (disk full, I/O error) takes back what it wrote, so the file still ends with a complete
        line, and raises ``WriteFailed``."""
        rec = {"mmspec": FORMAT, **{k: v for k, v in rec.items() if k != "mmspec"}}
        data = (json.dumps(rec, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
        size = os.fstat(self.fd).st_size
        try:
            view = memoryview(data)
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
            os.fsync(self.fd)
        except OSError as e:
            try:
                os.ftruncate(self.fd, size)
            except OSError:
                pass
            raise WriteFailed(f"cannot write to {self.path} ({e.strerror or e}); the {len(self.records)} line(s) "
                              f"written before are intact. Free some space (or fix the disk) and rerun the same "
                              f"command to finish") from None
        self.records[record_key(rec)] = rec

    def drop(self, keys: set[tuple[str, str]]) -> int:
        """Remove the lines of ``keys`` (errors to redo) with an atomic rewrite; returns how many went."""
        with open(self.path, "rb") as f:
            lines = f.read().split(b"\n")[:-1]
        keep, dropped = [], 0
        for line in lines:
            rec = _parse_line(line)
            if rec is not None and record_key(rec) in keys:
                dropped += 1
            else:
                keep.append(line + b"\n")  # lines of other inputs, and lines we did not write, stay
        if not dropped:
            return 0
        real = os.path.realpath(self.path)  # a symbolic link stays a link to the rewritten file
        tmp = f"{real}.tmp-{os.getpid()}"
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        except OSError as e:
            raise MMSpecError(f"cannot rewrite {self.path} to replace its lines ({e.strerror or e}: {tmp}); the file "
                              f"is unchanged") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            data = memoryview(b"".join(keep))
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
            os.chmod(tmp, stat.S_IMODE(os.fstat(self.fd).st_mode))
            os.replace(tmp, real)
        except BaseException as e:
            os.close(fd)
            if os.path.exists(tmp):
                os.unlink(tmp)
            if isinstance(e, OSError):
                raise WriteFailed(f"cannot rewrite {self.path} ({e.strerror or e}); the file is unchanged") from None
            raise
        _fsync_dir(real)
        os.close(self.fd)
        self.fd = fd
        for key in keys:
            self.records.pop(key, None)
        return dropped

    def close(self) -> None:
        if self.fd >= 0:
            if self.created and os.fstat(self.fd).st_size == 0:
                try:  # nothing was written: leave no trace (still under our lock)
                    os.unlink(self.path)
                except OSError:
                    pass
            os.close(self.fd)  # also releases the lock
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_records(path: str) -> list[dict]:
    """The caption lines of ours in a JSONL, last line per input, in file order."""
    out: dict[tuple[str, str], dict] = {}
    with open(path, "rb") as f:
        for line in f.read().split(b"\n"):
            rec = _parse_line(line) if line.strip() else None
            if rec is not None:
                out.pop(record_key(rec), None)
                out[record_key(rec)] = rec
    return list(out.values())


def write_csv(jsonl_path: str, csv_path: str) -> int:
    """Write every input of ``jsonl_path`` as a CSV row (atomically); returns the number of rows.

    An existing ``csv_path`` is replaced only if it is a CSV this tool wrote (``check_own_csv``)."""
    csv_path = os.path.expanduser(csv_path)
    if os.path.exists(csv_path):
        check_own_csv(csv_path)
    records = read_records(jsonl_path)
    columns = csv_columns(records)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for rec in records:
        writer.writerow({k: ("" if rec.get(k) is None else rec.get(k)) for k in columns})
    real = os.path.realpath(csv_path)
    os.makedirs(os.path.dirname(real), exist_ok=True)
    tmp = f"{real}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, real)
    except OSError as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise WriteFailed(f"cannot write the CSV {csv_path} ({e.strerror or e}); the captions are all in "
                          f"{jsonl_path}, and a rerun of the same command writes the CSV") from None
    return len(records)


# ----------------------------------------------------------------------------------------------------------
# captioning: one input's record, and the loop that feeds the batched engine
# ----------------------------------------------------------------------------------------------------------
DEFAULT_BATCH_SIZE = 16   # = mmspec.Pipeline.default_batch_size (not imported: --help loads no torch)
LOOKAHEAD = 0.5           # inputs read and queued beyond the batch (a fraction of it), so a freed row refills at once
COMPARE_CHUNK = 4         # --compare: inputs measured side by side at a time, in batches
POLL_S = 0.005            # how often the feeding loop looks for finished rows
CANCEL_WAIT_S = 30.0      # how long a stopped run waits for its cancelled rows to leave the engine


@dataclass
class Timing:
    """What a backend measured over this run's inputs (model loading excluded unless said)."""

    decode_s: float = 0.0     # wall time of the speculative side
    plain_s: float = 0.0      # --compare: wall time of the plain side, over ``compared`` inputs
    compared: int = 0
    failed_in_batch: int = 0  # rows that ended with an error inside a batch, then captioned again alone
    note: str = ""            # what decode_s includes beyond decoding


def _short(e: BaseException, path: str = "") -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if path and text.startswith(f"{path}: "):  # the line already names the file
        text = text[len(path) + 2:]
    msg = text if isinstance(e, MMSpecError) else f"{type(e).__name__}: {text}" if text else type(e).__name__
    return msg if len(msg) <= MAX_ERROR_CHARS else msg[: MAX_ERROR_CHARS - 3] + "..."


def baseline_pipeline(pipe):
    """Plain decoding (drafter kind "none") through the same target weights, with its own vision cache, so
    the baseline pays for encoding each image exactly as the speculative run does."""
    return pipe.with_drafter_kind("none", own_vision_cache=True)


def warm_up(*pipes) -> None:
    """One short batch per pipeline so one-time costs do not land on the first images' timing."""
    from PIL import Image

    img = Image.new("RGB", (64, 64), (120, 80, 200))
    for p in pipes:
        try:
            p.generate_batch([img, img], DEFAULT_PROMPT, max_new_tokens=4)
        except Exception:  # noqa: BLE001 - a failed warm-up only costs accuracy of the first timing
            pass


def _fill(rec: dict, res) -> None:
    s = res.stats
    rec.update(caption=res.text, tokens=s.new_tokens, mean_accepted=round(s.mean_accepted, 4),
               acceptance_rate=round(s.acceptance_rate, 4), drafted=s.drafted_tokens, accepted=s.accepted_tokens,
               target_forwards=s.target_forwards)


def caption_one(pipe, task: Task, max_new_tokens: int, num_draft_tokens: int | None, baseline=None,
                result=None, plain=None, tree_nodes: int | None = None) -> dict:
    """The record of ``task``; never raises for a bad input (only for KeyboardInterrupt and the like).

    ``result`` is the ``GenerationResult`` of its row in the batched engine, ``plain`` (with ``baseline``) that of
    its plain-decoding row: the record is made from them, ``time_s`` being the row's latency (from reading the
    input to its last token, in a batch shared with others). With no result, or one that ended with an error,
    the input is captioned here alone (``generate``, batch 1), so an error line always says what that input does
    by itself; the same for the plain side."""
    rec = {"path": task.path, "prompt": task.prompt, "caption": None, "tokens": 0, "mean_accepted": None,
           "acceptance_rate": None, "time_s": 0.0, "error": None}
    start = time.perf_counter()
    try:
        if result is not None and result.error is None:
            res, elapsed = result, result.stats.wall_s
        else:
            res = pipe.generate(task.path, task.prompt, max_new_tokens=max_new_tokens,
                                num_draft_tokens=num_draft_tokens, tree_nodes=tree_nodes)
            elapsed = time.perf_counter() - start
        _fill(rec, res)
        rec["time_s"] = round(elapsed, 4)
        if baseline is not None:
            if plain is not None and plain.error is None:
                plain_s = plain.stats.wall_s
            else:
                t0 = time.perf_counter()
                plain = baseline.generate(task.path, task.prompt, max_new_tokens=max_new_tokens)
                plain_s = time.perf_counter() - t0
            rec.update(plain_time_s=round(plain_s, 4), speedup=round(plain_s / elapsed, 4) if elapsed > 0 else None,
                       plain_matches=plain.token_ids == res.token_ids)
    except Exception as e:  # noqa: BLE001 - one odd input must not stop the batch; KeyboardInterrupt still does
        rec.update(error=_short(e, task.path), time_s=round(time.perf_counter() - start, 4))
    return rec


def feed(pipe, tasks: Iterable[Task], settings: dict, window: int, on_done: Callable) -> None:
    """Caption ``tasks`` on ``pipe``'s shared batched engine (``pipe.submit``; it keeps
    ``pipe.default_batch_size`` rows in flight and admits a waiting input as soon as a row finishes), with at most
    ``window`` inputs read and not finished at a time. ``on_done(task, result)`` runs in this thread as each input
    finishes, in completion order; ``result`` is None for an input ``submit`` refused (a bad file).
    Inputs still in the engine when this stops early (Ctrl-C, a failed write) are cancelled."""
    todo = iter(tasks)
    out: list = []  # (task, job), oldest first
    try:
        while True:
            while len(out) < window and (task := next(todo, None)) is not None:
                try:
                    out.append((task, pipe.submit(task.path, task.prompt, **settings)))
                except Exception:  # noqa: BLE001 - a bad input: on_done captions it alone, which says why
                    on_done(task, None)
            if not out:
                return
            finished = [pair[1].done for pair in out]
            if not any(finished):
                try:  # sleep until the oldest row has news, or POLL_S
                    out[0][1].events.get(timeout=POLL_S)
                except queue.Empty:
                    pass
                continue
            done = [pair for pair, f in zip(out, finished) if f]
            out = [pair for pair, f in zip(out, finished) if not f]
            for task, job in done:
                on_done(task, job.result)
    finally:
        _cancel([job for _, job in out])  # (those of ``done`` are finished already)


def _cancel(jobs: list) -> None:
    """Free the rows of ``jobs`` and wait (a little) until the engine has let them go."""
    for job in jobs:
        job.cancelled = True
    deadline = time.monotonic() + CANCEL_WAIT_S
    for job in jobs:
        while not job.done and time.monotonic() < deadline:
            try:
                job.events.get(timeout=0.05)
            except queue.Empty:
                pass


# ----------------------------------------------------------------------------------------------------------
# backends: each loads its models, then returns work(emit) -> Timing, which hands every record of ``pending``
# to ``emit`` (the caller writes it) as it finishes, in any order
# ----------------------------------------------------------------------------------------------------------
def model_device(args) -> str:
    """Where the target runs: ``--device``, except that Ray workers given GPUs run on them."""
    device = str(getattr(args, "device", None) or "cpu")
    if getattr(args, "backend", None) == "ray" and float(getattr(args, "num_gpus_per_worker", 0) or 0) > 0 \
            and device.startswith("cpu"):
        return "cuda"  # Ray gives each actor its own CUDA_VISIBLE_DEVICES
    return device


def _model_kwargs(args) -> dict:
    """The shared model flags (whatever ``mmspec.cli.add_model_arguments`` defines), to rebuild them in a worker."""
    dests = getattr(args, "model_dests", None) or ("target", "drafter", "drafter_kind", "device", "dtype",
                                                   "device_map", "trust_remote_code")
    return {k: getattr(args, k, None) for k in dests}


def _batch_size(args) -> int:
    return int(getattr(args, "batch_size", None) or DEFAULT_BATCH_SIZE)


def run_local(args, pending: list[Task]) -> Callable[[Callable[[dict], None]], Timing]:
    """Loads the models now (before the progress bar starts); the returned ``work(emit)`` captions ``pending``
    through the batched engine, each record handed to ``emit`` as its row finishes.

    With ``--compare``, ``COMPARE_CHUNK`` batches of inputs at a time go through the speculative pipeline, then
    the same inputs through plain decoding at the same batch size; their lines follow the plain side."""
    from mmspec.cli import load_from_args

    pipe = load_from_args(args)
    check_prompts(pipe, pending, args.tree_nodes)
    batch = _batch_size(args)
    pipe.default_batch_size = batch  # the rows in flight of the pipeline's shared engine (made at the first submit)
    baseline = baseline_pipeline(pipe) if args.compare else None
    if baseline is not None:
        baseline.default_batch_size = batch
        warm_up(pipe, baseline)
    window = batch + max(1, int(batch * LOOKAHEAD))
    settings = dict(max_new_tokens=args.max_new_tokens, num_draft_tokens=args.num_draft_tokens,
                    tree_nodes=args.tree_nodes)
    timing = Timing()

    def record(task: Task, result=None, plain=None) -> dict:
        if result is not None and result.error is not None:
            timing.failed_in_batch += 1
        return caption_one(pipe, task, args.max_new_tokens, args.num_draft_tokens, baseline, result, plain,
                           tree_nodes=args.tree_nodes)

    def work(emit: Callable[[dict], None]) -> Timing:
        if baseline is None:
            t0 = time.perf_counter()
            feed(pipe, pending, settings, window, lambda task, res: emit(record(task, res)))
            timing.decode_s = time.perf_counter() - t0
            return timing
        step = batch * COMPARE_CHUNK
        for i in range(0, len(pending), step):
            chunk = pending[i:i + step]
            spec: dict = {}
            plain: dict = {}
            t0 = time.perf_counter()
            feed(pipe, chunk, settings, window, lambda task, res: spec.__setitem__(task.key, res))
            t1 = time.perf_counter()
            ok = [t for t in chunk if spec.get(t.key) is not None and spec[t.key].error is None]
            feed(baseline, ok, dict(max_new_tokens=args.max_new_tokens), window,
                 lambda task, res: plain.__setitem__(task.key, res))
            timing.decode_s += t1 - t0
            timing.plain_s += time.perf_counter() - t1
            timing.compared += len(ok)
            for task in chunk:
                emit(record(task, spec.get(task.key), plain.get(task.key)))
        return timing

    return work


def _batch_results(pipe, tasks: list[Task], batch_size: int, **settings) -> list:
    """``pipe.generate_batch`` over ``tasks`` (results in order); if the batch as a whole fails, no results
    (each input is then captioned alone by ``caption_one``)."""
    if not tasks:
        return []
    try:
        return pipe.generate_batch([t.path for t in tasks], [t.prompt for t in tasks], batch_size=batch_size,
                                   **settings)
    except Exception:  # noqa: BLE001 - KeyboardInterrupt still stops the worker
        return [None] * len(tasks)


class RayCaptioner:
    """The Ray Data worker: one model replica per actor, loaded once; each call captions one batch of inputs
    with ``generate_batch`` (``batch_size`` rows in flight)."""

    def __init__(self, model_kwargs: dict, max_new_tokens: int, num_draft_tokens: int | None, compare: bool,
                 num_threads: int = 1, batch_size: int = DEFAULT_BATCH_SIZE, tree_nodes: int | None = None):
        import argparse as _argparse

        import torch

        from mmspec.cli import load_from_args

        torch.set_num_threads(max(1, int(num_threads)))
        self.pipe = load_from_args(_argparse.Namespace(**model_kwargs))
        self.baseline = baseline_pipeline(self.pipe) if compare else None
        if self.baseline is not None:
            warm_up(self.pipe, self.baseline)
        self.max_new_tokens = max_new_tokens
        self.num_draft_tokens = num_draft_tokens
        self.tree_nodes = tree_nodes
        self.batch_size = batch_size

    def __call__(self, batch: dict) -> dict:
        tasks = [Task(str(path), str(prompt)) for path, prompt in zip(batch["path"], batch["prompt"])]
        results = _batch_results(self.pipe, tasks, self.batch_size, max_new_tokens=self.max_new_tokens,
                                 num_draft_tokens=self.num_draft_tokens, tree_nodes=self.tree_nodes)
        plains = [None] * len(tasks)
        if self.baseline is not None:  # the same inputs through plain decoding, at the same batch size
            ok = [i for i, r in enumerate(results) if r is not None and r.error is None]
            got = _batch_results(self.baseline, [tasks[i] for i in ok], self.batch_size,
                                 max_new_tokens=self.max_new_tokens)
            for i, res in zip(ok, got):
                plains[i] = res
        # Records travel back as JSON strings: no Arrow type inference over None/str/float columns.
        out = [json.dumps(caption_one(self.pipe, task, self.max_new_tokens, self.num_draft_tokens, self.baseline,
                                      res, plain, tree_nodes=self.tree_nodes), ensure_ascii=False)
               for task, res, plain in zip(tasks, results, plains)]
        return {"record": out}


def run_ray(args, pending: list[Task]) -> Callable[[Callable[[dict], None]], Timing]:
    try:
        import ray
        import ray.data
    except ImportError:
        raise MMSpecError("--backend ray needs Ray Data: pip install 'mmspec[ray]' (or 'ray[data]>=2.9,<3')") from None

    def work(emit: Callable[[dict], None]) -> Timing:
        t0 = time.perf_counter()
        for rec in _ray_records(ray, args, pending):
            emit(rec)
        return Timing(decode_s=time.perf_counter() - t0, note="Ray start-up and the workers' model loading included")

    return work


def _ray_records(ray, args, pending: list[Task]) -> Iterator[dict]:
    if not pending:
        return
    workers = max(1, int(args.workers))
    cpus = float(args.num_cpus_per_worker)
    gpus = float(args.num_gpus_per_worker)
    model_kwargs = dict(_model_kwargs(args), device=model_device(args))
    started_here = False
    if not ray.is_initialized():
        init = dict(include_dashboard=False, log_to_driver=not args.quiet, ignore_reinit_error=True)
        if args.ray_address:
            ray.init(address=args.ray_address, **init)
        else:
            # a local instance: enough logical CPUs for the actors plus the driver-side read tasks
            ray.init(num_cpus=max(os.cpu_count() or 1, int(workers * max(cpus, 1)) + 1), **init)
        started_here = True
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        items = [{"path": t.path, "prompt": t.prompt} for t in pending]
        # Workers open the files themselves: on a remote cluster the paths must be visible to every node.
        if "override_num_blocks" in _params(ray.data.from_items):
            ds = ray.data.from_items(items, override_num_blocks=len(items))
        else:  # Ray < 2.10
            ds = ray.data.from_items(items, parallelism=len(items))
        ds = ds.map_batches(RayCaptioner, batch_size=_batch_size(args), batch_format="numpy",
                            compute=ray.data.ActorPoolStrategy(size=workers),
                            fn_constructor_kwargs=dict(model_kwargs=model_kwargs, max_new_tokens=args.max_new_tokens,
                                                       num_draft_tokens=args.num_draft_tokens, compare=args.compare,
                                                       num_threads=max(1, int(cpus)), batch_size=_batch_size(args),
                                                       tree_nodes=args.tree_nodes),
                            num_cpus=cpus, num_gpus=gpus if gpus > 0 else None)
        rows = iter(ds.iter_rows())
        while True:
            try:
                row = next(rows)
            except StopIteration:
                break
            except Exception as e:  # noqa: BLE001 - a dead worker, a lost cluster: the lines written stay valid
                raise MMSpecError(f"the Ray run stopped ({_short(e)}); the captions written so far are kept, rerun "
                                  f"the same command to finish") from e
            yield json.loads(row["record"])
    finally:
        if started_here:
            ray.shutdown()


def _params(fn) -> set[str]:
    import inspect

    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


BACKENDS = {"local": run_local, "ray": run_ray}


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mmspec.cli import add_model_arguments

    parser.add_argument("paths", nargs="+", metavar="PATHS",
                        help="image files, folders (recursive), glob patterns, or .txt/.jsonl lists of paths "
                             '(jsonl lines: {"path": ..., "prompt": ...})')
    parser.add_argument("--out", required=True, help="JSONL output, one line per input; rerun with the same file "
                                                     "to resume (done inputs are skipped)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT,
                        help=f"prompt for every image (default: {DEFAULT_PROMPT!r})")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="caption length limit (default: 64)")
    parser.add_argument("--num-draft-tokens", type=int, default=None,
                        help="draft tokens per round (default: adaptive, from the drafter kind)")
    parser.add_argument("--tree-nodes", type=int, default=None, metavar="N",
                        help="draft a tree of at most N tokens per round instead of a chain (drafters that grow "
                             "trees: eagle, text, visual, vlm; default: a chain)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, metavar="N",
                        help="inputs decoded together (continuous batching: a finished row is refilled at once; with "
                             "--backend ray, per worker); captions are the same at any N (default 16)")
    parser.add_argument("--csv", default=None, metavar="FILE",
                        help="also write all captions of --out as CSV at the end")
    parser.add_argument("--compare", action="store_true",
                        help="also run plain decoding (drafter kind 'none', same target, same --batch-size) on the "
                             "same inputs, side by side a few batches at a time, and report the measured speedup")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N inputs")
    parser.add_argument("--retry-errors", action="store_true",
                        help="caption again the inputs whose line in --out records an error (their error line "
                             "is replaced)")
    parser.add_argument("--redo-other-target", action="store_true",
                        help="caption again the inputs whose line in --out was written by a different target model "
                             "(their lines are replaced); without it such a file is refused")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar, no per-image output, no summary")
    g = parser.add_argument_group("backend")
    g.add_argument("--backend", choices=sorted(BACKENDS), default="local",
                   help="local: this process; ray: Ray Data, one model replica per worker (pip install 'mmspec[ray]')")
    g.add_argument("--workers", type=int, default=2, help="ray: number of model replicas (default: 2)")
    g.add_argument("--num-gpus-per-worker", type=float, default=0.0,
                   help="ray: GPUs per replica; > 0 puts the models on CUDA (default: 0)")
    g.add_argument("--num-cpus-per-worker", type=float, default=1.0, help="ray: CPUs per replica (default: 1)")
    g.add_argument("--ray-address", default=None,
                   help="ray: address of an existing cluster ('auto', 'ray://host:10001'); default: start a local one")
    before = {a.dest for a in parser._actions}
    add_model_arguments(parser)
    parser.set_defaults(model_dests=tuple(a.dest for a in parser._actions if a.dest not in before))


def _print(quiet: bool, *parts, file=None) -> None:
    if not quiet:
        from tqdm import tqdm

        out = file or sys.stdout
        tqdm.write(" ".join(str(p) for p in parts), file=out)
        out.flush()  # line by line, also into a pipe (| tee, | head)


def _summary(args, records: list[dict], n_new: int, wall: float, timing: Timing | None = None,
             new_tokens: int = 0) -> None:
    """Totals over every input of this command, captioned now or in an earlier run of the same --out; speeds
    from what this run measured (rows of a batch overlap, so their latencies do not add up to a wall time)."""
    timing = timing or Timing()
    batch = _batch_size(args)
    where = f"batch size {batch}" + (f", {args.workers} Ray workers" if args.backend == "ray" else "")
    ok = [r for r in records if r.get("error") is None]
    errors = len(records) - len(ok)
    tokens = sum(r.get("tokens") or 0 for r in ok)
    forwards = sum(r.get("target_forwards") or 0 for r in ok)
    earlier = len(records) - n_new
    lines = [f"{len(records)} input(s): {len(ok)} captioned, {errors} error(s); {n_new} done now in {wall:.1f}s"
             + (f", {earlier} in an earlier run" if earlier else "") + f" -> {args.out}"]
    if ok:
        mean_acc = tokens / forwards if forwards else 0.0
        drafted = sum(r.get("drafted") or 0 for r in ok)
        accepted = sum(r.get("accepted") or 0 for r in ok)
        lines.append(f"  {tokens} tokens, mean accepted {mean_acc:.2f} tokens per target forward, "
                     f"{accepted}/{drafted} drafted tokens accepted" + (f" ({accepted / drafted:.0%})" if drafted else ""))
    if new_tokens and timing.decode_s > 0:
        lines.append(f"  this run: {new_tokens} tokens in {timing.decode_s:.1f}s = {new_tokens / timing.decode_s:.1f} "
                     f"tokens/s at {where}" + (f" ({timing.note})" if timing.note else ""))
    if timing.failed_in_batch:
        lines.append(f"  {timing.failed_in_batch} input(s) failed inside a batch and were captioned again alone")
    timed = [r for r in ok if r.get("plain_time_s") and r.get("time_s")]
    if args.compare and timed:
        per_image = statistics.median(r["plain_time_s"] / r["time_s"] for r in timed)
        same = sum(bool(r.get("plain_matches")) for r in timed)
        if timing.plain_s > 0 and timing.decode_s > 0:
            overall = (f"{timing.plain_s / timing.decode_s:.2f}x throughput ({timing.plain_s:.2f}s -> "
                       f"{timing.decode_s:.2f}s for the {timing.compared} input(s) compared now, both sides at {where})")
        else:  # nothing compared in this run (or by Ray workers): the rows' own latencies
            plain = sum(r["plain_time_s"] for r in timed)
            spec = sum(r["time_s"] for r in timed)
            overall = f"{plain / spec:.2f}x over the summed per-image latencies ({plain:.2f}s -> {spec:.2f}s)"
        lines.append(f"  speedup vs plain decoding (same target, drafter kind 'none'): {overall}, median "
                     f"{per_image:.2f}x per image (latency)"
                     + (f" (over {len(timed)} of {len(ok)} images; the others were captioned without --compare)"
                        if len(timed) < len(ok) else "")
                     + f"; identical output on {same}/{len(timed)}")
    elif args.compare and ok:
        lines.append("  no speedup measured: these images were captioned earlier without --compare")
    for line in lines:
        _print(args.quiet, line)


def _per_image(args, rec: dict, i: int, n: int, earlier: bool = False) -> None:
    """Errors always (on stderr); with --compare, every image: path, caption, accepted/drafted, speedup."""
    tag = f"[{i}/{n}{', earlier run' if earlier else ''}] {rec['path']}"
    if rec.get("error") is not None:
        _print(args.quiet, f"{tag}: error: {rec['error']}", file=sys.stdout if earlier else sys.stderr)
        return
    if not args.compare:
        return
    if rec.get("speedup"):
        speed = f"speedup {rec['speedup']:.2f}x ({rec['plain_time_s']:.3f}s plain -> {rec['time_s']:.3f}s latency)"
    else:
        speed = f"{rec['time_s']:.3f}s (not compared)"
    same = "" if rec.get("plain_matches", True) else "  [WARNING: differs from plain decoding]"
    _print(args.quiet, f"{tag}\n    {rec['caption']!r}\n    accepted {rec.get('accepted', 0)}/{rec.get('drafted', 0)} "
                       f"drafted tokens, {rec['mean_accepted']:.2f} tokens per target forward, {speed}{same}")


def check_flags(args) -> None:
    """Every flag value, before the first input is looked at: a value wrong for every input stops the run here
    instead of giving each input an error line (which a rerun would then skip as done)."""
    import math

    from mmspec.config import DecodeConfig

    try:
        DecodeConfig(max_new_tokens=args.max_new_tokens, num_draft_tokens=args.num_draft_tokens,
                     tree_nodes=args.tree_nodes)
    except MMSpecError as e:
        raise MMSpecError(str(e).replace("max_new_tokens", "--max-new-tokens")
                          .replace("num_draft_tokens", "--num-draft-tokens").replace("tree_nodes", "--tree-nodes")
                          .replace(" or None (adaptive)", " (leave it out for adaptive)")) from None
    if not isinstance(args.prompt, str) or not args.prompt.strip():
        raise MMSpecError("--prompt is empty")
    if args.limit is not None and args.limit < 1:
        raise MMSpecError(f"--limit must be at least 1, got {args.limit}")
    batch = getattr(args, "batch_size", DEFAULT_BATCH_SIZE)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise MMSpecError(f"--batch-size must be a positive whole number, got {batch!r}")
    if args.workers < 1:
        raise MMSpecError(f"--workers must be at least 1, got {args.workers}")
    if not (math.isfinite(args.num_cpus_per_worker) and args.num_cpus_per_worker > 0):
        raise MMSpecError(f"--num-cpus-per-worker must be > 0, got {args.num_cpus_per_worker}")
    if not (math.isfinite(args.num_gpus_per_worker) and args.num_gpus_per_worker >= 0):
        raise MMSpecError(f"--num-gpus-per-worker must be >= 0, got {args.num_gpus_per_worker}")
    from mmspec.pipeline import check_device, check_model_path, load_dtype

    if getattr(args, "preset", None):
        from mmspec.presets import resolve_preset

        resolve_preset(args.preset)
    load_dtype(getattr(args, "dtype", None), model_device(args), getattr(args, "preset", None))  # dtype, preset
    if args.backend == "local" and getattr(args, "device_map", None) is None:
        check_device(args.device)  # (Ray workers may have devices the driver lacks)
    if getattr(args, "target", None) is not None:
        check_model_path("target", args.target)
    drafter = getattr(args, "drafter", None)
    if drafter is not None and str(drafter).lower() not in ("default", "none"):
        check_model_path("drafter", drafter)


def check_prompts(pipe, tasks: list[Task], tree_nodes: int | None = None) -> None:
    """Each distinct prompt through the target's chat template once, before the first caption: a prompt that
    cannot work (two image tokens, no chat template) is refused instead of failing on every input; so is
    ``--tree-nodes`` with a drafter that drafts chains only."""
    pipe.adapter.check_generation_config()
    try:
        pipe.decode_config(dict(tree_nodes=tree_nodes))
    except MMSpecError as e:
        raise MMSpecError(str(e).replace("tree_nodes", "--tree-nodes")) from None
    for prompt in dict.fromkeys(t.prompt for t in tasks):
        try:
            pipe.adapter.format_prompt(prompt)
        except MMSpecError as e:
            raise MMSpecError(f"the prompt {prompt!r} cannot be used: {e}") from None


def run(args) -> int:
    from tqdm import tqdm

    check_flags(args)
    tasks = expand_inputs(args.paths, args.prompt)
    if args.limit is not None:
        tasks = tasks[: args.limit]
    if not tasks:
        raise MMSpecError(f"no inputs found in {' '.join(args.paths)}")
    check_outputs(args, tasks)
    started = time.perf_counter()
    warn = (lambda msg: None) if args.quiet else (lambda msg: print(f"mmspec caption: {msg}", file=sys.stderr))
    target = target_identity(args)
    with CaptionLog(os.path.expanduser(args.out), warn=warn) as log:
        other = {k for k, rec in log.records.items() if rec.get("target") not in (None, target)}
        if other and not args.redo_other_target:
            seen = sorted({log.records[k]["target"] for k in other})
            raise MMSpecError(f"{args.out} holds {len(other)} caption(s) written by another target "
                              f"({', '.join(seen)}); this run's target is {target}. Use another --out, or "
                              f"--redo-other-target to caption those inputs again and replace their lines")
        pending = [t for t in tasks if t.key in other or not log.is_done(t.key, args.retry_errors)]
        if args.retry_errors or other:
            log.drop({t.key for t in pending})  # lines of inputs outside this run stay as they are
        skipped = len(tasks) - len(pending)
        if skipped and not args.quiet:
            warn(f"{skipped} of {len(tasks)} input(s) already done in {args.out}; captioning the other {len(pending)}")
        if args.compare:  # the images done in an earlier run, so the measurement shows the whole batch
            for i, t in enumerate(t for t in tasks if t.key not in {p.key for p in pending}):
                _per_image(args, log.records[t.key], i + 1, len(tasks), earlier=True)
        if args.quiet:
            try:
                from transformers.utils import logging as hf_logging

                hf_logging.disable_progress_bar()
            except ImportError:
                pass
        work = BACKENDS[args.backend](args, pending) if pending else None
        bar = tqdm(total=len(pending), unit="img", disable=args.quiet or not pending, dynamic_ncols=True,
                   file=sys.stderr, desc="captioning")
        n_new = n_errors = forwards = tokens = 0
        want = {t.key for t in pending}

        def emit(rec: dict) -> None:
            nonlocal n_new, n_errors, forwards, tokens
            key = record_key(rec)
            if key not in want:  # never twice, whatever a backend sends back
                return
            want.discard(key)
            rec["target"] = target
            log.append(rec)
            n_new += 1
            if rec.get("error") is None:
                forwards += rec.get("target_forwards") or 0
                tokens += rec.get("tokens") or 0
            else:
                n_errors += 1
            bar.update(1)
            bar.set_postfix(mean_acc=f"{tokens / forwards:.2f}" if forwards else "-", errors=n_errors,
                            refresh=False)
            _per_image(args, rec, skipped + n_new, len(tasks))

        try:
            timing = work(emit) if work is not None else Timing()
        finally:
            bar.close()
        final = [log.records.get(t.key) for t in tasks]
    _summary(args, [r for r in final if r is not None], n_new, time.perf_counter() - started, timing, tokens)
    if args.csv:
        rows = write_csv(os.path.expanduser(args.out), args.csv)
        _print(args.quiet, f"  wrote {rows} row(s) to {args.csv}")
    missing = sum(r is None for r in final)
    failed = sum(r is not None and r.get("error") is not None for r in final)
    if failed and skipped and not args.quiet:
        warn(f"{failed} input(s) have an error line in {args.out}; --retry-errors captions them again")
    return 1 if failed or missing else 0


INTERRUPT_HINT = "rerun the same command to finish"


def main(argv: list[str] | None = None) -> int:
    """``python -m demos.caption`` is ``mmspec caption``: the same flags, errors and exit codes."""
    from mmspec.cli import main as cli_main

    return cli_main(["caption", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
