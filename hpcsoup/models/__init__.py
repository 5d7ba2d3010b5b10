"""Stage 2: the GNN architectures experts are made of."""
from hpcsoup.models.gnn import GNN, ModelSpec, build_model

__all__ = ["GNN", "ModelSpec", "build_model"]
