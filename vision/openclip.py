"""An open_clip image encoder, as a source of visual tokens for drafters, cached like the target's features.

``model`` is any open_clip model name; ``pretrained`` is a pretrained tag (needs the hub the first time) or a
local checkpoint path (works offline), or None for random weights (tests).
"""

from __future__ import annotations

import threading

import torch
from PIL import Image

from mmspec.errors import MMSpecError
from vision.cache import EmbeddingCache, image_digest

_LOADED: dict[tuple, "OpenClipEncoder"] = {}
_LOCK = threading.Lock()


class OpenClipEncoder:
    def __init__(self, model: str, pretrained: str | None = None, device="cpu"):
        import open_clip

        try:
            self.model, _, self.preprocess = open_clip.create_model_and_transforms(model, pretrained=pretrained,
                                                                                   device=device)
        except Exception as e:  # unknown name, missing file, no hub: say which
            raise MMSpecError(f"cannot load open_clip model {model!r} (pretrained={pretrained!r}): {e}") from e
        self.model.eval()
        self.name = f"open_clip:{model}:{pretrained}"
        self.device = device

    @classmethod
    def get(cls, model: str, pretrained: str | None = None, device="cpu") -> "OpenClipEncoder":
        """One loaded encoder per (model, pretrained, device) in the process."""
        key = (model, pretrained, str(device))
        with _LOCK:
            if key not in _LOADED:
                _LOADED[key] = cls(model, pretrained, device)
            return _LOADED[key]

    @property
    def dim(self) -> int:
        return int(self.model.visual.output_dim)

    @torch.inference_mode()
    def encode(self, image: Image.Image) -> torch.Tensor:
        """[1, dim] image embedding."""
        pixels = self.preprocess(image).unsqueeze(0).to(self.device)
        return self.model.encode_image(pixels).float()

    def features(self, image: Image.Image, cache: EmbeddingCache) -> tuple[torch.Tensor, bool]:
        """The embedding of ``image`` through ``cache``: computed once per image content."""
        return cache.get_or_compute(f"{self.name}/{image_digest(image)}", lambda: self.encode(image))
