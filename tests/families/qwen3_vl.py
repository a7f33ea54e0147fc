"""The tiny qwen3_vl builder lives in the package (``mmspec.tiny.qwen3_vl``, so ``mmspec bench --target tiny:...`` can
build it without tests/); re-exported here for the fixtures' registry (``tests.families.builder``)."""

from mmspec.tiny.qwen3_vl import *  # noqa: F401,F403
from mmspec.tiny.qwen3_vl import build  # noqa: F401
