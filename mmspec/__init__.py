"""mmspec: lossless speculative decoding for vision-language models.

    import mmspec
    pipe = mmspec.load()                       # bundled default pair, offline, CPU
    res = pipe.generate(image, "Describe the image.")
    res.text, res.token_ids, res.rounds, res.stats
"""

from mmspec.config import DecodeConfig
from mmspec.errors import MMSpecError
from mmspec.pipeline import Pipeline, load
from mmspec.types import GenerationResult, Round, Stats, StreamEvent, acceptance_by_position

__all__ = ["DecodeConfig", "GenerationResult", "MMSpecError", "Pipeline", "Round", "Stats", "StreamEvent",
           "acceptance_by_position", "load"]
__version__ = "0.1.0"
