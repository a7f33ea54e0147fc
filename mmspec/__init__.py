"""mmspec: lossless speculative decoding for vision-language models.

    import mmspec
    pipe = mmspec.load()                       # bundled default pair, offline, CPU
    res = pipe.generate(image, "Describe the image.")
    res.text, res.token_ids, res.rounds, res.stats
"""

from mmspec.config import DecodeConfig
from mmspec.errors import MMSpecError
from mmspec.types import GenerationResult, Round, Stats, StreamEvent, acceptance_by_position

__all__ = ["DecodeConfig", "GenerationResult", "MMSpecError", "Pipeline", "Round", "Stats", "StreamEvent",
           "acceptance_by_position", "load"]
__version__ = "0.1.0"

_LAZY = {"Pipeline": "mmspec.pipeline", "load": "mmspec.pipeline"}


def __getattr__(name: str):
    """``load`` and ``Pipeline`` import torch and transformers on first use, so that ``import mmspec.cli`` (and
    ``mmspec --help``) stays fast."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mmspec' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
