"""KV-cache rollback by position: rejected tokens are undone by moving the cache length back."""

from __future__ import annotations

import inspect

from transformers import LlamaModel

# transformers renamed ``past_key_values`` to ``cache`` during 5.x; speak whichever this install understands.
CACHE_KW = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def rollback(cache, length: int) -> None:
    """Shrink ``cache`` to its first ``length`` positions (no-op when it is not longer)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)  # negative = number of positions to drop, in every transformers 5.x
