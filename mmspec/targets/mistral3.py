"""Mistral 3 (``Mistral3ForConditionalGeneration``: Mistral-Small-3.1 / 3.2, a Pixtral vision tower).

The generic family: images of any size (up to the tower's ``image_size``) go through the model's own
``get_image_features`` with their ``image_sizes``; the projector merges 2x2 patches (``spatial_merge_size``). The
processor writes one row of ``[IMG]`` per merged patch row, each row closed by ``[IMG_BREAK]`` and the last one by
``[IMG_END]``: only ``[IMG]`` (``config.image_token_id``) takes features, the break and end tokens keep their
text embeddings (as ``generate()`` does). Positions are 1-D.
"""

from __future__ import annotations

from mmspec.targets.base import TargetAdapter


class Mistral3Adapter(TargetAdapter):
    family = "mistral3"
    model_types = ("mistral3",)
    pixel_inputs = ("pixel_values", "image_sizes")
    config_feature_kwargs = ("vision_feature_layer",)
    default_image_token = "[IMG]"
