"""Fixtures of tests/soup: defined in soup_support.py, which its test modules also import
(a module named conftest would clash with the other test folders' conftest.py)."""
from soup_support import *  # noqa: F401,F403
