"""Routing: the closed-form, label-free ridge gate and its sparsification."""
from __future__ import annotations

import pytest
import torch

from hpcsoup.errors import MergeError
from hpcsoup.merge.route import (AUTO_CHANCE_FRACTION, confidence_targets, descriptors, fit_gate,
                                 fit_routing_gate, normalise, owner_targets, sparsify)
from hpcsoup.merge.umpm import GraphOps


def _two_communities(n: int = 120, seed: int = 0):
    """Two dense communities with shifted features; half the nodes of each are 'trained on'."""
    g = torch.Generator().manual_seed(seed)
    side = (torch.arange(n) >= n // 2).long()
    src = torch.randint(0, n, (n * 6,), generator=g)
    dst = torch.randint(0, n // 2, (n * 6,), generator=g) + side[src] * (n // 2)
    edge_index = torch.cat([torch.stack([src, dst]), torch.stack([dst, src])], 1)
    x = torch.randn(n, 5, generator=g) + side.unsqueeze(1) * 1.0
    trained_on = torch.where(torch.rand(n, generator=g) < 0.5, side, torch.full_like(side, -1))
    return x, edge_index, side, trained_on


def test_ridge_gate_routes_communities_to_their_parent():
    x, edge_index, side, trained_on = _two_communities()
    ops = GraphOps(edge_index, x.size(0))
    nodes, targets = owner_targets(trained_on, 2)
    gate = fit_gate(x, ops, nodes, targets)
    weights = gate(x, ops)
    assert torch.allclose(weights.sum(1), torch.ones(x.size(0)))
    assert (weights.argmax(1) == side).float().mean() > 0.95
    assert gate.smooth_steps in (0, 1, 2, 4, 8) and gate.lam > 0


def test_gate_scores_equal_the_explicit_descriptor_regression():
    x, edge_index, _, trained_on = _two_communities(seed=1)
    ops = GraphOps(edge_index, x.size(0))
    nodes, targets = owner_targets(trained_on, 2)
    gate = fit_gate(x, ops, nodes, targets, smooth_grid=(0,))
    explicit = torch.cat(descriptors(x, ops, 2), 1) @ gate.coef.reshape(-1, 2) + gate.intercept
    assert torch.allclose(gate.scores(x, ops), explicit, atol=1e-4)


def test_gate_is_deterministic_for_a_seed():
    x, edge_index, _, trained_on = _two_communities(seed=2)
    ops = GraphOps(edge_index, x.size(0))
    nodes, targets = owner_targets(trained_on, 2)
    a, b = fit_gate(x, ops, nodes, targets, seed=7), fit_gate(x, ops, nodes, targets, seed=7)
    assert torch.equal(a.coef, b.coef) and a.smooth_steps == b.smooth_steps


def test_normalise_and_sparsify():
    scores = torch.tensor([[0.8, 0.3, -0.1], [-1.0, -2.0, -0.5], [0.34, 0.33, 0.33]])
    g = normalise(scores)
    assert torch.allclose(g[1], torch.full((3,), 1 / 3))  # all negative: uniform
    assert g[0, 2] == 0
    hard = sparsify(g, 1.0)
    assert torch.equal((hard > 0).sum(1), torch.ones(3, dtype=torch.long))
    soft = sparsify(g, 0.2)
    assert (soft[0] > 0).sum() == 2 and torch.allclose(soft.sum(1), torch.ones(3))
    assert torch.equal(sparsify(g, 0.0), g)


def test_budget_caps_the_extra_parents_where_the_gate_is_least_sure():
    g = torch.tensor([[0.9, 0.1], [0.55, 0.45], [0.3, 0.7], [0.48, 0.52], [1.0, 0.0]])
    uncapped = sparsify(g, 0.3)  # three second weights reach 0.3
    assert ((uncapped > 0).sum(1) == 2).nonzero().view(-1).tolist() == [1, 2, 3]
    two = sparsify(g, 0.3, budget=0.4)  # 2 extra of 5 nodes: the two smallest margins
    assert ((two > 0).sum(1) == 2).nonzero().view(-1).tolist() == [1, 3]
    assert torch.allclose(two[1], g[1]) and torch.allclose(two.sum(1), torch.ones(5))
    assert torch.equal((sparsify(g, 0.3, budget=0.0) > 0).sum(1), torch.ones(5, dtype=torch.long))
    # a zero weight is never computed, whatever the threshold and budget
    assert ((sparsify(g, 0.0, budget=1.0) > 0).sum(1) == 2).nonzero().view(-1).tolist() == [0, 1, 2, 3]


def test_confidence_targets_are_normalised_over_parents():
    t = confidence_targets([torch.tensor([[4.0, 0.0]]), torch.tensor([[0.0, 0.0]])])
    assert torch.allclose(t.sum(1), torch.ones(1)) and t[0, 0] > t[0, 1]


def test_owner_targets_errors_name_the_fix():
    with pytest.raises(MergeError, match="marks none"):
        owner_targets(torch.full((5,), -1), 2)
    with pytest.raises(MergeError, match=r"parents \[1\] were trained on no node"):
        owner_targets(torch.tensor([0, 0, -1]), 2)


def test_auto_target_keeps_the_owner_gate_only_where_owners_are_predictable():
    x, edge_index, side, trained_on = _two_communities(n=800, seed=3)
    ops = GraphOps(edge_index, x.size(0))
    # parent 0 is sure of itself in community 0, parent 1 in community 1
    logits = [torch.stack([3.0 * (1 - side), torch.zeros_like(side)], 1).float(),
              torch.stack([3.0 * side, torch.zeros_like(side)], 1).float()]
    gate, decision = fit_routing_gate(x, ops, "auto", trained_on, logits)
    assert decision["used"] == "owner" and gate.target == "owner"
    assert decision["owner_cv_error"] < 0.1  # communities are told apart from the features

    g = torch.Generator().manual_seed(3)  # owners drawn at random: nothing to predict
    random_owner = torch.where(trained_on >= 0, torch.randint(0, 2, side.shape, generator=g), -1)
    gate, decision = fit_routing_gate(x, ops, "auto", random_owner, logits)
    assert decision["owner_cv_error"] > AUTO_CHANCE_FRACTION * decision["chance"]
    assert decision["used"] == "mixture" and gate is None  # every parent on every node

    confident, decision = fit_routing_gate(x, ops, "confidence", random_owner, logits)
    assert decision["used"] == "confidence" and confident.target == "confidence"
    assert (confident(x, ops).argmax(1) == side).float().mean() > 0.9  # the confident parent
    forced, decision = fit_routing_gate(x, ops, "owner", random_owner, logits)
    assert decision["used"] == "owner" and forced.target == "owner"
    gate, decision = fit_routing_gate(x, ops, "auto", None, logits)  # no specialists: mixture
    assert decision["used"] == "mixture" and gate is None and "owner_cv_error" not in decision
    with pytest.raises(MergeError, match="needs trained_on"):
        fit_routing_gate(x, ops, "owner", None, logits)
    with pytest.raises(MergeError, match=r"routing target 'best' is unknown"):
        fit_routing_gate(x, ops, "best", trained_on, logits)
