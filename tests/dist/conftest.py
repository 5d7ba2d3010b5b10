"""Fixtures of tests/dist: defined in dist_support.py, which its test modules also import
(a module named conftest would clash with the other test folders' conftest.py)."""
from dist_support import *  # noqa: F401,F403
