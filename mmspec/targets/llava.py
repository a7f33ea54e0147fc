"""LLaVA (``LlavaForConditionalGeneration``): a fixed number of image placeholders, 1-D positions.

Image features are spliced into the prompt embeddings by a mask over placeholder positions, the same way the
model's own forward does it, so pixels reach the vision tower once per image (through the vision cache).
"""

from __future__ import annotations

import torch

from mmspec.errors import MMSpecError
from mmspec.targets.base import Request, TargetAdapter


class LlavaAdapter(TargetAdapter):
    family = "llava"
    model_types = ("llava",)

    @property
    def image_token_ids(self) -> frozenset[int]:
        return frozenset([int(self.model.config.image_token_id)])

    def prepare(self, image, prompt_text: str) -> Request:
        image_token = getattr(self.processor, "image_token", "<image>")
        if image_token not in prompt_text:
            raise MMSpecError(f"the prompt must contain the image token {image_token!r} (raw_prompt=True passes "
                              "the prompt unchanged; leave it False to use the chat template)")
        inputs = self.processor(images=image, text=prompt_text, return_tensors="pt")
        ids = inputs.pop("input_ids")[0].tolist()
        inputs.pop("attention_mask", None)
        return Request(prompt_ids=ids, image=image, image_key=self.image_key(image), model_inputs=dict(inputs),
                       image_token_ids=self.image_token_ids, prompt_text=prompt_text)

    @torch.inference_mode()
    def encode_image(self, request: Request) -> torch.Tensor:
        pixel_values = request.model_inputs["pixel_values"].to(self.device, self.model.dtype)
        out = self.model.get_image_features(pixel_values=pixel_values, return_dict=True)
        # [n_image_tokens, hidden]
        return torch.cat(list(out.pooler_output), dim=0)

    @torch.inference_mode()
    def encode_images(self, requests: list[Request]) -> list | None:
        pixels = [r.model_inputs["pixel_values"] for r in requests]
        if type(self) is not LlavaAdapter or len({tuple(p.shape) for p in pixels}) != 1:
            return None  # tiles of varying count (LLaVA-NeXT) or sizes: one image at a time
        stack = torch.cat(pixels).to(self.device, self.model.dtype)
        out = self.model.get_image_features(pixel_values=stack, return_dict=True)
        return [feats for feats in out.pooler_output]
