"""Fixtures of tests/merge: defined in merge_support.py, which its test modules also import
(a module named conftest would clash with the other test folders' conftest.py)."""
from merge_support import *  # noqa: F401,F403
