"""Draft trees, in one place: a ``Draft`` is a tree of tokens given by parent indices (a chain is the tree
``[-1, 0, 1, ...]``). Here: the topology helpers (chain, depths, ancestors, children), how the verify indexes a
tree (its nodes hang under the pending token, verify node 0) and how a round's trace orders it (accepted path
first), and how drafters grow trees: EAGLE-2's dynamic ``grow_tree`` and ``TreeFeeds``, the bookkeeping of a
tree fed depth by depth over several forwards of one cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Draft:
    ids: torch.Tensor                 # [k] drafted token ids (target vocabulary), k may be 0
    q: torch.Tensor | None = None     # [k, target_vocab] draft probabilities; None = deterministic (one-hot)
    forwards: int = 0                 # drafter forwards this row took part in for this draft
    parents: list[int] | None = None  # a tree: node i's parent (-1 = after the pending token); None = a chain

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def probs(self, vocab_size: int) -> torch.Tensor:
        """q as a dense [k, vocab] tensor (one-hot for deterministic drafters)."""
        if self.q is not None:
            return self.q
        return torch.nn.functional.one_hot(self.ids, vocab_size).float()


# ----- topology ---------------------------------------------------------------------------------------
def chain(n: int) -> list[int]:
    """Parents of a chain of ``n`` tokens: each token's parent is the one before it."""
    return list(range(-1, n - 1))


def depths(parents: list[int]) -> list[int]:
    out: list[int] = []
    for p in parents:
        out.append(0 if p < 0 else out[p] + 1)
    return out


def ancestor_matrix(parents: list[int], device) -> torch.Tensor:
    """[n, n] bool: entry (i, j) is True when token j is token i or one of its ancestors (parents point back)."""
    return ancestor_matrices([parents], len(parents), device)[0]


def ancestor_matrices(parents: list[list[int]], T: int, device) -> torch.Tensor:
    """[B, T, T] bool: ``ancestor_matrix`` of every row's parents at once, rows padded to T tokens (a padding
    token is its own only ancestor). One small op per tree depth, not per node: every token walks up its path
    one step at a time, all tokens of all rows together, marking the ancestor it reached."""
    B = len(parents)
    bad = next(((i, p) for par in parents for i, p in enumerate(par) if p >= i), None)
    if bad:
        raise ValueError(f"parent {bad[1]} of token {bad[0]} must come before it")
    if all(p == i - 1 for par in parents for i, p in enumerate(par)):   # chains (padding aside): one tril
        anc = torch.ones(T, T, dtype=torch.bool, device=device).tril().expand(B, T, T)
        n = torch.tensor([len(par) for par in parents], device=device)
        inside = torch.arange(T, device=device)[None] < n[:, None]          # [B, T]
        return (anc & inside[:, None, :] & inside[:, :, None]) | torch.eye(T, dtype=torch.bool, device=device)
    par = torch.full((B, T), -1, dtype=torch.long)
    for b, row in enumerate(parents):
        if row:
            par[b, :len(row)] = torch.tensor(row, dtype=torch.long)
    par = par.to(device)
    anc = torch.zeros(B, T, T, dtype=torch.bool, device=device)
    own = torch.arange(T, device=device).expand(B, T)
    cur = own.clone()                           # [B, T]: the ancestor each token has reached (-1: past the root)
    for _ in range(max((max(depths(row), default=0) for row in parents), default=0) + 1):
        anc.scatter_(2, torch.where(cur >= 0, cur, own)[..., None], True)
        cur = torch.where(cur >= 0, par.gather(1, cur.clamp_min(0)), cur)
    return anc


def children(parents: list[int]) -> dict[int, list[int]]:
    """node -> its children in order (-1: the root's)."""
    kids: dict[int, list[int]] = {-1: []}
    for i, p in enumerate(parents):
        kids.setdefault(p, []).append(i)
        kids.setdefault(i, [])
    return kids


# ----- a tree in the verify and in the trace ----------------------------------------------------------
def verify_parents(parents: list[int]) -> list[int]:
    """A draft's parents as the verify sees them: the pending token is node 0, draft node j is node j + 1."""
    return [-1] + [p + 1 if p >= 0 else 0 for p in parents]


def verify_indices(nodes) -> list[int]:
    """The verify nodes of the pending token and the given draft nodes (what a row keeps of its verify)."""
    return [0] + [i + 1 for i in nodes]


def trace_order(path: list[int], parents: list[int]) -> tuple[list[int], tuple[int, ...]]:
    """A tree round's trace lists the accepted path first, then the rejected nodes: -> (node order, each listed
    node's parent as a position in that order, -1 = the pending token)."""
    on_path = set(path)
    order = path + [i for i in range(len(parents)) if i not in on_path]
    where = {i: j for j, i in enumerate(order)}
    return order, tuple(where.get(parents[i], -1) for i in order)


# ----- growing trees ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TreeShape:
    """What a row's tree may be (``DraftBatch.propose``'s ``tree_nodes`` values; a plain int N means
    ``TreeShape(N)``): at most ``nodes`` nodes; the drafter's own chain (its top token after each) kept
    ``spine`` deep whatever its probabilities, so a tree holds the chain the draft-length policy would draft
    and never accepts less; width only where a node's path probability clears ``floor`` (None: the drafter's
    ``tree_floor``)."""

    nodes: int
    spine: int = 0
    floor: float | None = None

    @classmethod
    def of(cls, value) -> "TreeShape":
        return value if isinstance(value, TreeShape) else cls(int(value))


def grow_tree(first: torch.Tensor, expand, budgets: list[int], max_depth: int | list[int], eos_ids: frozenset[int],
              branch: int = 4, floor: float | list[float] = 0.0, spines: list[int] | None = None) -> list[Draft]:
    """Grow one dynamic draft tree per row (EAGLE-2): the root's top ``branch`` tokens, then at each depth the
    ``branch`` frontier nodes with the highest path probability (product of the drafter's probabilities along
    the path) are fed and each gets its top ``branch`` children; finally the ``budgets[b]`` nodes with the
    highest path probability are kept (ancestors before descendants, so the set is a tree).

    ``floor`` > 0 (one for all rows, or one per row): a node whose path probability is below it is neither fed
    nor kept (a row whose every first token is under the floor drafts nothing this round). A node's path
    probability is roughly its chance to be accepted, so a sure drafter then grows a long thin tree (a chain
    with the few branches worth verifying) and an unsure one a short bushy tree, and growth stops once no
    frontier node clears the floor: fewer drafting forwards and verified tokens.

    ``spines[b]`` > 0: row b's spine, the chain of the drafter's top token after each spine node (what a chain
    draft of that length would hold, up to an end-of-sequence token), is fed and kept ``spines[b]`` deep (within
    ``max_depth`` and the budget) whatever the floor says, before any other node: a sure drafter's tree is then
    that chain (its siblings are under the floor), and width appears only where the drafter hesitates.

    ``first`` [R, vocab]: each row's logits after its sequence; ``expand(feeds)`` takes, per row, the nodes to
    feed as (node, token, parent node or -1, depth) and returns per row their logits [n, vocab]. Children are the
    drafter's top tokens (deterministic), so a tree's q is one-hot per node (``Draft.q`` None). End-of-sequence
    tokens are never nodes: as in ``draft_block``, the target's own token after an accepted node gives them.
    ``max_depth``: the deepest a path may be, for all rows or per row (a row near its token budget is shallower
    than the others of its batch)."""
    R = first.shape[0]
    caps = list(max_depth) if isinstance(max_depth, (list, tuple)) else [max_depth] * R
    floors = floor if isinstance(floor, (list, tuple)) else [floor] * R
    low = [math.log(f) if f > 0 else float("-inf") for f in floors]
    spines = [min(s, b) for s, b in zip(spines, budgets)] if spines else [0] * R
    tokens = [[] for _ in range(R)]
    parents = [[] for _ in range(R)]
    depth = [[] for _ in range(R)]
    score = [[] for _ in range(R)]
    spine = [[] for _ in range(R)]      # row -> its spine's nodes, root first

    def add_children(b, parents_fed: list[int], logits: torch.Tensor, d: int) -> None:
        # logits [n, vocab] of the fed nodes: every node's top tokens in one op and one host sync
        top = logits.float().log_softmax(-1).topk(min(branch, logits.shape[-1]), dim=-1)
        tip = spine[b][-1] if spine[b] else -1
        grows = len(spine[b]) == d and d < spines[b]     # the spine reached this depth and goes on
        for parent, lps, toks in zip(parents_fed, top.values.tolist(), top.indices.tolist()):
            base = score[b][parent] if parent >= 0 else 0.0
            for rank, (lp, tok) in enumerate(zip(lps, toks)):
                if lp == float("-inf") or tok in eos_ids:
                    continue
                if grows and parent == tip and rank == 0:   # the spine's next node: the top token after its tip
                    spine[b].append(len(tokens[b]))
                tokens[b].append(tok)
                parents[b].append(parent)
                depth[b].append(d)
                score[b].append(base + lp)

    for b in range(R):
        if budgets[b] > 0:
            add_children(b, [-1], first[b][None], 0)
    frontier = [list(range(len(tokens[b]))) for b in range(R)]
    forwards = 1
    for d in range(1, max(caps, default=0)):
        feeds = []
        for b in range(R):
            if d >= caps[b]:     # this row's paths are as deep as it may take
                feeds.append([])
                continue
            on_spine = set(spine[b])
            live = [i for i in frontier[b] if score[b][i] >= low[b] or i in on_spine]
            live.sort(key=lambda i: (i not in on_spine, -score[b][i]))
            feeds.append([(i, tokens[b][i], parents[b][i], depth[b][i]) for i in live[:branch]])
        if not any(feeds):
            break
        logits = expand(feeds)
        forwards += 1
        frontier = [[] for _ in range(R)]
        for b in range(R):
            if feeds[b]:
                start = len(tokens[b])
                add_children(b, [i for i, *_ in feeds[b]], logits[b], d)
                frontier[b].extend(range(start, len(tokens[b])))
    out = []
    for b in range(R):
        chosen: list[int] = spine[b][:budgets[b]]
        picked = set(chosen)
        for i in sorted(range(len(tokens[b])), key=lambda i: (-score[b][i], i)):
            if len(chosen) >= budgets[b] or score[b][i] < low[b]:
                break
            if i not in picked and (parents[b][i] < 0 or parents[b][i] in picked):
                chosen.append(i)
                picked.add(i)
        chosen.sort(key=lambda i: (depth[b][i], i))
        index = {i: j for j, i in enumerate(chosen)}
        ids = torch.tensor([tokens[b][i] for i in chosen], dtype=torch.long, device=first.device)
        out.append(Draft(ids, None, forwards, [index.get(parents[b][i], -1) for i in chosen]))
    return out


class TreeFeeds:
    """Bookkeeping for a drafter that grows trees over several forwards of one ``SlotCache``: each fed node
    sees the row's committed slots and its fed ancestors only, and stays invisible to other branches."""

    def __init__(self, slots):
        self.slots = slots
        self.committed = {r: slots.valid[b].clone() for b, r in enumerate(slots.rows)}
        self.column: dict = {r: {} for r in slots.rows}      # row -> node -> slot column
        self.seen: dict = {r: {} for r in slots.rows}        # row -> node -> [S] bool of what it sees

    def extend_args(self, feeds: dict) -> dict:
        """feeds: row -> [(node, token, parent, depth)] -> keyword arguments of ``SlotCache.extend``."""
        S = self.slots.slots
        parents, past, depth0 = [], [], []
        for b, r in enumerate(self.slots.rows):
            nodes = feeds.get(r, [])
            vis = []
            for j, (node, _, parent, _) in enumerate(nodes):
                base = self.seen[r][parent] if parent >= 0 else self.committed[r]
                v = torch.cat([base, torch.zeros(S - base.shape[0], dtype=torch.bool, device=base.device)])
                if parent >= 0:
                    v[self.column[r][parent]] = True
                self.seen[r][node] = v
                self.column[r][node] = S + j
                vis.append(v)
            parents.append([-1] * len(nodes))
            past.append(torch.stack(vis) if vis else None)
            depth0.append([d for *_, d in nodes])
        return dict(parents=parents, past=past, depth0=depth0, hidden=True)
