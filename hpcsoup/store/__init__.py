"""Stage 4: the Zarr store every stage reads and writes (see :mod:`hpcsoup.store.zarr_store`).

Example::

    store = Store.create("runs/x.zarr", attrs={"name": "x"})
    store.write_group("experts", "sage-e000", model.state_dict(), {"arch": "sage", ...})
    [g.id for g in store.groups("experts", arch="sage")]     # complete groups only
    state_dict, attrs = store.load_group("experts", "sage-e000")
    with store.write_graph("Cora/parts-8-halo1-seed0", {"halo": 1}) as shards:   # graph shards
        shards.add("p00000", {"x": x0, "edge_index": e0}, {"core_count": 120})
    tensors, attrs = store.read_graph_arrays("Cora/parts-8-halo1-seed0", ["x"], "p00000")
"""
from hpcsoup.store.describe import describe_store, remove_group
from hpcsoup.store.provenance import provenance
from hpcsoup.store.zarr_store import GRAPHS, KINDS, GraphWriter, GroupInfo, Store

__all__ = ["GRAPHS", "KINDS", "GraphWriter", "GroupInfo", "Store", "describe_store", "provenance",
           "remove_group"]
