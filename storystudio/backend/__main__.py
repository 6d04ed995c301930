"""``python -m storystudio.backend`` = the ``storystudio`` command."""

import sys

from .cli import main

sys.exit(main())
