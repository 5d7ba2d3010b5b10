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
