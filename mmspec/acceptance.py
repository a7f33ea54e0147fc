"""The accept phase: every row's verdict on its draft (``accept``), by one rule per case -- greedy chains
(exact match, all rows with one host sync), sampling chains (speculative sampling), greedy trees and sampling
trees (recursive rejection) -- and the ``Accepted`` verdict the caches then commit.

Names follow Leviathan et al. 2023 / Chen et al. 2023: ``p`` = target probabilities, ``q`` = draft
probabilities. A draft token x is accepted with probability min(1, p(x)/q(x)); at the first rejection the
*recovered* token is sampled from norm(max(0, p - q)); when every draft is accepted a *bonus* token is
sampled from the target's next distribution. The emitted sequence is distributed exactly as the target's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmspec.trees import Draft, ancestor_matrix, children, trace_order, verify_indices


@dataclass
class Accepted:
    """One row's verdict on its draft."""

    n: int                       # drafts kept
    token: int                   # the target's own token after them
    drafts: list[int]            # the row's draft ids (draft order)
    keep: list[int]              # verify positions that stay in the target's cache (0 = the pending token)
    path: list[int] | None = None      # a tree's accepted nodes, root first (None for a chain)
    parents: list[int] | None = None   # a tree's parents (draft order)

    @property
    def emitted(self) -> list[int]:
        kept = [self.drafts[i] for i in self.path] if self.path is not None else self.drafts[:self.n]
        return kept + [self.token]

    def trace(self) -> tuple[list[int], tuple[int, ...] | None]:
        """The draft ids as the round's trace lists them, and a tree's parents in that order (None: a chain)."""
        if self.path is None:
            return self.drafts, None
        order, parents = trace_order(self.path, self.parents)
        return [self.drafts[i] for i in order], parents

    @classmethod
    def chain(cls, drafts: list[int], n: int, token: int) -> "Accepted":
        return cls(n, token, drafts, verify_indices(range(n)))

    @classmethod
    def tree(cls, drafts: list[int], parents: list[int], path: list[int], token: int) -> "Accepted":
        return cls(len(path), token, drafts, verify_indices(path), path, parents)


def accept(drafts: dict, logits: dict, configs: dict, generators: dict) -> dict[int, Accepted]:
    """row -> ``Accepted``, for rows given as row -> ``Draft``, verify logits [n+1, vocab] (after any logits
    processing), ``DecodeConfig`` (in the engine's row order) and random generator (None for greedy rows)."""
    chains = [r for r in configs if configs[r].greedy and drafts[r].parents is None]
    out = accept_greedy_chains({r: drafts[r] for r in chains}, logits)
    for r, config in configs.items():
        if r in out:
            continue
        d, generator = drafts[r], generators[r]
        ids = d.ids.tolist()
        if d.parents is not None:   # a tree: the accepted root path
            if config.greedy:
                path, token = accept_tree_greedy(ids, d.parents, logits[r].argmax(-1).tolist())
            else:
                p = warp_logits(logits[r], config.temperature, config.top_p)
                path, token = accept_tree_sampling(ids, d.parents, p, generator)
            out[r] = Accepted.tree(ids, d.parents, path, token)
        else:
            p = warp_logits(logits[r], config.temperature, config.top_p)
            q = d.probs(p.shape[-1]).to(p.device)
            n, token = accept_sampling(d.ids.to(p.device), q, p, generator)
            out[r] = Accepted.chain(ids, n, token)
    return out


def accept_greedy_chains(drafts: dict[int, Draft], logits: dict) -> dict[int, Accepted]:
    """Greedy chains: each row keeps the longest prefix of its drafts that equals the target's argmax, then the
    argmax after it."""
    if not drafts:
        return {}
    # one host sync for every greedy chain row: the target's argmax at each verified position
    argmax = torch.cat([logits[r].argmax(-1) for r in drafts]).tolist()
    drafted = torch.cat([d.ids for d in drafts.values()]).tolist()
    out = {}
    i = j = 0
    for r, d in drafts.items():
        k = len(d)
        target, mine = argmax[i:i + k + 1], drafted[j:j + k]
        n = 0
        while n < k and mine[n] == target[n]:
            n += 1
        out[r] = Accepted.chain(mine, n, target[n])
        i, j = i + k + 1, j + k
    return out


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
                            penalty: float, parents: list[int] | None = None) -> torch.Tensor:
    """transformers' ``RepetitionPenaltyLogitsProcessor`` applied to every verify row at once.

    logits: [k+1, vocab]; seen: [vocab] bool, the tokens of the prompt and output so far; row i has also seen
    the first i drafts. A target whose generation_config sets ``repetition_penalty`` applies it even in greedy
    ``generate()``, so greedy equality needs it too.
    """
    k, vocab = draft_ids.shape[0], logits.shape[-1]
    onehot = torch.nn.functional.one_hot(draft_ids.clamp_max(vocab - 1), vocab).to(logits.device)
    if parents is None:
        # [k, vocab]: drafts seen up to each draft (a chain)
        drafted = onehot.cumsum(0) > 0
    else:
        # a tree (parents in verify indexing, node 0 = the pending token): the drafts on each node's path
        anc = ancestor_matrix(parents, logits.device)[1:, 1:].to(onehot.dtype)
        drafted = (anc @ onehot) > 0
    rows = seen[None, :vocab] | torch.cat([torch.zeros(1, vocab, dtype=torch.bool, device=logits.device),
                                           drafted])[: k + 1]
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(rows, penalized, logits)


def accept_tree_greedy(ids: list[int], parents: list[int], target_ids: list[int]) -> tuple[list[int], int]:
    """The longest root path of a draft tree whose tokens equal the target's argmax, and the target's token
    after it. ids/parents: the tree's nodes (parent -1 = after the pending token); target_ids[i]: the target's
    argmax after verify node i (0 = the pending token, node j at j + 1). -> (path of node indices, token)."""
    kids = children(parents)
    node, path = -1, []
    while True:
        t = target_ids[node + 1]
        nxt = next((c for c in kids[node] if ids[c] == t), None)
        if nxt is None:
            return path, t
        path.append(nxt)
        node = nxt


def accept_tree_sampling(ids: list[int], parents: list[int], p: torch.Tensor,
                         generator: torch.Generator | None = None) -> tuple[list[int], int]:
    """Lossless multi-draft rejection over a tree whose children are the drafter's top tokens (deterministic,
    so q is one-hot per child): at each node the children are tried in order, child x is accepted with
    probability p(x), and after a rejection p becomes norm(max(0, p - onehot(x))) (recursive rejection, as
    SpecInfer / EAGLE); when every child is rejected the token is drawn from what is left of p. The emitted
    token at each step is distributed exactly as p. p: [n+1, vocab] target probabilities per verify node."""
    kids = children(parents)
    node, path = -1, []
    while True:
        dist = p[node + 1].clone()
        nxt = None
        for c in kids[node]:
            x = ids[c]
            total = dist.sum()
            if total <= 0:
                break
            r = torch.rand((), generator=generator, device=dist.device)
            if r * total < dist[x]:
                nxt = c
                break
            dist[x] = 0.0
        if nxt is None:
            if dist.sum() <= 0:          # only possible when p puts all its mass on rejected children
                dist = p[node + 1]
            return path, int(torch.multinomial(dist / dist.sum(), 1, generator=generator).item())
        path.append(nxt)
        node = nxt
