"""Idefics3 and SmolVLM (``Idefics3ForConditionalGeneration`` "idefics3", ``SmolVLMForConditionalGeneration``
"smolvlm").

The processor splits the image into tiles (a grid of crops plus a global view), each laid out in the prompt as
``<fake_token_around_image><row_i_col_j>`` then ``image_seq_len`` ``<image>`` placeholders; ``pixel_values`` holds
the tiles ``[1, n_tiles, 3, h, w]`` and ``pixel_attention_mask`` their valid pixels. Features come from the model's
own ``get_image_features`` (vision encoder over the real tiles, pixel-shuffle connector), one row per placeholder
in order, as ``generate()`` merges them. Positions are 1-D, numbered from the cache length.

SmolVLM (with a ``SmolVLMProcessor``, which needs the optional ``num2words`` package) takes video clips: the
processor writes each ``<video>`` as a text intro and, per frame, a timestamp then one global-image block of
``<image>`` placeholders; the frames come back as ``pixel_values`` / ``pixel_attention_mask`` (one square tile per
frame) and go through the same ``get_image_features``, as ``generate()`` runs them. The video processor's outputs
take the images' names, so a request with both a clip and an image loses the images' pixels in transformers'
processor (its ``generate()`` then fails: "Image features and image tokens do not match"); such a request is
refused here.
"""

from __future__ import annotations

import torch

from mmspec.errors import MMSpecError
from mmspec.targets.base import Request, TargetAdapter


class Idefics3Adapter(TargetAdapter):
    family = "idefics3"
    model_types = ("idefics3", "smolvlm")
    pixel_inputs = ("pixel_values", "pixel_attention_mask")
    # SmolVLM's video processor gives the frames under the images' names (only for requests without images)
    video_inputs = ("pixel_values", "pixel_attention_mask")

    @property
    def takes_video(self) -> bool:
        # the clip's placeholders are ``<image>`` tokens (the config has no video token id): SmolVLM with its
        # processor's video processor
        return (self.model.config.model_type == "smolvlm"
                and getattr(self.processor, "video_processor", None) is not None)

    @property
    def image_token_ids(self) -> frozenset[int]:
        return frozenset({int(self.model.config.image_token_id)})

    no_images_with_video = ("transformers' processor gives the frames under the images' names (pixel_values), so "
                            "generate() cannot run them together")

    @torch.inference_mode()
    def encode_video_blocks(self, request: Request) -> list[torch.Tensor]:
        """One block per clip: the frames go through ``get_image_features`` in one forward (one block for the
        request), cut into ``image_seq_len`` rows per frame of each clip."""
        block = torch.cat(list(self.model.get_image_features(**self.video_feature_kwargs(request),
                                                              return_dict=True).pooler_output), dim=0)
        if len(request.videos) == 1:
            return [block]
        per_frame = int(getattr(self.processor, "image_seq_len", 0))
        sizes = [len(v) * per_frame if isinstance(v, (list, tuple)) else -1 for v in request.videos]
        if min(sizes) < 0 or sum(sizes) != block.shape[0]:
            raise MMSpecError("several SmolVLM clips in one request must each be a list of frames",
                              code="unsupported_value", param="messages")
        return list(block.split(sizes))
