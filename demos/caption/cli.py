"""``mmspec caption``: its flags (``add_arguments``) and the run (``run``): expand the inputs, check every flag
and output path, open the log, skip what is done, hand the rest to a backend and write each record as it comes."""

from __future__ import annotations

import argparse
import os
import sys
import time

from demos.caption.backends import BACKENDS
from demos.caption.files import check_outputs
from demos.caption.inputs import DEFAULT_PROMPT, expand_inputs, record_key
from demos.caption.log import CaptionLog, write_csv
from demos.caption.record import Timing
from demos.caption.report import per_image, say, summary
from demos.caption.settings import DEFAULT_BATCH_SIZE, check_flags
from demos.caption.target import target_identity
from mmspec.errors import MMSpecError
from mmspec.model_flags import add_model_flags

INTERRUPT_HINT = "rerun the same command to finish"


def add_arguments(parser: argparse.ArgumentParser) -> None:
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
                             "trees, see mmspec.drafters.tree_kinds(); default: a chain)")
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
    add_model_flags(parser)


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
                per_image(args, log.records[t.key], i + 1, len(tasks), earlier=True)
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
            per_image(args, rec, skipped + n_new, len(tasks))

        try:
            timing = work(emit) if work is not None else Timing()
        finally:
            bar.close()
        final = [log.records.get(t.key) for t in tasks]
    summary(args, [r for r in final if r is not None], n_new, time.perf_counter() - started, timing, tokens)
    if args.csv:
        rows = write_csv(os.path.expanduser(args.out), args.csv)
        say(args.quiet, f"  wrote {rows} row(s) to {args.csv}")
    missing = sum(r is None for r in final)
    failed = sum(r is not None and r.get("error") is not None for r in final)
    if failed and skipped and not args.quiet:
        warn(f"{failed} input(s) have an error line in {args.out}; --retry-errors captions them again")
    return 1 if failed or missing else 0


def main(argv: list[str] | None = None) -> int:
    """``python -m demos.caption`` is ``mmspec caption``: the same flags, errors and exit codes."""
    from mmspec.cli import main as cli_main

    return cli_main(["caption", *(sys.argv[1:] if argv is None else argv)])
