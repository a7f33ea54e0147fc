"""``mmspec bench``: mmspec side by side with transformers, same inputs, same process, interleaved.

Modes: ``hf-greedy`` (the target's own ``generate``, the baseline), ``hf-assisted`` (``assistant_model=`` the same
text drafter), ``hf-prompt-lookup``, and every mmspec drafter kind available for the pair. Each timed call
includes preprocessing and the vision tower: mmspec's image cache is cleared before every timed call, so the
headline numbers never profit from having seen an image before; the warm-cache effect is reported separately
as time to first token (cold vs warm).

A mode's tokens/s over a set of inputs is that of each timed pass (the pass's tokens over its seconds), median
over the passes: what a user running that set would see. The median of the per-call rates is reported beside
it, but it is no speed for a mixed set: with one-word answers and captions half and half, it falls in the gap
between the two clusters and moves with whichever call lands nearest.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from mmspec.errors import MMSpecError
from mmspec.types import acceptance_by_position

QUESTION_KINDS = ("color", "count", "position", "yesno")


@dataclass
class Input:
    image: object
    prompt: str
    prompt_type: str
    name: str


@dataclass
class Call:
    """One timed call of one mode on one input."""

    input: str
    prompt_type: str
    wall_s: float
    ids: list[int]
    forwards: int = 0
    drafted: int = 0
    accepted: int = 0
    rounds: list = field(default_factory=list)
    peak_mb: float = 0.0
    rep: int = 0          # the timed pass it belongs to


@dataclass
class ModeResult:
    mode: str
    calls: list[Call] = field(default_factory=list)
    ttft_cold: list[float] = field(default_factory=list)
    ttft_warm: list[float] = field(default_factory=list)
    error: str | None = None


class PeakMemory:
    """Peak memory during a call: CUDA allocator peak on GPU, resident set size (sampled) on CPU."""

    def __init__(self, device: str):
        import torch

        self.cuda = str(device).startswith("cuda") and torch.cuda.is_available()
        self.peak = 0

    def _rss(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            return 0

    def __enter__(self):
        import torch

        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            self._stop = threading.Event()
            self.peak = self._rss()

            def sample():
                while not self._stop.wait(0.005):
                    self.peak = max(self.peak, self._rss())

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss())

    @property
    def mb(self) -> float:
        return self.peak / 2**20


def scene_inputs(n: int, prompt_types: list[str]) -> list[Input]:
    """Held-out scenes of the bundled world: one caption and one question per scene."""
    from vision.scenes import HELDOUT_SEEDS, examples_for_scene

    inputs = []
    for i, seed in enumerate(list(HELDOUT_SEEDS)[-n:]):  # the end of the held-out range: not used by the tests
        for ptype in prompt_types:
            kind = "caption" if ptype == "caption" else QUESTION_KINDS[i % len(QUESTION_KINDS)]
            ex = examples_for_scene(seed, kinds=(kind,))[0]
            inputs.append(Input(ex.image, ex.prompt, ptype, f"scene{seed}:{kind}"))
    return inputs


def folder_inputs(folder: str, n: int, prompts: dict[str, str]) -> list[Input]:
    from vision.images import load_image

    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp"})[:n]
    if not files:
        raise MMSpecError(f"no images found in {folder}")
    return [Input(load_image(f), prompt, ptype, f"{f.name}:{ptype}") for f in files for ptype, prompt in prompts.items()]


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


class Bench:
    def __init__(self, pipe, modes: list[str], max_new_tokens: int, temperature: float, k: int | None,
                 lookup_tokens: int, extra: dict | None = None, tree_nodes: int | None = None):
        self.pipe, self.adapter = pipe, pipe.adapter
        self.max_new_tokens, self.temperature, self.k, self.lookup = max_new_tokens, temperature, k, lookup_tokens
        self.pipelines = {f"mmspec-{pipe.drafter_kind}": pipe,
                          "mmspec-ngram": pipe.with_drafter_kind("ngram"),
                          "mmspec-none": pipe.with_drafter_kind("none"), **(extra or {})}
        # a tree mode per drafter that grows trees: ``mmspec-<kind>-tree`` (tree_nodes per round)
        self.tree_nodes = {}
        for mode, p in list(self.pipelines.items()):
            if p.strategy.grows_trees and tree_nodes != 0:
                self.pipelines[f"{mode}-tree"] = p
                self.tree_nodes[f"{mode}-tree"] = tree_nodes or p.strategy.default_tree_nodes
        # transformers' assisted generation takes a causal LM: the text (or visual) drafter's, when there is one
        self.assistant = next((p.drafter for p in [pipe, *self.pipelines.values()]
                               if p.strategy.kind in ("text", "visual")), None)
        available = ["hf-greedy", "hf-prompt-lookup"] + (["hf-assisted"] if self.assistant is not None else [])
        available += list(self.pipelines)
        self.modes = [m for m in available if not modes or m in modes]
        unknown = set(modes or []) - set(available)
        if unknown:
            raise MMSpecError(f"unknown or unavailable modes {sorted(unknown)}; available: {available}")
        if "hf-greedy" not in self.modes:
            self.modes.insert(0, "hf-greedy")
        self.results = {m: ModeResult(m) for m in self.modes}

    def _hf(self, mode: str, inp: Input) -> tuple[list[int], float]:
        import torch

        from vision.images import load_image

        start = time.perf_counter()
        text = self.adapter.format_prompt(inp.prompt)
        inputs = self.pipe.processor(images=load_image(inp.image), text=text, return_tensors="pt")
        inputs = inputs.to(self.adapter.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.pipe.target.dtype)
        kwargs = dict(max_new_tokens=self.max_new_tokens)
        if self.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=1.0, top_k=0)
        else:
            kwargs.update(do_sample=False)
        if mode == "hf-assisted":
            kwargs["assistant_model"] = self.assistant
        elif mode == "hf-prompt-lookup":
            kwargs["prompt_lookup_num_tokens"] = self.lookup
        with torch.inference_mode():
            out = self.pipe.target.generate(**inputs, **kwargs)
        ids = out[0, inputs["input_ids"].shape[1]:].tolist()
        return ids, time.perf_counter() - start

    def run_one(self, mode: str, inp: Input, record: bool, rep: int = 0) -> None:
        res = self.results[mode]
        if res.error:
            return
        try:
            with PeakMemory(self.adapter.device.type) as mem:
                if mode.startswith("hf-"):
                    ids, wall = self._hf(mode, inp)
                else:
                    self.adapter.vision_cache.clear()  # every timed call encodes its image
                    out = self.pipelines[mode].generate(inp.image, inp.prompt, max_new_tokens=self.max_new_tokens,
                                                        temperature=self.temperature, num_draft_tokens=self.k,
                                                        seed=0 if self.temperature > 0 else None,
                                                        tree_nodes=self.tree_nodes.get(mode))
                    ids, wall = out.token_ids, out.stats.wall_s
        except Exception as e:  # a mode that breaks (e.g. HF assisted decoding on a padded vocab) is reported
            res.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            return
        if not record:
            return
        call = Call(inp.name, inp.prompt_type, wall, ids, peak_mb=mem.mb, rep=rep)
        if not mode.startswith("hf-"):
            call.forwards, call.drafted = out.stats.target_forwards, out.stats.drafted_tokens
            call.accepted, call.rounds = out.stats.accepted_tokens, out.rounds
        res.calls.append(call)

    def time_to_first_token(self, inputs: list[Input]) -> None:
        for mode, pipe in self.pipelines.items():
            if mode not in self.modes:
                continue
            for inp in inputs:
                self.adapter.vision_cache.clear()
                cold = pipe.generate(inp.image, inp.prompt, max_new_tokens=1).stats.time_to_first_token_s
                warm = pipe.generate(inp.image, inp.prompt, max_new_tokens=1).stats.time_to_first_token_s
                self.results[mode].ttft_cold.append(cold)
                self.results[mode].ttft_warm.append(warm)

    def summary(self, inputs: list[Input]) -> list[dict]:
        """One row per mode over ``inputs`` (all inputs, or those of one prompt type)."""
        names = {i.name for i in inputs}

        def calls(mode):
            return [c for c in self.results[mode].calls if c.input in names]

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
        for mode in self.modes:
            r, cs = self.results[mode], calls(mode)
            tps, per_call = pass_rate(cs), median_call_rate(cs)
            mismatches = sorted({c.input for c in cs if c.ids != reference.get(c.input)})
            forwards, drafted = sum(c.forwards for c in cs), sum(c.drafted for c in cs)
            checked = self.temperature == 0 and not r.error
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


    # ----- throughput at batch size B: every input through each mode, B rows in flight ---------------------
    def hf_batched(self, inputs: list[Input], B: int) -> list[list[int]]:
        """transformers' own batched greedy ``generate`` (left padding), in chunks of B; rows cut at EOS."""
        import torch

        from vision.images import load_image

        tok = self.pipe.processor.tokenizer
        side, tok.padding_side = tok.padding_side, "left"
        eos = self.adapter.eos_token_ids
        out = []
        try:
            for s in range(0, len(inputs), B):
                chunk = inputs[s:s + B]
                x = self.pipe.processor(images=[load_image(i.image) for i in chunk],
                                        text=[self.adapter.format_prompt(i.prompt) for i in chunk],
                                        padding=True, return_tensors="pt").to(self.adapter.device)
                if "pixel_values" in x:
                    x["pixel_values"] = x["pixel_values"].to(self.pipe.target.dtype)
                with torch.inference_mode():
                    ids = self.pipe.target.generate(**x, max_new_tokens=self.max_new_tokens, do_sample=False)
                for row in ids[:, x["input_ids"].shape[1]:].tolist():
                    cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
                    out.append(row[:cut])
        finally:
            tok.padding_side = side
        return out

    def run_batched(self, mode: str, inputs: list[Input], B: int) -> dict:
        """One timed pass of ``mode`` over ``inputs`` with B rows in flight: tokens, seconds, ids, forwards."""
        try:
            with PeakMemory(self.adapter.device.type) as mem:
                start = time.perf_counter()
                if mode == "hf-greedy":
                    ids, forwards = self.hf_batched(inputs, B), 0
                elif mode.startswith("hf-"):
                    raise MMSpecError(f"{mode} runs one request at a time in transformers")
                else:
                    self.adapter.vision_cache.clear()  # every timed pass encodes its images
                    res = self.pipelines[mode].generate_batch(
                        [i.image for i in inputs], [i.prompt for i in inputs], batch_size=B,
                        max_new_tokens=self.max_new_tokens, temperature=self.temperature, num_draft_tokens=self.k,
                        seed=0 if self.temperature > 0 else None, tree_nodes=self.tree_nodes.get(mode))
                    errors = [r.error for r in res if r.error]
                    if errors:
                        raise MMSpecError(errors[0])
                    ids, forwards = [r.token_ids for r in res], sum(r.stats.target_forwards for r in res)
                wall = time.perf_counter() - start
        except Exception as e:
            return {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]}
        return {"tokens": sum(len(i) for i in ids), "wall_s": wall, "ids": ids, "forwards": forwards,
                "peak_mb": mem.mb}


def batched_summary(runs: dict, reference: dict, inputs: list[Input], temperature: float) -> list[dict]:
    """runs: mode -> [pass results] at one batch size -> one row per mode (median tokens/s over passes)."""
    base = None
    rows = []
    for mode, passes in runs.items():
        ok = [p for p in passes if "error" not in p]
        if not ok:
            rows.append({"mode": mode, "error": passes[0]["error"] if passes else "not run"})
            continue
        tps = statistics.median(p["tokens"] / p["wall_s"] for p in ok)
        if mode == "hf-greedy":
            base = tps
        mismatched = sorted({inp.name for p in ok for inp, ids in zip(inputs, p["ids"])
                             if ids != reference.get(inp.name)})
        forwards = sum(p["forwards"] for p in ok)
        rows.append({"mode": mode, "tokens_per_s": round(tps, 1), "runs": len(ok),
                     "mean_accepted": round(sum(p["tokens"] for p in ok) / forwards, 3) if forwards else None,
                     "peak_memory_mb": round(max(p["peak_mb"] for p in ok), 1),
                     "lossless": (not mismatched) if temperature == 0 else None, "mismatched_inputs": mismatched,
                     "error": None})
    for r in rows:
        r["speedup_vs_hf_greedy"] = round(r["tokens_per_s"] / base, 3) if base and r.get("tokens_per_s") else None
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mmspec.cli import add_model_arguments

    add_model_arguments(parser)
    g = parser.add_argument_group("benchmark")
    g.add_argument("--n", type=int, default=12, help="number of scenes / images (default 12)")
    g.add_argument("--prompt-types", default="caption,question", help="caption,question (default both)")
    g.add_argument("--images", default=None, help="folder of images instead of the bundled world's scenes")
    g.add_argument("--caption-prompt", default="Describe the image.", help="caption prompt for --images")
    g.add_argument("--question-prompt", default="What is in the image?", help="question prompt for --images")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--repeats", type=int, default=2, help="timed passes over all inputs (default 2)")
    g.add_argument("--warmup", type=int, default=2, help="untimed inputs per mode first (default 2)")
    g.add_argument("--temperature", type=float, default=0.0, help="> 0 benchmarks sampling (no lossless check)")
    g.add_argument("--num-draft-tokens", type=int, default=None, help="fixed k for mmspec (default: adaptive)")
    g.add_argument("--visual-drafter", default="default",
                   help="also time this visual drafter folder (default: the bundled one with the bundled target; "
                        "'none' to skip)")
    g.add_argument("--lookup-tokens", type=int, default=4, help="prompt_lookup_num_tokens for hf-prompt-lookup")
    g.add_argument("--eagle-drafter", default="default",
                   help="also time this eagle head folder as mmspec-eagle (default: the bundled one with the bundled "
                        "target; 'none' to skip)")
    g.add_argument("--tree-nodes", type=int, default=None,
                   help="nodes per round of the mmspec-<kind>-tree modes (0 = no tree modes; default: each "
                        "drafter's own, 32 for eagle and 16 for text and visual)")
    g.add_argument("--batch-size", default="1",
                   help="comma list of batch sizes for the throughput table, e.g. 1,4,16: at each, hf-greedy's "
                        "batched generate() and every mmspec mode (generate_batch) over all inputs (default 1)")
    g.add_argument("--modes", default="", help="comma list to restrict modes (hf-greedy is always run)")
    g.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    g.add_argument("--json", default=None, help="write results as JSON to this file")
    g.add_argument("--plot", default=None, help="write a PNG plot (speedup per mode, acceptance by position)")


def run(args) -> int:
    import torch
    from tqdm import tqdm

    from mmspec.cli import load_from_args

    if args.n < 1 or args.repeats < 1 or args.max_new_tokens < 1:
        raise MMSpecError("--n, --repeats and --max-new-tokens must be at least 1")
    try:
        batch_sizes = [int(b) for b in str(args.batch_size).split(",") if b.strip()]
    except ValueError:
        raise MMSpecError(f"--batch-size takes a comma list of positive integers, got {args.batch_size!r}")
    if not batch_sizes or min(batch_sizes) < 1:
        raise MMSpecError(f"--batch-size takes a comma list of positive integers, got {args.batch_size!r}")
    if args.tree_nodes is not None and args.tree_nodes < 0:
        raise MMSpecError("--tree-nodes must be >= 0")
    from mmspec.outputs import check_own_file

    if args.json:
        check_own_file(args.json, "--json", "bench-json")
    if args.plot:
        check_own_file(args.plot, "--plot", "png")
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = load_from_args(args)
    if args.visual_drafter == "default":
        from mmspec.pipeline import BUNDLED_VISUAL_DRAFTER

        args.visual_drafter = BUNDLED_VISUAL_DRAFTER if args.target is None and pipe.drafter_kind != "visual" else None
    elif str(args.visual_drafter).lower() == "none":
        args.visual_drafter = None
    prompt_types = [p.strip() for p in args.prompt_types.split(",") if p.strip()]
    if set(prompt_types) - {"caption", "question"}:
        raise MMSpecError("--prompt-types takes caption and/or question")
    if args.images:
        prompts = {"caption": args.caption_prompt, "question": args.question_prompt}
        inputs = folder_inputs(args.images, args.n, {p: prompts[p] for p in prompt_types})
    elif args.target is None:
        inputs = scene_inputs(args.n, prompt_types)
    else:
        raise MMSpecError("with --target, give --images FOLDER to benchmark on")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    extra = {}
    if args.target is None and pipe.drafter_kind != "text":
        # the bundled text drafter is always timed with the bundled target (and gives hf-assisted its drafter)
        from mmspec.drafters import drafter_class
        from mmspec.pipeline import BUNDLED_TEXT_DRAFTER, Pipeline

        strategy = drafter_class("text").from_pretrained(pipe.adapter, BUNDLED_TEXT_DRAFTER, pipe.target.dtype)
        extra["mmspec-text"] = Pipeline(pipe.adapter, strategy)
    if args.visual_drafter:
        # another drafter on the same target weights and image cache, e.g. the bundled visual drafter
        from mmspec.drafters import drafter_class
        from mmspec.pipeline import Pipeline

        strategy = drafter_class("visual").from_pretrained(pipe.adapter, args.visual_drafter, pipe.target.dtype)
        extra["mmspec-visual"] = Pipeline(pipe.adapter, strategy)
    if args.eagle_drafter == "default":
        from mmspec.pipeline import BUNDLED_EAGLE_DRAFTER

        bundled = args.target is None and pipe.drafter_kind != "eagle" and BUNDLED_EAGLE_DRAFTER.is_dir()
        args.eagle_drafter = BUNDLED_EAGLE_DRAFTER if bundled else None
    elif str(args.eagle_drafter).lower() == "none":
        args.eagle_drafter = None
    if args.eagle_drafter:
        from mmspec.drafters import drafter_class
        from mmspec.pipeline import Pipeline

        strategy = drafter_class("eagle").from_pretrained(pipe.adapter, args.eagle_drafter, pipe.target.dtype)
        extra["mmspec-eagle"] = Pipeline(pipe.adapter, strategy)
    bench = Bench(pipe, modes, args.max_new_tokens, args.temperature, args.num_draft_tokens, args.lookup_tokens,
                  extra, args.tree_nodes)

    by_type = {p: [i for i in inputs if i.prompt_type == p] for p in prompt_types}
    total = len(bench.modes) * (min(args.warmup, len(inputs)) + args.repeats * len(inputs))
    with tqdm(total=total, desc="bench", unit="call") as bar:
        for inp in inputs[: args.warmup]:
            for mode in bench.modes:
                bench.run_one(mode, inp, record=False)
                bar.update()
        for rep in range(args.repeats):
            for inp in inputs:
                # interleave modes per input, rotating the order so no mode always runs first
                order = bench.modes[rep % len(bench.modes):] + bench.modes[: rep % len(bench.modes)]
                for mode in order:
                    bench.run_one(mode, inp, record=True, rep=rep)
                    bar.update()
    bench.time_to_first_token(inputs[:3])

    # throughput at each batch size: the same inputs through every mode, B rows in flight, passes interleaved
    reference = {c.input: c.ids for c in bench.results["hf-greedy"].calls}
    by_batch = {}
    batched_modes = [m for m in bench.modes if not m.startswith("hf-") or m == "hf-greedy"]
    for B in batch_sizes:
        runs = {m: [] for m in batched_modes}
        with tqdm(total=len(batched_modes) * args.repeats, desc=f"batch {B}", unit="pass") as bar:
            for rep in range(args.repeats):
                order = batched_modes[rep % len(batched_modes):] + batched_modes[: rep % len(batched_modes)]
                for mode in order:
                    runs[mode].append(bench.run_batched(mode, inputs, B))
                    bar.update()
        by_batch[B] = batched_summary({m: runs[m] for m in batched_modes}, reference, inputs, args.temperature)

    report = {"machine": machine_info(str(pipe.adapter.device)),
              "config": {"target": str(args.target or "bundled"), "drafter_kind": pipe.drafter_kind,
                         "n_inputs": len(inputs), "prompt_types": prompt_types, "repeats": args.repeats,
                         "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                         "num_draft_tokens": args.num_draft_tokens, "lookup_tokens": args.lookup_tokens,
                         "batch_sizes": batch_sizes, "tree_nodes": args.tree_nodes},
              "modes": bench.summary(inputs), "by_prompt_type": {},
              "batched": {str(B): rows for B, rows in by_batch.items()}}
    for ptype, subset in by_type.items():
        report["by_prompt_type"][ptype] = bench.summary(subset)

    print(markdown_table(report["modes"]))
    for ptype, rows in report["by_prompt_type"].items():
        print(f"\n{ptype} prompts:\n" + markdown_table(rows))
    print("\nthroughput by batch size (all inputs, tokens/s over the whole pass):\n" + batched_table(by_batch))
    bad = [r["mode"] for r in report["modes"] if r["lossless"] is False]
    bad += [f"{r['mode']}@{B}" for B, rows in by_batch.items() for r in rows
            if r.get("lossless") is False and not r["mode"].startswith("hf-")]
    if bad:
        print(f"\nNOT LOSSLESS: {bad}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    if args.plot:
        plot(report["modes"], args.plot, f"mmspec bench: {report['config']['target']} on {report['machine']['cpu']}",
             report["batched"])
    return 1 if bad else 0
