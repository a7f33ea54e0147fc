"""InternVL 3.x in transformers' own format (``InternVLForConditionalGeneration``, the ``-hf`` checkpoints).

The generic family: the image processor cuts an image into tiles (plus a thumbnail when there are several), the
model's own ``get_image_features`` runs them through the vision tower, pixel shuffle and projector, giving
``image_seq_length`` features per tile, in the order of the ``<IMG_CONTEXT>`` placeholders the processor writes
between ``<img>`` and ``</img>``. The tile count is implicit in ``pixel_values``' first dimension, so images are
encoded one at a time. The language model (Qwen2 or Llama) takes 1-D positions.

Video clips (``<video>``, the processor's ``video_token``): the processor writes each frame as one tile
(``Frame1: <img>`` + ``image_seq_length`` x ``<IMG_CONTEXT>`` + ``</img>``, one line per frame) and merges the
frames into ``pixel_values`` with the images' tiles, in placeholder order; the model has no video path of its own
(no ``get_video_features``, no video token id): ``generate()`` runs every tile and frame through
``get_image_features`` at once and splices the rows into the ``<IMG_CONTEXT>`` placeholders. The adapter does the
same (one vision forward for the request's images and clips) and cuts the rows into one block per image and per
clip, cached apart: an image is one ``<img>...</img>`` run of placeholders, a clip as many runs as it has frames
(every clip of a request has the same frame count: the processor stacks them).
"""

from __future__ import annotations

import torch

from mmspec.errors import MMSpecError
from mmspec.targets.base import Request, TargetAdapter


class InternVLAdapter(TargetAdapter):
    family = "internvl"
    model_types = ("internvl",)
    config_feature_kwargs = ("vision_feature_layer", "vision_feature_select_strategy")
    default_image_token = "<IMG_CONTEXT>"
    # the processor merges a clip's frames into ``pixel_values`` (there is no ``pixel_values_videos`` output)
    video_inputs = ("pixel_values",)

    def __init__(self, model, processor, vision_cache):
        super().__init__(model, processor, vision_cache)
        self._blocks: tuple[Request, list[torch.Tensor]] | None = None

    @property
    def video_token_id(self) -> int | None:
        """The model config names no video token: the processor's ``video_token`` (expanded into frames of image
        placeholders, so it never reaches the model)."""
        token = getattr(self.processor, "video_token", None)
        if not token:
            return None
        tid = self.tokenizer.convert_tokens_to_ids(token)
        return None if tid is None or tid == self.tokenizer.unk_token_id else int(tid)

    @property
    def feature_token_ids(self) -> frozenset[int]:
        # frames take ``<IMG_CONTEXT>`` placeholders, as the model's own placeholder mask has them
        return frozenset([int(self.model.config.image_token_id)])

    def item_tiles(self, request: Request) -> list[int]:
        """Rows of ``pixel_values`` per image and per clip, in placeholder order: an image's tiles (its one run of
        placeholders over ``image_seq_length``), a clip's frames (its runs: one per frame)."""
        image_id, per_tile = int(self.model.config.image_token_id), int(self.model.config.image_seq_length)
        runs, n = [], 0
        for t in request.prompt_ids + [None]:
            if t == image_id:
                n += 1
            elif n:
                runs.append(n)
                n = 0
        n_images, n_videos = request.order.count("image"), request.order.count("video")
        frames, extra = divmod(len(runs) - n_images, n_videos) if n_videos else (0, len(runs) - n_images)
        if extra or frames < 0 or any(r % per_tile for r in runs):
            raise MMSpecError(f"the prompt's {len(runs)} image placeholder runs do not match its {n_images} "
                              f"image(s) and {n_videos} clip(s)")
        tiles, it = [], iter(runs)
        for kind in request.order:
            tiles.append(next(it) // per_tile if kind == "image" else sum(next(it) // per_tile for _ in range(frames)))
        rows = request.model_inputs["pixel_values"].shape[0]
        if sum(tiles) != rows:
            raise MMSpecError(f"the prompt's placeholders give {sum(tiles)} tiles but the processor gave {rows}")
        return tiles

    @torch.inference_mode()
    def item_blocks(self, request: Request) -> list[torch.Tensor]:
        """One feature block per image and per clip in placeholder order, from one vision forward over all of the
        request's tiles and frames (as ``generate()`` runs them)."""
        if self._blocks is not None and self._blocks[0] is request:
            return self._blocks[1]
        tiles = self.item_tiles(request)
        out = self.model.get_image_features(**self.feature_kwargs([request]), return_dict=True).pooler_output
        blocks = [b.reshape(-1, b.shape[-1]) for b in torch.split(out, tiles)]
        self._blocks = (request, blocks)
        return blocks

    def encode_image_blocks(self, request: Request) -> list[torch.Tensor]:
        if not request.videos:
            return super().encode_image_blocks(request)
        return [b for kind, b in zip(request.order, self.item_blocks(request)) if kind == "image"]

    def encode_video_blocks(self, request: Request) -> list[torch.Tensor]:
        blocks = [b for kind, b in zip(request.order, self.item_blocks(request)) if kind == "video"]
        self._blocks = None
        return blocks
