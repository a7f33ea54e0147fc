"""The tiny internvl builder lives in the package (``mmspec.tiny.internvl``, so ``mmspec bench --target tiny:...`` can
build it without tests/); re-exported here for the fixtures' registry (``tests.families.builder``)."""

from mmspec.tiny.internvl import *  # noqa: F401,F403
from mmspec.tiny.internvl import build  # noqa: F401
