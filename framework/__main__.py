"""``python -m framework`` is ``prism``."""

import sys

from framework.cli import main

sys.exit(main())
