"""Tiny random-weight VLMs of each new family, built offline from a config: for ``mmspec bench --target
tiny:<model_type>`` (the per-round overhead against ``generate()`` means something on them; acceptance does not) and
for the tests. Each family module has ``build(folder, **options) -> folder``: a folder ``AutoProcessor`` and
``AutoModelForImageTextToText`` load back (a word-level tokenizer over a small vocabulary, the family's own
processor, weights scaled so greedy output is varied and depends on the image). ``tests/families/NOTES.md`` says
what each family needs and how the fixtures were checked against ``generate()``.
"""

from __future__ import annotations

import functools
import importlib
from pathlib import Path

from mmspec.errors import MMSpecError

# model_type -> "module:function", or "module:function?flag" for ``function(..., flag=True)``
TINY_BUILDERS: dict[str, str] = {
    "qwen3_vl": "mmspec.tiny.qwen3_vl:build",
    "qwen3_vl_moe": "mmspec.tiny.qwen3_vl:build?moe",
    "glm4v": "mmspec.tiny.glm4v:build",
    "glm4v_moe": "mmspec.tiny.glm4v:build?moe",
    "mistral3": "mmspec.tiny.mistral3:build",
    "internvl": "mmspec.tiny.internvl:build",
    "gemma3": "mmspec.tiny.gemma3:build",
    "qwen3_5": "mmspec.tiny.qwen3_5:build",
}


def tiny_builder(model_type: str):
    """The ``build(folder, **options)`` of ``model_type``'s tiny model (an ``MMSpecError`` for an unknown type)."""
    if model_type not in TINY_BUILDERS:
        raise MMSpecError(f"no tiny model for {model_type!r}; tiny targets: {', '.join(sorted(TINY_BUILDERS))}",
                          code="invalid_value", param="target")
    spec, _, flag = TINY_BUILDERS[model_type].partition("?")
    module, name = spec.split(":")
    build = getattr(importlib.import_module(module), name)
    return functools.partial(build, **{flag: True}) if flag else build


def build_tiny(model_type: str, folder: str | Path, **options) -> Path:
    return tiny_builder(model_type)(Path(folder), **options)


__all__ = ["TINY_BUILDERS", "build_tiny", "tiny_builder"]
