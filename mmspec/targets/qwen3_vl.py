"""Qwen3-VL, dense and MoE (``Qwen3VLForConditionalGeneration``, ``Qwen3VLMoeForConditionalGeneration``).

What differs from Qwen2-VL (whose ``rope_positions`` / ``MRopePositions`` it reuses: the model's own
``get_rope_index`` with ``mm_token_type_ids``, continued as ``p + rope_delta``; the interleaved T/H/W layout is
inside the model):

- **DeepStack.** The vision tower also returns features of some of its layers, which the decoder adds to the
  hidden states at the image positions after its first layers (``visual_pos_masks``, ``deepstack_visual_embeds``).
  They are part of the image's features: ``encode_image`` returns one row per placeholder holding the spliced
  feature and then each DeepStack level side by side ([n, (1 + levels) * hidden]), so the vision cache keeps them
  together per image and several images' rows concatenate in placeholder order like any family's.
  ``prompt_embeds`` splices the first ``hidden`` columns; ``prompt_extras`` / ``prefill_kwargs`` hand the rest to
  the forward that holds the prompt (a prefill, alone or with other joining rows). Later forwards carry only text
  (``generate()`` drops the pixel inputs after the prefill too), so they get nothing.
- **Video.** A clip's features come from ``get_video_features`` with DeepStack levels of their own, kept the same
  way per clip; the decoder takes images' and clips' DeepStack rows together in placeholder order, as the model
  joins them. The processor writes each temporal patch of a clip as its own ``<t seconds>`` + vision block, and
  ``get_rope_index`` splits ``video_grid_thw`` per temporal patch accordingly (inside the model).
"""

from __future__ import annotations

import dataclasses

import torch

from mmspec.targets.base import Request
from mmspec.targets.qwen2_vl import Qwen2VLAdapter


class Qwen3VLAdapter(Qwen2VLAdapter):
    family = "qwen3_vl"
    model_types = ("qwen3_vl", "qwen3_vl_moe")

    @property
    def hidden_size(self) -> int:
        return self.model.config.get_text_config().hidden_size

    @staticmethod
    def _with_deepstack(out) -> list[torch.Tensor]:
        """One block per image (or clip) of a vision output: [n_tokens, (1 + levels) * hidden], the spliced
        feature then each DeepStack level."""
        levels = list(out.deepstack_features or [])
        return [torch.cat([block] + [level[i] for level in levels], dim=-1)
                for i, block in enumerate(out.pooler_output)]

    @torch.inference_mode()
    def encode_image(self, request: Request) -> torch.Tensor:
        return torch.cat(self.encode_image_blocks(request))

    @torch.inference_mode()
    def encode_image_blocks(self, request: Request) -> list[torch.Tensor]:
        return self._with_deepstack(self.model.get_image_features(**self.feature_kwargs([request]), return_dict=True))

    @torch.inference_mode()
    def encode_video_blocks(self, request: Request) -> list[torch.Tensor]:
        return self._with_deepstack(self.model.get_video_features(**self.video_feature_kwargs(request),
                                                                  return_dict=True))

    def spliced_features(self, features: torch.Tensor) -> torch.Tensor:
        """The columns of ``features`` that replace the placeholders' embeddings (the DeepStack levels dropped)."""
        return features[:, : self.hidden_size]

    def prompt_embeds(self, request: Request) -> torch.Tensor:
        if request.features is None:   # a text-only request
            return super().prompt_embeds(request)
        narrow = dataclasses.replace(request, features=self.spliced_features(request.features))
        return super().prompt_embeds(narrow)

    def prompt_extras(self, request: Request):
        """(image positions of the prompt [L] bool, DeepStack levels [levels, n_image_tokens, hidden])."""
        h = self.hidden_size
        levels = 0 if request.features is None else request.features.shape[-1] // h - 1
        if levels <= 0 or not request.features.shape[0]:
            return None
        ids = torch.tensor(request.prompt_ids, device=self.device)
        mask = torch.isin(ids, torch.tensor(sorted(self.feature_token_ids), device=self.device))
        deep = request.features[:, h:].reshape(-1, levels, h).transpose(0, 1)
        return mask, deep

    def prefill_kwargs(self, extras: list, kept: list[int], width: int) -> dict:
        """``visual_pos_masks`` [B, width] over the forward's positions and, per DeepStack level, the rows of
        those positions in row-major order (row b's kept image tokens, then row b+1's)."""
        masks = torch.zeros(len(extras), width, dtype=torch.bool, device=self.device)
        per_level = []
        for b, (extra, n) in enumerate(zip(extras, kept)):
            if extra is None:
                continue
            mask, deep = extra
            masks[b, :n] = mask[:n]
            per_level.append(deep[:, : int(mask[:n].sum())])
        if not per_level:
            return {}
        dtype = self.model.get_input_embeddings().weight.dtype
        deep = torch.cat(per_level, dim=1).to(self.device, dtype)
        return {"visual_pos_masks": masks, "deepstack_visual_embeds": list(deep)}
