"""The tiny qwen3_5 builder lives in the package (``mmspec.tiny.qwen3_5``, so ``mmspec bench --target tiny:...`` can
build it without tests/); re-exported here for the fixtures' registry (``tests.families.builder``)."""

from mmspec.tiny.qwen3_5 import *  # noqa: F401,F403
from mmspec.tiny.qwen3_5 import build, tokenizer  # noqa: F401
