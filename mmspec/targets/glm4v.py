"""GLM-4.1V / GLM-4.5V (``Glm4vForConditionalGeneration``, ``Glm4vMoeForConditionalGeneration``).

Its positions are 3-D M-RoPE of its own kind (non-interleaved sections over the rotary half of each head, GLM's
pairwise rotation), but all of that is inside the model: what the engine hands over is what Qwen2-VL takes, the
model's own ``get_rope_index`` (given ``mm_token_type_ids`` and ``image_grid_thw``) for the prompt and
``p + rope_delta`` after it, so ``Qwen2VLAdapter`` serves it with other settings. The image is
``<|begin_of_image|>`` + ``<|image|>`` x n + ``<|end_of_image|>``; only ``<|image|>`` takes features. GLM-4.1V stops
at any of three ids (``generation_config.eos_token_id`` is a list, read as such).
"""

from __future__ import annotations

from mmspec.targets.qwen2_vl import Qwen2VLAdapter


class Glm4vAdapter(Qwen2VLAdapter):
    family = "glm4v"
    model_types = ("glm4v", "glm4v_moe")
    default_image_token = "<|image|>"
    video_inputs = ()   # video not wired up (nor tested) for this family yet: a video part is refused
