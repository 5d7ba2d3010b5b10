"""Fixtures of the merge tests: Cora and specialist parents trained on its two random halves."""
from __future__ import annotations

import pytest
import torch

from hpcsoup.models import ModelSpec, build_model
from hpcsoup.train import fit
from hpcsoup.train.regions import specialist_regions

ARCHS = ("gcn", "sage", "gat", "gin")


@pytest.fixture(scope="session")
def cora_regions(cora):
    """Owner (0/1) of every Cora node: seeded random halves (no METIS needed here)."""
    return specialist_regions(cora, "random", 2, seed=0)


def train_specialist(graph, regions, arch: str, region: int, hidden: int = 16, layers: int = 2,
                     epochs: int = 25, heads: int = 2):
    spec = ModelSpec(arch, graph.num_features, graph.num_classes, layers=layers, hidden=hidden,
                     heads=heads if arch == "gat" else 1)
    model = build_model(spec, seed=region)
    mask = graph.mask("train") & (regions == region)
    result = fit(model, graph, train_mask=mask, epochs=epochs, lr=0.02, seed=region)
    return spec, result.state_dict


@pytest.fixture(scope="session")
def specialists(cora, cora_regions):
    """``{(arch, region): (spec, state_dict)}`` for every architecture on both halves' first."""
    out = {}
    for i, arch in enumerate(ARCHS):
        out[(arch, i % 2)] = train_specialist(cora, cora_regions, arch, i % 2)
    return out


def trained_on(graph, regions) -> torch.Tensor:
    """Which parent (region index) was trained on each node; -1 outside the train split."""
    return torch.where(graph.mask("train"), regions, torch.full_like(regions, -1))
