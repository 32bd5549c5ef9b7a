"""``python -m slonn``: the same as the ``slonn`` command."""

import sys

from slonn.scripts.cli import main

sys.exit(main())
