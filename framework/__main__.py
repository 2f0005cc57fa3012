"""``python -m prism.framework`` is ``prism``."""

import sys

from prism.framework.cli import main

sys.exit(main())
