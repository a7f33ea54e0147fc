"""The tiny mistral3 builder lives in the package (``mmspec.tiny.mistral3``, so ``mmspec bench --target tiny:...`` can
build it without tests/); re-exported here for the fixtures' registry (``tests.families.builder``)."""

from mmspec.tiny.mistral3 import *  # noqa: F401,F403
from mmspec.tiny.mistral3 import build  # noqa: F401
