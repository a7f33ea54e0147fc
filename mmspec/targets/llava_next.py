"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``, "llava_next") and LLaVA-OneVision ("llava_onevision").

The image is split into tiles by the "anyres" grid (``image_grid_pinpoints``), so the number of image placeholders
depends on the image size; the processor expands them. Features come from the model's own ``get_image_features``
with ``image_sizes`` (and OneVision's ``batch_num_images``: one image per sample gets anyres patching): tiles
through the vision tower and projector, then the model's packing (unpadding, one ``image_newline`` per row), so the
rows equal what ``generate()`` splices into the placeholders. Positions are 1-D.

Several images in one OneVision request skip anyres patching (one base tile each, as ``generate()`` does for a
multi-image sample), so their features are cached under keys of their own.

OneVision takes video clips (``<video>``): the model's own ``get_video_features`` (each frame through the tower
and projector, 2x2 pooled, one ``image_newline`` after the clip), spliced with the images' in placeholder order.
A clip does not count as an image for anyres patching (``batch_num_images`` counts images), as in ``generate()``.
LLaVA-NeXT takes no video (its processor has no video processor).
"""

from __future__ import annotations

from mmspec.targets.base import Request, TargetAdapter


class LlavaNextAdapter(TargetAdapter):
    family = "llava_next"
    model_types = ("llava_next", "llava_onevision")
    pixel_inputs = ("pixel_values", "image_sizes", "batch_num_images")
    video_inputs = ("pixel_values_videos",)
    config_feature_kwargs = ("vision_feature_layer", "vision_feature_select_strategy")

    def cache_keys(self, request: Request) -> list[str]:
        keys = super().cache_keys(request)
        if self.model.config.model_type == "llava_onevision" and len(keys) > 1:
            return [f"{k}/in-set" for k in keys]
        return keys
