"""``python -m storystudio.serve`` = ``storystudio serve``."""

import sys

from storystudio.serve.cli import main

sys.exit(main())
