"""The speculative engine: one loop for batch 1 and batch B, the same for every target family and drafter.

Each round runs five phases over the rows in flight (``Engine.step``):

1. **draft**  the drafter proposes k tokens per row (k from ``DraftPolicy``; 0 = no drafting this round);
2. **verify** ONE target forward scores every row's pending token and drafts (a joining row's prefill runs
   in the same step, on its own);
3. **accept** greedy: the longest agreeing prefix plus the target's own token; sampling: rejection sampling
   with the row's own generator (``mmspec.acceptance``);
4. **commit** the target's and the drafter's caches keep what each row accepted;
5. **emit**   one ``Round`` and ``StreamEvent`` per row, cut at end-of-sequence; finished rows leave, queued
   requests join (continuous batching).

Invariant between rounds: a row's target cache holds every committed position except the last one, the
*pending* token, fed first in the next verify (for a new row: the prompt's last token).
"""

from __future__ import annotations

import atexit
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

import torch

from mmspec.acceptance import (accept_sampling, accept_tree_greedy, accept_tree_sampling, repetition_penalty_rows,
                               warp_logits)
from mmspec.config import MAX_DRAFT_TOKENS, DecodeConfig, tree_depth
from mmspec.drafters.base import Draft, Drafter, RowSpec
from mmspec.targets.base import Request, TargetAdapter, TargetBatch
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


@dataclass
class Accepted:
    """One row's verdict on its draft."""

    n: int                       # drafts kept
    token: int                   # the target's own token after them
    drafts: list[int]            # the row's draft ids (draft order)
    keep: list[int]              # verify positions that stay in the target's cache (0 = the pending token)
    path: list[int] | None = None   # a tree's accepted nodes, root first (None for a chain)

    @property
    def emitted(self) -> list[int]:
        kept = [self.drafts[i] for i in self.path] if self.path is not None else self.drafts[:self.n]
        return kept + [self.token]

    @classmethod
    def chain(cls, drafts: list[int], n: int, token: int) -> "Accepted":
        return cls(n, token, drafts, list(range(1 + n)))

    @classmethod
    def tree(cls, drafts: list[int], path: list[int], token: int) -> "Accepted":
        return cls(len(path), token, drafts, [0] + [i + 1 for i in path], path)


class LinearFit:
    """y = a + b * x by least squares over what was observed, older observations fading (so the fit follows
    the machine it runs on), starting from prior pseudo-observations; a and b are kept positive."""

    DECAY = 0.98

    def __init__(self, prior: tuple[tuple[float, float], ...]):
        self.n, self.sx, self.sy, self.sxx, self.sxy = 0.0, 0.0, 0.0, 0.0, 0.0
        for x, y in prior:
            self._add(x, y)

    def _add(self, x: float, y: float) -> None:
        self.n += 1.0
        self.sx += x
        self.sy += y
        self.sxx += x * x
        self.sxy += x * y

    def observe(self, x: float, y: float) -> None:
        d = self.DECAY
        self.n, self.sx, self.sy, self.sxx, self.sxy = (v * d for v in (self.n, self.sx, self.sy, self.sxx, self.sxy))
        self._add(x, y)

    def __call__(self, x: float) -> float:
        det = self.n * self.sxx - self.sx * self.sx
        b = (self.n * self.sxy - self.sx * self.sy) / det if det > 1e-12 else 0.0
        b = max(b, 1e-7)
        a = max((self.sy - b * self.sx) / self.n, 1e-6)
        return a + b * x


class CostModel:
    """Running estimates, each a ``LinearFit`` from priors measured on the bundled target: a verify forward of
    B rows of T tokens, t = a + b * B * T; a round's drafting of k drafter forwards, t = c + d * k. The fixed
    part c (feeding what the last round accepted, the first logits, bookkeeping) is paid once per round
    whatever k is, so it must not be charged per step: a per-step average would make every draft token look
    twice as dear as it is and a sure drafter draft short."""

    def __init__(self):
        # verify: 17.5 ms for 1 token at batch 1, 74 ms for 9 tokens at batch 16; drafting: 1.4 ms for a
        # one-token draft, 6.6 ms for sixteen (the eagle head at batch 1)
        self.verify = LinearFit(((1, 0.0175), (144, 0.074)))
        self.draft = LinearFit(((1, 0.0014), (16, 0.0066)))

    def observe_draft(self, forwards: int, seconds: float) -> None:
        if forwards:
            self.draft.observe(forwards, seconds)

    def draft_s(self, k: int) -> float:
        """A round drafting k tokens (k drafter forwards; nothing when k = 0)."""
        return self.draft(k) if k else 0.0


class DraftPolicy:
    """Draft length per round: fixed when the request says so, else the k that maximises the expected tokens
    per second of the whole batch, from the measured forward costs and the acceptance seen so far.

    Acceptance is kept two ways: per draft position over every row (the chance that position i is accepted
    when position i-1 was: drafters are surer of near tokens than far ones) and per row (a one-word answer
    accepts nothing); a row's chance at position i is the mean of the two. k drafts then give
    1 + sum_i prod_{j<=i} p_j tokens per round for k drafting steps plus one verify of B*(k+1) tokens.
    k = 0 (no drafting) wins when drafts rarely pass; after a few rounds without drafting k = 1 is tried again.
    """

    PROBE_EVERY = 8
    DECAY = 0.98

    def __init__(self, drafter: Drafter):
        self.costs = CostModel()
        self.max_k = MAX_DRAFT_TOKENS if drafter.default_k else 0
        self.idle_rounds = 0
        self.pos_accepted = [0.0] * (MAX_DRAFT_TOKENS + 1)
        self.pos_tried = [0.0] * (MAX_DRAFT_TOKENS + 1)
        # before anything is measured: the drafter's own guess (a trained head knows its held-out acceptance)
        self.prior = drafter.prior_acceptance
        # every row's rounds pooled: a new row starts from what rows before it got, not from a fixed guess
        self.pool_accepted = 2 * self.prior
        self.pool_rejected = 2 * (1 - self.prior)

    def row_prior(self) -> tuple[float, float]:
        """A new row's running counts: the pooled per-token acceptance, worth two rounds of evidence (so the
        second round of a request drafts as long as rows before it earned, and its own record soon rules)."""
        p = self.pool_accepted / (self.pool_accepted + self.pool_rejected)
        return 2 * p, 2 * (1 - p)

    def position_acceptance(self) -> list[float]:
        out, prev = [], self.prior
        for acc, tried in zip(self.pos_accepted, self.pos_tried):
            # unseen positions lean on the one before them
            prev = (acc + 2 * prev) / (tried + 2)
            out.append(prev)
        return out

    def expected_tokens(self, row: float, positions: list[float], k: int) -> float:
        total, chain = 1.0, 1.0
        for i in range(k):
            chain *= min(max(0.5 * (positions[i] + row), 0.0), 0.999)
            total += chain
        return total

    def choose(self, jobs: list[Job]) -> int:
        adaptive = [j for j in jobs if j.config.num_draft_tokens is None]
        if not adaptive or not self.max_k:
            return 0
        positions = self.position_acceptance()
        best_k, best = 0, -1.0
        for k in range(self.max_k + 1):
            seconds = self.costs.draft_s(k) + self.costs.verify(len(jobs) * (k + 1))
            rate = sum(self.expected_tokens(j.acceptance, positions, k) for j in adaptive) / seconds
            if rate > best * (1 + 1e-3):
                best_k, best = k, rate
        if best_k == 0:
            self.idle_rounds += 1
            if self.idle_rounds % self.PROBE_EVERY == 0:
                return 1
        else:
            self.idle_rounds = 0
        return best_k

    def observe(self, job: Job, drafted: int, accepted: int) -> None:
        if not drafted:
            return
        # recent rounds weigh most: a row's counts fade by a fifth each round, the positions' more slowly
        job.accepted_run = 0.8 * job.accepted_run + accepted
        job.rejected_run = 0.8 * job.rejected_run + (accepted < drafted)
        self.pool_accepted = self.DECAY * self.pool_accepted + accepted
        self.pool_rejected = self.DECAY * self.pool_rejected + (accepted < drafted)
        self.pos_accepted = [v * self.DECAY for v in self.pos_accepted]
        self.pos_tried = [v * self.DECAY for v in self.pos_tried]
        for i in range(min(accepted + 1, drafted, len(self.pos_tried))):
            self.pos_tried[i] += 1
            self.pos_accepted[i] += i < accepted


class Engine:
    """Up to ``max_batch`` jobs in flight over one target and one drafter. ``step()`` runs one round."""

    def __init__(self, adapter: TargetAdapter, strategy: Drafter, max_batch: int = 1,
                 policy: DraftPolicy | None = None):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.adapter = adapter
        self.strategy = strategy
        self.max_batch = max_batch
        self.drafts = strategy.batch()
        self.target = TargetBatch(adapter, want_hidden=self.drafts.wants_hidden)
        # what was learned of costs and acceptance carries over from earlier engines of the same pipeline
        self.policy = policy or DraftPolicy(strategy)
        self.queue: deque[Job] = deque()
        self.active: dict[int, Job] = {}
        self._next_id = 0
        self._tree_turn = False
        self.eos_ids = adapter.eos_token_ids
        self.context_length = adapter.context_length
        self.repetition_penalty = adapter.repetition_penalty

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
                failed.append((job, self._finish_error(job, job.error or "cancelled before it started")))
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
                failed.append((job, self._finish_error(job, f"{type(e).__name__}: {e}")))
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
        self.target.add(row, request)
        try:
            self.drafts.add(row, RowSpec(request, config, job.generator))
        except Exception:
            self.target.remove([row])
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

    def _finish_error(self, job: Job, message: str) -> StreamEvent:
        job.error = message
        return self._last_event(job, "error")

    def cancel_finished(self) -> list[tuple[Job, StreamEvent]]:
        """Cancelled rows leave the batch; each gets a last event (``done``, stop reason "cancelled")."""
        gone = [r for r, j in self.active.items() if j.cancelled]
        events = []
        if gone:
            for r in gone:
                job = self.active.pop(r)
                events.append((job, self._last_event(job, "cancelled")))
            self.target.remove(gone)
            self.drafts.remove(gone)
        return events

    # ----- one round --------------------------------------------------------------------------------
    def step(self) -> list[tuple[Job, StreamEvent]]:
        """Admit what fits, run one round over every row in flight, and return each row's event."""
        events = self.cancel_finished()
        events += self._admit()
        if not self.active:
            return events
        rows = list(self.active)
        drafts = self._draft(rows)
        # a prefill's cost says nothing about a round's, so rounds with a joining row are not timed
        timed = all(self.active[r].stats.target_forwards for r in rows)
        t0 = time.perf_counter()
        logits = self._verify(rows, drafts)
        accepted = self._accept(rows, drafts, logits)
        if timed:  # up to the accept phase's host sync, where the forward has surely finished
            self.policy.costs.verify.observe(sum(1 + len(drafts[r]) for r in rows), time.perf_counter() - t0)
        self._commit(accepted)
        events += self._emit(rows, drafts, accepted)
        return events

    def _budget(self, job: Job) -> int:
        """Tokens this row may still add (the prompt's length was checked against the context up front)."""
        n = job.stats.new_tokens
        return min(job.config.max_new_tokens - n, self.context_length - (len(job.request.prompt_ids) + n))

    def _draft(self, rows: list[int]) -> dict[int, Draft]:
        jobs = [self.active[r] for r in rows]
        chains = [j for j in jobs if j.config.tree_nodes is None and (j.config.greedy or j.config.seed is None)]
        k_batch = self.policy.choose(chains) if chains else 0
        ks, trees = {}, {}
        for r, job in zip(rows, jobs):
            cfg = job.config
            if cfg.tree_nodes is not None:    # a tree: at most tree_nodes nodes, depth num_draft_tokens or tree_depth()
                k = cfg.num_draft_tokens if cfg.num_draft_tokens is not None else tree_depth(cfg.tree_nodes)
                trees[r] = cfg.tree_nodes
            elif cfg.num_draft_tokens is not None:
                k = cfg.num_draft_tokens
            elif not cfg.greedy and cfg.seed is not None:
                # a seeded sample must not depend on timing: the measured-cost policy would change how many
                # draws each round takes, so seeded rows draft the drafter's default length
                k = self.strategy.default_k
            else:
                k = k_batch
            # never more than the budget can take after the target's own token
            ks[r] = max(min(k, self._budget(job) - 1), 0)
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
        drafts = self.drafts.propose(ks, trees) if trees else self.drafts.propose(ks)
        self.policy.costs.observe_draft(max((d.forwards for d in drafts.values()), default=0),
                                        time.perf_counter() - t0)
        for r in rows:
            self.active[r].stats.draft_forwards += drafts[r].forwards
        return drafts

    def _verify(self, rows: list[int], drafts: dict[int, Draft]) -> dict[int, torch.Tensor]:
        device = self.target.device
        ids = {r: torch.cat([torch.tensor([self.active[r].pending], device=device), drafts[r].ids.to(device)])
               for r in rows}
        # a tree's nodes hang under the pending token (verify index 0), node j at index j + 1
        parents = {r: [-1] + [p + 1 if p >= 0 else 0 for p in drafts[r].parents]
                   for r in rows if drafts[r].parents is not None}
        logits = self.target.verify(ids, parents)
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

    def _accept(self, rows, drafts, logits) -> dict[int, Accepted]:
        out = {}
        greedy = [r for r in rows if self.active[r].config.greedy and drafts[r].parents is None]
        if greedy:
            # one host sync for every greedy chain row: the target's argmax at each verified position
            argmax = torch.cat([logits[r].argmax(-1) for r in greedy]).tolist()
            drafted = torch.cat([drafts[r].ids for r in greedy]).tolist()
            i = j = 0
            for r in greedy:
                k = len(drafts[r])
                target, mine = argmax[i:i + k + 1], drafted[j:j + k]
                n = 0
                while n < k and mine[n] == target[n]:
                    n += 1
                out[r] = Accepted.chain(mine, n, target[n])
                i, j = i + k + 1, j + k
        for r in rows:
            if r in out:
                continue
            job, d = self.active[r], drafts[r]
            ids = d.ids.tolist()
            if d.parents is not None:   # a tree: the accepted root path
                if job.config.greedy:
                    path, token = accept_tree_greedy(ids, d.parents, logits[r].argmax(-1).tolist())
                else:
                    p = warp_logits(logits[r], job.config.temperature, job.config.top_p)
                    path, token = accept_tree_sampling(ids, d.parents, p, job.generator)
                out[r] = Accepted.tree(ids, path, token)
            else:
                p = warp_logits(logits[r], job.config.temperature, job.config.top_p)
                q = d.probs(p.shape[-1]).to(p.device)
                n, token = accept_sampling(d.ids.to(p.device), q, p, job.generator)
                out[r] = Accepted.chain(ids, n, token)
        return out

    def _commit(self, accepted: dict[int, Accepted]) -> None:
        self.target.commit({r: a.keep for r, a in accepted.items()})
        # the target's hidden states of the positions just committed, for drafters that read them
        self.drafts.update({r: (a.n, a.emitted) for r, a in accepted.items()},
                           self.target.committed_hidden if self.drafts.wants_hidden else None)

    def _emit(self, rows, drafts, accepted) -> list[tuple[Job, StreamEvent]]:
        events, finished = [], []
        for r in rows:
            job = self.active[r]
            acc = accepted[r]
            n_acc, token, emitted, draft_ids = acc.n, acc.token, acc.emitted, acc.drafts
            tree = None
            if acc.path is not None:
                # the trace lists the accepted path first, then the rejected nodes, with their parents
                order = acc.path + [i for i in range(len(draft_ids)) if i not in acc.path]
                where = {i: j for j, i in enumerate(order)}
                tree = tuple(where.get(drafts[r].parents[i], -1) for i in order)
                draft_ids = [draft_ids[i] for i in order]
            if job.seen is not None:
                job.seen[torch.tensor(emitted, device=job.seen.device).clamp_max(job.seen.shape[0] - 1)] = True
            if tree is None:
                self.policy.observe(job, len(draft_ids), n_acc)
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
            self.target.remove(finished)
            self.drafts.remove(finished)
        return events

    def run(self) -> Iterator[tuple[Job, StreamEvent]]:
        """Step until every queued and running job is done."""
        while self.busy:
            yield from self.step()


class Scheduler:
    """A background thread that keeps one ``Engine`` busy for callers on other threads (demo users, server
    clients): ``submit`` queues a job and returns it; its events arrive on ``job.events``; a job that is
    cancelled (client gone) leaves the batch at the next round."""

    def __init__(self, adapter: TargetAdapter, strategy: Drafter, max_batch: int,
                 policy: DraftPolicy | None = None):
        self.engine = Engine(adapter, strategy, max_batch, policy)
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.closing = False
        self.thread = threading.Thread(target=self._loop, name="mmspec-engine", daemon=True)
        self.thread.start()
        # stop between rounds before the interpreter goes down: a thread killed inside a forward aborts it
        atexit.register(self.close)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread after the round in progress. Jobs still queued or running then get a last event
        (``done``, stop reason "error": the engine was closed), so no caller waits on them forever."""
        self.closing = True
        self.wake.set()
        if threading.current_thread() is self.thread:
            return
        self.thread.join(timeout)
        if self.thread.is_alive():
            return   # still inside a forward: its jobs are not ours to touch
        atexit.unregister(self.close)   # the exit hook held the engine, and with it the model, alive
        engine = self.engine
        with self.lock:
            left = list(engine.queue) + list(engine.active.values())
            engine.queue.clear()
            engine.active.clear()
        for job in left:
            if job.events is not None and not job.done:
                job.events.put(engine._finish_error(job, "the pipeline was closed before this request finished"))

    def submit(self, job: Job) -> Job:
        job.events = queue.Queue()
        with self.lock:
            self.engine.add(job)
        self.wake.set()
        return job

    @torch.inference_mode()
    def _loop(self) -> None:
        while not self.closing:
            self.wake.wait()
            while not self.closing:
                with self.lock:
                    if not self.engine.busy:
                        self.wake.clear()
                        break
                try:
                    events = self.engine.step()
                except Exception as e:  # keep serving: every row in flight gets the error
                    events = self._fail_all(f"{type(e).__name__}: {e}")
                for job, event in events:
                    job.events.put(event)

    def _fail_all(self, message: str) -> list:
        engine = self.engine
        rows = list(engine.active)
        out = [(engine.active[r], engine._finish_error(engine.active[r], message)) for r in rows]
        engine.active.clear()
        engine.target = TargetBatch(engine.adapter, want_hidden=engine.drafts.wants_hidden)
        engine.drafts = engine.strategy.batch()
        return out


def iter_job_events(job: Job, timeout: float | None = None) -> Iterator[StreamEvent]:
    """The events of a submitted job as they come (blocking); ends after the ``done`` event."""
    while True:
        event = job.events.get(timeout=timeout)
        yield event
        if event.done:
            return


__all__ = ["CostModel", "DraftPolicy", "LinearFit", "Engine", "Job", "Scheduler", "iter_job_events"]
