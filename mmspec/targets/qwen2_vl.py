"""Qwen2-VL and Qwen2.5-VL (``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``).

Two things differ from LLaVA:

- the number of image placeholders depends on the image size (``image_grid_thw`` after ``smart_resize``); the
  processor expands them, and the model's own ``get_image_features`` returns one feature row per placeholder;
- positions are 3-D (M-RoPE: temporal, height, width). For the prompt they come from the model's own
  ``get_rope_index``; every later position p (cache length + i) is ``p + rope_deltas`` on all three axes, exactly
  as ``generate()`` continues them. Positions are passed as the 4-row tensor ``generate()`` passes (row 0: the
  plain 1-D text positions the causal mask is built from; rows 1-3: M-RoPE).

A text-only drafter is unaffected: it numbers its own prompt (image placeholders removed) with 1-D positions.
"""

from __future__ import annotations

import torch

from mmspec.errors import MMSpecError
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

    @property
    def image_token_ids(self) -> frozenset[int]:
        cfg = self.model.config
        return frozenset(int(i) for i in (cfg.image_token_id, cfg.video_token_id) if i is not None)

    def prepare(self, image, prompt_text: str) -> Request:
        image_token = getattr(self.processor, "image_token", "<|image_pad|>")
        if image_token not in prompt_text:
            raise MMSpecError(f"the prompt must contain the image token {image_token!r} (raw_prompt=True passes "
                              "the prompt unchanged; leave it False to use the chat template)")
        inputs = dict(self.processor(images=image, text=prompt_text, return_tensors="pt"))
        ids = inputs.pop("input_ids")[0].tolist()
        inputs.pop("attention_mask", None)
        token_types = inputs.pop("mm_token_type_ids", None)
        if token_types is None:
            image_ids = torch.tensor(sorted(self.image_token_ids))
            token_types = torch.isin(torch.tensor([ids]), image_ids).long()
        return Request(prompt_ids=ids, image=image, image_key=self.image_key(image), model_inputs=inputs,
                       image_token_ids=self.image_token_ids, prompt_text=prompt_text, token_types=token_types)

    @torch.inference_mode()
    def encode_image(self, request: Request) -> torch.Tensor:
        inner = self.model.model
        pixel_values = request.model_inputs["pixel_values"].to(self.device)
        grid = request.model_inputs["image_grid_thw"].to(self.device)
        out = inner.get_image_features(pixel_values, grid, return_dict=True)
        # [n_image_tokens, hidden]
        return torch.cat(list(out.pooler_output), dim=0)

    @property
    def feature_token_ids(self) -> frozenset[int]:
        return frozenset([int(self.model.config.image_token_id)])

    def rope_positions(self, request: Request) -> tuple[torch.Tensor, int]:
        """The model's own 3-D prompt positions [3, 1, L] and its rope delta (as ``generate()`` computes them)."""
        ids = torch.tensor([request.prompt_ids], device=self.device)
        types = request.token_types.to(self.device)
        grid = request.model_inputs["image_grid_thw"].to(self.device)
        positions, deltas = self.model.model.get_rope_index(ids, mm_token_type_ids=types, image_grid_thw=grid)
        return positions, int(deltas.view(-1)[0])

    @torch.inference_mode()
    def positions(self, request: Request) -> MRopePositions:
        return MRopePositions(*self.rope_positions(request))
