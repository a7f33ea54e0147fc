"""The speculative loop: one function, the same for every target family and every drafter.

Invariant between rounds: the target's cache holds every committed position except the last one, the
*pending* token, which is fed first in the next verify forward (for round 1 it is the prompt's last token: the
target's prefill runs in that same forward, so round 1's drafts are verified by the prefill itself).
"""

from __future__ import annotations

from typing import Iterator

import torch

from mmspec.acceptance import accept_greedy, accept_sampling, repetition_penalty_rows, warp_logits
from mmspec.config import MAX_DRAFT_TOKENS, DecodeConfig
from mmspec.drafters.base import DraftSession
from mmspec.targets.base import TargetSession
from mmspec.types import Round, Stats


class DraftLength:
    """Number of draft tokens per round: fixed when given, else adapted from recent acceptance
    (grow by 2 after a fully accepted round, shrink by 1 after a rejection, as transformers' heuristic)."""

    def __init__(self, fixed: int | None, start: int):
        self.fixed = fixed
        self.k = fixed if fixed is not None else start

    def observe(self, n_drafted: int, n_accepted: int) -> None:
        if self.fixed is not None or n_drafted == 0:
            return
        if n_accepted == n_drafted:
            self.k = min(self.k + 2, MAX_DRAFT_TOKENS)
        else:
            self.k = max(self.k - 1, 1)


def speculative_decode(target: TargetSession, drafter: DraftSession, pending: int, prompt_len: int,
                       config: DecodeConfig, draft_length: DraftLength, eos_ids: frozenset[int],
                       context_length: int, stats: Stats, generator: torch.Generator | None = None,
                       repetition_penalty: float = 1.0, prompt_ids: list[int] | None = None) -> Iterator[Round]:
    """Yield one ``Round`` per target forward until end-of-sequence, ``max_new_tokens`` or the context end."""
    device = None
    seen = None  # [vocab] bool, only when the target's generation_config asks for a repetition penalty
    n_generated = 0
    while True:
        # tokens this request may still add (the prompt's length was checked against the context upfront)
        budget = min(config.max_new_tokens - n_generated, context_length - (prompt_len + n_generated))
        # 1. draft (never more than the budget can take after the target's own token)
        forwards_before = drafter.forwards
        draft = drafter.propose(min(draft_length.k, budget - 1))
        k = len(draft)
        stats.draft_forwards += drafter.forwards - forwards_before

        # 2. verify: the pending token and all k drafts in ONE target forward
        if device is None:
            device = draft.ids.device
        ids = torch.cat([torch.tensor([pending], device=device), draft.ids])
        base = target.length
        # [k+1, vocab]: row i is the target's distribution after i accepted drafts
        logits = target.forward(ids)
        stats.target_forwards += 1
        if repetition_penalty != 1.0:
            if seen is None:
                seen = torch.zeros(logits.shape[-1] + 1, dtype=torch.bool, device=logits.device)
                seen[torch.tensor(prompt_ids, device=logits.device).clamp_max(logits.shape[-1])] = True
            logits = repetition_penalty_rows(logits, seen, draft.ids.to(logits.device), repetition_penalty)

        # 3. accept
        if config.greedy:
            n_acc, token = accept_greedy(draft.ids.to(logits.device), logits)
        else:
            p = warp_logits(logits, config.temperature, config.top_p)
            q = draft.probs(p.shape[-1]).to(p.device)
            n_acc, token = accept_sampling(draft.ids.to(p.device), q, p, generator)
        draft_ids = draft.ids.tolist()

        # 4. roll back both caches to the accepted length (pending + accepted drafts stay in the target's)
        target.rollback(base + 1 + n_acc)
        emitted = draft_ids[:n_acc] + [token]
        drafter.update(n_acc, emitted)
        if seen is not None:
            seen[torch.tensor(emitted, device=seen.device).clamp_max(seen.shape[0] - 1)] = True
        draft_length.observe(k, n_acc)

        # 5. emit, cut at the first end-of-sequence token
        stop = next((i for i, t in enumerate(emitted) if t in eos_ids), None)
        if stop is not None and stop < n_acc:
            rnd = Round(tuple(draft_ids), stop + 1, None)   # stopped inside the accepted drafts
        else:
            rnd = Round(tuple(draft_ids), n_acc, token)
        n_generated += len(rnd.emitted)
        stats.new_tokens = n_generated
        stats.drafted_tokens += k
        stats.accepted_tokens += rnd.n_accepted
        # the stop reason is set before the last round is yielded, so consumers know it is the last
        if stop is not None:
            stats.stop_reason = "eos"
        elif n_generated >= config.max_new_tokens:
            stats.stop_reason = "max_new_tokens"
        elif prompt_len + n_generated >= context_length:
            stats.stop_reason = "context"
        yield rnd
        if stats.stop_reason:
            return
        pending = token
