"""Distributed souping: MPI ranks that each hold a shard of the partitioned graph.

- :mod:`hpcsoup.distributed.mpi`: the communicator wrapper (the only import of ``mpi4py.MPI``),
  abort-on-error, collective error agreement;
- :mod:`hpcsoup.distributed.shards`: the partitioned graph stored once, read back one rank's
  partitions at a time;
- :mod:`hpcsoup.distributed.pls`: partition learned souping run by the ranks.

Importing this package does not import MPI.
"""
