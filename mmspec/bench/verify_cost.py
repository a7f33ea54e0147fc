"""``mmspec bench --verify-cost NODES``: what one round's target forward costs, against a plain decoding step.

B rows of the bench's first input (one image and its prompt) join one ``Engine`` of the loaded pipeline, the same
engine and ``TargetBatch`` every request runs through, and are prefilled (untimed). Each timed forward is the
engine's own verify (``Engine._verify``: the ids, a tree's verify parents, ``TargetBatch.verify``, whose
``SlotCache.extend`` builds the mask and positions as every round does), then rolled back untimed by a commit that
keeps nothing, so every row's cache is as between rounds again (all of the prompt but its pending token):

- step: every row's pending token alone, a plain decoding step;
- chain n: the pending token and n - 1 drafts;
- tree n: the pending token and n - 1 draft nodes shaped as the engine's trees are (``tree_draft``); a target with
  linear-attention layers verifies no trees (``TargetAdapter.verifies_trees``), so its trees are not timed;
- with the ``layerskip`` drafter loaded, a draft step: one token through the drafter's own batch (the target with
  the skipped layers left out), as each drafted token costs. Its ratio to the step is what a layerskip estimate
  for a memory-bound GPU needs; ``--shaped 1b`` gives a target whose forward's time grows with the layers it runs.

The measurements are interleaved, their order rotated each pass, and each is the median over ``repeats`` passes
after ``warmup`` untimed ones; times are per row (a forward's time over B). A forward is timed once: a chain of 1
token is the step, and a tree grown as a chain (n <= 3) is the chain (the same call). On a GPU each timed call ends with a
synchronize, as the round's accept phase would.
"""

from __future__ import annotations

import statistics
import time

import torch

from mmspec.bench.modes import Input, rotated
from mmspec.config import tree_depth
from mmspec.engine import Engine
from mmspec.errors import MMSpecError
from mmspec.trees import Draft, chain, depths, grow_tree, verify_parents

# the tree's synthetic drafter: after any node its top tokens have these chances (one sure choice, runners-up),
# so grow_tree keeps its spine and adds the likeliest side branches, as a confident eagle head's trees look
SIDE_CHANCES = (0.6, 0.2, 0.12, 0.08)


def chain_draft(n: int) -> Draft:
    """The drafts of a chain verify of n tokens: n - 1 of them after the pending token (token ids do not change a
    forward's cost)."""
    return Draft(torch.zeros(n - 1, dtype=torch.long))


def tree_draft(n: int) -> Draft:
    """The drafts of a tree verify of n nodes (the pending token and n - 1 draft nodes), grown as the engine grows
    one (``grow_tree`` with a spine as deep as ``tree_depth`` gives a tree of that size) over a drafter whose
    chances after every node are ``SIDE_CHANCES``: a spine of about n / 2 and side branches where they are likeliest."""
    if n <= 1:
        return Draft(torch.empty(0, dtype=torch.long), parents=[])
    logits = torch.tensor(SIDE_CHANCES).log()
    depth = tree_depth(n - 1)
    draft = grow_tree(logits[None], lambda feeds: [logits.expand(len(f), -1) if f else None for f in feeds],
                      [n - 1], depth, frozenset(), spines=[depth])[0]
    if len(draft) < n - 1:   # far beyond the engine's largest tree (MAX_TREE_NODES draft nodes)
        raise MMSpecError(f"--verify-cost: a tree of {n} nodes is larger than the engine's trees grow (at most "
                          f"{len(draft) + 1} nodes at their depth limit)", param="verify_cost")
    return draft


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Rounds:
    """B rows of one input in an engine of ``pipe``, prefilled; ``verify(draft)`` and ``draft_step()`` time one
    forward of every row and roll it back."""

    def __init__(self, pipe, inp: Input, B: int):
        self.engine = Engine(pipe.adapter, pipe.strategy, max_batch=B)
        for _ in range(B):
            self.engine.add(pipe._job(inp.image, inp.prompt, {}))
        failed = self.engine._admit()
        if failed:
            raise MMSpecError(f"{inp.name}: {failed[0][0].error}")
        self.rows = list(self.engine.active)
        self.device = self.engine.target_batch.device
        self.prompt_tokens = len(self.engine.active[self.rows[0]].request.prompt_ids)
        self.verify(chain_draft(1))       # the rows' prefills, in one forward as the engine runs them
        self.drafts = pipe.strategy.kind == "layerskip"
        if self.drafts:
            self.draft_step()             # the drafter's prefill of the rows (its first catch-up)

    def verify(self, draft: Draft) -> tuple[dict, float]:
        """One verify of every row's pending token and ``draft`` -> (row -> logits [n, vocab], seconds)."""
        start = time.perf_counter()
        logits = self.engine._verify(self.rows, {r: draft for r in self.rows})
        _sync(self.device)
        seconds = time.perf_counter() - start
        self.engine.target_batch.commit({r: [] for r in self.rows})   # nothing kept: the caches as before
        return logits, seconds

    def draft_step(self) -> float:
        """One draft token of every row through the drafter's batch: the catch-up forward of the token the last
        round emitted gives it (a chain's later tokens cost one such forward each) -> seconds."""
        batch = self.engine.draft_batch
        start = time.perf_counter()
        batch.propose({r: 1 for r in self.rows})
        _sync(self.device)
        seconds = time.perf_counter() - start
        # what the round's update says: nothing accepted, the target's token emitted (fed by the next step, so
        # each row's drafter sequence grows one token per step, as a drafting row's does)
        batch.update({r: (0, [self.engine.active[r].pending]) for r in self.rows})
        return seconds


def measure(pipe, inp: Input, nodes: list[int], batch_sizes: list[int], repeats: int, warmup: int) -> dict:
    """The medians of every measurement at each batch size (module docstring) -> the report's ``verify_cost`` and
    ``layerskip`` parts."""
    verifies_trees = pipe.adapter.verifies_trees
    shapes = {n: (chain_draft(n), tree_draft(n) if verifies_trees else None) for n in nodes}
    by_batch, draft_steps, prompt_tokens = {}, {}, None
    with torch.inference_mode():
        for B in batch_sizes:
            rounds = Rounds(pipe, inp, B)
            prompt_tokens = rounds.prompt_tokens
            # the same forward is timed once: a chain of 1 is the step, a tree grown as a chain (n <= 3) the chain
            timed, same = {"step": lambda: rounds.verify(chain_draft(1))[1]}, {("chain", 1): "step"}
            for n, (as_chain, as_tree) in shapes.items():
                if n > 1:
                    timed[("chain", n)] = lambda d=as_chain: rounds.verify(d)[1]
                if as_tree is not None and as_tree.parents == chain(n - 1):
                    same[("tree", n)] = same.get(("chain", n), ("chain", n))
                elif as_tree is not None:
                    timed[("tree", n)] = lambda d=as_tree: rounds.verify(d)[1]
            if rounds.drafts:
                timed["draft"] = rounds.draft_step
            order = list(timed)
            samples = {key: [] for key in order}
            for rep in range(warmup + repeats):
                for key in rotated(order, rep):
                    seconds = timed[key]()
                    if rep >= warmup:
                        samples[key].append(seconds)
            ms = {key: statistics.median(s) * 1e3 / B for key, s in samples.items()}
            ms.update({key: ms[twin] for key, twin in same.items()})
            step = ms["step"]
            by_batch[str(B)] = [{"nodes": n, "step_ms": step, "chain_ms": ms[("chain", n)],
                                 "tree_ms": ms.get(("tree", n)), "chain_per_step": ms[("chain", n)] / step,
                                 "tree_per_step": ms[("tree", n)] / step if ("tree", n) in ms else None}
                                for n in nodes]
            if rounds.drafts:
                draft_steps[str(B)] = {"draft_step_ms": ms["draft"], "step_ms": step,
                                       "draft_per_step": ms["draft"] / step}
    drafter = pipe.strategy
    layerskip = None
    if draft_steps:
        layerskip = {"skip": list(drafter.skip), "layers": drafter.n_layers, "kept_fraction": drafter.kept_fraction,
                     "source": drafter.source, "by_batch": draft_steps}
    return {"prompt_tokens": prompt_tokens,
            "tree_parents": {str(n): verify_parents(tree.parents) for n, (_, tree) in shapes.items()
                             if tree is not None},
            "verify_cost": by_batch, "layerskip": layerskip}


def _num(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def tables(report: dict) -> str:
    """The markdown of a ``--verify-cost`` report: a line of the machine and setup, a table per batch size (rows:
    n), the layerskip draft step's ratio as its own line."""
    m, c = report["machine"], report["config"]
    lines = [f"machine: {m['cpu']} ({m['cpu_count']} cores, {m['torch_threads']} torch threads), device "
             f"{m['device']}{', ' + m['gpu'] if m.get('gpu') else ''}; torch {m['torch']}, transformers "
             f"{m['transformers']}",
             f"target {c['target']} ({c['dtype']}), {c['input']} ({report['prompt_tokens']} prompt tokens); median "
             f"of {c['repeats']} interleaved passes after {c['warmup']} warm-up passes; ms per row"]
    if report["tree_parents"]:
        tree = ", ".join(f"{n}: depth {max(depths(p))}" for n, p in report["tree_parents"].items())
        lines.append(f"trees: the pending token and a spine with side branches ({tree})")
    else:
        lines.append("trees: not timed (this target verifies no trees in one forward: linear-attention layers)")
    for B, rows in report["verify_cost"].items():
        lines += ["", f"batch {B}:", "", "| n | step (ms) | chain n (ms) | tree n (ms) | chain / step | tree / step |",
                  "|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['nodes']} | {_num(r['step_ms'])} | {_num(r['chain_ms'])} | {_num(r['tree_ms'])} | "
                  f"{_num(r['chain_per_step'])} | {_num(r['tree_per_step'])} |" for r in rows]
    ls = report["layerskip"]
    if ls:
        ratios = "; ".join(f"{_num(d['draft_per_step'])} at batch {B} ({_num(d['draft_step_ms'])} vs "
                           f"{_num(d['step_ms'])} ms)" for B, d in ls["by_batch"].items())
        lines += ["", f"layerskip draft step (runs {ls['layers'] - len(ls['skip'])} of {ls['layers']} layers, skips "
                      f"{ls['skip']}, {ls['source']}) / target step: {ratios}"]
    return "\n".join(lines)


__all__ = ["Rounds", "SIDE_CHANCES", "chain_draft", "measure", "tables", "tree_draft"]
