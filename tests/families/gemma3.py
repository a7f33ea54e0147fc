"""The tiny gemma3 builder lives in the package (``mmspec.tiny.gemma3``, so ``mmspec bench --target tiny:...`` can
build it without tests/); re-exported here for the fixtures' registry (``tests.families.builder``)."""

from mmspec.tiny.gemma3 import *  # noqa: F401,F403
from mmspec.tiny.gemma3 import build, tokenizer  # noqa: F401
