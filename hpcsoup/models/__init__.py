"""Stage 2: the GNN architectures experts are made of."""
from hpcsoup.models.gnn import ARCHS, GNN, ModelSpec, build_model

__all__ = ["ARCHS", "GNN", "ModelSpec", "build_model"]
