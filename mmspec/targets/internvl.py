"""InternVL 3.x in transformers' own format (``InternVLForConditionalGeneration``, the ``-hf`` checkpoints).

The generic family: the image processor cuts an image into tiles (plus a thumbnail when there are several), the
model's own ``get_image_features`` runs them through the vision tower, pixel shuffle and projector, giving
``image_seq_length`` features per tile, in the order of the ``<IMG_CONTEXT>`` placeholders the processor writes
between ``<img>`` and ``</img>``. The tile count is implicit in ``pixel_values``' first dimension, so images are
encoded one at a time. The language model (Qwen2 or Llama) takes 1-D positions.
"""

from __future__ import annotations

from mmspec.targets.base import TargetAdapter


class InternVLAdapter(TargetAdapter):
    family = "internvl"
    model_types = ("internvl",)
    config_feature_kwargs = ("vision_feature_layer", "vision_feature_select_strategy")
    default_image_token = "<IMG_CONTEXT>"
