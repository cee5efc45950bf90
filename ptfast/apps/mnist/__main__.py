"""``python -m ptfast.apps.mnist``: the same as the ``ptfast-mnist`` console script."""

import sys

from ptfast.apps.mnist.cli import main

sys.exit(main())
