"""Drafting strategies, one class per file. ``DRAFTER_KINDS`` lists what ``drafter_kind`` accepts."""

from mmspec.drafters.base import Draft, Drafter, DraftSession, NoDrafter
from mmspec.drafters.ngram import NgramDrafter
from mmspec.drafters.text import TextDrafter

# kind -> (class, needs drafter weights)
DRAFTER_KINDS: dict[str, tuple[type[Drafter], bool]] = {
    "text": (TextDrafter, True),
    "ngram": (NgramDrafter, False),
    "none": (NoDrafter, False),
}

__all__ = ["DRAFTER_KINDS", "Draft", "Drafter", "DraftSession", "NgramDrafter", "NoDrafter", "TextDrafter"]
