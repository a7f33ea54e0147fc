"""``drafter_kind="visual"``: a small causal LM fed ``m`` compressed visual tokens before the prompt text.

The visual tokens come from features that are already cached: the target's own projected image features
(``source="target"``), or an open_clip image embedding (``source="open_clip"``), pooled to ``m`` tokens and
mapped into the drafter's embedding space by a trained projector (``vision.compress.VisualProjector``). The
drafter's visual tokens are cached beside the image's features, so a repeated image costs nothing extra.
Folders are made by ``mmspec train-drafter --kind visual``.
"""

from __future__ import annotations

import uuid

import torch

from mmspec.drafters.text import TextDrafter
from mmspec.errors import MMSpecError
from mmspec.targets.base import Request, TargetAdapter
from vision.compress import VisualProjector, pool_tokens


class VisualDrafter(TextDrafter):
    kind = "visual"
    needs_weights = True

    def __init__(self, target: TargetAdapter, model, tokenizer, projector: VisualProjector):
        super().__init__(target, model, tokenizer)
        self.projector = projector.to(target.device, model.dtype).eval()
        self.encoder = None
        if projector.source == "open_clip":
            from vision.openclip import OpenClipEncoder

            self.encoder = OpenClipEncoder.get(projector.config["open_clip_model"],
                                               projector.config["open_clip_pretrained"], target.device)
        expected = self.projector.config["in_dim"]
        got = self.encoder.dim if self.encoder else target.model.config.get_text_config().hidden_size
        if expected != got:
            raise MMSpecError(f"this visual drafter's projector takes {expected}-dim features but its "
                              f"{projector.source} features are {got}-dim: it was trained for another target")
        self._cache_tag = f"visual-drafter:{uuid.uuid4().hex[:8]}"

    @classmethod
    def from_pretrained(cls, target: TargetAdapter, path, dtype, trust_remote_code: bool = False) -> "VisualDrafter":
        from pathlib import Path

        if not VisualProjector.exists(path) and Path(str(path)).is_dir():
            raise MMSpecError(f"{path} is not a visual drafter (no visual projector in it); make one with "
                              "`mmspec train-drafter --kind visual`")
        text = TextDrafter.from_pretrained(target, path, dtype, trust_remote_code)
        if not VisualProjector.exists(path):
            from huggingface_hub import snapshot_download

            path = snapshot_download(str(path))  # a hub id: fetch the projector files beside the weights
        return cls(target, text.model, text.tokenizer, VisualProjector.from_pretrained(path))

    def pooled_features(self, request: Request) -> torch.Tensor:
        return self.pool(self.target, request, self.projector.num_tokens, self.encoder)

    @classmethod
    def pool(cls, target: TargetAdapter, request: Request, m: int, encoder=None) -> torch.Tensor:
        """The source features of ``request``'s images pooled to [m, in_dim] (no trained parameters): the target's
        spliced features, or ``encoder``'s (open_clip) embedding of each image. Several images are pooled together,
        so the drafter sees m tokens whatever their number. ``train-drafter --kind visual`` trains on the same."""
        if encoder is not None:
            feats = torch.cat([encoder.features(im, target.vision_cache)[0].reshape(-1, encoder.dim)
                               for im in cls._pictures(request)])
        else:
            feats = target.spliced_features(request.features)
        return pool_tokens(feats.float(), m)

    @classmethod
    def sees(cls, request: Request, encoder=None) -> bool:
        """Whether the drafter gets visual tokens for ``request`` (a text-only request gets none)."""
        return bool(cls._pictures(request) if encoder is not None else request.images or request.videos)

    @torch.inference_mode()
    def visual_tokens(self, request: Request) -> torch.Tensor:
        """[1, m, drafter_hidden], computed once per image and cached beside the image's features."""
        def compute():
            pooled = self.pooled_features(request).to(self.target.device, self.model.dtype)
            return self.projector(pooled)[None]

        tokens, _ = self.target.vision_cache.get_or_compute(f"{request.image_key}/{self._cache_tag}", compute)
        return tokens

    @staticmethod
    def _pictures(request: Request) -> list:
        """The request's images, then its clips' frames (a clip the processor reads from a file has none here)."""
        return list(request.images) + [f for clip in request.videos if isinstance(clip, list) for f in clip]

    def prefix_embeds(self, request: Request) -> torch.Tensor | None:
        # a text-only request: no visual tokens, the drafter reads the text alone
        return self.visual_tokens(request) if self.sees(request, self.encoder) else None
