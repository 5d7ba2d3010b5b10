"""Fixtures of tests/distributed: defined in distributed_support.py, which its test modules also import
(a module named conftest would clash with the other test folders' conftest.py)."""
from distributed_support import *  # noqa: F401,F403
