"""Qwen3.5 (``Qwen3_5ForConditionalGeneration``, natively multimodal; ``qwen3_5`` and ``qwen3_5_moe``).

Images and positions as Qwen3-VL without DeepStack: features from the model's own ``get_image_features`` at
``<|image_pad|>``, 3-D M-RoPE positions from ``get_rope_index`` continued as ``p + rope_delta`` (``Qwen2VLAdapter``).
Video clips likewise: the processor (``Qwen3VLProcessor``) writes each temporal patch of a clip as its own
``<t seconds>`` + vision block, features come from the model's own ``get_video_features`` (the image path's) at
``<|video_pad|>``, and ``get_rope_index`` (given ``video_grid_thw`` and ``mm_token_type_ids``) splits the clip's grid
per temporal patch inside the model.

What is its own is the decoder: Gated DeltaNet linear-attention layers (a causal-conv state and a recurrent state
per row, no keys) beside gated full-attention layers. ``mmspec.kv.SlotCache`` handles them: full-attention layers
get the usual 4-D mask, linear ones none; before each forward the linear layers record the state after every
position a row may keep, and after acceptance each row takes the state after its kept prefix (rejected drafts
and padding leave no trace). A tree cannot be verified: one forward feeds its nodes through a single recurrence,
so siblings would see each other; ``tree_nodes`` is refused up front (``verifies_trees``, read by
``Pipeline.decode_config``) and by the slot cache itself, with an ``MMSpecError``.
"""

from __future__ import annotations

from mmspec.targets.qwen2_vl import Qwen2VLAdapter


class Qwen3_5Adapter(Qwen2VLAdapter):
    family = "qwen3_5"
    model_types = ("qwen3_5", "qwen3_5_moe")
    verifies_trees = False
    video_inputs = ("pixel_values_videos", "video_grid_thw")
