"""Visual-token compression for drafters: many image features in, ``m`` drafter-space tokens out.

Pooling follows IbED/TABED-style image pooling (average over a grid), and a small trained projector maps the
pooled features into the drafter's embedding space (as SpecFLASH/ViSpec feed a drafter a few visual tokens).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

CONFIG_NAME = "mmspec_visual.json"
WEIGHTS_NAME = "visual_projector.safetensors"


def pool_tokens(features: torch.Tensor, m: int) -> torch.Tensor:
    """[n, dim] -> [m, dim]. Square grids pool in 2-D (keeps where things are), others in 1-D; n = 1 repeats."""
    n, dim = features.shape
    if n == 1:
        return features.expand(m, dim)
    side, m_side = math.isqrt(n), math.isqrt(m)
    if side * side == n and m_side * m_side == m:
        # [1, dim, side, side] -> [1, dim, m_side, m_side]
        grid = features.T.reshape(1, dim, side, side)
        return nn.functional.adaptive_avg_pool2d(grid, m_side).reshape(dim, m).T
    return nn.functional.adaptive_avg_pool1d(features.T[None], m)[0].T


class VisualProjector(nn.Module):
    """Pooled image features [m, in_dim] -> drafter input embeddings [m, out_dim]."""

    def __init__(self, in_dim: int, out_dim: int, num_tokens: int, source: str = "target",
                 open_clip_model: str | None = None, open_clip_pretrained: str | None = None):
        super().__init__()
        self.config = dict(in_dim=in_dim, out_dim=out_dim, num_tokens=num_tokens, source=source,
                           open_clip_model=open_clip_model, open_clip_pretrained=open_clip_pretrained)
        self.num_tokens = num_tokens
        self.norm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)
        self.position = nn.Parameter(torch.zeros(num_tokens, out_dim))

    @property
    def source(self) -> str:
        return self.config["source"]

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        # pooled: [..., m, in_dim] -> [..., m, out_dim]
        return self.fc2(nn.functional.gelu(self.fc1(self.norm(pooled)))) + self.position

    def save_pretrained(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_NAME).write_text(json.dumps(self.config, indent=2))
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, folder / WEIGHTS_NAME)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "VisualProjector":
        from safetensors.torch import load_file

        folder = Path(folder)
        proj = cls(**json.loads((folder / CONFIG_NAME).read_text()))
        proj.load_state_dict(load_file(folder / WEIGHTS_NAME))
        return proj.eval()

    @staticmethod
    def exists(folder: str | Path) -> bool:
        return (Path(folder) / CONFIG_NAME).is_file() and (Path(folder) / WEIGHTS_NAME).is_file()
