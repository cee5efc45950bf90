"""``python -m ptfast.benchmark``: the same as the ``ptfast-bench`` console script."""

import sys

from ptfast.benchmark.cli import main

sys.exit(main())
