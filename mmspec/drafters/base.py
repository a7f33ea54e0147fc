"""The drafter interface. Each strategy answers two questions, and the loop never asks which one it has:

- ``propose(k)``: "propose up to k tokens after the sequence so far" -> ``Draft``;
- ``update(n_accepted, emitted)``: "here is how many you got right, and what was emitted" (so it can roll
  back its own cache to the accepted length and catch up on tokens it has not seen).

A ``Drafter`` holds the weights and is shared; a ``DraftSession`` holds one request's state.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from mmspec.acceptance import warp_logits
from mmspec.config import DecodeConfig
from mmspec.targets.base import Request, TargetAdapter


@dataclass
class Draft:
    ids: torch.Tensor                 # [k] drafted token ids (target vocabulary), k may be 0
    q: torch.Tensor | None = None     # [k, target_vocab] draft probabilities; None = deterministic (one-hot)

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def probs(self, vocab_size: int) -> torch.Tensor:
        """q as a dense [k, vocab] tensor (one-hot for deterministic drafters)."""
        if self.q is not None:
            return self.q
        return torch.nn.functional.one_hot(self.ids, vocab_size).float()


def sample_block(logits: torch.Tensor, step, k: int, config: DecodeConfig, generator: torch.Generator | None,
                 target_vocab: int) -> Draft:
    """Draft ``k`` tokens autoregressively: ``logits`` [drafter_vocab] predict the first, ``step(token)`` feeds a
    token and returns the next logits (not called after the last). Greedy takes the argmax; sampling draws from
    q = the warped distribution, returned over the target's vocabulary (ids the drafter lacks get q = 0)."""
    ids, qs = [], []
    for i in range(k):
        if config.greedy:
            # [1]; stays on the device: no host sync while drafting
            token = logits.argmax(-1, keepdim=True)
        else:
            q = warp_logits(logits, config.temperature, config.top_p)
            token = torch.multinomial(q, 1, generator=generator)
            qs.append(q)
        ids.append(token)
        if i < k - 1:
            logits = step(token)
    q = None
    if qs:
        # [k, drafter_vocab] -> [k, target_vocab]
        q = torch.stack(qs)
        pad = target_vocab - q.shape[-1]
        q = torch.nn.functional.pad(q, (0, pad)) if pad > 0 else q[:, :target_vocab]
    return Draft(torch.cat(ids), q)


class DraftSession(ABC):
    forwards: int = 0

    @abstractmethod
    def propose(self, k: int) -> Draft: ...

    @abstractmethod
    def update(self, n_accepted: int, emitted: list[int]) -> None: ...


class Drafter(ABC):
    kind: str = ""
    default_k: int = 4
    needs_weights: bool = False   # True: built by ``from_pretrained(target, path, ...)``
    model = None                  # the underlying HF model, when there is one

    def __init__(self, target: TargetAdapter):
        self.target = target

    @classmethod
    def from_pretrained(cls, target: TargetAdapter, path, dtype, trust_remote_code: bool = False) -> "Drafter":
        raise NotImplementedError(f"drafter kind {cls.kind!r} has no weights to load")

    @abstractmethod
    def session(self, request: Request, config: DecodeConfig, generator: torch.Generator | None) -> DraftSession:
        ...


class NoDraftSession(DraftSession):
    def __init__(self, device):
        self._empty = Draft(torch.empty(0, dtype=torch.long, device=device))

    def propose(self, k: int) -> Draft:
        return self._empty

    def update(self, n_accepted: int, emitted: list[int]) -> None:
        pass


class NoDrafter(Drafter):
    """``drafter_kind="none"``: plain target decoding through the same loop (the baseline)."""

    kind = "none"
    default_k = 0

    def session(self, request, config, generator):
        return NoDraftSession(self.target.device)
