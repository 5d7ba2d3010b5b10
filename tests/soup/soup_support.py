"""Fixtures of the souping tests: a tiny graph and experts trained from one shared init."""
from __future__ import annotations

import pytest
from tiny_support import make_graph, train_experts

from hpcsoup.data import Graph
from hpcsoup.soup import Ingredients


@pytest.fixture(scope="session")
def tiny_graph() -> Graph:
    return make_graph()


@pytest.fixture(scope="session")
def tiny_experts(tiny_graph) -> Ingredients:
    return train_experts(tiny_graph)
