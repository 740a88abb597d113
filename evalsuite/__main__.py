"""``python -m evalsuite``: the ``evalsuite`` command, for machines where the package is on the path but not installed."""

import sys

from .cli import main

sys.exit(main())
