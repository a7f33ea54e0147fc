"""The registry of drafting strategies: one line per kind that ``drafter_kind`` accepts, naming its class.

Each kind is one ``Drafter`` subclass in its own file. What callers ask about a kind is an attribute of that
class, stated there once: ``needs_weights`` (built by ``Class.from_pretrained(adapter, path, dtype)`` from a model
folder, else by ``Class(adapter)``), ``grows_trees`` (``tree_nodes=N`` drafts a tree), ``default_k`` ... Read them
through ``drafter_class(kind)``, or ask for the kinds that have one: ``tree_kinds()``, ``weightless_kinds()``.

A kind's class is imported when it is first asked for, so reading the registry (``mmspec --help`` lists the
kinds) imports neither torch nor any drafter. Adding a kind: its file, its line here, its test.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from mmspec.errors import MMSpecError

if TYPE_CHECKING:
    from mmspec.drafters.base import Drafter

# kind -> "module:Class"
DRAFTER_KINDS: dict[str, str] = {
    "text": "mmspec.drafters.text:TextDrafter",
    "visual": "mmspec.drafters.visual:VisualDrafter",
    "vlm": "mmspec.drafters.vlm:VlmDrafter",
    "eagle": "mmspec.drafters.eagle:EagleDrafter",
    "ngram": "mmspec.drafters.ngram:NgramDrafter",
    "layerskip": "mmspec.drafters.layerskip:LayerSkipDrafter",
    "none": "mmspec.drafters.base:NoDrafter",
}


def drafter_class(kind: str) -> type[Drafter]:
    """The class that implements drafter ``kind`` (an ``MMSpecError`` for a kind the registry lacks)."""
    if kind not in DRAFTER_KINDS:
        raise MMSpecError(f"unknown drafter kind {kind!r}; choose one of {sorted(DRAFTER_KINDS)}")
    module, name = DRAFTER_KINDS[kind].split(":")
    try:
        return getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as e:
        raise MMSpecError(f"drafter kind {kind!r} is not available in this build ({e})") from e


def infer_kind(drafter, kind: str | None) -> str | None:
    """The kind a local drafter folder's own files name, checked against ``kind`` (None: not given).

    An EAGLE-3 head (SpecForge/vLLM or speculators ``config.json``) or mmspec's ``eagle_config.json`` is kind
    "eagle"; an HF model folder says nothing (None, the caller's default applies). A folder with none of these,
    or an EAGLE-3 head given another kind, is refused here rather than failing deep inside transformers. Hub
    ids (not local folders) pass through unchanged."""
    from pathlib import Path

    folder = Path(str(drafter)) if isinstance(drafter, (str, Path)) else None
    if folder is not None and folder.is_file() and _is_skip_set(folder):   # a `mmspec tune-layerskip` file
        if kind not in (None, "layerskip"):
            raise MMSpecError(f"{folder} is a layerskip skip-set file, not a {kind!r} drafter: use "
                              "drafter_kind='layerskip' (or leave it out: the kind is read from the file)",
                              code="invalid_value", param="drafter_kind")
        return "layerskip"
    if folder is None or not folder.is_dir() or (kind is not None and not drafter_class(kind).needs_weights):
        return kind
    found = None
    if (folder / "eagle_config.json").is_file():
        found = "eagle"
    elif (folder / "config.json").is_file():
        from mmspec.drafters.eagle3 import read_config

        config = read_config(folder)
        if config is not None:
            found = "eagle"
        else:
            import json

            raw = json.loads((folder / "config.json").read_text())
            if kind is None and (not isinstance(raw, dict) or "model_type" not in raw
                                 or raw.get("speculators_model_type")):
                raise MMSpecError(f"{folder} is not a drafter mmspec recognises: its config.json is neither an HF "
                                  "model's (no model_type) nor an EAGLE-3 head's (no EAGLE-3 architecture or "
                                  "speculators_model_type 'eagle3')", code="invalid_value", param="drafter")
    elif kind is None:   # (a given kind's loader says what its folder lacks)
        raise MMSpecError(f"{folder} is not a drafter mmspec recognises (no config.json or eagle_config.json)",
                          code="invalid_value", param="drafter")
    if found and kind not in (None, found) and drafter_class(kind).needs_weights:
        raise MMSpecError(f"{folder} holds an eagle head, not a {kind!r} drafter: use drafter_kind={found!r} (or "
                          "leave it out: the kind is read from the folder)", code="invalid_value",
                          param="drafter_kind")
    return kind or found


def _is_skip_set(path) -> bool:
    """Whether ``path`` is a JSON file in the layerskip skip-set format (``layerskip.FORMAT``, read without
    importing the drafter)."""
    import json

    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and str(data.get("format", "")).startswith("mmspec-layerskip/")


def kinds_where(**attributes) -> list[str]:
    """The kinds, sorted, whose class has each given attribute value, e.g. ``kinds_where(grows_trees=True)``
    (a kind this build cannot import is left out)."""
    kinds = []
    for kind in sorted(DRAFTER_KINDS):
        try:
            cls = drafter_class(kind)
        except MMSpecError:
            continue
        if all(getattr(cls, name) == value for name, value in attributes.items()):
            kinds.append(kind)
    return kinds


def tree_kinds() -> list[str]:
    """The kinds whose drafter grows trees (``tree_nodes=N``), sorted."""
    return kinds_where(grows_trees=True)


def weightless_kinds() -> list[str]:
    """The kinds built from the target alone (no drafter model), sorted: any pipeline can switch to them."""
    return kinds_where(needs_weights=False)


__all__ = ["DRAFTER_KINDS", "drafter_class", "infer_kind", "kinds_where", "tree_kinds", "weightless_kinds"]
