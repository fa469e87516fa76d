"""``python -m deformarray``: the ``deformarray`` command line (see ``deformarray.cli``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
