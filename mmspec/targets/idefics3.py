"""Idefics3 and SmolVLM (``Idefics3ForConditionalGeneration`` "idefics3", ``SmolVLMForConditionalGeneration``
"smolvlm").

The processor splits the image into tiles (a grid of crops plus a global view), each laid out in the prompt as
``<fake_token_around_image><row_i_col_j>`` then ``image_seq_len`` ``<image>`` placeholders; ``pixel_values`` holds
the tiles ``[1, n_tiles, 3, h, w]`` and ``pixel_attention_mask`` their valid pixels. Features come from the model's
own ``get_image_features`` (vision encoder over the real tiles, pixel-shuffle connector), one row per placeholder
in order, as ``generate()`` merges them. Positions are 1-D, numbered from the cache length.
"""

from __future__ import annotations

import torch

from mmspec.errors import MMSpecError
from mmspec.targets.base import Request
from mmspec.targets.llava import LlavaAdapter


class Idefics3Adapter(LlavaAdapter):
    family = "idefics3"
    model_types = ("idefics3", "smolvlm")

    def prepare(self, image, prompt_text: str) -> Request:
        image_token = getattr(self.processor, "image_token", "<image>")
        if image_token not in prompt_text:
            raise MMSpecError(f"the prompt must contain the image token {image_token!r} (raw_prompt=True passes "
                              "the prompt unchanged; leave it False to use the chat template)")
        # Idefics3's processor takes one list of images per prompt
        inputs = dict(self.processor(images=[[image]], text=[prompt_text], return_tensors="pt"))
        ids = inputs.pop("input_ids")[0].tolist()
        inputs.pop("attention_mask", None)
        return Request(prompt_ids=ids, image=image, image_key=self.image_key(image), model_inputs=inputs,
                       image_token_ids=self.image_token_ids, prompt_text=prompt_text)

    @torch.inference_mode()
    def encode_image(self, request: Request) -> torch.Tensor:
        inputs = request.model_inputs
        pixel_values = inputs["pixel_values"].to(self.device, self.model.dtype)
        mask = inputs.get("pixel_attention_mask")
        mask = None if mask is None else mask.to(self.device)
        out = self.model.model.get_image_features(pixel_values=pixel_values, pixel_attention_mask=mask,
                                                  return_dict=True)
        # [n_image_tokens, hidden]: tiles in prompt order, image_seq_len rows each
        return torch.cat(list(out.pooler_output), dim=0)
