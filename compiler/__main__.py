"""``python -m potstill``: the same command as the ``potstill`` script."""

import sys

from potstill.cli import main

if __name__ == "__main__":
    sys.exit(main())
