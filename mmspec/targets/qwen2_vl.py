"""Qwen2-VL and Qwen2.5-VL (``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``).

Two things differ from LLaVA:

- the number of image placeholders depends on the image size (``image_grid_thw`` after ``smart_resize``); the
  processor expands them, and the model's own ``get_image_features`` (given ``image_grid_thw``) returns one
  feature row per placeholder;
- positions are 3-D (M-RoPE: temporal, height, width). For the prompt they come from the model's own
  ``get_rope_index``; every later position p (cache length + i) is ``p + rope_deltas`` on all three axes, exactly
  as ``generate()`` continues them. Positions are passed as the 4-row tensor ``generate()`` passes (row 0: the
  plain 1-D text positions the causal mask is built from; rows 1-3: M-RoPE).

Video clips (``<|video_pad|>``) take features from the model's own ``get_video_features`` (given
``video_grid_thw``), spliced with the images' in placeholder order; ``get_rope_index`` places them given
``video_grid_thw`` (and Qwen2.5-VL's ``second_per_grid_ts``, the seconds per temporal patch), as ``generate()``
passes them.

A text-only drafter is unaffected: it numbers its own prompt (image placeholders removed) with 1-D positions.
"""

from __future__ import annotations

import torch

from mmspec.targets.base import Positions, Request, TargetAdapter


class MRopePositions(Positions):
    """The prompt's 3-D positions from ``get_rope_index``; after the prompt, position p sits at p + rope_delta on
    all three axes. Row 0 holds the plain 1-D positions, as ``generate()`` passes them."""

    def __init__(self, prompt_positions: torch.Tensor, rope_delta: int):
        self.prompt = prompt_positions[:, 0]     # [3, L]
        self.delta = int(rope_delta)

    def __call__(self, p: torch.Tensor) -> torch.Tensor:
        # p: [n] -> [4, n]
        p = p.to(self.prompt.device)
        mrope = (p + self.delta).view(1, -1).expand(3, -1).clone()
        in_prompt = p < self.prompt.shape[-1]
        if bool(in_prompt.any()):
            mrope[:, in_prompt] = self.prompt[:, p[in_prompt]]
        return torch.cat([p.view(1, -1), mrope], dim=0)


class Qwen2VLAdapter(TargetAdapter):
    family = "qwen2_vl"
    model_types = ("qwen2_vl", "qwen2_5_vl")
    pixel_inputs = ("pixel_values", "image_grid_thw")
    video_inputs = ("pixel_values_videos", "video_grid_thw")
    position_inputs = ("second_per_grid_ts",)
    default_image_token = "<|image_pad|>"
    default_video_token = "<|video_pad|>"

    @property
    def image_token_ids(self) -> frozenset[int]:
        cfg = self.model.config
        return frozenset(int(i) for i in (cfg.image_token_id, cfg.video_token_id) if i is not None)

    @property
    def feature_token_ids(self) -> frozenset[int]:
        # the video token takes features only where the family takes video (elsewhere it stays a plain token)
        cfg = self.model.config
        return frozenset(int(i) for i in (cfg.image_token_id, cfg.video_token_id if self.takes_video else None)
                         if i is not None)

    def rope_positions(self, request: Request) -> tuple[torch.Tensor, int]:
        """The model's own 3-D prompt positions [3, 1, L] and its rope delta (as ``generate()`` computes them)."""
        ids = torch.tensor([request.prompt_ids], device=self.device)
        types = request.token_types
        if types is None:   # a processor that does not give ``mm_token_type_ids``: 1 image, 2 video placeholders
            cfg = self.model.config
            types = (ids == cfg.image_token_id).long()
            if self.takes_video:
                types = types + 2 * (ids == cfg.video_token_id).long()
        types = types.to(self.device)
        # the grids (None for a text-only request) and Qwen2.5-VL's seconds per temporal patch, as generate() has them
        grids = {name: request.model_inputs[name].to(self.device)
                 for name in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")
                 if request.model_inputs.get(name) is not None}
        positions, deltas = self.model.model.get_rope_index(ids, mm_token_type_ids=types, **grids)
        return positions, int(deltas.view(-1)[0])

    @torch.inference_mode()
    def positions(self, request: Request) -> MRopePositions:
        return MRopePositions(*self.rope_positions(request))
