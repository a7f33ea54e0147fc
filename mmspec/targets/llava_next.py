"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``, "llava_next") and LLaVA-OneVision ("llava_onevision").

The image is split into tiles by the "anyres" grid (``image_grid_pinpoints``), so the number of image placeholders
depends on the image size; the processor expands them. Features come from the model's own ``get_image_features``
with ``image_sizes``: tiles through the vision tower and projector, then the model's packing (unpadding, one
``image_newline`` per row), so the rows equal what ``generate()`` splices into the placeholders. Positions are 1-D.
"""

from __future__ import annotations

import torch

from mmspec.targets.base import Request
from mmspec.targets.llava import LlavaAdapter


class LlavaNextAdapter(LlavaAdapter):
    family = "llava_next"
    model_types = ("llava_next", "llava_onevision")

    @torch.inference_mode()
    def encode_image(self, request: Request) -> torch.Tensor:
        cfg = self.model.config
        inputs = request.model_inputs
        kwargs = dict(vision_feature_layer=cfg.vision_feature_layer,
                      vision_feature_select_strategy=cfg.vision_feature_select_strategy, return_dict=True)
        if "batch_num_images" in inputs:   # LLaVA-OneVision: one image per sample gets anyres patching
            kwargs["batch_num_images"] = inputs["batch_num_images"].to(self.device)
        pixel_values = inputs["pixel_values"].to(self.device, self.model.dtype)
        out = self.model.model.get_image_features(pixel_values, inputs["image_sizes"].to(self.device), **kwargs)
        # [n_image_tokens, hidden]: packed rows with their newline tokens, in placeholder order
        return torch.cat(list(out.pooler_output), dim=0)
