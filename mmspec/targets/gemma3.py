"""Gemma 3 (``Gemma3ForConditionalGeneration``: google/gemma-3-4b-it, 12b-it, 27b-it).

The generic family for features (SigLIP, pooled to ``mm_tokens_per_image`` soft tokens per image, spliced at
``config.image_token_id``: the *soft* token; the processor's ``image_token`` is the begin-of-image marker the prompt
names an image by) and 1-D positions; embeddings come from the model's scaled embedding module (it multiplies by
sqrt(hidden) itself). Two things are its own, both in the attention mask (``mmspec.kv.SlotCache``):

- sliding-window layers beside global ones: the decoder takes a dict ``{"full_attention": m,
  "sliding_attention": m}``; the window is one more mask term, the cache keeps every position;
- in the prefill, the tokens of one image attend to each other both ways (``attention_groups``: one group per
  contiguous run of soft tokens, as ``generate()`` builds from ``token_type_ids``). Only the prefill:
  ``generate()`` passes ``token_type_ids`` on its first step only, and generated tokens are text.
"""

from __future__ import annotations

import torch

from mmspec.targets.base import Request, TargetAdapter


class Gemma3Adapter(TargetAdapter):
    family = "gemma3"
    model_types = ("gemma3",)
    pixel_inputs = ("pixel_values",)
    default_image_token = "<start_of_image>"

    def attention_groups(self, request: Request) -> torch.Tensor | None:
        ids = torch.tensor(request.prompt_ids)
        image = ids == int(self.model.config.image_token_id)
        if not bool(image.any()):
            return None
        starts = image & ~torch.nn.functional.pad(image, (1, 0))[:-1]
        return torch.where(image, torch.cumsum(starts.long(), 0) - 1, -1)
