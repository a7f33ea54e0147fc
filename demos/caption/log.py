"""The append-only results log (``--out``, JSONL): resumable without redoing or losing work.

One line per input, written with one ``write`` and ``fsync``-ed as its row finishes, so a crash loses at most the
inputs in flight; a rerun reads the file back (``CaptionLog.records``) and skips the inputs done. A last line cut
by a crash is removed on open, so that input is redone; lines this tool did not write are kept and never trusted.
One process at a time holds the file (an exclusive ``flock``). Error lines are replaced (``drop``) only by an
atomic rewrite. ``write_csv`` turns the log into a CSV at the end of a run."""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import stat
from typing import Callable

from demos.caption.files import CSV, FORMAT, JSONL, LEGACY_PREFIX, OUT_WHY_REGULAR, OWN_PREFIX, csv_columns, parse_line
from demos.caption.inputs import record_key
from mmspec.errors import MMSpecError
from mmspec.outputs import check_writable, recognise


class WriteFailed(MMSpecError):
    """A write to an output file failed (disk full, I/O error); the lines written before it are intact."""


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


class CaptionLog:
    """The JSONL output: exclusive while open, repaired on open, appended to durably one line at a time.

    Only a file of ours is opened (its first line is a caption record) or a new one; a new file that ends up
    with no line (a run refused or stopped before its first caption) is removed on close."""

    def __init__(self, path: str | os.PathLike, warn: Callable[[str], None] = lambda msg: None):
        self.path = str(path)
        self.warn = warn
        self.fd = -1
        check_writable("--out", self.path, JSONL.example, why_regular=OUT_WHY_REGULAR)
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
                recognise(self.path, "--out", JSONL)
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
        parsed = [parse_line(line) for line in lines]
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
            rec = parse_line(line)
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
            rec = parse_line(line) if line.strip() else None
            if rec is not None:
                out.pop(record_key(rec), None)
                out[record_key(rec)] = rec
    return list(out.values())


def write_csv(jsonl_path: str, csv_path: str) -> int:
    """Write every input of ``jsonl_path`` as a CSV row (atomically); returns the number of rows.

    An existing ``csv_path`` is replaced only if it is a CSV this tool wrote (``files.CSV``)."""
    csv_path = os.path.expanduser(csv_path)
    if os.path.exists(csv_path):
        recognise(csv_path, "--csv", CSV)
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
