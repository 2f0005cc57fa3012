"""``python -m prism.framework`` is ``prism``."""

import sys

from prism.framework.cli import main

if __name__ == "__main__":  # not when a spawned worker process imports it
    sys.exit(main())
