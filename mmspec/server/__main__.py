"""``python -m mmspec.server [flags]``: the same as ``mmspec serve [flags]``."""

import sys

from mmspec.cli import main

sys.exit(main(["serve", *sys.argv[1:]]))
