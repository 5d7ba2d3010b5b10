"""Baselines for H-GRAMA in the same code path: the logit-averaging ensemble and interpolation.

- :class:`Ensemble`: :math:`\\frac1K \\sum_k f_k(X, A)`, the parents run in full. It is never slowed
  down relative to the child: it uses the same UMPM kernels (:mod:`~hpcsoup.merge.umpm`: one CSR
  adjacency for every static propagation, projection before aggregation, sparse bag-of-words
  projection, GAT softmax denominators from the same sparse product), the same
  :class:`~hpcsoup.merge.umpm.GraphOps` cache and the same cached attention, and it runs its
  members in lock step so that their input projections and their static propagations share one
  pass each, as the child's do.
- :func:`interpolate`: vanilla parameter averaging :math:`\\sum_k w_k \\theta_k` (model soups),
  defined only for parents of one architecture and shape.
"""
from __future__ import annotations

import torch

from hpcsoup.errors import MergeError
from hpcsoup.merge.umpm import GraphOps, UMPMNet, as_features, layer_forward, \
    propagate_static
from hpcsoup.soup import Ingredients  # the soups' mixing: names and shapes checked there


class Ensemble:
    """Logit-averaging ensemble of UMPM parents, executed with the child's kernels."""

    def __init__(self, parents: list[UMPMNet]):
        if not parents:
            raise MergeError("an ensemble needs at least one parent")
        self.parents = parents
        self._input_weight = torch.cat([p.layers[0].weight for p in parents], 1).contiguous()

    def make_cache(self, x: torch.Tensor, edge_index: torch.Tensor, undirected: bool = False,
                   attention: bool = True, ops: GraphOps | None = None) -> dict:
        """``{"ops": GraphOps, "attention": {...}}``: what the child's cache holds, for the ensemble
        (``ops``: graph operators already built for this graph, shared)."""
        cache = {"ops": ops or GraphOps(edge_index, x.size(0), undirected=undirected),
                 "attention": {} if attention else None}
        if attention:
            self.forward(x, edge_index, cache=cache)
        return cache

    @torch.no_grad()
    def forward(self, x: torch.Tensor, edge_index: torch.Tensor | None = None, *,
                undirected: bool = False, cache: dict | None = None,
                members: bool = False):
        """Mean of the parents' logits ``[N, C]`` (with ``members``: also each parent's logits)."""
        ops = cache["ops"] if cache is not None else GraphOps(edge_index, x.size(0),
                                                              undirected=undirected)
        attention = cache.get("attention") if cache is not None else None
        block = ops.full()
        x = as_features(x)
        hs = None
        for li in range(self.parents[0].depth):
            layers = [p.layers[li] for p in self.parents]
            if li == 0:  # one shared pass over the input features
                weights = [layer.weight for layer in layers]
                full = x @ self._input_weight
                us, start = [], 0
                for w in weights:
                    us.append(full[:, start:start + w.size(1)])
                    start += w.size(1)
            else:
                us = [h @ layer.weight for h, layer in zip(hs, layers)]
                hs = None  # read: at products scale each layer's tensors are hundreds of MB
            zs: list = [None] * len(layers)
            static = []
            for j, (layer, u) in enumerate(zip(layers, us)):
                if layer.prop == "gat":
                    key = ("ensemble", j, li)
                    cached = attention.get(key) if attention is not None else None
                    zs[j], att = layer_forward(layer, block, u, cached)
                    if attention is not None:
                        attention[key] = att
                else:
                    static.append(j)
            if static:
                splits = [layers[j].split(us[j]) for j in static]
                aggs = propagate_static(block, [(layers[j].prop, s[1])
                                                for j, s in zip(static, splits)])
                for j, (u_self, _), agg in zip(static, splits, aggs):
                    zs[j] = layers[j].finish(block, u_self, agg)
                del splits, aggs
            full = us = u = None
            hs = []
            for j, layer in enumerate(layers):
                hs.append(layer.activate(zs[j]))
                zs[j] = None
        # the mean without a stacked copy of every member's logits (at 2.45M nodes a [K, N, C]
        # stack is K x 460 MB): the same sum, member by member, in the same order
        mean = hs[0].clone()
        for h in hs[1:]:
            mean.add_(h)
        mean.div_(len(hs))
        return (mean, hs) if members else mean

    __call__ = forward


def interpolate(specs: list, state_dicts: list[dict], weights: list[float] | None = None):
    """Vanilla parameter interpolation ``sum_k w_k theta_k`` of same-architecture parents.

    Returns ``(spec, state_dict)``. Raises :class:`MergeError` for heterogeneous parents, which
    have no common parameter space (that is what H-GRAMA is for).
    """
    if len(specs) < 2 or len(specs) != len(state_dicts):
        raise MergeError(f"interpolation needs >= 2 parents with one state_dict each, got "
                         f"{len(specs)} specs and {len(state_dicts)} state_dicts")
    shapes = {(s.arch, s.layers, s.hidden, s.heads, s.in_channels, s.out_channels) for s in specs}
    if len(shapes) > 1:
        archs = [s.arch for s in specs]
        raise MergeError(f"vanilla parameter interpolation needs parents of one architecture and "
                         f"shape, got {archs} ({sorted(shapes)}); it is a baseline for homogeneous "
                         f"pairs only: use H-GRAMA for heterogeneous parents")
    ingredients = Ingredients.from_state_dicts(specs[0], state_dicts)
    if weights is None:
        return specs[0], ingredients.mean()
    return specs[0], ingredients.mix(torch.tensor(weights, dtype=torch.float32))
