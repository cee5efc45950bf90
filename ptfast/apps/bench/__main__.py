"""``python -m ptfast.apps.bench``: the same as the ``ptfast-bench`` console script."""

import sys

from ptfast.apps.bench.cli import main

sys.exit(main())
