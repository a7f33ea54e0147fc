"""Drafting strategies, one class per file. ``DRAFTER_KINDS`` lists what ``drafter_kind`` accepts.

Kinds are imported lazily ("module:Class"), so a strategy's optional dependencies load only when it is used.
A kind whose class has ``needs_weights = True`` loads its model with ``Class.from_pretrained(adapter, path, ...)``.
"""

from __future__ import annotations

import importlib

from mmspec.drafters.base import Draft, Drafter, DraftSession, NoDrafter
from mmspec.drafters.ngram import NgramDrafter
from mmspec.drafters.text import TextDrafter
from mmspec.errors import MMSpecError

DRAFTER_KINDS: dict[str, str] = {
    "text": "mmspec.drafters.text:TextDrafter",
    "visual": "mmspec.drafters.visual:VisualDrafter",
    "vlm": "mmspec.drafters.vlm:VlmDrafter",
    "eagle": "mmspec.drafters.eagle:EagleDrafter",
    "ngram": "mmspec.drafters.ngram:NgramDrafter",
    "none": "mmspec.drafters.base:NoDrafter",
}

# kinds whose drafter grows trees (``tree_nodes=N``)
TREE_KINDS = ("eagle", "text", "visual", "vlm")


def drafter_class(kind: str) -> type[Drafter]:
    if kind not in DRAFTER_KINDS:
        raise MMSpecError(f"unknown drafter kind {kind!r}; choose one of {sorted(DRAFTER_KINDS)}")
    module, name = DRAFTER_KINDS[kind].split(":")
    try:
        return getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as e:
        raise MMSpecError(f"drafter kind {kind!r} is not available in this build ({e})") from e


__all__ = ["DRAFTER_KINDS", "TREE_KINDS", "Draft", "Drafter", "DraftSession", "NgramDrafter", "NoDrafter", "TextDrafter",
           "drafter_class"]
