"""Target adapters, one file per VLM family. ``adapter_for`` picks the one that accepts a loaded model.

Adding a family: a family of the generic shape (1-D positions, the model's own ``get_image_features``, features
spliced at the placeholders) is a ``TargetAdapter`` subclass that only declares its settings (see ``llava_next``);
a family with its own position scheme overrides ``positions`` too (see ``qwen2_vl``). Then list it here.
"""

from __future__ import annotations

from mmspec.errors import MMSpecError
from mmspec.targets.base import Request, TargetAdapter
from mmspec.targets.batch import TargetBatch, TargetSession
from mmspec.targets.gemma3 import Gemma3Adapter
from mmspec.targets.glm4v import Glm4vAdapter
from mmspec.targets.idefics3 import Idefics3Adapter
from mmspec.targets.internvl import InternVLAdapter
from mmspec.targets.llava import LlavaAdapter
from mmspec.targets.llava_next import LlavaNextAdapter
from mmspec.targets.mistral3 import Mistral3Adapter
from mmspec.targets.qwen2_vl import Qwen2VLAdapter
from mmspec.targets.qwen3_5 import Qwen3_5Adapter
from mmspec.targets.qwen3_vl import Qwen3VLAdapter

ADAPTERS: list[type[TargetAdapter]] = [LlavaAdapter, LlavaNextAdapter, Qwen2VLAdapter, Idefics3Adapter,
                                       Qwen3VLAdapter, Glm4vAdapter, Mistral3Adapter, InternVLAdapter,
                                       Gemma3Adapter, Qwen3_5Adapter]

# model types refused up front, with the reason (the general message lists what is supported)
REFUSED: dict[str, str] = {
    "llama4": "transformers' own generate() fails on it (Llama4ForConditionalGeneration.forward reads "
              "image_outputs off its language model's output, which has no such field: AttributeError), so "
              "there is no reference output to be lossless against; its NoPE layers also take their "
              "temperature from the cache length, which a slot cache with holes would get wrong",
}


def adapter_for(model) -> type[TargetAdapter]:
    for cls in ADAPTERS:
        if cls.accepts(model):
            return cls
    supported = ", ".join(t for cls in ADAPTERS for t in cls.model_types)
    model_type = model.config.model_type
    why = f" ({REFUSED[model_type]})" if model_type in REFUSED else ""
    raise MMSpecError(f"target model type {model_type!r} is not supported yet{why}; supported: {supported}")


__all__ = ["ADAPTERS", "Request", "TargetAdapter", "TargetBatch", "TargetSession", "adapter_for"]
