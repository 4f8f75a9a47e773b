"""``python -m eventpipe``: the command line (see :mod:`eventpipe._cli`)."""

import sys

from ._cli import main

if __name__ == "__main__":  # guarded: spawned worker processes import this module too
    sys.exit(main())
