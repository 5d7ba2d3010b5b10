"""Stage 4: the Zarr store every stage reads and writes (see :mod:`hpcsoup.store.zarr_store`).

Example::

    store = Store.create("runs/x.zarr", attrs={"name": "x"})
    store.write_group("experts", "sage-e000", model.state_dict(), {"arch": "sage", ...})
    [g.id for g in store.groups("experts", arch="sage")]     # complete groups only
    state_dict, attrs = store.load_group("experts", "sage-e000")
"""
from hpcsoup.store.describe import describe_store, remove_group
from hpcsoup.store.provenance import provenance
from hpcsoup.store.zarr_store import KINDS, GroupInfo, Store

__all__ = ["KINDS", "GroupInfo", "Store", "describe_store", "provenance", "remove_group"]
