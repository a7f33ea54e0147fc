"""``drafter_kind="text"``: a small causal LM sharing the target's tokenizer, drafting from the prompt text alone.

It never sees image tokens: its prompt is the target's prompt with every image placeholder removed. Ids it
cannot produce (the target's padding rows, image placeholders) get draft probability 0.
"""

from __future__ import annotations

import torch

from mmspec.drafters.base import RowSpec
from mmspec.drafters.model_batch import FedTokens, ModelDraftBatch, ModelDrafter
from mmspec.kv import CACHE_KW, SlotCache
from mmspec.targets.base import Request, TargetAdapter
from mmspec.trees import chain


LEAN_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def lean_forward(model, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
    """The decoder's own layers, without the output plumbing of its ``forward`` (the 4-D mask is ready-made).
    Drafting is latency-bound and its numerics never change what is emitted; this saves a tiny drafter a
    good part of its step. embeds [B, T, hidden] -> last hidden states [B, T, hidden]."""
    inner = model.model
    hidden = embeds
    rotary = inner.rotary_emb(hidden, positions)
    for layer in inner.layers:
        hidden = layer(hidden, attention_mask=mask, position_ids=positions, position_embeddings=rotary,
                       use_cache=True, **{CACHE_KW: cache})
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    return inner.norm(hidden)


def full_forward(model, embeds, mask, positions, cache) -> torch.Tensor:
    return model.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True,
                       **{CACHE_KW: cache}).last_hidden_state


def lean_step_works(model) -> bool:
    """Use the lean forward only where it reproduces the model's own (checked once, at load)."""
    if getattr(model.config, "model_type", None) not in LEAN_MODEL_TYPES or getattr(model.config, "sliding_window", None):
        return False
    inner = getattr(model, "model", None)
    if not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return False
    try:
        with torch.inference_mode():
            device = model.get_input_embeddings().weight.device
            ids = torch.arange(1, 6, device=device) % model.config.vocab_size
            ref = model(input_ids=ids[None]).logits[0, -1]
            slots = SlotCache(model.config, device, model.dtype)
            slots.add_empty(0)
            mask, pos = slots.extend([chain(5)])
            got = model.lm_head(lean_forward(model, inner.embed_tokens(ids[None]), mask, pos, slots.cache))[0, -1]
        return bool(torch.allclose(ref.float(), got.float(), atol=1e-3, rtol=1e-3))
    except Exception:  # another layer signature: the regular forward is always right
        return False


class CausalLMDraftBatch(ModelDraftBatch):
    """Rows drafting with one causal LM; a row's sequence is its prompt as the drafter sees it (after any prefix
    embeddings: visual tokens), then the output."""

    def __init__(self, drafter: "TextDrafter"):
        self.model = drafter.model
        self.forward_fn = lean_forward if drafter.lean_step else full_forward
        self.embed = self.model.get_input_embeddings()
        super().__init__(drafter, SlotCache(self.model.config, self.embed.weight.device, self.embed.weight.dtype))

    def _open(self, row, spec: RowSpec) -> FedTokens:
        ids = self.drafter.readable(spec.request.text_only_ids)
        prefix = self.drafter.prefix_embeds(spec.request)
        if prefix is None:
            return FedTokens(ids, len(ids))
        return FedTokens(ids, prefix.shape[1] + len(ids), prefix[0])

    def _inputs(self, ids: torch.Tensor, prev) -> torch.Tensor:
        return self.embed(ids)

    def _model(self, slots: SlotCache, x: torch.Tensor, parents: list[list[int]], **tree) -> torch.Tensor:
        mask, pos = slots.extend(parents, **tree)
        return self.model.lm_head(self.forward_fn(self.model, x, mask, pos, slots.cache)).float()


class TextDrafter(ModelDrafter):
    kind = "text"
    default_k = 4

    def __init__(self, target: TargetAdapter, model, tokenizer):
        super().__init__(target, model, tokenizer, target.image_token_ids)
        self.tokenizer = tokenizer
        self.lean_step = lean_step_works(model)
        self.context_length = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)

    def prefix_embeds(self, request: Request) -> torch.Tensor | None:
        """Embeddings fed before the prompt text ([1, m, hidden]); none for a text-only drafter."""
        return None

    def batch(self) -> CausalLMDraftBatch:
        return CausalLMDraftBatch(self)
