"""UMPM form: every architecture as an instance, reproducing the PyG experts exactly."""
from __future__ import annotations

import pytest
import torch

from hpcsoup.errors import MergeError
from hpcsoup.merge.umpm import (GraphOps, as_features, from_pyg, gat_attention, propagate_gat,
                                propagate_static)
from hpcsoup.models import ModelSpec, build_model

ARCHS = ("gcn", "sage", "gat", "gin")


@pytest.mark.parametrize("arch", ARCHS)
def test_umpm_form_of_a_trained_expert_reproduces_pyg(cora, specialists, arch):
    spec, state = next(v for (a, _), v in specialists.items() if a == arch)
    model = build_model(spec)
    model.load_state_dict(state)
    model.eval()
    data = cora.data
    with torch.no_grad():
        expected = model(data.x, data.edge_index)
    net = from_pyg(spec, state)
    for undirected in (False, True):
        got = net(as_features(data.x), GraphOps(data.edge_index, cora.num_nodes, undirected))
        assert (got - expected).abs().max() <= 1e-4
    assert net.arch == arch and net.depth == spec.layers


@pytest.mark.parametrize("arch", ARCHS)
def test_umpm_matches_pyg_with_self_loops_duplicates_and_unsorted_edges(arch):
    # a tiny directed graph: a self loop on node 1, an isolated node 4, a duplicated edge, unsorted
    edge_index = torch.tensor([[3, 0, 1, 2, 1, 0, 2, 0], [0, 1, 1, 3, 2, 2, 0, 1]])
    torch.manual_seed(0)
    x = torch.randn(5, 6)
    spec = ModelSpec(arch, 6, 3, layers=3, hidden=8, heads=2)
    model = build_model(spec, seed=1).eval()
    with torch.no_grad():
        expected = model(x, edge_index)
    got = from_pyg(spec, model.state_dict())(x, GraphOps(edge_index, 5))
    assert torch.allclose(got, expected, atol=1e-5)


def test_gin_with_batch_norm_converts_exactly(cora):
    """The eval-mode BatchNorm inside GIN's MLP is folded into W_1, b_1: logits equal to 1e-5."""
    spec = ModelSpec("gin", cora.num_features, cora.num_classes, layers=3, hidden=16, norm="batch")
    model = build_model(spec, seed=0)
    data = cora.data
    model.train()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # dropout: the same running statistics on every run
        for _ in range(3):  # running statistics of real activations, and a non-trivial affine
            model(data.x, data.edge_index)
        for conv in model.convs:
            conv.nn[1].weight.uniform_(0.5, 2.0)
            conv.nn[1].bias.uniform_(-0.5, 0.5)
    model.eval()
    with torch.no_grad():
        expected = model(data.x, data.edge_index)
    state = model.state_dict()
    assert all(float(model.convs[i].nn[1].running_var.sub(1).abs().max()) > 1e-3 for i in range(3))
    got = from_pyg(spec, state)(as_features(data.x), GraphOps(data.edge_index, cora.num_nodes))
    # float32 rounding grows with the logits (measured: 3e-7..7e-7 of their largest magnitude)
    scale = max(1.0, float(expected.abs().max()))
    assert (got - expected).abs().max() <= 1e-5 * scale
    # without the fold (the BatchNorm ignored) the logits are far off: the test can fail
    plain = ModelSpec("gin", cora.num_features, cora.num_classes, layers=3, hidden=16)
    unfolded = {k.replace("nn.3.", "nn.2."): v for k, v in state.items() if ".nn.1." not in k}
    assert (from_pyg(plain, unfolded)(data.x, GraphOps(data.edge_index, cora.num_nodes))
            - expected).abs().max() > 1e-2 * scale


def test_gat_attention_is_stable_for_large_logits(cora):
    spec = ModelSpec("gat", cora.num_features, cora.num_classes, layers=2, hidden=16, heads=2)
    model = build_model(spec, seed=0).eval()
    with torch.no_grad():
        for conv in model.convs:  # attention logits in the hundreds: exp() would overflow
            conv.att_src.mul_(400.0)
            conv.att_dst.mul_(400.0)
        expected = model(cora.data.x, cora.data.edge_index)
    ops = GraphOps(cora.data.edge_index, cora.num_nodes)
    got = from_pyg(spec, model.state_dict())(cora.data.x, ops)
    assert torch.isfinite(got).all()
    assert (got - expected).abs().max() <= 1e-4 * max(1.0, float(expected.abs().max()))


def test_restricted_rows_equal_the_full_operator(cora):
    ops = GraphOps(cora.data.edge_index, cora.num_nodes, undirected=True)
    rows = torch.arange(0, cora.num_nodes, 3)
    block = ops.restrict(rows)
    u = torch.randn(cora.num_nodes, 5)
    full = propagate_static(ops.full(), [("gcn", u), ("mean", u), ("sum", u)])
    part = propagate_static(block, [(k, u.index_select(0, block.support))
                                    for k in ("gcn", "mean", "sum")])
    for a, b in zip(full, part):
        assert torch.allclose(a[rows], b, atol=1e-5)
    assert block.n_support < cora.num_nodes  # the support is only what the rows read


def test_restricted_gcn_values_taken_from_the_whole_graph_equal_their_own(cora):
    """Once the whole graph's GCN values exist (the gate made them), a restricted block gathers
    its entries' values from them instead of recomputing: the same numbers, bit for bit."""
    ops = GraphOps(cora.data.edge_index, cora.num_nodes, undirected=True)
    rows = torch.arange(1, cora.num_nodes, 3)
    u = torch.randn(cora.num_nodes, 5)
    own = ops.restrict(rows)  # no whole-graph values yet: computed from the degrees
    expected = propagate_static(own, [("gcn", u.index_select(0, own.support))])[0]
    propagate_static(ops.full(), [("gcn", u)])
    assert ops.full()._vec.get(("values", "gcn")) is not None
    block = ops.restrict(rows)
    got = propagate_static(block, [("gcn", u.index_select(0, block.support))])[0]
    assert torch.equal(block._vec[("values", "gcn")], own._vec[("values", "gcn")])
    assert torch.equal(got, expected)


def test_shared_pass_equals_separate_passes(cora):
    block = GraphOps(cora.data.edge_index, cora.num_nodes).full()
    u, v = torch.randn(cora.num_nodes, 4), torch.randn(cora.num_nodes, 3)
    fused = propagate_static(block, [("gcn", u), ("mean", v)])
    assert torch.allclose(fused[0], propagate_static(block, [("gcn", u)])[0], atol=1e-5)
    assert torch.allclose(fused[1], propagate_static(block, [("mean", v)])[0], atol=1e-5)


def test_sparse_and_dense_features_give_the_same_projection(cora):
    w = torch.randn(cora.num_features, 8)
    sparse = as_features(cora.data.x)
    assert sparse.layout == torch.sparse_csr  # Cora's bag of words is ~1% dense
    assert torch.allclose(sparse @ w, cora.data.x @ w, atol=1e-4)


def test_converter_names_a_missing_tensor():
    spec = ModelSpec("sage", 4, 2, layers=2, hidden=8)
    state = build_model(spec, seed=0).state_dict()
    del state["convs.1.lin_r.weight"]
    with pytest.raises(MergeError, match=r"convs\.1\.lin_r\.weight"):
        from_pyg(spec, state, name="sage-s0")


def test_bad_edge_index_is_an_error():
    with pytest.raises(MergeError, match=r"not \[2, E\]"):
        GraphOps(torch.zeros(3, 4, dtype=torch.long), 4)


def test_all_heads_in_one_product_equal_per_head_products(cora):
    """GAT's heads share one block-diagonal sparse product; per head it is the softmax-weighted
    sum over N(i) and i itself, computed here head by head on a restricted block."""
    ops = GraphOps(cora.data.edge_index, cora.num_nodes, undirected=True)
    block = ops.restrict(torch.arange(0, cora.num_nodes, 2))
    g = torch.Generator().manual_seed(0)
    heads, channels = 4, 8
    u = torch.randn(block.n_support, heads * channels, generator=g)
    att_src, att_dst = torch.randn(heads, channels, generator=g), torch.randn(heads, channels, generator=g)
    for concat in (True, False):
        att = gat_attention(block, u, att_src, att_dst, 0.2)
        got = propagate_gat(block, u, att, concat)
        again = propagate_gat(block, u, att, concat)  # the cached denominator's path
        outs = []
        for h in range(heads):
            uh = u[:, h * channels:(h + 1) * channels]
            num = block.spmm(uh.contiguous(), att.edges[h]) + uh[:block.n_rows] * att.self_[:, h:h + 1]
            den = block.spmm(torch.ones(block.n_support, 1), att.edges[h]) + att.self_[:, h:h + 1]
            outs.append(num / den)
        expected = torch.cat(outs, 1) if concat else torch.stack(outs).mean(0)
        assert (got - expected).abs().max() <= 1e-5
        assert (again - expected).abs().max() <= 1e-5
