"""The drafter interface. A drafter's batch answers two questions, and the engine never asks which one it has:

- ``propose(ks)``: "for each row, propose up to ks[row] tokens after its sequence so far" -> ``Draft`` per row;
- ``update(results, hidden)``: "here is how many each row got right, and what was emitted" (so it rolls back
  its own cache to the accepted length and catches up on tokens it has not seen). ``hidden`` holds the
  target's last hidden states of the positions it just verified, only when the drafter sets ``wants_hidden``.

Rows join with ``add`` and leave with ``remove`` at any round; batch 1 is a batch of one row. A ``Drafter``
holds the weights and is shared; a ``DraftBatch`` holds the rows' state. Drafters with a model build on
``ModelDraftBatch`` (``drafters/model_batch.py``); drafters without a batched forward (prompt lookup) run one
``DraftSession`` per row through ``PerRowDraftBatch``. A ``Draft`` (``mmspec.trees``) is a chain or a tree.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from mmspec.acceptance import warp_logits
from mmspec.config import DecodeConfig
from mmspec.targets.base import Request, TargetAdapter
from mmspec.trees import Draft


@dataclass
class RowSpec:
    """What a drafter needs to know of one row: its request, settings and random generator."""

    request: Request
    config: DecodeConfig
    generator: torch.Generator | None = None


def to_target_vocab(q: torch.Tensor, target_vocab: int) -> torch.Tensor:
    pad = target_vocab - q.shape[-1]
    return torch.nn.functional.pad(q, (0, pad)) if pad > 0 else q[..., :target_vocab]


def never_drafted(target: TargetAdapter) -> torch.Tensor:
    """[vocab] bool: ids a drafter reading the target's own LM head must never propose: image placeholders, and
    the padding rows of the target's vocabulary beyond its tokenizer (the target never emits them)."""
    bad = torch.zeros(target.vocab_size, dtype=torch.bool)
    bad[sorted(i for i in target.image_token_ids if i < target.vocab_size)] = True
    tok_len = len(target.tokenizer)
    if tok_len < target.vocab_size:
        bad[tok_len:] = True
    return bad.to(target.device)


def draft_block(logits: torch.Tensor, step, ks: list[int], specs: list[RowSpec], target_vocab: int,
                eos_ids: frozenset[int], stop_threshold: float = 0.0) -> list[Draft]:
    """Draft autoregressively for B rows at once: ``logits`` [B, drafter_vocab] predict each row's first token,
    ``step(tokens [B])`` feeds one token per row and returns the next logits (not called after the last step).
    Row b drafts ``ks[b]`` tokens, fewer when it reaches an end-of-sequence token: the draft ends before it
    (when the tokens before it pass, the target's own token after them is that end of sequence anyway, so
    drafting it would only lengthen the verify: a 1-word answer then verifies 1 token, not 2); drafting stops
    once every row is done. Greedy rows take the argmax; sampling rows draw from
    q = the warped distribution with their own generator, returned over the target's vocabulary."""
    B = logits.shape[0]
    K = max(ks, default=0)
    toks: list[torch.Tensor] = []
    qs: list[list[torch.Tensor]] = [[] for _ in range(B)]
    done = [k <= 0 for k in ks]
    lengths = list(ks)
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=logits.device) if eos_ids else None
    forwards = 1
    for i in range(K):
        token = logits.argmax(-1)                           # [B], stays on the device for greedy rows
        for b, spec in enumerate(specs):
            if not spec.config.greedy and not done[b]:
                q = warp_logits(logits[b], spec.config.temperature, spec.config.top_p)
                token[b] = torch.multinomial(q, 1, generator=spec.generator)[0]
                qs[b].append(q)
        toks.append(token)
        if stop_threshold > 0:
            conf = logits.float().softmax(-1).gather(-1, token[:, None])[:, 0]
            for b in torch.nonzero(conf < stop_threshold).flatten().tolist():
                if not done[b]:
                    lengths[b] = min(lengths[b], i)
        if eos is not None:
            # one host sync per drafting step: which rows just reached their end of sequence (it is not drafted)
            hit = torch.isin(token, eos).tolist()
            for b in range(B):
                if hit[b] and not done[b]:
                    lengths[b] = min(lengths[b], i)
        for b in range(B):
            done[b] = done[b] or i + 1 >= lengths[b]
        if i < K - 1 and not all(done):
            logits = step(token)
            forwards += 1
        else:
            break
    ids = torch.stack(toks, dim=1) if toks else torch.empty(B, 0, dtype=torch.long, device=logits.device)
    out = []
    for b in range(B):
        n = max(min(lengths[b], ids.shape[1]), 0)
        q = to_target_vocab(torch.stack(qs[b][:n]), target_vocab) if qs[b] and n else None
        out.append(Draft(ids[b, :n], q, forwards))
    return out


class DraftBatch(ABC):
    """One drafter's rows. ``wants_hidden``: ``update`` gets the target's hidden states of verified positions."""

    wants_hidden: bool = False

    @abstractmethod
    def add(self, row, spec: RowSpec) -> None: ...

    @abstractmethod
    def remove(self, rows) -> None: ...

    @abstractmethod
    def propose(self, ks: dict, tree_nodes: dict | None = None) -> dict:
        """ks: row -> k (every row of the batch; 0 = no draft this round) -> row -> ``Draft``. With
        ``tree_nodes`` (row -> N), a row drafts a tree of at most N nodes and depth k instead of a chain, where
        the drafter can (``grows_trees``)."""

    @abstractmethod
    def update(self, results: dict, hidden: dict | None = None) -> None:
        """results: row -> (n_accepted, emitted ids); hidden: row -> [n_verified, hidden] when wanted."""


class DraftSession(ABC):
    """One row of a drafter that drafts row by row (no model forward to batch)."""

    forwards: int = 0

    @abstractmethod
    def propose(self, k: int) -> Draft: ...

    @abstractmethod
    def update(self, n_accepted: int, emitted: list[int]) -> None: ...


class PerRowDraftBatch(DraftBatch):
    def __init__(self, open_session):
        self.open_session = open_session
        self.sessions: dict = {}

    def add(self, row, spec: RowSpec) -> None:
        self.sessions[row] = self.open_session(spec)

    def remove(self, rows) -> None:
        for r in rows:
            self.sessions.pop(r, None)

    def propose(self, ks: dict, tree_nodes: dict | None = None) -> dict:
        out = {}
        for r, k in ks.items():
            s = self.sessions[r]
            before = s.forwards
            out[r] = s.propose(k)
            out[r].forwards = s.forwards - before
        return out

    def update(self, results: dict, hidden: dict | None = None) -> None:
        for r, (n, emitted) in results.items():
            self.sessions[r].update(n, emitted)


class Drafter(ABC):
    kind: str = ""
    default_k: int = 4
    needs_weights: bool = False   # True: built by ``from_pretrained(target, path, ...)``
    gives_distribution: bool = True   # False: deterministic proposals only (prompt lookup, none)
    grows_trees: bool = False     # True: ``tree_nodes`` drafts a tree (EAGLE-2 dynamic)
    prior_acceptance: float = 0.6  # the draft-length policy's guess of a draft token's chance before it measures
    default_tree_nodes: int = 16  # the tree size ``mmspec bench`` times (measured best for the bundled drafter)
    # trees neither grow nor keep nodes whose path probability is below this (``grow_tree``); 0.02 measured
    # as fast as no floor or faster, with the same tokens per forward, for the bundled drafters
    tree_floor: float = 0.02
    stop_threshold: float = 0.0   # > 0: a chain ends where the drafter's confidence in its token falls below this
    model = None                  # the underlying HF model, when there is one

    def __init__(self, target: TargetAdapter):
        self.target = target

    @classmethod
    def from_pretrained(cls, target: TargetAdapter, path, dtype, trust_remote_code: bool = False) -> "Drafter":
        raise NotImplementedError(f"drafter kind {cls.kind!r} has no weights to load")

    @property
    def eos_ids(self) -> frozenset[int]:
        """Tokens after which nothing drafted can be accepted: the target's end-of-sequence ids."""
        return self.target.eos_token_ids

    def batch(self) -> DraftBatch:
        """A new, empty batch of rows for this drafter: by default one ``session`` per row."""
        return PerRowDraftBatch(lambda spec: self.session(spec.request, spec.config, spec.generator))

    def session(self, request: Request, config: DecodeConfig, generator: torch.Generator | None) -> DraftSession:
        """One row's drafting state, for drafters without a batched forward."""
        raise NotImplementedError(f"drafter kind {self.kind!r} defines neither batch() nor session()")


class NoDraftSession(DraftSession):
    def __init__(self, device):
        self._empty = Draft(torch.empty(0, dtype=torch.long, device=device))

    def propose(self, k: int) -> Draft:
        return Draft(self._empty.ids)

    def update(self, n_accepted: int, emitted: list[int]) -> None:
        pass


class NoDrafter(Drafter):
    """``drafter_kind="none"``: plain target decoding through the same engine (the baseline)."""

    kind = "none"
    default_k = 0
    gives_distribution = False

    def session(self, request, config, generator) -> DraftSession:
        return NoDraftSession(self.target.device)
