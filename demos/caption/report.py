"""What the user sees: errors per input (always, on stderr), each image with ``--compare``, and the summary
over every input of the command; nothing with ``--quiet``. Lines go through tqdm, under the progress bar."""

from __future__ import annotations

import statistics
import sys

from demos.caption.record import Timing
from demos.caption.settings import batch_size_of


def say(quiet: bool, *parts, file=None) -> None:
    if not quiet:
        from tqdm import tqdm

        out = file or sys.stdout
        tqdm.write(" ".join(str(p) for p in parts), file=out)
        out.flush()  # line by line, also into a pipe (| tee, | head)


def summary(args, records: list[dict], n_new: int, wall: float, timing: Timing | None = None,
            new_tokens: int = 0) -> None:
    """Totals over every input of this command, captioned now or in an earlier run of the same --out; speeds
    from what this run measured (rows of a batch overlap, so their latencies do not add up to a wall time)."""
    timing = timing or Timing()
    batch = batch_size_of(args)
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
        say(args.quiet, line)


def per_image(args, rec: dict, i: int, n: int, earlier: bool = False) -> None:
    """Errors always (on stderr); with --compare, every image: path, caption, accepted/drafted, speedup."""
    tag = f"[{i}/{n}{', earlier run' if earlier else ''}] {rec['path']}"
    if rec.get("error") is not None:
        say(args.quiet, f"{tag}: error: {rec['error']}", file=sys.stdout if earlier else sys.stderr)
        return
    if not args.compare:
        return
    if rec.get("speedup"):
        speed = f"speedup {rec['speedup']:.2f}x ({rec['plain_time_s']:.3f}s plain -> {rec['time_s']:.3f}s latency)"
    else:
        speed = f"{rec['time_s']:.3f}s (not compared)"
    same = "" if rec.get("plain_matches", True) else "  [WARNING: differs from plain decoding]"
    say(args.quiet, f"{tag}\n    {rec['caption']!r}\n    accepted {rec.get('accepted', 0)}/{rec.get('drafted', 0)} "
                    f"drafted tokens, {rec['mean_accepted']:.2f} tokens per target forward, {speed}{same}")
