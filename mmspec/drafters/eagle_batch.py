"""The draft batch every eagle head shares (mmspec's one-layer head and EAGLE-3 heads): the head is fed pairs
(input_{t+1}, h_t), the target's true hidden states after each round, then its own predictions while drafting.
Its own module so that both head formats import it without importing each other."""

from __future__ import annotations

from dataclasses import dataclass
import torch

from mmspec.drafters.base import Drafter, RowSpec
from mmspec.drafters.model_batch import ModelDraftBatch
from mmspec.kv import SlotCache


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass
class EagleRow:
    inputs: torch.Tensor                  # [L, H] the prompt's inputs (embeddings / projected image features)
    todo: torch.Tensor | None = None      # [m, 2H] (input, true hidden state) pairs not fed yet


class EagleDraftBatch(ModelDraftBatch):
    """Rows over one head cache. The head is fed pairs (input_{t+1}, h_t): the true hidden states the target hands
    over after each round, then while drafting its own predictions (dropped after the round: ``keeps_drafts``)."""

    wants_hidden = True
    keeps_drafts = False

    def __init__(self, drafter: Drafter):   # an eagle drafter: ``head``, ``embed``, ``logits``
        self.head = drafter.head
        self.H = drafter.head.cfg["hidden_size"]
        slots = SlotCache(drafter.head.layer_cfg, drafter.target.device, drafter.target.model.dtype)
        slots.none_means = "every slot"   # the head's sdpa
        super().__init__(drafter, slots)

    def _open(self, row, spec: RowSpec) -> EagleRow:
        request = spec.request
        adapter = self.drafter.target
        with torch.inference_mode():
            embeds = adapter.prompt_embeds(request)[0]                      # [L, H] with the image features
            ids = torch.tensor(request.prompt_ids, device=self.device)
            is_image = torch.isin(ids, torch.tensor(sorted(adapter.feature_token_ids), device=self.device))
            return EagleRow(self.head.inputs(self.drafter.embed(ids), embeds, is_image))

    def _room(self, row) -> int:
        # a row drafts once the target has given it hidden states (after its prefill's round)
        return 1 << 30 if self.state[row].todo is not None else 0

    def _waiting(self, row) -> torch.Tensor | None:
        st = self.state[row]
        todo, st.todo = st.todo, None
        return todo

    def _append(self, row, emitted: list[int], kept: int, hidden: torch.Tensor | None) -> None:
        st = self.state[row]
        m = hidden.shape[0]                                 # the positions just committed
        new_inputs = self.drafter.embed(torch.tensor(emitted, device=self.device))
        if st.todo is None and row in self.fresh:
            # first round: hidden of the whole prompt (but its last) + pending + accepted; inputs are the
            # prompt's from position 1, then the emitted tokens
            new_inputs = torch.cat([st.inputs[1:], new_inputs])
        pairs = torch.cat([new_inputs[-m:].to(self.slots.dtype), hidden.to(self.slots.dtype)], dim=-1)
        st.todo = pairs if st.todo is None else torch.cat([st.todo, pairs])

    def _inputs(self, ids: torch.Tensor, prev: list) -> torch.Tensor:
        # each token's parent's predicted hidden state
        hid = torch.zeros(*ids.shape, self.H, dtype=self.slots.dtype, device=self.device)
        for b, fed_after in enumerate(prev):
            if fed_after:
                hid[b, :len(fed_after)] = torch.stack(fed_after)
        return torch.cat([self.drafter.embed(ids).to(hid.dtype), hid], dim=-1)

    def _model(self, slots: SlotCache, x: torch.Tensor, parents: list[list[int]], **tree) -> torch.Tensor:
        mask, pos = slots.extend(parents, **tree)
        return self.head(x[..., self.H:], x[..., :self.H], mask, pos, slots.cache)

    def _logits(self, out: torch.Tensor) -> torch.Tensor:
        return self.drafter.logits(out)


__all__ = ["EagleDraftBatch", "EagleRow", "rotate_half"]
