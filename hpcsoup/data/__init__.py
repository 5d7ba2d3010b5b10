"""Stage 1: graphs, their scores and their METIS partitions."""
from hpcsoup.data.datasets import Graph, default_root, load_dataset, load_from_config

__all__ = ["Graph", "default_root", "load_dataset", "load_from_config"]
