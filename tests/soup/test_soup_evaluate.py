import pytest
import torch

from hpcsoup.models import ModelSpec, build_model
from hpcsoup.soup import Evaluator


@pytest.mark.parametrize("arch", ["gcn", "sage", "gat", "gin"])
@pytest.mark.parametrize("self_loops", [False, True])
def test_evaluator_reproduces_the_plain_pyg_model(tiny_graph, arch, self_loops):
    data = tiny_graph.data
    if self_loops:  # some nodes carry a self-loop: GCN's normalisation must still match PyG's
        graph = type(tiny_graph)(tiny_graph.name, data.clone(), tiny_graph.num_classes, "accuracy")
        loops = torch.arange(0, data.num_nodes, 3)
        graph.data.edge_index = torch.cat([data.edge_index, loops.repeat(2, 1)], 1)
    else:
        graph = tiny_graph
    spec = ModelSpec(arch, graph.num_features, graph.num_classes, 2, 16, heads=2)
    model = build_model(spec, seed=3).eval()
    expected = model(graph.data.x, graph.data.edge_index)
    evaluator = Evaluator(spec, graph)
    got = evaluator.logits(model.state_dict())
    assert torch.allclose(got, expected, atol=1e-5)
    assert evaluator.evaluations == 1
    assert evaluator.metrics(model.state_dict())["metric"] == "accuracy"


def test_a_locality_order_changes_nothing_but_speed(tiny_graph):
    from hpcsoup.soup.evaluate import locality_order

    spec = ModelSpec("gcn", tiny_graph.num_features, tiny_graph.num_classes, 2, 16)
    state = build_model(spec, seed=1).state_dict()
    parts = torch.arange(tiny_graph.num_nodes) % 7
    plain, ordered = Evaluator(spec, tiny_graph), Evaluator(spec, tiny_graph,
                                                            order=locality_order(parts))
    assert torch.allclose(plain.logits(state), ordered.logits(state), atol=1e-5)
    grads = []
    for evaluator in (plain, ordered):  # the same loss, so the same gradients, in either order
        params = {k: v.clone().requires_grad_(True) for k, v in state.items()}
        evaluator.forward(params)[evaluator.masks["val"]].logsumexp(1).sum().backward()
        grads.append({k: p.grad for k, p in params.items()})
    assert all(torch.allclose(grads[0][k], grads[1][k], atol=1e-5) for k in state)


def _directed_few_validation_nodes(graph, keep: int = 6):
    """``graph`` with every other edge dropped (directed: the in-neighbourhood matters) and
    only ``keep`` validation nodes, so their receptive field is a small part of the graph."""
    data = graph.data.clone()
    data.edge_index = data.edge_index[:, ::2]
    val = data.val_mask.nonzero().view(-1)
    data.val_mask = torch.zeros_like(data.val_mask)
    data.val_mask[val[:keep]] = True
    return type(graph)(graph.name, data, graph.num_classes, graph.metric)


@pytest.mark.parametrize("arch", ["gcn", "sage", "gat", "gin"])
def test_the_receptive_field_gives_the_full_graphs_validation_logits_and_gradients(
        tiny_graph, arch):
    graph = _directed_few_validation_nodes(tiny_graph)
    spec = ModelSpec(arch, graph.num_features, graph.num_classes, 2, 16, heads=2)
    state = build_model(spec, seed=3).state_dict()
    field, full = Evaluator(spec, graph), Evaluator(spec, graph, receptive_field=False)
    assert full.field() is None and field.field()[0].size(0) < graph.num_nodes // 2
    outs, grads = [], []
    for evaluator in (field, full):
        params = {k: v.clone().requires_grad_(True) for k, v in state.items()}
        out = evaluator.val_logits(params)
        out.logsumexp(1).sum().backward()
        outs.append(out.detach())
        grads.append([params[k].grad for k in state])
    assert torch.allclose(outs[0], full.logits(state)[full.masks["val"]], atol=1e-5)
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(*grads))
    assert field.evaluate(state) == full.score(full.logits(state), "val")


@pytest.mark.parametrize("dataset", ["Cora", "Tolokers"])
def test_a_sorted_undirected_edge_list_is_its_own_csr_bit_for_bit(dataset, data_root, monkeypatch):
    """A Graph's source-sorted symmetric edges are read as the CSR without a sort (GCN's
    self-loops inserted in place): exactly the adjacency PyG's sort of the flipped list builds."""
    import hpcsoup.soup.evaluate as evaluate
    from hpcsoup.data import load_dataset

    monkeypatch.setattr(evaluate, "CSR_CHUNK", 1000)  # several passes, a partial last one
    data = load_dataset(dataset, data_root).data
    n = data.num_nodes
    for arch in ("gcn", "sage"):
        assert evaluate.sorted_csr(arch, data.edge_index, n, undirected=True) is not None
        fast = evaluate.build_adjacency(arch, data.edge_index, n, undirected=True)
        by_sort = evaluate.build_adjacency(arch, data.edge_index, n)  # targets unsorted: a sort
        for part in ("crow_indices", "col_indices", "values"):
            assert torch.equal(getattr(fast, part)(), getattr(by_sort, part)()), (arch, part)
    # a self-loop of its own, or rows not in CSR order: the general path
    looped = torch.cat([torch.tensor([[0], [0]]), data.edge_index], 1)
    assert evaluate.sorted_csr("gcn", looped, n, undirected=True) is None
    assert evaluate.sorted_csr("sage", data.edge_index.flip(1), n, undirected=True) is None


@pytest.mark.parametrize("arch", ["gcn", "sage"])
def test_a_renumbered_graphs_csr_moves_rows_and_sorts_chunks_bit_for_bit(cora, arch, monkeypatch):
    """The evaluator's partition-contiguous graph: its CSR permuted from the graph's, a chunk of
    entries at a time, is exactly what converting the renumbered edge list builds."""
    import hpcsoup.soup.evaluate as evaluate
    from hpcsoup.data.partition import partition

    monkeypatch.setattr(evaluate, "CSR_CHUNK", 500)  # many chunks, rows never split
    data = cora.data
    order = evaluate.locality_order(partition(data.edge_index, data.num_nodes, 8, seed=0))
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    by_sort = evaluate.build_adjacency(arch, inverse[data.edge_index], data.num_nodes)
    adj = Evaluator(ModelSpec(arch, cora.num_features, cora.num_classes), cora, order=order).adj
    for part in ("crow_indices", "col_indices", "values"):
        assert torch.equal(getattr(adj, part)(), getattr(by_sort, part)()), part


@pytest.mark.parametrize("arch", ["gcn", "sage", "gin"])
def test_the_kept_transpose_gives_torchs_gradients(tiny_graph, arch):
    from hpcsoup.soup.evaluate import build_adjacency, keep_transposes, make_template

    graph = _directed_few_validation_nodes(tiny_graph)
    data = graph.data
    spec = ModelSpec(arch, graph.num_features, graph.num_classes, 2, 16)
    state = build_model(spec, seed=3).state_dict()
    grads = []
    for template in (make_template(spec), keep_transposes(make_template(spec))):
        adj = build_adjacency(arch, data.edge_index, data.num_nodes)
        params = {k: v.clone().requires_grad_(True) for k, v in state.items()}
        x = data.x.clone().requires_grad_(True)  # through the first aggregation too
        torch.func.functional_call(template, params, (x, adj)).logsumexp(1).sum().backward()
        grads.append([x.grad] + [params[k].grad for k in state])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(*grads))


@pytest.mark.parametrize("arch", ["gcn", "sage", "gin"])
@pytest.mark.parametrize("layers", [1, 2, 3])
def test_inference_on_the_field_runs_in_blocks_and_on_its_roots_alone(
        tiny_graph, arch, layers, monkeypatch):
    """Without autograd the first layer runs in row blocks and the last layer computes the
    roots' rows alone: still the full graph's validation logits."""
    import hpcsoup.models.gnn as gnn
    import hpcsoup.models.rows as rows

    monkeypatch.setattr(gnn, "FIRST_LAYER_BLOCK", 7)
    monkeypatch.setattr(rows, "READ_BLOCK", 3)  # the first layer's reads, a block at a time
    graph = _directed_few_validation_nodes(tiny_graph, keep=20)
    spec = ModelSpec(arch, graph.num_features, graph.num_classes, layers, 16)
    state = build_model(spec, seed=3).state_dict()
    evaluator = Evaluator(spec, graph)
    x, graph_input, count = evaluator.field()
    assert graph_input.roots == count == 20 and x.size(0) > 7
    assert (x.size(0) > count) == (layers > 1)  # one layer: the field is its roots
    with torch.no_grad():
        out = evaluator.val_logits(state)
    assert out.shape == (count, graph.num_classes)
    assert torch.allclose(out, evaluator.logits(state)[evaluator.masks["val"]], atol=1e-5)


@pytest.mark.parametrize("arch", ["gcn", "sage", "gin"])
def test_learned_soupings_gradients_through_the_hidden_layers_blocks(tiny_graph, arch,
                                                                     monkeypatch):
    """With autograd a two-layer field runs in blocks too (LS's step at 1M nodes): the same
    logits and gradients as the unblocked forward, step after step (kept transposes)."""
    import hpcsoup.models.gnn as gnn
    import hpcsoup.models.rows as rows

    monkeypatch.setattr(rows, "READ_BLOCK", 3)  # and RowsLinear's backward reads in blocks
    graph = _directed_few_validation_nodes(tiny_graph, keep=20)
    spec = ModelSpec(arch, graph.num_features, graph.num_classes, 2, 16)
    state = build_model(spec, seed=3).state_dict()
    results = []
    for block in (10 ** 9, 7):
        monkeypatch.setattr(gnn, "FIRST_LAYER_BLOCK", block)
        evaluator = Evaluator(spec, graph)
        assert evaluator.field()[0].size(0) > 7
        for _ in range(2):  # the second step uses the blocks' kept transposes
            params = {k: v.clone().requires_grad_(True) for k, v in state.items()}
            out = evaluator.val_logits(params)
            out.logsumexp(1).sum().backward()
            results.append([out.detach()] + [params[k].grad for k in state])
    whole, blocked = results[0], results[2]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(whole, blocked))
    assert all(torch.equal(a, b) for a, b in zip(results[2], results[3]))
