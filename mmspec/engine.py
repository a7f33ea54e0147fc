"""The speculative engine: one loop for batch 1 and batch B, the same for every target family and drafter.

Each round runs five phases over the rows in flight (``Engine.step``):

1. **draft**  the drafter proposes k tokens per row, a chain or a tree (k from ``mmspec.policy``; 0 = no
   drafting this round);
2. **verify** ONE target forward scores every row's pending token and drafts (a joining row's prefill runs
   in the same step, on its own);
3. **accept** greedy: the longest agreeing prefix (or tree path) plus the target's own token; sampling:
   rejection sampling with the row's own generator (``mmspec.acceptance``);
4. **commit** the target's and the drafter's caches keep what each row accepted;
5. **emit**   one ``Round`` and ``StreamEvent`` per row, cut at end-of-sequence; finished rows leave, queued
   requests join (continuous batching).

Invariant between rounds: a row's target cache holds every committed position except the last one, the
*pending* token, fed first in the next verify (for a new row: the prompt's last token). ``mmspec.scheduler``
runs an engine on a thread of its own for callers on other threads.
"""

from __future__ import annotations

import queue
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

import torch

from mmspec.acceptance import Accepted, accept, repetition_penalty_rows
from mmspec.config import DecodeConfig, tree_depth
from mmspec.drafters.base import Drafter, RowSpec
from mmspec.policy import DraftPolicy
from mmspec.targets.base import Request, TargetAdapter
from mmspec.targets.batch import TargetBatch
from mmspec.trees import Draft, TreeShape, depths, verify_parents
from mmspec.types import GenerationResult, Round, Stats, StreamEvent


@dataclass
class Job:
    """One request through the engine: its settings, its running state and, when done, its result."""

    request: Request | None
    config: DecodeConfig
    start: float = field(default_factory=time.perf_counter)
    error: str | None = None
    stats: Stats = field(default_factory=Stats)
    rounds: list[Round] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    pending: int = 0
    seen: torch.Tensor | None = None         # [vocab + 1] bool, for the target's repetition penalty
    accepted_run: float = 0.0                # running counts for the per-token acceptance (DraftPolicy)
    rejected_run: float = 0.0

    @property
    def acceptance(self) -> float:
        """Estimated chance that the next draft token is accepted: accepted / (accepted + rejections), the
        estimate of a geometric run cut at k (accepted / drafted would read long drafts as poor ones)."""
        total = self.accepted_run + self.rejected_run
        return self.accepted_run / total if total else 0.0
    result: GenerationResult | None = None
    cancelled: bool = False
    events: "queue.Queue | None" = None      # set for jobs submitted from other threads
    index: int = 0                           # position in the caller's list

    @property
    def done(self) -> bool:
        return self.result is not None


class Engine:
    """Up to ``max_batch`` jobs in flight over one target and one drafter. ``step()`` runs one round."""

    def __init__(self, adapter: TargetAdapter, strategy: Drafter, max_batch: int = 1,
                 policy: DraftPolicy | None = None):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.adapter = adapter
        self.strategy = strategy
        self.max_batch = max_batch
        self.draft_batch, self.target_batch = self._new_batches()
        # what was learned of costs and acceptance carries over from earlier engines of the same pipeline
        self.policy = policy or DraftPolicy(strategy)
        self.queue: deque[Job] = deque()
        self.active: dict[int, Job] = {}
        self._next_id = 0
        self._tree_turn = False
        self.eos_ids = adapter.eos_token_ids
        self.context_length = adapter.context_length
        self.repetition_penalty = adapter.repetition_penalty

    def _new_batches(self) -> tuple:
        """Empty drafter and target batches (the target returns hidden states where the drafter reads them)."""
        draft_batch = self.strategy.batch()
        return draft_batch, TargetBatch(self.adapter, want_hidden=draft_batch.wants_hidden)

    # ----- scheduling -----------------------------------------------------------------------------
    def add(self, job: Job) -> None:
        self.queue.append(job)

    @property
    def busy(self) -> bool:
        return bool(self.queue or self.active)

    def _admit(self) -> list[tuple[Job, StreamEvent | None]]:
        """Queued jobs join while there is room; a job whose image fails to encode finishes with its error."""
        failed, joining = [], []
        while self.queue and len(self.active) + len(joining) < self.max_batch:
            job = self.queue.popleft()
            if job.error is not None or job.cancelled:
                failed.append((job, self.finish_error(job, job.error or "cancelled before it started")))
            else:
                joining.append(job)
        if len(joining) > 1:
            try:  # the joining rows' images in one vision forward where the family can; else one by one below
                self.adapter.images_features([j.request for j in joining])
            except Exception:
                pass
        for job in joining:
            try:
                self._open(job)
            except Exception as e:  # one bad input never takes the batch down
                failed.append((job, self.finish_error(job, f"{type(e).__name__}: {e}")))
        return failed

    def _open(self, job: Job) -> None:
        request, config = job.request, job.config
        if not config.greedy and job.generator is None:
            job.generator = torch.Generator(device=self.adapter.device)
            job.generator.manual_seed(config.seed if config.seed is not None else torch.seed())
        if request.features is None:
            self.adapter.image_features(request)
        job.stats.vision_cache_hit = request.vision_cache_hit
        row = self._next_id
        self._next_id += 1
        self.target_batch.add(row, request)
        try:
            self.draft_batch.add(row, RowSpec(request, config, job.generator))
        except Exception:
            self.target_batch.remove([row])
            raise
        job.pending = request.prompt_ids[-1]
        job.accepted_run, job.rejected_run = self.policy.row_prior()
        self.active[row] = job

    @staticmethod
    def _result(job: Job, text: str) -> GenerationResult:
        job.result = GenerationResult(text=text, token_ids=list(job.token_ids), rounds=list(job.rounds),
                                      stats=job.stats, prompt_ids=list(job.request.prompt_ids) if job.request else [],
                                      error=job.error)
        return job.result

    def _last_event(self, job: Job, stop_reason: str) -> StreamEvent:
        """A job that ends outside a round (an error before it ran, a cancellation): its done event."""
        job.stats.stop_reason = stop_reason
        job.stats.wall_s = time.perf_counter() - job.start
        text = self.adapter.decode(job.token_ids) if job.token_ids else ""
        return StreamEvent(round=Round((), 0, None), token_ids=list(job.token_ids), text=text, stats=job.stats,
                           done=True, result=self._result(job, text))

    def finish_error(self, job: Job, message: str) -> StreamEvent:
        """The job ends with ``message`` outside a round: its done event (stop reason "error")."""
        job.error = message
        return self._last_event(job, "error")

    def fail_active(self, message: str) -> list[tuple[Job, StreamEvent]]:
        """Every row in flight ends with ``message`` (a round raised); the batches start afresh for the queue."""
        out = [(job, self.finish_error(job, message)) for job in self.active.values()]
        self.active.clear()
        self.draft_batch, self.target_batch = self._new_batches()
        return out

    def cancel_finished(self) -> list[tuple[Job, StreamEvent]]:
        """Cancelled rows leave the batch; each gets a last event (``done``, stop reason "cancelled")."""
        gone = [r for r, j in self.active.items() if j.cancelled]
        events = []
        if gone:
            for r in gone:
                job = self.active.pop(r)
                events.append((job, self._last_event(job, "cancelled")))
            self.target_batch.remove(gone)
            self.draft_batch.remove(gone)
        return events

    # ----- one round --------------------------------------------------------------------------------
    def step(self) -> list[tuple[Job, StreamEvent]]:
        """Admit what fits, run one round over every row in flight, and return each row's event."""
        events = self.cancel_finished()
        events += self._admit()
        if not self.active:
            return events
        rows = list(self.active)
        # 1. draft
        drafts = self._draft(rows)
        # a prefill's cost says nothing about a round's, so rounds with a joining row are not timed
        timed = all(self.active[r].stats.target_forwards for r in rows)
        t0 = time.perf_counter()
        # 2. verify
        logits = self._verify(rows, drafts)
        # 3. accept
        accepted = accept(drafts, logits, {r: self.active[r].config for r in rows},
                          {r: self.active[r].generator for r in rows})
        if timed:  # up to the accept phase's host sync, where the forward has surely finished
            self.policy.costs.verify.observe(sum(1 + len(drafts[r]) for r in rows), time.perf_counter() - t0)
        # 4. commit
        self._commit(accepted)
        # 5. emit
        events += self._emit(rows, accepted)
        return events

    def _budget(self, job: Job) -> int:
        """Tokens this row may still add (the prompt's length was checked against the context up front)."""
        n = job.stats.new_tokens
        return min(job.config.max_new_tokens - n, self.context_length - (len(job.request.prompt_ids) + n))

    def _draft(self, rows: list[int]) -> dict[int, Draft]:
        jobs = [self.active[r] for r in rows]
        # a seeded sample must not depend on timing: the measured-cost policy would change how many draws each
        # round takes, so seeded rows draft fixed lengths (the drafter's default; a tree, tree_depth())
        timed = [j for j in jobs if j.config.greedy or j.config.seed is None]
        k_batch = self.policy.choose(timed) if timed else 0
        adaptive = k_batch and any(j.config.tree_nodes is not None and j.config.num_draft_tokens is None
                                   for j in timed)
        # adaptive trees widen only where a node pays for its verify at this round's costs
        floor = max(self.strategy.tree_floor, self.policy.node_floor(timed, k_batch)) if adaptive else None
        ks, trees = {}, {}
        for r, job in zip(rows, jobs):
            cfg = job.config
            tree = cfg.tree_nodes is not None
            if cfg.num_draft_tokens is not None:
                k = cfg.num_draft_tokens
            elif not cfg.greedy and cfg.seed is not None:
                k = tree_depth(cfg.tree_nodes) if tree else self.strategy.default_k
            else:
                k = k_batch
            # never more than the budget can take after the target's own token
            ks[r] = max(min(k, self._budget(job) - 1), 0)
            if tree:
                # a tree holds the chain of this depth (never accepts less than it) and widens where the drafter
                # hesitates: at most tree_nodes nodes
                timing = cfg.num_draft_tokens is None and (cfg.greedy or cfg.seed is None)
                trees[r] = TreeShape(cfg.tree_nodes, spine=ks[r], floor=floor if timing else None)
        if trees and any(ks[r] for r in rows if r not in trees):
            # a drafter grows either trees or chains in one call: a batch that mixes them (clients with
            # different settings) takes turns, one kind drafting per round (the other drafts nothing: lossless)
            self._tree_turn = not self._tree_turn
            if self._tree_turn:
                ks.update({r: 0 for r in rows if r not in trees})
            else:
                ks.update({r: 0 for r in trees})
                trees = {}
        t0 = time.perf_counter()
        drafts = self.draft_batch.propose(ks, trees) if trees else self.draft_batch.propose(ks)
        self.policy.costs.observe_draft(max((d.forwards for d in drafts.values()), default=0),
                                        time.perf_counter() - t0)
        for r in rows:
            self.active[r].stats.draft_forwards += drafts[r].forwards
        return drafts

    def _verify(self, rows: list[int], drafts: dict[int, Draft]) -> dict[int, torch.Tensor]:
        device = self.target_batch.device
        ids = {r: torch.cat([torch.tensor([self.active[r].pending], device=device), drafts[r].ids.to(device)])
               for r in rows}
        # a tree's nodes hang under the pending token
        parents = {r: verify_parents(drafts[r].parents) for r in rows if drafts[r].parents is not None}
        logits = self.target_batch.verify(ids, parents)
        for r in rows:
            self.active[r].stats.target_forwards += 1
        if self.repetition_penalty != 1.0:
            logits = {r: self._penalize(self.active[r], l, drafts[r], parents.get(r)) for r, l in logits.items()}
        return logits

    def _penalize(self, job: Job, logits: torch.Tensor, draft: Draft, parents=None) -> torch.Tensor:
        if job.seen is None:
            job.seen = torch.zeros(logits.shape[-1] + 1, dtype=torch.bool, device=logits.device)
            job.seen[torch.tensor(job.request.prompt_ids, device=logits.device).clamp_max(logits.shape[-1])] = True
        return repetition_penalty_rows(logits, job.seen, draft.ids.to(logits.device), self.repetition_penalty,
                                       parents)

    def _commit(self, accepted: dict[int, Accepted]) -> None:
        self.target_batch.commit({r: a.keep for r, a in accepted.items()})
        # the target's hidden states of the positions just committed, for drafters that read them
        self.draft_batch.update({r: (a.n, a.emitted) for r, a in accepted.items()},
                                self.target_batch.committed_hidden if self.draft_batch.wants_hidden else None)

    def _emit(self, rows, accepted: dict[int, Accepted]) -> list[tuple[Job, StreamEvent]]:
        events, finished = [], []
        for r in rows:
            job = self.active[r]
            acc = accepted[r]
            n_acc, token, emitted = acc.n, acc.token, acc.emitted
            draft_ids, tree = acc.trace()
            if job.seen is not None:
                job.seen[torch.tensor(emitted, device=job.seen.device).clamp_max(job.seen.shape[0] - 1)] = True
            # a tree's round counts as a chain as deep as the tree (its best path is what was accepted)
            deep = len(draft_ids) if acc.parents is None else max(depths(acc.parents), default=-1) + 1
            self.policy.observe(job, deep, n_acc)
            stop = next((i for i, t in enumerate(emitted) if t in self.eos_ids), None)
            if stop is not None and stop < n_acc:
                rnd = Round(tuple(draft_ids), stop + 1, None, tree)   # stopped inside the accepted drafts
            else:
                rnd = Round(tuple(draft_ids), n_acc, token, tree)
            stats = job.stats
            n_before = stats.new_tokens
            stats.new_tokens += len(rnd.emitted)
            stats.drafted_tokens += len(draft_ids)
            stats.accepted_tokens += rnd.n_accepted
            if stop is not None:
                stats.stop_reason = "eos"
            elif stats.new_tokens >= job.config.max_new_tokens:
                stats.stop_reason = "max_new_tokens"
            elif len(job.request.prompt_ids) + stats.new_tokens >= self.context_length:
                stats.stop_reason = "context"
            now = time.perf_counter()
            if n_before == 0:
                stats.time_to_first_token_s = now - job.start
            stats.wall_s = now - job.start
            job.rounds.append(rnd)
            job.token_ids.extend(rnd.emitted)
            job.pending = token
            text = self.adapter.decode(job.token_ids)
            done = bool(stats.stop_reason)
            if done:
                self._result(job, text)
                finished.append(r)
            events.append((job, StreamEvent(round=rnd, token_ids=list(job.token_ids), text=text, stats=stats,
                                            done=done, result=job.result)))
        if finished:
            for r in finished:
                self.active.pop(r)
            self.target_batch.remove(finished)
            self.draft_batch.remove(finished)
        return events

    def run(self) -> Iterator[tuple[Job, StreamEvent]]:
        """Step until every queued and running job is done."""
        while self.busy:
            yield from self.step()


__all__ = ["Engine", "Job"]
