"""PyG's own models as hpcsoup experts: ``torch_geometric.nn.models`` -> ModelSpec + state_dict.

H-GRAMA (:mod:`hpcsoup.merge`) reads an expert as a :class:`~hpcsoup.models.ModelSpec` and a
state_dict named like :class:`~hpcsoup.models.GNN`'s (``convs.{i}.<tensor>``). PyG's
``BasicGNN`` models compute the same stack on eval,

.. math::
    H^{(l+1)} = \\mathrm{ReLU}\\big(\\mathrm{conv}_l(H^{(l)}, A)\\big), \\qquad
    \\text{logits} = \\mathrm{conv}_{L-1}(H^{(L-1)}, A),

when they have no normalisation (``norm=None``), no jumping knowledge (``jk=None``), ReLU and
one of the supported layers, so :func:`to_expert` only renames tensors:

===========  ====================  ==============================================
PyG model    layer                 tensors (per layer ``i``)
===========  ====================  ==============================================
``GCN``      ``GCNConv``           ``lin.weight``, ``bias``
``GraphSAGE``  ``SAGEConv`` (mean)  ``lin_l.weight``, ``lin_l.bias``, ``lin_r.weight``
``GAT``      ``GATConv``           ``lin.weight``, ``att_src``, ``att_dst``, ``bias``
``GIN``      ``GINConv``           ``eps``, ``nn.lins.{0,1}.*`` -> ``nn.{0,2}.*``
===========  ====================  ==============================================

A PyG ``GAT``'s output layer averages its ``heads`` (hpcsoup's has one head); the UMPM
converter (:func:`hpcsoup.merge.umpm.from_pyg`) reads the head count from ``att_src``, so
the merge sees the model exactly. Anything else (another layer, a layer option that changes
the maths, a normalisation) is a :class:`~hpcsoup.errors.ModelError` naming the module path
and the supported layer types.
"""
from __future__ import annotations

import torch
from torch import nn

from hpcsoup.errors import ModelError
from hpcsoup.models.gnn import GNN, ModelSpec

SUPPORTED = ("GCNConv, SAGEConv (aggr='mean'), GATConv and GINConv (a 2-layer MLP), stacked by "
             "torch_geometric.nn.models GCN, GraphSAGE, GAT, GIN (norm=None, jk=None, act='relu') "
             "or hpcsoup.models.GNN")


def _unsupported(path: str, what: str) -> ModelError:
    return ModelError(f"{path}: {what}; hpcsoup converts {SUPPORTED}")


def _layer_arch(conv: nn.Module, path: str) -> str:
    from torch_geometric.nn import GATConv, GCNConv, GINConv, SAGEConv

    kinds = {GCNConv: "gcn", SAGEConv: "sage", GATConv: "gat", GINConv: "gin"}
    arch = kinds.get(type(conv))
    if arch is None:
        for cls, name in kinds.items():  # hpcsoup's MeanSAGEConv and other subclasses
            if isinstance(conv, cls):
                arch = name
    if arch is None:
        raise _unsupported(path, f"is a {type(conv).__name__}, which hpcsoup cannot convert")
    return arch


def _check_options(conv: nn.Module, arch: str, last: bool, path: str) -> None:
    """Layer options that change the maths the UMPM form assumes."""
    bad = []
    if arch == "gcn":
        bad = [k for k, ok in (("improved", not conv.improved), ("add_self_loops", conv.add_self_loops),
                               ("normalize", conv.normalize), ("bias", conv.bias is not None)) if not ok]
    elif arch == "sage":
        bad = [k for k, ok in (("aggr", conv.aggr == "mean"), ("root_weight", conv.root_weight),
                               ("project", not conv.project), ("normalize", not conv.normalize),
                               ("bias", conv.lin_l.bias is not None)) if not ok]
    elif arch == "gat":
        single = conv.heads == 1
        bad = [k for k, ok in (("edge_dim", conv.edge_dim is None),
                               ("add_self_loops", conv.add_self_loops),
                               ("negative_slope", conv.negative_slope == 0.2),
                               ("residual", not getattr(conv, "residual", False)),
                               ("bias", conv.bias is not None),
                               ("concat", single or conv.concat != last)) if not ok]
    else:
        linears = _linears(conv.nn)
        if len(linears) != 2 or any(isinstance(m, (nn.BatchNorm1d, nn.LayerNorm))
                                    for m in conv.nn.modules()):
            bad = ["nn (expected Linear, ReLU, Linear)"]
    if bad:
        raise _unsupported(path, f"{type(conv).__name__} option {bad[0]} differs from the default "
                                 f"form hpcsoup converts")


def _linears(mlp: nn.Module) -> list[nn.Module]:
    """The linear layers of a GIN MLP (``torch.nn.Linear`` or PyG's ``Linear``)."""
    from torch_geometric.nn.dense.linear import Linear

    return [m for m in mlp.modules() if isinstance(m, (nn.Linear, Linear))]


def _layer_tensors(conv: nn.Module, arch: str) -> dict[str, torch.Tensor]:
    if arch == "gcn":
        return {"lin.weight": conv.lin.weight, "bias": conv.bias}
    if arch == "sage":
        return {"lin_l.weight": conv.lin_l.weight, "lin_l.bias": conv.lin_l.bias,
                "lin_r.weight": conv.lin_r.weight}
    if arch == "gat":
        return {"att_src": conv.att_src, "att_dst": conv.att_dst, "bias": conv.bias,
                "lin.weight": conv.lin.weight}
    first, second = _linears(conv.nn)
    return {"eps": conv.eps.reshape(1), "nn.0.weight": first.weight, "nn.0.bias": first.bias,
            "nn.2.weight": second.weight, "nn.2.bias": second.bias}


def to_expert(model: nn.Module, path: str = "model") -> tuple[ModelSpec, dict[str, torch.Tensor]]:
    """``(ModelSpec, state_dict named like hpcsoup's GNN)`` of a PyG ``BasicGNN`` or a ``GNN``.

    Args:
        model: ``torch_geometric.nn.models.GCN``/``GraphSAGE``/``GAT``/``GIN`` (trained) or
            :class:`hpcsoup.models.GNN`.
        path: how errors name the model (e.g. ``"models[1]"``).

    Raises:
        ModelError: naming the first module (``models[1].convs.0``, ``models[1].norms.0``...)
            that cannot be converted and the supported layer types.
    """
    if isinstance(model, GNN):
        return model.spec, {k: v.detach() for k, v in model.state_dict().items()}
    from torch_geometric.nn.models.basic_gnn import BasicGNN

    if not isinstance(model, BasicGNN):
        raise _unsupported(path, f"is a {type(model).__name__}, not a model hpcsoup can read layer "
                                 f"by layer")
    if model.jk_mode is not None:
        raise _unsupported(f"{path}.jk", f"jumping knowledge jk={model.jk_mode!r} is not supported")
    for i, norm in enumerate(model.norms):
        if not isinstance(norm, nn.Identity):
            raise _unsupported(f"{path}.norms.{i}", f"is a {type(norm).__name__} normalisation")
    if not isinstance(model.act, nn.ReLU):
        raise _unsupported(f"{path}.act", f"activation {type(model.act).__name__} is not ReLU")
    archs = [_layer_arch(conv, f"{path}.convs.{i}") for i, conv in enumerate(model.convs)]
    for i, (arch, conv) in enumerate(zip(archs, model.convs)):
        if arch != archs[0]:
            raise _unsupported(f"{path}.convs.{i}", f"is a {type(conv).__name__} after a "
                                                    f"{type(model.convs[0]).__name__}: one layer "
                                                    f"type per model")
        _check_options(conv, arch, i == len(model.convs) - 1, f"{path}.convs.{i}")
    first = model.convs[0]
    if archs[0] == "gat" and getattr(first, "lin", None) is None:
        raise _unsupported(f"{path}.convs.0", "a bipartite GATConv (lin_src/lin_dst) is not "
                                              "supported")
    state = {f"convs.{i}.{name}": tensor.detach()
             for i, conv in enumerate(model.convs)
             for name, tensor in _layer_tensors(conv, archs[0]).items()}
    if any(isinstance(t, nn.parameter.UninitializedParameter) for t in state.values()):
        raise _unsupported(path, "has lazy (uninitialised) parameters: run it once first")
    in_channels = state["convs.0.nn.0.weight" if archs[0] == "gin" else
                        "convs.0.lin_l.weight" if archs[0] == "sage" else "convs.0.lin.weight"].size(1)
    spec = ModelSpec(archs[0], in_channels, int(model.out_channels), int(model.num_layers),
                     int(model.hidden_channels), heads=int(getattr(first, "heads", 1)),
                     dropout=float(model.dropout.p))
    return spec, state


def pyg_kwargs(model: nn.Module) -> dict | None:
    """``{"class", "kwargs"}`` that rebuild a convertible PyG model (``None`` for other modules).

    ``getattr(torch_geometric.nn.models, class)(**kwargs)`` has the same tensors, so a file
    holding the state_dict can be loaded without pickling the module (:mod:`hpcsoup.export`).
    """
    from torch_geometric.nn.models import GAT, GCN, GIN, GraphSAGE

    if type(model) not in (GCN, GraphSAGE, GAT, GIN):
        return None
    spec, _ = to_expert(model)
    kwargs = {"in_channels": spec.in_channels, "hidden_channels": spec.hidden,
              "num_layers": spec.layers, "out_channels": spec.out_channels,
              "dropout": spec.dropout}
    if spec.arch == "gat":
        kwargs["heads"] = spec.heads
    return {"class": type(model).__name__, "kwargs": kwargs}
