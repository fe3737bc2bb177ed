"""``python -m adalora ...``: the same command line as the ``adalora`` console script."""

import sys

from .cli import main

sys.exit(main())
