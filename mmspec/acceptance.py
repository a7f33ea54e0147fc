"""Acceptance rules: greedy exact match, and lossless speculative sampling.

Names follow Leviathan et al. 2023 / Chen et al. 2023: ``p`` = target probabilities, ``q`` = draft
probabilities. A draft token x is accepted with probability min(1, p(x)/q(x)); at the first rejection the
*recovered* token is sampled from norm(max(0, p - q)); when every draft is accepted a *bonus* token is
sampled from the target's next distribution. The emitted sequence is distributed exactly as the target's.
"""

from __future__ import annotations

import torch


def warp_logits(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Probabilities after temperature and nucleus filtering, as ``transformers``' warpers compute them.

    Greedy (temperature 0) returns a one-hot on the argmax, so greedy is the limit case of sampling.
    """
    # [..., vocab]
    logits = logits.float()
    if temperature == 0.0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / temperature
    if top_p < 1.0:
        # Same rule as transformers.TopPLogitsWarper: drop the low tail whose mass is <= 1 - top_p, keep >= 1 token.
        sorted_logits, sorted_idx = torch.sort(logits, descending=False, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove_sorted = cum <= (1 - top_p)
        remove_sorted[..., -1:] = False
        remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits.softmax(-1)


def accept_greedy(draft_ids: torch.Tensor, target_logits: torch.Tensor) -> tuple[int, int]:
    """Longest prefix of ``draft_ids`` equal to the target's argmax, and the target's next token after it.

    draft_ids: [k]; target_logits: [k+1, vocab] (row i predicts the token after i accepted drafts).
    """
    target_ids = target_logits.argmax(-1)
    k = draft_ids.shape[0]
    match = draft_ids == target_ids[:k]
    # One deliberate host sync per round: the count of leading matches.
    n = int(((~match).cumsum(-1) == 0).sum().item())
    return n, int(target_ids[n].item())


def accept_sampling(draft_ids: torch.Tensor, q: torch.Tensor, p: torch.Tensor,
                    generator: torch.Generator | None = None) -> tuple[int, int]:
    """Speculative sampling. draft_ids: [k]; q: [k, vocab] draft probs; p: [k+1, vocab] target probs.

    Returns (n_accepted, token) where token is the recovered token (n < k) or the bonus token (n == k).
    """
    k = draft_ids.shape[0]
    if k:
        idx = torch.arange(k, device=p.device)
        p_x = p[idx, draft_ids]
        q_x = q[idx, draft_ids]
        r = torch.rand(k, generator=generator, device=p.device)
        # accept iff r < p(x)/q(x), written without dividing (q(x) > 0 for any token the drafter sampled)
        accepted = r * q_x < p_x
        n = int(((~accepted).cumsum(-1) == 0).sum().item())
    else:
        n = 0
    if n < k:
        residual = (p[n] - q[n]).clamp_min(0)
        total = residual.sum()
        # total == 0 only if p == q exactly, in which case rejection had probability 0; fall back to p.
        dist = residual / total if total > 0 else p[n]
    else:
        dist = p[k]
    token = int(torch.multinomial(dist, 1, generator=generator).item())
    return n, token


def repetition_penalty_rows(logits: torch.Tensor, seen: torch.Tensor, draft_ids: torch.Tensor,
                            penalty: float) -> torch.Tensor:
    """transformers' ``RepetitionPenaltyLogitsProcessor`` applied to every verify row at once.

    logits: [k+1, vocab]; seen: [vocab] bool, the tokens of the prompt and output so far; row i has also seen
    the first i drafts. A target whose generation_config sets ``repetition_penalty`` applies it even in greedy
    ``generate()``, so greedy equality needs it too.
    """
    k, vocab = draft_ids.shape[0], logits.shape[-1]
    # [k+1, vocab]: drafts seen before each row
    drafted = torch.nn.functional.one_hot(draft_ids.clamp_max(vocab - 1), vocab).cumsum(0) > 0
    rows = seen[None, :vocab] | torch.cat([torch.zeros(1, vocab, dtype=torch.bool, device=logits.device),
                                           drafted.to(logits.device)])[: k + 1]
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(rows, penalized, logits)
