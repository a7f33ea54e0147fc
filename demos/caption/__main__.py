"""``python -m demos.caption`` is ``mmspec caption``: the same flags, errors and exit codes."""

import sys

from demos.caption.cli import main

sys.exit(main())
