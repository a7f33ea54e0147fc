"""The modes ``mmspec bench`` times, and how: ``Bench`` runs one mode on one input (``run_one``) or over all
inputs with B rows in flight (``run_batched``), and interleaves the modes over the inputs (``time_calls``,
``time_batches``); the inputs are the bundled world's held-out scenes or a folder of images.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from mmspec.drafters import drafter_class, weightless_kinds
from mmspec.errors import MMSpecError

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


class Bench:
    """The modes of one run: ``hf-*`` through transformers' ``generate`` on the loaded target, ``mmspec-<kind>``
    through a pipeline each (the loaded one, one per weightless drafter kind, and ``extra``), ``mmspec-<kind>-tree``
    for each drafter that grows trees; every call's result is kept in ``results``."""

    def __init__(self, pipe, modes: list[str], max_new_tokens: int, temperature: float, k: int | None,
                 lookup_tokens: int, extra: dict | None = None, tree_nodes: int | None = None):
        self.pipe, self.adapter = pipe, pipe.adapter
        self.max_new_tokens, self.temperature, self.k, self.lookup = max_new_tokens, temperature, k, lookup_tokens
        # (the loaded kind keeps the loaded pipeline: its settings, e.g. a layerskip skip-set file, are the user's)
        self.pipelines = {f"mmspec-{pipe.drafter_kind}": pipe,
                          **{f"mmspec-{kind}": pipe.with_drafter_kind(kind) for kind in weightless_kinds()
                             if kind != pipe.drafter_kind},
                          **(extra or {})}
        # a kind's variants (``bench_variants``: name -> its ``drafter=`` setting), as ``mmspec-<kind>-<name>``,
        # timed only where --modes names them (layerskip's untuned default beside its tuned skip set)
        for kind in weightless_kinds():
            for name, setting in getattr(drafter_class(kind), "bench_variants", {}).items():
                mode = f"mmspec-{kind}-{name}"
                if {mode, f"{mode}-tree"} & set(modes or []):
                    self.pipelines[mode] = pipe.with_drafter_kind(kind, drafter=setting)
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


    # ----- the timed passes, modes interleaved ---------------------------------------------------------------
    def time_calls(self, inputs: list[Input], warmup: int, repeats: int) -> None:
        """``warmup`` untimed inputs through every mode, then ``repeats`` timed passes over ``inputs``, one call
        at a time: the modes interleaved per input, their order rotated each pass so no mode always runs first."""
        from tqdm import tqdm

        total = len(self.modes) * (min(warmup, len(inputs)) + repeats * len(inputs))
        with tqdm(total=total, desc="bench", unit="call") as bar:
            for inp in inputs[:warmup]:
                for mode in self.modes:
                    self.run_one(mode, inp, record=False)
                    bar.update()
            for rep in range(repeats):
                for inp in inputs:
                    for mode in rotated(self.modes, rep):
                        self.run_one(mode, inp, record=True, rep=rep)
                        bar.update()

    def time_batches(self, inputs: list[Input], B: int, repeats: int) -> dict[str, list[dict]]:
        """``repeats`` timed passes over all ``inputs`` of hf-greedy and every mmspec mode with B rows in flight,
        the passes interleaved: mode -> its passes (``run_batched``)."""
        from tqdm import tqdm

        modes = [m for m in self.modes if not m.startswith("hf-") or m == "hf-greedy"]
        runs = {m: [] for m in modes}
        with tqdm(total=len(modes) * repeats, desc=f"batch {B}", unit="pass") as bar:
            for rep in range(repeats):
                for mode in rotated(modes, rep):
                    runs[mode].append(self.run_batched(mode, inputs, B))
                    bar.update()
        return runs


def rotated(modes: list[str], rep: int) -> list[str]:
    """``modes`` starting at the ``rep``-th, wrapping round: pass ``rep``'s order."""
    return modes[rep % len(modes):] + modes[: rep % len(modes)]
