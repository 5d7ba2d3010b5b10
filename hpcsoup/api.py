"""The Python API for models and graphs of your own: ``hpcsoup.soup`` and ``hpcsoup.merge``.

.. code-block:: python

    import hpcsoup
    souped = hpcsoup.soup(models, data, method="learned")   # one class, one shape
    souped.model(data.x, data.edge_index)                    # a new instance of that class
    merged = hpcsoup.merge([gcn, gat], data)                 # different architectures
    merged.model(data.x, data.edge_index)
    souped.save("soup.pt"); hpcsoup.load_model("soup.pt")

``data`` is a ``torch_geometric.data.Data`` with ``x``, ``y``, ``edge_index`` and boolean
``train_mask``/``val_mask``/``test_mask`` (graphs without them:
:func:`hpcsoup.data.datasets.random_split`). The souping methods are those of
:mod:`hpcsoup.soup` run through :class:`~hpcsoup.soup.module_evaluator.ModuleEvaluator`;
the merge is :func:`hpcsoup.merge.hgrama.merge` on experts converted by
:func:`hpcsoup.models.convert.to_expert`. Scores are the ``metric``'s (``accuracy`` or
``rocauc``) on ``val_mask``/``test_mask`` (``nan`` for a mask ``data`` does not have).
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Sequence

import torch
from torch import nn

from hpcsoup.errors import DatasetError, MergeError, SoupError

SPLITS = ("train", "val", "test")

#: anchor nodes of a merge without ``trained_on``: the confidence gate's ridge fit grows with
#: them (measured on Cora, GCN + GAT: all 2708 nodes 69 s, 512 nodes 4 s, test 0.771 -> 0.775)
CONFIDENCE_ANCHORS = 512


def as_graph(data, metric: str = "accuracy", name: str = "data"):
    """A :class:`~hpcsoup.data.Graph` over ``data`` (edges untouched; a missing mask is empty).

    Returns ``(graph, missing)``: ``missing`` lists the splits ``data`` has no mask for.
    """
    from torch_geometric.data import Data

    from hpcsoup.data import Graph
    from hpcsoup.data.metrics import METRICS

    if not isinstance(data, Data):
        raise DatasetError(f"data is a {type(data).__name__}; pass a torch_geometric.data.Data "
                           f"with x, y, edge_index and train/val/test masks")
    for key in ("x", "y", "edge_index"):
        if data.get(key) is None:
            raise DatasetError(f"data has no '{key}'; a node-classification Data needs x, y and "
                               f"edge_index")
    if metric not in METRICS:
        raise DatasetError(f"metric={metric!r} is unknown; choose from {list(METRICS)}")
    n = data.num_nodes
    masks, missing = {}, []
    for split in SPLITS:
        mask = data.get(f"{split}_mask")
        if mask is None:
            missing.append(split)
            mask = torch.zeros(n, dtype=torch.bool)
        elif mask.dtype != torch.bool or tuple(mask.shape) != (n,):
            raise DatasetError(f"data.{split}_mask has dtype {mask.dtype} and shape "
                               f"{tuple(mask.shape)}; expected a boolean mask of shape ({n},)")
        masks[f"{split}_mask"] = mask
    y = data.y.view(-1).long()
    out = Data(x=data.x.float(), y=y, edge_index=data.edge_index, **masks)
    return Graph(name, out, int(y.max()) + 1, metric), missing


def _require(missing: list[str], needs: Sequence[str], what: str) -> None:
    for split in needs:
        if split in missing:
            raise DatasetError(f"data has no {split}_mask, which {what} needs; give data a "
                               f"boolean {split}_mask (hpcsoup.data.datasets.random_split(data) "
                               f"draws a seeded split)")


def _check_models(models, least: int, what: str, error=SoupError) -> list[nn.Module]:
    models = list(models) if models is not None else []
    if not models:
        raise error(f"{what} got an empty list of models; pass at least {least} trained "
                    f"torch modules")
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise error(f"models[{i}] is a {type(m).__name__}, not a torch.nn.Module")
    if len(models) < least:
        raise error(f"{what} needs at least {least} models, got {len(models)}; a single model "
                    f"is already its own {what.split('.')[-1]}")
    return models


@dataclasses.dataclass
class Souped:
    """A soup of user modules.

    Attributes:
        model: a new instance of the models' class (a deep copy of ``models[0]``, eval mode)
            holding the soup.
        state_dict: the soup's state_dict (integer buffers carried from ``models[0]``).
        coefficients: ``{tensor name: [weight of model i]}`` for every mixed tensor.
        metrics: ``{"metric", "val", "test"}`` of the soup on ``data``'s masks.
        method: the souping method; ``extras``: its facts (steps, evaluations, ...).
    """

    model: nn.Module
    state_dict: dict[str, torch.Tensor]
    coefficients: dict[str, list[float]]
    metrics: dict
    method: str
    extras: dict = dataclasses.field(default_factory=dict)

    def save(self, path) -> None:
        """Write the soup as a file :func:`hpcsoup.load_model` reads (see :mod:`hpcsoup.export`)."""
        from hpcsoup.export import save_module
        save_module(path, self.model, "soup", self.state_dict, self.metrics,
                    {"method": self.method, "coefficients": self.coefficients})


@dataclasses.dataclass
class Merged:
    """An H-GRAMA child of models of different architectures.

    Attributes:
        model: the child, an ``nn.Module``: ``model(x, edge_index) -> [N, C]`` class scores.
        metrics: ``{"metric", "val", "test", "retention", "parents", "ensemble", ...}``
            (:func:`hpcsoup.merge.run.evaluate_merge`).
        routing: which routing the merge used and why.
        settings: the :class:`~hpcsoup.merge.hgrama.HGramaSettings` used.
        names: the parents' names in ``metrics``.
    """

    model: nn.Module
    metrics: dict
    routing: str
    settings: dict
    names: list[str]

    def save(self, path) -> None:
        """Write the child as a file :func:`hpcsoup.load_model` reads (see :mod:`hpcsoup.export`)."""
        from hpcsoup.export import save_module
        save_module(path, self.model, "merge", self.model.tensors(), self.metrics,
                    {"parents": self.names, "settings": self.settings, "routing": self.routing})


def _split_state(models: list[nn.Module]) -> tuple[list[dict], dict]:
    """Per model its floating tensors (to mix), and ``models[0]``'s other buffers (carried)."""
    for i, m in enumerate(models):
        for name, p in m.named_parameters():
            if not p.is_floating_point():
                raise SoupError(f"models[{i}] parameter '{name}' has dtype {p.dtype}; only "
                                f"floating-point parameters can be souped")
    first = models[0].state_dict()
    carried = {k: v.detach().clone() for k, v in first.items() if not v.is_floating_point()}
    mixed = [{k: v for k, v in m.state_dict().items() if k not in carried} for m in models]
    return mixed, carried


def soup(models: Sequence[nn.Module], data, method: str = "learned", *, metric: str = "accuracy",
         seed: int = 0, device: str = "cpu", **settings: Any) -> Souped:
    """Soup trained modules of one class and one shape (from one shared initialisation).

    Args:
        models: two or more modules called as ``module(x, edge_index)``: a user's own
            class (any parameter names, BatchNorm...), PyG's models or hpcsoup's GNN.
        data: the ``torch_geometric.data.Data`` they were trained on; greedy, GIS, learned
            and PLS choose the mixture on ``val_mask``.
        method: ``uniform``, ``greedy``, ``gis``, ``learned`` or ``pls`` (default: ``learned``).
        metric: ``accuracy`` or ``rocauc`` (default: ``accuracy``).
        seed: seeds PLS's partition draws (default: ``0``).
        device: where the forwards run (default: ``"cpu"``).
        **settings: the method's settings, e.g. ``steps=50`` (an unknown one lists the valid ones).

    Floating tensors (parameters and buffers such as BatchNorm's running statistics) are
    mixed; other buffers (``num_batches_tracked``) are carried from ``models[0]``.
    """
    from hpcsoup.soup import Ingredients, get_method
    from hpcsoup.soup.module_evaluator import ModuleEvaluator

    models = _check_models(models, 2, "hpcsoup.soup")
    chosen = get_method(method, **settings)  # unknown method or setting: a SoupError first
    for i, m in enumerate(models[1:], 1):
        if type(m) is not type(models[0]):
            raise SoupError(f"models[{i}] is a {type(m).__name__}, models[0] a "
                            f"{type(models[0]).__name__}: souping mixes tensors of one class and "
                            f"one shape; combine different architectures with "
                            f"hpcsoup.merge(models, data)")
    graph, missing = as_graph(data, metric)
    _require(missing, () if chosen.name == "uniform" else ("val",),
             f"souping method '{chosen.name}'")
    mixed, carried = _split_state(models)
    ids = [f"models[{i}]" for i in range(len(models))]
    evaluator = ModuleEvaluator(models[0], graph, device)
    try:
        ingredients = Ingredients.from_state_dicts(evaluator.spec, mixed, ids).to(device)
    except SoupError as exc:  # names the first mismatching tensor
        raise SoupError(f"{exc} (in Python: hpcsoup.merge(models, data))") from None
    result = chosen.soup(ingredients, evaluator, seed=seed)
    order = models[0].state_dict()
    state = {k: (carried[k] if k in carried else result.state_dict[k].detach().cpu())
             for k in order}
    metrics = evaluator.metrics(result.state_dict)
    model = copy.deepcopy(models[0])
    model.load_state_dict(state)
    coefficients = dict(zip(ingredients.names, result.coefficients))
    extras = {k: v for k, v in result.extras.items() if k != "logits"}
    return Souped(model.eval(), state, coefficients, metrics, result.method, extras)


def _owners(trained_on, n: int, count: int) -> torch.Tensor:
    """``trained_on`` masks -> which parent trained on each node (``-1``: none)."""
    masks = list(trained_on)
    if len(masks) != count:
        raise MergeError(f"trained_on has {len(masks)} masks for {count} models; give one boolean "
                         f"node mask per model (the nodes it was trained on)")
    owners = torch.full((n,), -1, dtype=torch.long)
    for k, mask in enumerate(masks):
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or \
                tuple(mask.shape) != (n,):
            raise MergeError(f"trained_on[{k}] must be a boolean tensor of shape ({n},)")
        clash = mask & (owners >= 0)
        if bool(clash.any()):
            other = int(owners[clash][0])
            raise MergeError(f"trained_on[{k}] and trained_on[{other}] share {int(clash.sum())} "
                             f"nodes; routing by owner needs disjoint training sets: omit "
                             f"trained_on to route by the models' confidence")
        owners[mask] = k
    return owners


def merge(models: Sequence[nn.Module], data, trained_on: Sequence[torch.Tensor] | None = None, *,
          regions: Sequence[torch.Tensor] | None = None, metric: str = "accuracy",
          names: Sequence[str] | None = None, timing: bool = False, **settings: Any) -> Merged:
    """Merge trained models of different architectures into one with H-GRAMA (no training).

    Args:
        models: two or more of ``torch_geometric.nn.models`` GCN, GraphSAGE, GAT, GIN and
            :class:`hpcsoup.models.GNN`, of one depth, trained on ``data``'s graph.
        data: the ``torch_geometric.data.Data`` (the merge reads ``x`` and ``edge_index``
            only; the scores use ``val_mask``/``test_mask``).
        trained_on: one boolean node mask per model, the (disjoint) nodes it was trained on:
            the gate learns to route each node to its owner. Without it the gate routes by
            the models' own confidence (``route_target='confidence'``, fitted on
            :data:`CONFIDENCE_ANCHORS` seeded nodes unless ``anchors`` is given), which needs
            no regions; the result's ``routing`` says which was used.
        regions: one boolean node mask per model, the part of the graph it specialises in:
            its retention (child / model score) is measured on the test nodes there
            (default: on every test node).
        metric: ``accuracy`` or ``rocauc`` (default: ``accuracy``).
        names: the models' names in the metrics (default: ``gcn0``, ``gat1``, ...).
        timing: also time the child against the ensemble (default: ``False``).
        **settings: :class:`~hpcsoup.merge.hgrama.HGramaSettings` fields.
    """
    from hpcsoup.merge.hgrama import HGramaSettings, merge as hgrama_merge
    from hpcsoup.merge.run import evaluate_merge
    from hpcsoup.merge.umpm import from_pyg
    from hpcsoup.models.convert import to_expert
    from torch_geometric.utils import is_undirected

    models = _check_models(models, 2, "hpcsoup.merge", MergeError)
    HGramaSettings(**settings)  # an unknown or bad setting fails here, before any work
    graph, _ = as_graph(data, metric)
    n = graph.num_nodes
    owners = None
    if regions is None:
        regions = [torch.ones(n, dtype=torch.bool)] * len(models)
    elif len(regions) != len(models):
        raise MergeError(f"regions has {len(regions)} masks for {len(models)} models; give one "
                         f"boolean node mask per model")
    if trained_on is not None:
        owners = _owners(trained_on, n, len(models))
        target = settings.get("route_target", "auto")
        routing = (f"route_target='{target}': a ridge gate on which model was trained on each "
                   f"node" + (" where that is predictable from the features, else every model "
                              "on every node (the ensemble, fused)" if target == "auto" else ""))
    elif settings.get("routing", "ridge") != "ridge":
        routing = f"routing={settings['routing']!r}: equal weights, no gate"
    elif settings.get("route_target", "confidence") != "confidence":
        raise MergeError(f"route_target={settings['route_target']!r} needs trained_on (one "
                         f"boolean mask per model); without it use route_target='confidence'")
    else:
        settings = {"anchors": CONFIDENCE_ANCHORS, **settings, "route_target": "confidence"}
        used = settings["anchors"] if 0 < settings["anchors"] < n else n
        routing = (f"ridge gate on the models' own confidence, fitted on {used} anchor nodes "
                   f"(route_target='confidence'): no trained_on was given, so no regions are "
                   f"needed")
    chosen = HGramaSettings(**settings)
    experts = [to_expert(m, f"models[{i}]") for i, m in enumerate(models)]
    names = list(names) if names is not None else \
        [f"{spec.arch}{i}" for i, (spec, _) in enumerate(experts)]
    parents = [from_pyg(spec, state, name) for (spec, state), name in zip(experts, names)]
    x, edge_index = graph.data.x, graph.data.edge_index
    _check_conversion(models, parents, x, edge_index)
    child = hgrama_merge(parents, x, edge_index, trained_on=owners, settings=chosen,
                         undirected=is_undirected(edge_index, num_nodes=n))
    metrics = evaluate_merge(child, parents, graph, regions, names, timing=timing)
    return Merged(child.eval(), metrics, routing, chosen.to_dict(), names)


@torch.no_grad()
def _check_conversion(models, parents, x, edge_index, tolerance: float = 1e-3) -> None:
    """Each parent's UMPM form must give its module's own logits (else the merge is of something
    else): a layer option the converter missed fails here, named, instead of silently."""
    from hpcsoup.merge.umpm import GraphOps

    ops = GraphOps(edge_index, x.size(0))
    for i, (model, parent) in enumerate(zip(models, parents)):
        was_training = model.training
        model.eval()
        try:
            own = model(x, edge_index)
        finally:
            model.train(was_training)
        gap = float((parent(x, ops) - own).abs().max())
        if gap > tolerance * max(1.0, float(own.abs().max())):
            raise MergeError(f"models[{i}] ({type(model).__name__}): its converted form differs "
                             f"from its own outputs by {gap:.3g}; a layer option hpcsoup does not "
                             f"convert? (see hpcsoup.models.convert)")
