"""``drafter_kind="ngram"``: prompt lookup (no weights). The last n tokens are searched for earlier in the
prompt and output; the tokens that followed are proposed. Image placeholders are never proposed: the
sequence searched is the prompt without them."""

from __future__ import annotations

import torch

from mmspec.drafters.base import Drafter, DraftSession
from mmspec.trees import Draft


class NgramDraftSession(DraftSession):
    def __init__(self, seq: list[int], device, max_ngram: int, min_ngram: int, eos_ids: frozenset[int]):
        self.seq = list(seq)
        self.eos_ids = eos_ids
        self.device = device
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.forwards = 0

    def propose(self, k: int) -> Draft:
        seq, found = self.seq, []
        for n in range(min(self.max_ngram, len(seq) - 1), self.min_ngram - 1, -1):
            tail = seq[-n:]
            # the most recent earlier occurrence of the tail wins
            for start in range(len(seq) - n - 1, -1, -1):
                if seq[start:start + n] == tail:
                    found = seq[start + n:start + n + k]
                    break
            if found:
                break
        found = found[:max(k, 0)]
        # nothing after an end-of-sequence token can be accepted
        end = next((i for i, t in enumerate(found) if t in self.eos_ids), None)
        if end is not None:
            found = found[:end + 1]
        return Draft(torch.tensor(found, dtype=torch.long, device=self.device))

    def update(self, n_accepted: int, emitted: list[int]) -> None:
        self.seq.extend(emitted)


class NgramDrafter(Drafter):
    kind = "ngram"
    default_k = 4

    def __init__(self, target, max_ngram: int = 3, min_ngram: int = 1):
        super().__init__(target)
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    gives_distribution = False

    def session(self, request, config, generator) -> DraftSession:
        return NgramDraftSession(request.text_only_ids, self.target.device, self.max_ngram, self.min_ngram,
                                 self.eos_ids)
