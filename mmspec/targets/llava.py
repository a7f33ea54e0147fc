"""LLaVA (``LlavaForConditionalGeneration``): a fixed number of image placeholders, 1-D positions.

The generic family (``TargetAdapter``) as it is: features from the model's own ``get_image_features``, spliced
into the prompt embeddings by a mask over placeholder positions, the way the model's own forward does it, so
pixels reach the vision tower once per image (through the vision cache). Every image has the same grid, so
several images go through the vision tower as one stack.
"""

from __future__ import annotations

from mmspec.targets.base import TargetAdapter


class LlavaAdapter(TargetAdapter):
    family = "llava"
    model_types = ("llava",)
    stacks_same_shape_images = True
