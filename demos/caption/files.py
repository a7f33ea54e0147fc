"""The files ``mmspec caption`` writes, and the checks that it writes only those: its JSONL (every line a caption
record, recognised by its first line) and its CSV (recognised by its header row), through the one mechanism of
``mmspec.outputs``. Every output path is checked before the first input: a regular file that is ours or new, in a
folder this user can write, not a folder, not an input, and no two outputs the same file."""

from __future__ import annotations

import csv
import json
import os

from demos.caption.inputs import Task
from mmspec.errors import MMSpecError
from mmspec.outputs import HEAD_BYTES, FileKind, NotOurs, check_writable, first_line, recognise

FORMAT = "caption/1"                      # every line this tool writes starts with {"mmspec": FORMAT, ...}
OWN_PREFIX = b'{"mmspec": "caption/'      # how the start of one of our lines looks, even when cut by a crash
LEGACY_PREFIX = b'{"path": '              # lines of the previous release (no "mmspec" field) started so
FIELDS = ("path", "prompt", "caption", "tokens", "mean_accepted", "acceptance_rate", "time_s", "error")
EXTRA_FIELDS = ("target", "drafted", "accepted", "target_forwards", "plain_time_s", "speedup", "plain_matches")
OUT_WHY_REGULAR = "a rerun reads it back to resume; use a file name, and e.g. `tail -f` it to watch"


def is_own(rec) -> bool:
    """A caption record of ours: marked with this format, or a previous release's line (every field of FIELDS)."""
    if not isinstance(rec, dict) or not isinstance(rec.get("path"), str) or not isinstance(rec.get("prompt"), str):
        return False
    if "mmspec" in rec:
        return rec["mmspec"] == FORMAT
    return all(f in rec for f in FIELDS)


def parse_line(line: bytes) -> dict | None:
    """The record on ``line`` if it is one of ours, else None (a line this tool did not write is never trusted)."""
    try:
        rec = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return rec if is_own(rec) else None


def _recognise_jsonl(head: bytes) -> None:
    line, complete = first_line(head)
    if not line and complete:
        raise NotOurs("its first line is empty")
    if not line:
        return  # empty: nothing to lose
    if not complete:
        if line.startswith(OWN_PREFIX) and len(line) < HEAD_BYTES:
            return  # our first line, cut by a crash: repaired on open
        raise NotOurs("it has no complete first line")
    try:
        rec = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise NotOurs("its first line is not JSON") from None
    if isinstance(rec, dict) and "mmspec" in rec and rec.get("mmspec") != FORMAT:
        raise NotOurs(f"it was written in format {rec.get('mmspec')!r}; this version writes {FORMAT!r}",
                      what="a caption file this version can resume")
    if not is_own(rec):
        raise NotOurs("its first line is not a caption record")


def _recognise_csv(head: bytes) -> None:
    line, complete = first_line(head)
    if not line and not complete:
        return
    try:
        header = next(csv.reader([line.decode("utf-8").rstrip("\r")]))
    except (UnicodeDecodeError, csv.Error, StopIteration):
        header = []
    extra = header[len(FIELDS):]
    if header[: len(FIELDS)] != list(FIELDS) or extra != [f for f in EXTRA_FIELDS if f in extra]:
        raise NotOurs(f"its header is not {','.join(FIELDS)},...")


JSONL = FileKind("a caption file written by mmspec caption", _recognise_jsonl, "captions.jsonl")
CSV = FileKind("a CSV written by mmspec caption", _recognise_csv, "captions.csv")


def csv_columns(records: list[dict]) -> list[str]:
    return list(FIELDS) + [f for f in EXTRA_FIELDS if any(f in r for r in records)]


def same_file(a: str, b: str) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_outputs(args, tasks: list[Task]) -> None:
    """Every output path of this run is checked before any work: a regular file that is ours or new, in a
    folder this user can write, not a folder, not an input, and no two outputs the same file."""
    out = os.path.expanduser(args.out)
    csv_path = os.path.expanduser(args.csv) if args.csv else None
    check_writable("--out", out, JSONL.example, why_regular=OUT_WHY_REGULAR)
    if csv_path is not None:
        if same_file(out, csv_path):
            raise MMSpecError(f"--csv and --out are the same file ({args.out}); the CSV would overwrite the captions "
                              f"a rerun resumes from. Give the CSV its own name, e.g. "
                              f"{os.path.splitext(args.out)[0]}.csv")
        out_folder = os.path.dirname(os.path.abspath(out))
        check_writable("--csv", csv_path, CSV.example,
                       create_folder=os.path.dirname(os.path.abspath(csv_path)) == out_folder,
                       why_regular="it is replaced atomically at the end of the run",
                       hint="or put the file next to --out, whose folder is created")
    given = [os.path.expanduser(str(p)) for p in args.paths if os.path.isfile(os.path.expanduser(str(p)))]
    for flag, path in (("--out", out), ("--csv", csv_path)):
        if path is None:
            continue
        name = os.path.basename(path)
        # the files named on the command line (list files above all: any spelling, hard links), and the images
        # found (by name first: a batch may hold a million of them)
        for inp in given + [t.path for t in tasks if os.path.basename(t.path) == name]:
            if same_file(inp, path):
                raise MMSpecError(f"{flag} {path} is also an input of this run ({inp}); mmspec never writes over "
                                  f"its inputs. Choose another {flag}")
    if os.path.exists(out):
        recognise(out, "--out", JSONL)
    if csv_path is not None and os.path.exists(csv_path):
        recognise(csv_path, "--csv", CSV)
