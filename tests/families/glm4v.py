"""The tiny glm4v builder lives in the package (``mmspec.tiny.glm4v``, so ``mmspec bench --target tiny:...`` can
build it without tests/); re-exported here for the fixtures' registry (``tests.families.builder``)."""

from mmspec.tiny.glm4v import *  # noqa: F401,F403
from mmspec.tiny.glm4v import build  # noqa: F401
