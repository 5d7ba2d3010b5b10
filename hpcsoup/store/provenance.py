"""Provenance recorded with every group: library versions, host and time."""
from __future__ import annotations

import datetime
import os
import platform
import socket


def provenance() -> dict:
    """``{python, torch, torch_geometric, zarr, numpy, hpcsoup, hostname, pid, time}``."""
    import numpy
    import torch
    import torch_geometric
    import zarr

    import hpcsoup

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_geometric": torch_geometric.__version__,
        "zarr": zarr.__version__,
        "numpy": numpy.__version__,
        "hpcsoup": hpcsoup.__version__,
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
