"""``python -m demos.app`` is ``mmspec demo``."""

import sys

from demos.app import main

sys.exit(main())
