"""CPython's multiprocessing tests, installed for the start method named in the environment.

Imported by the runner and, under spawn and forkserver, by every child that unpickles
one of the suite's test classes; both see ``MANYPROC_CONFORMANCE_METHOD``.
"""

from __future__ import annotations

import os

from tests.conformance import mp_alias

mp_alias.install()

from test import _test_multiprocessing  # noqa: E402

START_METHOD = os.environ["MANYPROC_CONFORMANCE_METHOD"]
_test_multiprocessing.install_tests_in_module_dict(globals(), START_METHOD)
