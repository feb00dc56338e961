"""``python -m opentsu``: the same as the ``opentsu`` command."""

import sys

from .cli import main

sys.exit(main())
