"""``python -m manyproc``: see :mod:`manyproc._cli`."""

import sys

from ._cli import main

sys.exit(main())
