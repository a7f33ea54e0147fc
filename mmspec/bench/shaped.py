"""``mmspec bench --shaped SIZE``: a GPU-shaped estimate on this machine. The bundled target is tiny, so its
forwards cost about what a forward's per-call overhead costs, as no real VLM's do; here the target is a
random-weight LLaVA of the bundled layout (its vision tower, processor and tokenizer) whose language model has
the shape of a 1 B (``1b``) model, so a forward's time is dominated by reading its weights, as on a GPU serving a
7 B one. Random weights answer nonsense, so the drafters are oracles that know the target's greedy answer (a
first untimed pass records it, ``record_references``):

- ``mmspec-oracle`` always right (the ceiling: every round as long as the policy dares);
- ``mmspec-replay`` right at draft position i with the chance ``profile[i]`` (given that position i-1 was
  right), by default the bundled eagle head's measured per-position acceptance on captions
  (docs/bench_runD.json), wrong after that; its choices come from a generator seeded per request and position,
  so every pass sees the same draws.

Both draft for free (no drafter forwards): what they measure is the target's and the engine's cost per round.
``smoke`` is a small shape for checking that the path works (``--n 2 --repeats 1``), not for figures.
"""

from __future__ import annotations

import json
import random
import shutil
import zlib
from pathlib import Path

import torch

from mmspec.drafters.base import Draft, Drafter, DraftSession
from mmspec.errors import MMSpecError

# the language model's shape per size: hidden, intermediate, layers, heads, kv heads (1b: TinyLlama-1.1B's)
SHAPES = {"smoke": (256, 704, 2, 4, 4), "1b": (2048, 5632, 22, 32, 4), "3b": (3200, 8640, 26, 32, 32)}
# P(position i accepted | position i-1 was), the bundled eagle head on captions (docs/bench_runD.json, Run D)
EAGLE_CAPTION_PROFILE = (0.963, 0.957, 0.955, 0.953, 0.952, 0.951, 0.951, 0.906)


def build_shaped_target(size: str, folder: Path, dtype: torch.dtype) -> Path:
    """A random-weight LLaVA with the bundled target's vision tower, processor and tokenizer and a language model
    of ``SHAPES[size]``, written to ``folder`` (built offline from a config)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from mmspec.loading import BUNDLED_TARGET

    if size not in SHAPES:
        raise MMSpecError(f"--shaped takes one of {sorted(SHAPES)}, got {size!r}", param="shaped")
    hidden, inter, layers, heads, kv = SHAPES[size]
    cfg = json.loads((BUNDLED_TARGET / "config.json").read_text())
    text = cfg["text_config"]
    text.update(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv, head_dim=hidden // heads)
    config = LlavaConfig.from_dict(cfg)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).to(dtype).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    for f in BUNDLED_TARGET.iterdir():
        if f.name not in ("config.json", "model.safetensors", "generation_config.json") and f.is_file():
            shutil.copy(f, folder / f.name)
    return folder


class OracleSession(DraftSession):
    """One row: drafts the recorded answer (``profile`` None: always right; else right at position i with the
    chance ``profile[i]``, the last entry for deeper positions, and wrong from the first miss on)."""

    def __init__(self, drafter: "OracleDrafter", key, seed_key):
        self.drafter, self.key, self.seed_key = drafter, key, seed_key
        self.reference = drafter.references.get(key)
        self.emitted: list[int] = []

    def propose(self, k: int) -> Draft:
        device = self.drafter.target.device
        if self.reference is None or k <= 0:
            return Draft(torch.empty(0, dtype=torch.long, device=device))
        n = len(self.emitted)
        ids = list(self.reference[n:n + k])
        profile = self.drafter.profile
        if profile is not None:
            # the same draws in every pass and process: seeded by the request and how far it got
            rnd = random.Random(zlib.crc32(repr((self.seed_key, n)).encode()))
            for i in range(len(ids)):
                if rnd.random() >= profile[min(i, len(profile) - 1)]:
                    vocab = self.drafter.target.vocab_size
                    ids[i:] = [(t + 1) % vocab for t in ids[i:]]   # a miss: this token and every later one wrong
                    break
        return Draft(torch.tensor(ids, dtype=torch.long, device=device))

    def update(self, n_accepted: int, emitted: list[int]) -> None:
        self.emitted += emitted
        if self.reference is None:   # the recording pass: the target's own answer, for the timed passes
            self.drafter.recorded[self.key] = list(self.emitted)


class OracleDrafter(Drafter):
    """Drafts the target's recorded greedy answers (module docstring). ``references`` is shared by the oracle and
    the replay drafter of one bench run."""

    kind = "oracle"
    default_k = 4
    gives_distribution = False
    prior_acceptance = 0.9

    def __init__(self, target, references: dict, profile: tuple[float, ...] | None = None, recorded=None):
        super().__init__(target)
        self.references, self.profile = references, profile
        self.recorded = references if recorded is None else recorded
        if profile is not None:
            self.kind = "replay"

    def session(self, request, config, generator) -> DraftSession:
        key = (request.image_key, tuple(request.prompt_ids))
        # the image keys without the adapter's per-process namespace: the same draws in every process too
        seed_key = (request.image_key.replace(f"{self.target.cache_namespace}/", ""), key[1])
        return OracleSession(self, key, seed_key)


def shaped_setup(size: str, dtype: str | None, profile: str | None) -> tuple:
    """-> (the target pipeline, {mode: pipeline} of the oracle and replay drafters, the recording pipeline)."""
    import mmspec
    from mmspec.loading import load_dtype, scratch_folder
    from mmspec.pipeline import Pipeline

    # float32 by default: in bfloat16 a verify of several tokens and generate()'s one-token steps round
    # differently, and a random-weight model's near-ties then flip the odd token (the lossless column says so)
    torch_dtype = load_dtype(dtype or "float32", "cpu")
    folder = scratch_folder(f"mmspec-shaped-{size}-")
    build_shaped_target(size, folder, torch_dtype)
    pipe = mmspec.load(str(folder), drafter=None, drafter_kind="none", dtype=torch_dtype)
    references: dict = {}
    try:
        prof = tuple(float(p) for p in profile.split(",")) if profile else EAGLE_CAPTION_PROFILE
    except ValueError:
        raise MMSpecError(f"--replay-profile takes comma-separated chances, got {profile!r}", param="replay_profile")
    if not prof or not all(0.0 <= p <= 1.0 for p in prof):
        raise MMSpecError(f"--replay-profile takes chances in [0, 1], got {profile!r}", param="replay_profile")
    modes = {"mmspec-oracle": Pipeline(pipe.adapter, OracleDrafter(pipe.adapter, references)),
             "mmspec-replay": Pipeline(pipe.adapter, OracleDrafter(pipe.adapter, references, prof))}
    recorder = Pipeline(pipe.adapter, OracleDrafter(pipe.adapter, {}, recorded=references))
    return pipe, modes, recorder


def record_references(recorder, inputs, max_new_tokens: int) -> None:
    """The untimed pass that records the target's greedy answer to every input (the oracles' knowledge)."""
    for inp in inputs:
        recorder.generate(inp.image, inp.prompt, max_new_tokens=max_new_tokens)


__all__ = ["EAGLE_CAPTION_PROFILE", "OracleDrafter", "SHAPES", "build_shaped_target", "record_references",
           "shaped_setup"]
