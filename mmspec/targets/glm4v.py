"""GLM-4.1V / GLM-4.5V (``Glm4vForConditionalGeneration``, ``Glm4vMoeForConditionalGeneration``).

Its positions are 3-D M-RoPE of its own kind (non-interleaved sections over the rotary half of each head, GLM's
pairwise rotation), but all of that is inside the model: what the engine hands over is what Qwen2-VL takes, the
model's own ``get_rope_index`` (given ``mm_token_type_ids`` and ``image_grid_thw``) for the prompt and
``p + rope_delta`` after it, so ``Qwen2VLAdapter`` serves it with other settings. The image is
``<|begin_of_image|>`` + ``<|image|>`` x n + ``<|end_of_image|>``; only ``<|image|>`` takes features. GLM-4.1V stops
at any of three ids (``generation_config.eos_token_id`` is a list, read as such).

Video: the processor writes a clip as ``<|begin_of_video|>``, then per temporal patch ``<|begin_of_image|>`` +
``<|image|>`` x n + ``<|end_of_image|>`` + its timestamp in whole seconds, then ``<|end_of_video|>``: the clip's
placeholders are the image token too (``mm_token_type_ids`` marks them 2), so they take the clip's
``get_video_features`` rows in placeholder order, and ``get_rope_index`` (given ``video_grid_thw``) splits the
clip per temporal patch (inside the model). A request holding both images and clips is refused: transformers'
own ``Glm4vModel.get_placeholder_mask`` counts a clip's ``<|image|>`` placeholders as the image's too, so
``generate()`` itself fails on it ("Image features and image tokens do not match"), and there is no reference to
be lossless to.
"""

from __future__ import annotations

from mmspec.targets.qwen2_vl import Qwen2VLAdapter


class Glm4vAdapter(Qwen2VLAdapter):
    family = "glm4v"
    model_types = ("glm4v", "glm4v_moe")
    default_image_token = "<|image|>"
    video_inputs = ("pixel_values_videos", "video_grid_thw")
    position_inputs = ()
    default_video_token = "<|video|>"
    no_images_with_video = ("transformers' own generate() cannot run them together (its placeholder mask counts "
                            "the clips' <|image|> tokens as the images'); send the clip's frames as image parts, or "
                            "the clip alone")
