"""How long each round drafts: ``DraftPolicy`` picks k from the measured forward costs (``CostModel``, running
``LinearFit``s) and the acceptance seen so far, and how wide a tree may grow (``node_floor``). One policy per
pipeline, shared by every engine it runs.

The policy must never talk itself out of drafting for good: a busy machine's slow forwards can make drafting
look dear, and a round that drafts nothing measures nothing about drafting. So (issue 31) it keeps measuring:
after ``PROBE_EVERY`` rounds in which it would draft less than the prior costs say it should, it drafts that
much anyway (a probe, on a round counter: no random numbers, so seeded rows stay reproducible); a timing far
below what a fit predicted restarts the fit from its prior's shape (``LinearFit.SURPRISE``); and estimates fade
towards the drafter's prior in rounds that measure nothing."""

from __future__ import annotations

from typing import Protocol

from mmspec.config import MAX_DRAFT_TOKENS, DecodeConfig
from mmspec.drafters.base import Drafter


class PolicyRow(Protocol):
    """What the policy reads and updates of a row (the engine's ``Job``): its settings and its running counts of
    accepted and rejected drafts; ``acceptance`` = accepted / (accepted + rejected)."""

    config: DecodeConfig
    accepted_run: float
    rejected_run: float

    @property
    def acceptance(self) -> float: ...


class LinearFit:
    """y = a + b * x by least squares over what was observed, older observations fading (so the fit follows
    the machine it runs on), starting from prior pseudo-observations; a and b are kept positive.

    An observation under 1 / ``SURPRISE`` of the prediction means the old evidence is wrong (a busy spell is
    over, or absurd timings were fed): the fit then starts again from the prior's shape scaled through that
    observation (old evidence at any x could keep an absurd slope alive), so a fit that made drafting look dear
    is corrected by one probe instead of hundreds of rounds."""

    DECAY = 0.98
    SURPRISE = 4.0

    def __init__(self, prior: tuple[tuple[float, float], ...]):
        self.prior = prior
        self._start(1.0)

    def _start(self, scale: float) -> None:
        self.n, self.sx, self.sy, self.sxx, self.sxy = 0.0, 0.0, 0.0, 0.0, 0.0
        for x, y in self.prior:
            self._add(x, scale * y)

    def _add(self, x: float, y: float) -> None:
        self.n += 1.0
        self.sx += x
        self.sy += y
        self.sxx += x * x
        self.sxy += x * y

    def observe(self, x: float, y: float) -> None:
        if y * self.SURPRISE < self(x):
            a, b = LinearFit(self.prior).coefficients()
            self._start(y / (a + b * x))
        else:
            d = self.DECAY
            self.n, self.sx, self.sy, self.sxx, self.sxy = (v * d for v in (self.n, self.sx, self.sy, self.sxx,
                                                                             self.sxy))
        self._add(x, y)

    def coefficients(self) -> tuple[float, float]:
        """(a, b), both positive."""
        det = self.n * self.sxx - self.sx * self.sx
        b = (self.n * self.sxy - self.sx * self.sy) / det if det > 1e-12 * max(self.n * self.sxx, 1e-30) else 0.0
        b = max(b, 1e-7)
        a = max((self.sy - b * self.sx) / self.n, 1e-6)
        return a, b

    def __call__(self, x: float) -> float:
        a, b = self.coefficients()
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

    def round_s(self, rows: int, k: int) -> float:
        """A round of ``rows`` rows drafting k tokens each: drafting, then one verify of rows * (k + 1) tokens."""
        return self.draft_s(k) + self.verify(rows * (k + 1))


class DraftPolicy:
    """Draft length per round: fixed when the request says so, else the k that maximises the expected tokens
    per second of the whole batch, from the measured forward costs and the acceptance seen so far.

    Acceptance is kept two ways: per draft position over every row (the chance that position i is accepted
    when position i-1 was: drafters are surer of near tokens than far ones) and per row (a one-word answer
    accepts nothing); a row's chance at position i is the mean of the two. k drafts then give
    1 + sum_i prod_{j<=i} p_j tokens per round for k drafting steps plus one verify of B*(k+1) tokens.

    Recovery (module docstring): after ``PROBE_EVERY`` rounds in a row in which the measured costs pick a k
    shorter than the prior costs would (``prior_costs``, never fitted), a round drafts the prior's k (at least
    1): its timing either replaces the fit (far below it) or confirms it, and then the next probe waits twice
    as long, up to ``PROBE_MAX`` rounds. Rounds that draft nothing fade the pooled acceptance estimates towards
    the drafter's prior.
    """

    PROBE_EVERY = 8      # the first probe after this many short rounds in a row
    PROBE_MAX = 64       # the longest wait between probes
    DECAY = 0.98

    def __init__(self, drafter: Drafter):
        self.costs = CostModel()
        self.prior_costs = CostModel()   # the probe's yardstick: what drafting costs before anything is measured
        self.max_k = MAX_DRAFT_TOKENS if drafter.default_k else 0
        self.short_rounds = 0            # short rounds (less than the prior costs would draft) since the last probe
        self.probe_every = self.PROBE_EVERY
        self.probes = 0                  # probe rounds so far (for tests and the bench's notes)
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

    def _best(self, costs: CostModel, adaptive: list[PolicyRow], rows: int, positions: list[float]) -> tuple:
        """(k, expected tokens per second) maximising the batch's rate under ``costs``."""
        best_k, best = 0, -1.0
        for k in range(self.max_k + 1):
            rate = sum(self.expected_tokens(j.acceptance, positions, k) for j in adaptive) / costs.round_s(rows, k)
            if rate > best * (1 + 1e-3):
                best_k, best = k, rate
        return best_k, best

    def choose(self, jobs: list[PolicyRow]) -> int:
        """k for this round's rows (``jobs``: every row whose k the policy sets or that shares its verify)."""
        adaptive = [j for j in jobs if j.config.num_draft_tokens is None]
        if not adaptive or not self.max_k:
            return 0
        positions = self.position_acceptance()
        best_k, _ = self._best(self.costs, adaptive, len(jobs), positions)
        probe_k = max(self._best(self.prior_costs, adaptive, len(jobs), positions)[0], 1)
        if best_k >= probe_k:
            self.short_rounds, self.probe_every = 0, self.PROBE_EVERY
            return best_k
        if best_k == 0:
            self._fade()
        self.short_rounds += 1
        if self.short_rounds >= self.probe_every:
            # a probe that leaves the fit short confirmed it: the next one waits twice as long (at most
            # PROBE_MAX rounds), so a machine that is really slow to verify pays for few probes
            self.short_rounds, self.probe_every = 0, min(2 * self.probe_every, self.PROBE_MAX)
            self.probes += 1
            return probe_k
        return best_k

    def node_floor(self, jobs: list[PolicyRow], k: int) -> float:
        """The path probability a tree node needs to be worth verifying at this round's costs: a node adds about
        its path probability in accepted tokens and one verified token's cost (the verify fit's slope), so it
        pays when p / slope beats the batch's expected tokens per second at draft length k."""
        adaptive = [j for j in jobs if j.config.num_draft_tokens is None] or jobs
        if not adaptive or not k:
            return 0.0
        positions = self.position_acceptance()
        rate = sum(self.expected_tokens(j.acceptance, positions, k) for j in adaptive) / self.costs.round_s(
            len(jobs), k)
        return min(self.costs.verify.coefficients()[1] * rate, 0.9)

    def _fade(self) -> None:
        """A round that measures nothing: the pooled estimates lean a little further on the drafter's prior."""
        d = self.DECAY
        self.pos_accepted = [v * d for v in self.pos_accepted]
        self.pos_tried = [v * d for v in self.pos_tried]
        self.pool_accepted = d * self.pool_accepted + (1 - d) * 2 * self.prior
        self.pool_rejected = d * self.pool_rejected + (1 - d) * 2 * (1 - self.prior)

    def observe(self, job: PolicyRow, drafted: int, accepted: int) -> None:
        """A row's round: ``drafted`` tokens deep (a tree: its depth), ``accepted`` of them kept."""
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


__all__ = ["CostModel", "DraftPolicy", "LinearFit", "PolicyRow"]
