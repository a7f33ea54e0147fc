"""Target adapters, one file per VLM family. ``adapter_for`` picks the one that accepts a loaded model.

Adding a family: a family of the generic shape (1-D positions, the model's own ``get_image_features``, features
spliced at the placeholders) is a ``TargetAdapter`` subclass that only declares its settings (see ``llava_next``);
a family with its own position scheme overrides ``positions`` too (see ``qwen2_vl``). Then list it here.
"""

from __future__ import annotations

from mmspec.errors import MMSpecError
from mmspec.targets.base import Request, TargetAdapter
from mmspec.targets.batch import TargetBatch, TargetSession
from mmspec.targets.idefics3 import Idefics3Adapter
from mmspec.targets.llava import LlavaAdapter
from mmspec.targets.llava_next import LlavaNextAdapter
from mmspec.targets.qwen2_vl import Qwen2VLAdapter

ADAPTERS: list[type[TargetAdapter]] = [LlavaAdapter, LlavaNextAdapter, Qwen2VLAdapter, Idefics3Adapter]


def adapter_for(model) -> type[TargetAdapter]:
    for cls in ADAPTERS:
        if cls.accepts(model):
            return cls
    supported = ", ".join(t for cls in ADAPTERS for t in cls.model_types)
    raise MMSpecError(f"target model type {model.config.model_type!r} is not supported yet; supported: {supported}")


__all__ = ["ADAPTERS", "Request", "TargetAdapter", "TargetBatch", "TargetSession", "adapter_for"]
