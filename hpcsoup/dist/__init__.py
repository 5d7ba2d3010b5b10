"""Distributed souping: MPI ranks that each hold a shard of the partitioned graph.

- :mod:`hpcsoup.dist.mpi`: the communicator wrapper (the only import of ``mpi4py.MPI``),
  abort-on-error, collective error agreement;
- :mod:`hpcsoup.dist.shards`: the partitioned graph stored once, read back one rank's
  partitions at a time;
- :mod:`hpcsoup.dist.pls_mpi`: partition learned souping run by the ranks.

Importing this package does not import MPI.
"""
