"""Validated settings for one request. CLIs and the demo map their flags onto ``DecodeConfig`` by keyword."""

from __future__ import annotations

import math
from dataclasses import dataclass

from mmspec.errors import MMSpecError

MAX_DRAFT_TOKENS = 16
MAX_TREE_NODES = 64


def tree_depth(tree_nodes: int) -> int:
    """Depth of a draft tree when num_draft_tokens does not say: half the nodes (16 nodes: 8, 32: 16). Trees
    stop growing where the drafter's path probabilities fall below its floor (``grow_tree``), so a deep limit
    costs an unsure drafter nothing and lets a sure one run long (measured: docs/BENCHMARKS.md)."""
    return max(2, min(MAX_DRAFT_TOKENS, round(tree_nodes / 2)))


MAX_SEED = 2**64  # torch.Generator.manual_seed takes 64-bit seeds


@dataclass(frozen=True)
class DecodeConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0          # 0 = greedy
    top_p: float = 1.0
    num_draft_tokens: int | None = None   # fixed k; None = adapt k from recent acceptance
    seed: int | None = None
    tree_nodes: int | None = None     # draft a tree of at most this many nodes per round; None = a chain

    def __post_init__(self):
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise MMSpecError(f"max_new_tokens must be an integer, got {self.max_new_tokens!r}",
                              code="invalid_value", param="max_new_tokens")
        if self.max_new_tokens < 1:
            raise MMSpecError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}",
                              code="invalid_value", param="max_new_tokens")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature):
            raise MMSpecError(f"temperature must be a finite number, got {self.temperature!r}",
                              code="invalid_value", param="temperature")
        if self.temperature < 0:
            raise MMSpecError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}",
                              code="invalid_value", param="temperature")
        if not isinstance(self.top_p, (int, float)) or not (0.0 < self.top_p <= 1.0):
            raise MMSpecError(f"top_p must be in (0, 1], got {self.top_p!r}",
                              code="invalid_value", param="top_p")
        k = self.num_draft_tokens
        if k is not None:
            if isinstance(k, bool) or not isinstance(k, int) or not (0 <= k <= MAX_DRAFT_TOKENS):
                raise MMSpecError(f"num_draft_tokens must be an integer in [0, {MAX_DRAFT_TOKENS}] "
                                  f"or None (adaptive), got {k!r}",
                                  code="invalid_value", param="num_draft_tokens")
        if self.seed is not None:
            if isinstance(self.seed, bool) or not isinstance(self.seed, int):
                raise MMSpecError(f"seed must be an integer or None, got {self.seed!r}",
                                  code="invalid_value", param="seed")
            if not 0 <= self.seed < MAX_SEED:
                raise MMSpecError(f"seed must be in [0, 2**64) (what torch.Generator.manual_seed takes), got {self.seed}",
                                  code="invalid_value", param="seed")

        t = self.tree_nodes
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or not (1 <= t <= MAX_TREE_NODES)):
            raise MMSpecError(f"tree_nodes must be an integer in [1, {MAX_TREE_NODES}] or None (a chain), got {t!r}",
                              code="invalid_value", param="tree_nodes")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
