"""``python -m conmim.cli``: the ``conmim`` command (torchrun runs it this way)."""

import sys

from . import main

sys.exit(main())
