"""First layers over row sources: gathered rows read a block at a time, in the backward too."""
import pytest
import torch
from torch_geometric.nn import GCNConv, SAGEConv

from hpcsoup.models import rows as rows_module
from hpcsoup.models.gnn import first_layer_from_aggregate
from hpcsoup.models.rows import GatheredRows, dense

F_IN, HIDDEN = 37, 16  # distinct widths: a saved input is told apart from a saved activation


def sources(n_source=3000, n=2500, seed=0):
    """Features and first aggregation of a larger graph, and the rows a piece takes of them."""
    g = torch.Generator().manual_seed(seed)
    x, aggregate = torch.randn(n_source, F_IN, generator=g), torch.randn(n_source, F_IN, generator=g)
    index = torch.randperm(n_source, generator=g)[:n].to(torch.int32)
    return x, aggregate, index


def conv_of(arch):
    torch.manual_seed(1)
    conv = SAGEConv(F_IN, HIDDEN) if arch == "sage" else GCNConv(F_IN, HIDDEN)
    with torch.no_grad():  # PyG's GCN starts with a zero bias: give it a gradient to check
        for p in conv.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return conv


def reference(conv, x, aggregate):
    """The layer as PyG's own modules compute it from its precomputed aggregation."""
    if isinstance(conv, SAGEConv):
        return conv.lin_l(aggregate) + conv.lin_r(x)
    return aggregate @ conv.lin.weight.t() + conv.bias


def test_gathered_rows_slice_without_copy_and_read_what_index_select_reads():
    x, _, index = sources()
    rows = GatheredRows(x, index)
    assert rows.shape == (2500, F_IN) and rows.size(0) == 2500 and rows.numel() == 2500 * F_IN
    part = rows[100:1300]
    assert isinstance(part, GatheredRows) and part.source is x  # a view of the index only
    assert torch.equal(dense(part), x[index[100:1300].long()])
    assert rows.to("cpu") is rows
    with pytest.raises(TypeError, match="row ranges"):
        rows[3]


@pytest.mark.parametrize("arch", ["sage", "gcn"])
def test_a_first_layer_over_gathered_rows_equals_pyg_and_its_weight_gradients(arch):
    x, aggregate, index = sources()
    conv = conv_of(arch)
    weight = torch.randn(index.numel(), HIDDEN, generator=torch.Generator().manual_seed(2))
    params = list(conv.parameters())

    expected = reference(conv, x[index.long()], aggregate[index.long()])
    expected_grads = torch.autograd.grad((expected * weight).sum(), params)
    out = first_layer_from_aggregate(conv, GatheredRows(x, index), GatheredRows(aggregate, index))
    grads = torch.autograd.grad((out * weight).sum(), params)

    assert index.numel() > rows_module.READ_BLOCK  # several blocks, a partial last one
    assert torch.allclose(out, expected, atol=1e-5)
    for got, want in zip(grads, expected_grads):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)


def saved_shapes(run) -> list:
    """Shapes of every tensor autograd saves for the backward while ``run()`` builds its graph."""
    shapes = []

    def pack(tensor):
        shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return shapes


def test_a_gathered_first_layer_keeps_no_input_rows_for_its_backward(monkeypatch):
    """What a PLS piece gains: PyG's layer keeps its [n, F] inputs until the backward; the
    gathered one saves no input and reads every block again in its backward."""
    x, aggregate, index = sources()
    conv = conv_of("sage")
    gathered = (x[index.long()], aggregate[index.long()])
    kept_by_pyg = saved_shapes(lambda: reference(conv, *gathered))
    reads = []
    read = GatheredRows.tensor
    monkeypatch.setattr(GatheredRows, "tensor", lambda self: reads.append(len(self.index)) or read(self))
    outputs = []
    kept = saved_shapes(lambda: outputs.append(first_layer_from_aggregate(
        conv, GatheredRows(x, index), GatheredRows(aggregate, index))))
    forward_reads = list(reads)
    outputs[0].sum().backward()

    assert (index.numel(), F_IN) in kept_by_pyg
    assert not [shape for shape in kept if F_IN in shape[-1:]]
    blocks = -(-index.numel() // rows_module.READ_BLOCK)
    assert len(forward_reads) == 2 * blocks and max(forward_reads) == rows_module.READ_BLOCK
    assert reads[len(forward_reads):] == forward_reads  # the backward read them all again
