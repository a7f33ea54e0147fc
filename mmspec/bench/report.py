"""What ``mmspec bench`` reports: a row per mode (speed over each timed pass, acceptance, time to first token,
peak memory, whether its output equals hf-greedy's), as JSON rows, markdown tables and a plot, with the
machine's description."""

from __future__ import annotations

import os
import platform
import statistics

from mmspec.bench.modes import Bench, Input
from mmspec.types import acceptance_by_position


def machine_info(device: str) -> dict:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "device": device}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    import transformers

    info["transformers"] = transformers.__version__
    return info



def summary(bench: Bench, inputs: list[Input]) -> list[dict]:
    """One row per mode of ``bench``'s timed calls over ``inputs`` (all inputs, or those of one prompt type)."""
    names = {i.name for i in inputs}

    def calls(mode):
        return [c for c in bench.results[mode].calls if c.input in names]

    def pass_rate(cs):
        """tokens / seconds of each timed pass over these inputs, median over the passes"""
        passes = {}
        for c in cs:
            tokens, wall = passes.get(c.rep, (0, 0.0))
            passes[c.rep] = (tokens + len(c.ids), wall + c.wall_s)
        rates = [t / w for t, w in passes.values() if w > 0]
        return statistics.median(rates) if rates else 0.0

    def median_call_rate(cs):
        rates = [len(c.ids) / c.wall_s for c in cs if c.wall_s > 0]
        return statistics.median(rates) if rates else 0.0

    base, base_call = pass_rate(calls("hf-greedy")), median_call_rate(calls("hf-greedy"))
    reference = {c.input: c.ids for c in calls("hf-greedy")}
    rows = []
    for mode in bench.modes:
        r, cs = bench.results[mode], calls(mode)
        tps, per_call = pass_rate(cs), median_call_rate(cs)
        mismatches = sorted({c.input for c in cs if c.ids != reference.get(c.input)})
        forwards, drafted = sum(c.forwards for c in cs), sum(c.drafted for c in cs)
        checked = bench.temperature == 0 and not r.error
        rows.append({
            "mode": mode,
            "tokens_per_s": round(tps, 2),
            "speedup_vs_hf_greedy": round(tps / base, 3) if base and tps else None,
            "median_call_tokens_per_s": round(per_call, 2),
            "median_call_speedup": round(per_call / base_call, 3) if base_call and per_call else None,
            "mean_accepted": round(sum(len(c.ids) for c in cs) / forwards, 3) if forwards else None,
            "acceptance_rate": round(sum(c.accepted for c in cs) / drafted, 3) if drafted else None,
            "acceptance_by_position": [round(a, 3) for a in
                                       acceptance_by_position([x for c in cs for x in c.rounds])] or None,
            "ttft_cold_s": round(statistics.median(r.ttft_cold), 4) if r.ttft_cold else None,
            "ttft_warm_s": round(statistics.median(r.ttft_warm), 4) if r.ttft_warm else None,
            "peak_memory_mb": round(max((c.peak_mb for c in cs), default=0.0), 1),
            "lossless": (not mismatches and {c.input for c in cs} == names) if checked else None,
            "mismatched_inputs": mismatches if checked else [],
            "runs": len(cs),
            "error": r.error,
        })
    return rows


def batched_summary(runs: dict, reference: dict, inputs: list[Input], temperature: float) -> list[dict]:
    """runs: mode -> [pass results] at one batch size -> one row per mode (median tokens/s over passes)."""
    rows, rates = [], {}   # rates: mode -> tokens/s unrounded (a speedup of rounded rates is off by up to 0.1%)
    for mode, passes in runs.items():
        ok = [p for p in passes if "error" not in p]
        if not ok:
            rows.append({"mode": mode, "error": passes[0]["error"] if passes else "not run"})
            continue
        tps = rates[mode] = statistics.median(p["tokens"] / p["wall_s"] for p in ok)
        mismatched = sorted({inp.name for p in ok for inp, ids in zip(inputs, p["ids"])
                             if ids != reference.get(inp.name)})
        forwards = sum(p["forwards"] for p in ok)
        rows.append({"mode": mode, "tokens_per_s": round(tps, 1), "runs": len(ok),
                     "mean_accepted": round(sum(p["tokens"] for p in ok) / forwards, 3) if forwards else None,
                     "peak_memory_mb": round(max(p["peak_mb"] for p in ok), 1),
                     "lossless": (not mismatched) if temperature == 0 else None, "mismatched_inputs": mismatched,
                     "error": None})
    base = rates.get("hf-greedy")
    for r in rows:
        tps = rates.get(r["mode"])
        r["speedup_vs_hf_greedy"] = round(tps / base, 3) if base and tps else None
    return rows


def batched_table(by_batch: dict) -> str:
    lines = ["| batch | mode | tokens/s | speedup vs hf-greedy (same batch) | tokens / target fwd | peak mem (MB) | "
             "rows equal to batch-1 generate() |", "|" + "---|" * 7]
    for B, rows in by_batch.items():
        for r in rows:
            if r.get("error"):
                lines.append(f"| {B} | {r['mode']} | – ({r['error'][:70]}) | | | | |")
                continue
            same = {True: "all", False: f"NO: {len(r['mismatched_inputs'])} differ", None: "–"}[r["lossless"]]
            acc = "–" if r["mean_accepted"] is None else f"{r['mean_accepted']:.2f}"
            lines.append(f"| {B} | {r['mode']} | {r['tokens_per_s']:.1f} | {r['speedup_vs_hf_greedy']:.2f}x | {acc} | "
                         f"{r['peak_memory_mb']:.0f} | {same} |")
    return "\n".join(lines)


def markdown_table(rows: list[dict]) -> str:
    head = ("| mode | tokens/s | speedup vs hf-greedy | median per call: tokens/s (speedup) | "
            "mean accepted / target fwd | acceptance | TTFT cold / warm (s) | peak mem (MB) | lossless |")
    lines = [head, "|" + "---|" * 9]
    fmt = lambda v, f="{:.2f}": "–" if v is None else f.format(v)  # noqa: E731
    for r in rows:
        lossless = {True: "yes", False: f"NO ({len(r['mismatched_inputs'])} inputs)", None: "–"}[r["lossless"]]
        if r["error"]:
            lines.append(f"| {r['mode']} | failed: {r['error'][:80]} | | | | | | | |")
            continue
        lines.append(f"| {r['mode']} | {fmt(r['tokens_per_s'], '{:.1f}')} | {fmt(r['speedup_vs_hf_greedy'])}x | "
                     f"{fmt(r['median_call_tokens_per_s'], '{:.1f}')} ({fmt(r['median_call_speedup'])}x) | "
                     f"{fmt(r['mean_accepted'])} | {fmt(r['acceptance_rate'])} | {fmt(r['ttft_cold_s'], '{:.3f}')} / "
                     f"{fmt(r['ttft_warm_s'], '{:.3f}')} | {fmt(r['peak_memory_mb'], '{:.0f}')} | {lossless} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str, title: str, batched: dict | None = None) -> None:
    """Speedup per mode at batch 1, acceptance by draft position (chains), and throughput by batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["speedup_vs_hf_greedy"]]
    n = 3 if batched else 2
    fig, axes = plt.subplots(1, n, figsize=(6 * n, 4.5))
    a, b = axes[0], axes[1]
    a.barh([r["mode"] for r in ok], [r["speedup_vs_hf_greedy"] for r in ok],
           color=["#888" if r["mode"].startswith("hf-") else "#2a7" for r in ok])
    a.axvline(1.0, color="k", lw=0.8)
    a.set_xlabel("speedup vs hf-greedy at batch 1 (tokens/s over a pass, median of passes)")
    a.set_title("speed, batch 1")
    for r in rows:
        # a tree's trace lists its accepted path first: its per-position figures are not a chain's
        if r["acceptance_by_position"] and not r["mode"].endswith("-tree"):
            pos = list(range(1, len(r["acceptance_by_position"]) + 1))
            b.plot(pos, r["acceptance_by_position"], marker="o", label=r["mode"])
    b.set_xlabel("draft position")
    b.set_ylabel("acceptance rate")
    b.set_ylim(0, 1.05)
    b.set_title("acceptance by draft position (chains)")
    b.legend()
    if batched:
        c = axes[2]
        sizes = sorted(int(k) for k in batched)
        modes = [r["mode"] for r in batched[str(sizes[0])] if not r.get("error")]
        for mode in modes:
            ys = [next((r["tokens_per_s"] for r in batched[str(B)] if r["mode"] == mode and not r.get("error")), None)
                  for B in sizes]
            c.plot(sizes, ys, marker="o", label=mode, color="#555" if mode.startswith("hf-") else None,
                   lw=2.5 if mode.startswith("hf-") else 1.5)
        c.set_xscale("log", base=2)
        c.set_xticks(sizes, [str(x) for x in sizes])
        c.set_xlabel("batch size (rows in flight)")
        c.set_ylabel("tokens/s over all inputs")
        c.set_title("throughput by batch size")
        c.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
