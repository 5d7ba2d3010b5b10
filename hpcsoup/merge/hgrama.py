"""H-GRAMA: training-free, label-free merging of GNN parents of different architectures.

"Training-Free Cross-Architecture Merging for Graph Neural Networks" (Bhattacharya, Kalsariya,
Manwani, arXiv 2602.19332): parents (e.g. a GCN and a GAT) trained on different labelled node
subsets of one graph become one child, with no labels and no optimisation at merge time:

1. **UMPM** (:mod:`~hpcsoup.merge.umpm`): every parent layer in one operator family.
2. **Message alignment** (:mod:`~hpcsoup.merge.align`): per hidden layer, a transport of each
   parent's activations into a reference parent's basis, fitted on unlabelled anchor nodes.
3. **Routing** (:mod:`~hpcsoup.merge.route`): a closed-form ridge gate over the parents per node.
4. **Calibration** (:mod:`~hpcsoup.merge.calibrate`): per-channel statistics matched, folded in.
5. **Fused execution** (:mod:`~hpcsoup.merge.child`): one hidden stream, each parent computed
   only where the gate sends nodes, static propagations sharing one pass over the edges.

Depth rule: parents must have the same depth (the merge is layer by layer; the paper reports
retention "in compatible depth settings"). Different depths raise :class:`MergeError` rather than
silently pairing unrelated layers. Hidden widths may differ: the reference is the widest parent
(a GAT among equally wide ones, which keeps its heads exact) and narrower parents get
semi-orthogonal transports, exact on their own rows.
"""
from __future__ import annotations

import dataclasses
import time

import torch

from hpcsoup.errors import ConfigError, MergeError
from hpcsoup.merge import align, calibrate
from hpcsoup.merge.child import READOUTS, MergedGNN
from hpcsoup.merge.route import TARGETS, fit_routing_gate
from hpcsoup.merge.umpm import GraphOps, UMPMNet, as_features
from hpcsoup.settings import Setting, nonnegative

ROUTINGS = ("ridge", "uniform", "none")


#: every choice of a merge, declared once: HGramaSettings and the config's ``[merge]`` section
#: (:mod:`hpcsoup.config`) are both built from this. Defaults were chosen by measurement
#: (benchmarks/RESULTS.md, ``## merge``).
MERGE_SETTINGS = {
    "alignment": Setting("procrustes", (str,), choices=align.ALIGNMENTS,
                         help="hidden-space alignment: procrustes, permutation or none (ablation)"),
    "routing": Setting("ridge", (str,), choices=ROUTINGS,
                       help="ridge (the gate), uniform or none (both: equal weights, the ablation)"),
    "calibration": Setting(True, (bool,), help="fold label-free statistics matching into the weights"),
    "anchors": Setting(0, (int,), **nonnegative(), help="anchor nodes for alignment (0 = all nodes)"),
    "seed": Setting(0, (int,), help="seeds the anchor sample and the gate's cross-validation folds"),
    "threshold": Setting(0.5, (float,), check=lambda v: 0 <= v <= 1, hint="must be in [0, 1]",
                         help="gate sparsity: parents below it are not computed on a node (0 = "
                              "every parent everywhere, >= 0.5 = top parent only with 2 parents)"),
    "budget": Setting(-1.0, (float,), check=lambda v: v >= 0 or v == -1,
                      hint="must be >= 0 (a fraction of the nodes) or -1 (no cap)",
                      help="parents computed beyond each node's top one, where the gate is least "
                           "sure, as a fraction of the nodes (-1 = no cap)"),
    "readout": Setting("probs", (str,), choices=READOUTS,
                       help="mixture of the parents' class probabilities (probs) or logits"),
    "route_target": Setting("auto", (str,), choices=TARGETS,
                            help="the gate's target: owner (which parent trained on a node), "
                                 "confidence, or auto (owner where predictable, else every parent "
                                 "on every node: the ensemble, fused)"),
    "reference": Setting("auto", (str, int),
                         help="the parent whose hidden basis is the stream's: auto or an index"),
    "gate_hops": Setting(2, (int,), **nonnegative(), help="hops of smoothed features in the gate"),
    "gate_standardize": Setting(False, (bool,),
                                help="scale the gate's descriptors per column (else per hop block)"),
    "gate_smooth": Setting(-1, (int,), check=lambda v: v >= -1, hint="must be >= -1",
                           help="smoothing steps of the gate's scores (-1 = by cross-validation)"),
    "calibrate_output": Setting(False, (bool,),
                                help="calibrate the output layer too (per-class logit shifts; "
                                     "measured to cost retention)"),
}


@dataclasses.dataclass(frozen=True)
class HGramaSettings:
    """Every choice of a merge (stored with the child): the :data:`MERGE_SETTINGS`, validated.

    ``HGramaSettings(**values)`` fills the defaults in; an unknown name or a bad value raises
    :class:`MergeError` naming the setting and what is allowed.
    """

    values: dict

    def __init__(self, **values):
        unknown = sorted(set(values) - set(MERGE_SETTINGS))
        if unknown:
            raise MergeError(f"H-GRAMA has no setting {unknown[0]!r}; valid settings: "
                             f"{sorted(MERGE_SETTINGS)}")
        checked = {name: setting.default for name, setting in MERGE_SETTINGS.items()}
        for name, value in values.items():
            try:
                checked[name] = MERGE_SETTINGS[name].validate(f"merge.{name}", value)
            except ConfigError as exc:
                raise MergeError(str(exc).replace("config key", "H-GRAMA setting", 1)) from None
        object.__setattr__(self, "values", checked)

    def __getattr__(self, name: str):
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(f"H-GRAMA has no setting {name!r}") from None

    def to_dict(self) -> dict:
        return dict(self.values)

    @classmethod
    def from_config(cls, section) -> "HGramaSettings":
        """From a config's ``[merge]`` section (keys that are not settings are ignored)."""
        values = section.to_dict() if hasattr(section, "to_dict") else dict(section)
        return cls(**{k: v for k, v in values.items() if k in MERGE_SETTINGS})


def check_parents(parents: list[UMPMNet]) -> None:
    """Raise :class:`MergeError` unless the parents can be merged layer by layer."""
    if len(parents) < 2:
        raise MergeError(f"H-GRAMA merges at least 2 parents, got {len(parents)}")
    depths = {p.name: p.depth for p in parents}
    if len(set(depths.values())) > 1:
        raise MergeError(f"parents have different depths {depths}; H-GRAMA merges layer by layer "
                         f"and needs equal depths: train the specialists with one "
                         f"specialists.layers (no depth-matching rule is applied)")
    ins = {p.name: p.layers[0].in_dim for p in parents}
    outs = {p.name: p.widths[-1] for p in parents}
    if len(set(ins.values())) > 1 or len(set(outs.values())) > 1:
        raise MergeError(f"parents disagree on input features {ins} or classes {outs}; "
                         f"merge parents trained on the same dataset")


def choose_reference(parents: list[UMPMNet], reference="auto") -> int:
    """The parent whose hidden basis the stream uses: widest, a GAT first among the widest."""
    if reference != "auto":
        index = int(reference)
        if not 0 <= index < len(parents):
            raise MergeError(f"reference={reference!r} is not a parent index 0..{len(parents) - 1}")
        return index
    width = [max(p.widths[:-1], default=0) for p in parents]
    best = max(width)
    candidates = [i for i, w in enumerate(width) if w == best]
    gats = [i for i in candidates if parents[i].arch == "gat"]
    return (gats or candidates)[0]


def merge(parents: list[UMPMNet], x: torch.Tensor, edge_index: torch.Tensor, *,
          trained_on: torch.Tensor | None = None,
          settings: HGramaSettings | None = None, undirected: bool = False,
          ops: GraphOps | None = None) -> MergedGNN:
    """Merge UMPM parents into one :class:`MergedGNN`, without labels and without training.

    Args:
        parents: the parents in UMPM form (:func:`~hpcsoup.merge.umpm.from_pyg`).
        x, edge_index: the graph's features and edges (no labels are taken).
        trained_on: ``[N]`` index of the parent trained on each node, ``-1`` elsewhere; the
            gate's target for ``route_target='owner'`` (and ``'auto'``).
        settings: :class:`HGramaSettings` (default: the defaults).
        undirected: ``edge_index`` is symmetric (lets :class:`GraphOps` skip a sort).
        ops: prebuilt :class:`GraphOps` of the graph.
    """
    settings = settings or HGramaSettings()
    check_parents(parents)
    start = time.perf_counter()
    ops = ops or GraphOps(edge_index, x.size(0), undirected=undirected)
    feats = as_features(x)
    runs = [p.forward(feats, ops, capture=True) for p in parents]
    logits = [r[0] for r in runs]
    traces = [r[1] for r in runs]
    k, depth = len(parents), parents[0].depth
    ref = choose_reference(parents, settings.reference)
    anchors = align.anchor_nodes(x.size(0), settings.anchors, settings.seed)

    # transports of every parent's hidden activations into the reference basis, per layer
    transports = []
    for li in range(depth - 1):
        h_ref = traces[ref][li][1]
        row = []
        for j in range(k):
            if j == ref:
                mu = (h_ref if anchors is None else h_ref[anchors]).mean(0)
                if settings.alignment == "none":
                    mu = torch.zeros_like(mu)
                row.append(align.Transport(torch.eye(h_ref.size(1)), mu, mu))
            else:
                row.append(align.fit_transport(traces[j][li][1], h_ref, settings.alignment, anchors))
        transports.append(row)

    # fold the transports into per-source projection matrices M_kj
    mix: list = [None] * depth
    for li in range(1, depth):
        mix[li] = []
        for j in range(k):
            w = parents[j].layers[li].weight
            tj = transports[li - 1][j]
            per_source = []
            for s in range(k):
                ts = transports[li - 1][s]
                if s == j and tj.matrix.size(0) <= tj.matrix.size(1):
                    # T_j T_j^T = I: a parent reads its own rows with its own weights, exactly
                    per_source.append(torch.cat([w, torch.zeros(1, w.size(1))], 0).contiguous())
                    continue
                cross = ts.matrix @ tj.matrix.t()                          # T_s T_j^T
                offset = (tj.mu_a - ts.mu_a @ cross) @ w                   # (mu_j - mu_s T_s T_j^T) W_j
                per_source.append(torch.cat([cross @ w, offset.unsqueeze(0)], 0).contiguous())
            mix[li].append(per_source)

    gate, routing = None, None
    threshold, budget, readout = settings.threshold, settings.budget, settings.readout
    if settings.routing == "ridge":
        gate, routing = fit_routing_gate(
            feats, ops, settings.route_target, trained_on, logits, anchors, seed=settings.seed,
            hops=settings.gate_hops, standardize=settings.gate_standardize,
            smooth_grid=(0, 1, 2, 4, 8) if settings.gate_smooth < 0 else (int(settings.gate_smooth),))
        if routing["used"] == "mixture":
            # no gate can be learned: every parent on every node, their logits averaged -- the
            # ensemble itself, fused (the log-probability mixture lost 0.2-1.1 points to it)
            threshold, budget, readout = 0.0, -1.0, "logits"

    child_parents = [{"name": p.name, "arch": p.arch, "layers": list(p.layers)} for p in parents]
    child = MergedGNN(child_parents, mix, gate, threshold, readout, budget=budget)

    if settings.calibration:
        cache_routing = child.route(feats, ops)
        for li in range(1, depth if settings.calibrate_output else depth - 1):
            _, trace = _capture(child, feats, ops, cache_routing)
            for j in range(k):
                rows = cache_routing.rows[j]
                target = traces[j][li][0].index_select(0, rows)
                scale, shift = calibrate.affine_match(trace[li][j], target, cache_routing.weights[j])
                layer, mats = calibrate.fold(child.layer(j, li), child.mix[li][j], scale, shift)
                child.parents[j]["layers"][li] = layer
                child.mix[li][j] = mats
    child.info = {"reference": ref, "parents": [p.name for p in parents],
                  "settings": settings.to_dict(), "merge_seconds": time.perf_counter() - start,
                  "gate": routing if gate is None else dict(gate.meta(), **routing)}
    return child


def _capture(child: MergedGNN, x, ops, routing):
    from hpcsoup.merge.child import ChildCache
    return child.forward(x, cache=ChildCache(ops, routing, None), capture=True)
