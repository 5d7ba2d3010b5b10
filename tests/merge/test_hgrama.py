"""H-GRAMA merges: exactness, label-freeness, determinism, depth rule, baselines."""
from __future__ import annotations

import copy

import pytest
import torch

from hpcsoup.errors import MergeError
from hpcsoup.merge.child import ChildCache, MergedGNN
from hpcsoup.merge.ensemble import Ensemble, interpolate
from hpcsoup.merge.hgrama import HGramaSettings, merge
from hpcsoup.merge.route import RidgeGate
from hpcsoup.merge.umpm import GraphOps, as_features, from_pyg
from hpcsoup.models import build_model

from merge_support import train_specialist, trained_on


def _permuted(spec, state: dict, perm: torch.Tensor) -> dict:
    """The same 2-layer network with its hidden units reordered by ``perm``."""
    s = copy.deepcopy(state)
    if spec.arch == "gcn":
        s["convs.0.lin.weight"] = s["convs.0.lin.weight"][perm]
        s["convs.0.bias"] = s["convs.0.bias"][perm]
        s["convs.1.lin.weight"] = s["convs.1.lin.weight"][:, perm]
    elif spec.arch == "sage":
        for name in ("lin_l.weight", "lin_r.weight"):
            s[f"convs.0.{name}"] = s[f"convs.0.{name}"][perm]
            s[f"convs.1.{name}"] = s[f"convs.1.{name}"][:, perm]
        s["convs.0.lin_l.bias"] = s["convs.0.lin_l.bias"][perm]
    elif spec.arch == "gin":
        s["convs.0.nn.2.weight"] = s["convs.0.nn.2.weight"][perm]
        s["convs.0.nn.2.bias"] = s["convs.0.nn.2.bias"][perm]
        s["convs.1.nn.0.weight"] = s["convs.1.nn.0.weight"][:, perm]
    else:
        raise ValueError(spec.arch)
    return s


def _spec_state(specialists, arch):
    return next(v for (a, _), v in specialists.items() if a == arch)


def _pyg_logits(spec, state, graph):
    model = build_model(spec)
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        return model(graph.data.x, graph.data.edge_index)


@pytest.mark.parametrize("arch", ["gcn", "sage", "gin"])
@pytest.mark.parametrize("alignment", ["procrustes", "permutation"])
def test_merging_with_a_permuted_copy_gives_back_the_original(cora, cora_regions, specialists,
                                                              arch, alignment):
    spec, state = _spec_state(specialists, arch)
    perm = torch.randperm(spec.hidden, generator=torch.Generator().manual_seed(0))
    parents = [from_pyg(spec, state, "a"), from_pyg(spec, _permuted(spec, state, perm), "b")]
    expected = _pyg_logits(spec, state, cora).log_softmax(-1)
    data = cora.data
    for threshold in (0.0, 0.5):  # dense mixture, and hard routing (mixed neighbourhoods)
        child = merge(parents, data.x, data.edge_index, trained_on=trained_on(cora, cora_regions),
                      settings=HGramaSettings(alignment=alignment, threshold=threshold,
                                              route_target="owner"))
        got = child(data.x, data.edge_index)
        assert (got - expected).abs().max() <= 1e-4, (alignment, threshold)
    # without alignment the same merge is not the original function: the test can fail (hard
    # routing, where a parent reads the other's rows; with every parent everywhere each reads
    # itself and the child is their ensemble, exact without alignment)
    child = merge(parents, data.x, data.edge_index, trained_on=trained_on(cora, cora_regions),
                  settings=HGramaSettings(alignment="none", threshold=0.5, route_target="owner"))
    assert (child(data.x, data.edge_index) - expected).abs().max() > 1e-2


def test_same_inputs_give_an_identical_child(cora, cora_regions, specialists):
    parents = [from_pyg(*_spec_state(specialists, a), a) for a in ("sage", "gat", "gin")]
    data = cora.data
    owners = trained_on(cora, cora_regions)
    owners[owners == 1] = torch.tensor([1, 2]).repeat(int((owners == 1).sum()))[:int((owners == 1).sum())]
    settings = HGramaSettings(anchors=500, seed=3)
    a = merge(parents, data.x, data.edge_index, trained_on=owners, settings=settings)
    b = merge(parents, data.x, data.edge_index, trained_on=owners, settings=settings)
    assert a.structure() == b.structure()
    assert a.tensors().keys() == b.tensors().keys()
    assert all(torch.equal(t, b.tensors()[k]) for k, t in a.tensors().items())
    assert torch.equal(a(data.x, data.edge_index), b(data.x, data.edge_index))


def test_a_parent_routed_everywhere_is_reproduced_exactly_even_when_narrower(cora, cora_regions):
    # GCN with 16 hidden units, GAT with 32: the reference is the wider GAT; the GCN's rows go
    # through a semi-orthogonal transport and back, which must be exact on its own rows.
    gcn = train_specialist(cora, cora_regions, "gcn", 0, hidden=16, epochs=5)
    gat = train_specialist(cora, cora_regions, "gat", 1, hidden=32, epochs=5)
    parents = [from_pyg(*gcn, "gcn"), from_pyg(*gat, "gat")]
    data = cora.data
    child = merge(parents, data.x, data.edge_index, trained_on=trained_on(cora, cora_regions),
                  settings=HGramaSettings(route_target="owner"))
    assert child.info["reference"] == 1
    for k, (spec, state) in enumerate((gcn, gat)):
        forced = MergedGNN.from_parts(child.structure(), child.tensors())
        f = cora.num_features
        intercept = torch.zeros(2)
        intercept[k] = 1.0
        forced.gate = RidgeGate(torch.zeros(3, f, 2), intercept)
        got = forced(data.x, data.edge_index)
        expected = _pyg_logits(spec, state, cora).log_softmax(-1)
        assert (got - expected).abs().max() <= 1e-4, k


def test_parents_of_different_depths_are_a_clear_error(cora, cora_regions):
    a = train_specialist(cora, cora_regions, "gcn", 0, layers=2, epochs=1)
    b = train_specialist(cora, cora_regions, "gat", 1, layers=3, epochs=1)
    with pytest.raises(MergeError, match=r"different depths .*'gcn': 2.*'gat': 3"):
        merge([from_pyg(*a, "gcn"), from_pyg(*b, "gat")], cora.data.x, cora.data.edge_index,
              trained_on=trained_on(cora, cora_regions))


def test_ensemble_is_the_mean_of_the_pyg_experts(cora, specialists):
    pairs = [_spec_state(specialists, a) for a in ("gcn", "gat", "gin")]
    expected = torch.stack([_pyg_logits(s, st, cora) for s, st in pairs]).mean(0)
    ensemble = Ensemble([from_pyg(s, st) for s, st in pairs])
    got = ensemble(cora.data.x, cora.data.edge_index)
    assert (got - expected).abs().max() <= 1e-4
    cache = ensemble.make_cache(cora.data.x, cora.data.edge_index)
    assert torch.allclose(ensemble(cora.data.x, cache=cache), got, atol=1e-6)


def test_every_parent_on_every_node_is_the_probability_ensemble(cora, cora_regions, specialists):
    """Each parent reads its own rows from itself: with every parent on every node (uniform
    weights, no sparsity) the child is the parents' probability mixture, whatever the alignment
    does to the rows it would read from other parents."""
    pairs = [_spec_state(specialists, a) for a in ("gcn", "gat", "sage")]
    parents = [from_pyg(s, st, s.arch) for s, st in pairs]
    expected = torch.stack([_pyg_logits(s, st, cora).softmax(-1) for s, st in pairs]).mean(0).log()
    data = cora.data
    child = merge(parents, data.x, data.edge_index, trained_on=trained_on(cora, cora_regions),
                  settings=HGramaSettings(routing="uniform", threshold=0.0))
    assert (child(data.x, data.edge_index) - expected).abs().max() <= 1e-4


def test_new_default_keeps_the_ensembles_accuracy_where_the_owner_gate_lost_it(
        cora, cora_regions, specialists):
    """Random halves: "which parent trained on this node" cannot be predicted from the features.
    The old default (the owner gate, one parent per node) lost more than 2 points to the
    ensemble here; the default (``route_target="auto"``) sees the gate at chance and runs the
    parents' ensemble fused, so it loses nothing."""
    parents = [from_pyg(*specialists[("gcn", 0)], "gcn"), from_pyg(*specialists[("gin", 1)], "gin")]
    data = cora.data
    owners = trained_on(cora, cora_regions)
    ensemble = Ensemble(parents)(data.x, data.edge_index)
    ens_test = cora.score(ensemble, "test")
    old = merge(parents, data.x, data.edge_index, trained_on=owners,
                settings=HGramaSettings(route_target="owner"))
    assert cora.score(old(data.x, data.edge_index), "test") < ens_test - 0.02
    new = merge(parents, data.x, data.edge_index, trained_on=owners)
    assert new.info["gate"]["used"] == "mixture"
    assert new.info["gate"]["owner_cv_error"] > 0.75 * new.info["gate"]["chance"]
    got = new(data.x, data.edge_index)
    assert cora.score(got, "test") >= ens_test - 0.005
    assert (got - ensemble).abs().max() <= 1e-4  # the fused child is the ensemble


def test_interpolation_is_for_homogeneous_pairs_only(cora, cora_regions, specialists):
    spec, state = _spec_state(specialists, "gcn")
    other = train_specialist(cora, cora_regions, "gcn", 1, epochs=3)[1]
    _, mid = interpolate([spec, spec], [state, other])
    assert torch.allclose(mid["convs.0.bias"], (state["convs.0.bias"] + other["convs.0.bias"]) / 2)
    with pytest.raises(MergeError, match="one architecture"):
        interpolate([spec, _spec_state(specialists, "gat")[0]],
                    [state, _spec_state(specialists, "gat")[1]])


def test_cached_child_equals_uncached(cora, cora_regions, specialists):
    parents = [from_pyg(*_spec_state(specialists, a), a) for a in ("gcn", "gat")]
    data = cora.data
    child = merge(parents, data.x, data.edge_index, trained_on=trained_on(cora, cora_regions))
    plain = child(data.x, data.edge_index)
    for attention in (False, True):
        cache = child.make_cache(data.x, data.edge_index, attention=attention)
        assert torch.allclose(child(data.x, cache=cache), plain, atol=1e-6)


def test_settings_errors_name_the_bad_value():
    with pytest.raises(MergeError, match="'merge.alignment' = 'rotate': 'rotate' is not allowed"):
        HGramaSettings(alignment="rotate")
    with pytest.raises(MergeError, match=r"'merge.threshold' = 2\.0: must be in \[0, 1\]"):
        HGramaSettings(threshold=2.0)
    with pytest.raises(MergeError, match="no setting 'sharpness'"):
        HGramaSettings(sharpness=2)


def test_shared_fast_paths_equal_the_general_ones(cora, cora_regions, specialists):
    """Uncached, one product of X serves the gate and both parents' layer 0, and one parent per
    node takes the short stream and readout paths; the general paths (gate-weighted stream rows
    added into the support, log-mixture readout) on the gate's own projection agree to 1e-5."""
    parents = [from_pyg(*_spec_state(specialists, a), a) for a in ("gcn", "gat")]
    data = cora.data
    child = merge(parents, data.x, data.edge_index, trained_on=trained_on(cora, cora_regions),
                  settings=HGramaSettings(route_target="owner"))
    fast = child(data.x, data.edge_index)
    ops = GraphOps(data.edge_index, cora.num_nodes)
    routing = child.route(as_features(data.x), ops)
    assert routing.hard and not routing.dense
    routing.hard = False  # weights of 1 through the general arithmetic
    general = child(data.x, cache=ChildCache(ops, routing, None))
    assert (fast - general).abs().max() <= 1e-5
