"""Result types returned by the public API (stable names: other tools and checks rely on them)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Round:
    """One target forward: what was drafted, how much the target kept, and the token it added.

    ``target_token`` is the target's own token after the accepted drafts (the correction when a draft was
    rejected, the bonus token when all were accepted). It is ``None`` only when generation stopped inside the
    accepted drafts (end-of-sequence or ``max_new_tokens`` reached there).
    """

    draft_ids: tuple[int, ...]
    n_accepted: int
    target_token: int | None
    # a tree round: each draft's parent in ``draft_ids`` (-1 = after the pending token); the accepted path comes
    # first, so ``draft_ids[:n_accepted]`` is still what was kept, and the rest are the rejected branches
    parents: tuple[int, ...] | None = None

    @property
    def emitted(self) -> list[int]:
        """The tokens this round added to the output, in order."""
        out = list(self.draft_ids[: self.n_accepted])
        if self.target_token is not None:
            out.append(self.target_token)
        return out

    def __iter__(self):  # lets users unpack ``draft_ids, n_accepted, target_token = round``
        return iter((self.draft_ids, self.n_accepted, self.target_token))


@dataclass
class Stats:
    new_tokens: int = 0
    target_forwards: int = 0        # target forwards (round 1's is the prefill, which verifies its drafts)
    draft_forwards: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    wall_s: float = 0.0
    time_to_first_token_s: float = 0.0
    vision_cache_hit: bool = False
    stop_reason: str = ""           # "eos" | "max_new_tokens" | "context" | "cancelled" | "error"

    @property
    def mean_accepted(self) -> float:
        """Tokens emitted per target forward (1.0 = plain decoding)."""
        return self.new_tokens / self.target_forwards if self.target_forwards else 0.0

    @property
    def acceptance_rate(self) -> float:
        """Accepted draft tokens / drafted tokens."""
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d.update(mean_accepted=self.mean_accepted, acceptance_rate=self.acceptance_rate,
                 tokens_per_s=self.tokens_per_s)
        return d


def acceptance_by_position(rounds: list[Round]) -> list[float]:
    """Fraction of rounds whose i-th draft token was accepted, among rounds that drafted at least i+1 tokens."""
    drafted: list[int] = []
    accepted: list[int] = []
    for r in rounds:
        for i in range(len(r.draft_ids)):
            if i == len(drafted):
                drafted.append(0)
                accepted.append(0)
            drafted[i] += 1
            accepted[i] += i < r.n_accepted
    return [a / d for a, d in zip(accepted, drafted)]


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]            # generated ids only (no prompt)
    rounds: list[Round]
    stats: Stats
    prompt_ids: list[int] = field(default_factory=list, repr=False)
    error: str | None = None        # set when this input could not be answered (generate_batch, submit)


@dataclass
class StreamEvent:
    """One event per round, for UIs. ``result`` is set on the last event only."""

    round: Round
    token_ids: list[int]            # all generated ids so far
    text: str                       # decoded text so far
    stats: Stats
    done: bool = False
    result: GenerationResult | None = None
