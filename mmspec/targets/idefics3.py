"""Idefics3 and SmolVLM (``Idefics3ForConditionalGeneration`` "idefics3", ``SmolVLMForConditionalGeneration``
"smolvlm").

The processor splits the image into tiles (a grid of crops plus a global view), each laid out in the prompt as
``<fake_token_around_image><row_i_col_j>`` then ``image_seq_len`` ``<image>`` placeholders; ``pixel_values`` holds
the tiles ``[1, n_tiles, 3, h, w]`` and ``pixel_attention_mask`` their valid pixels. Features come from the model's
own ``get_image_features`` (vision encoder over the real tiles, pixel-shuffle connector), one row per placeholder
in order, as ``generate()`` merges them. Positions are 1-D, numbered from the cache length.
"""

from __future__ import annotations

from mmspec.targets.base import TargetAdapter


class Idefics3Adapter(TargetAdapter):
    family = "idefics3"
    model_types = ("idefics3", "smolvlm")
    pixel_inputs = ("pixel_values", "pixel_attention_mask")
