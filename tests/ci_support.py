"""What a test does when its infrastructure (SLURM, MPI, root for mounts) is missing.

Importable from every test folder (pytest puts tests/ on sys.path for tests/conftest.py); a module
named conftest would resolve to whichever folder's conftest.py was imported first.
"""
from __future__ import annotations

import os

import pytest


def missing(reason: str):
    """Skip a test whose infrastructure is missing; under ``HPCSOUP_CI=1`` (.ci/run) fail instead,
    so that CI cannot pass by silently skipping its SLURM or MPI tests."""
    if os.environ.get("HPCSOUP_CI", "") not in ("", "0"):
        pytest.fail(f"{reason} -- HPCSOUP_CI=1 requires it", pytrace=False)
    pytest.skip(reason)
