"""``python -m hawq.report``."""

import sys

from hawq.report.cli import main

sys.exit(main())
