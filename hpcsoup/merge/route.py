"""Routing: a per-node gate over the parents, fitted in closed form and without labels.

H-GRAMA (arXiv 2602.19332) routes every node to the parents likely to serve it. The gate here is
ridge regression on label-free node descriptors, the input features smoothed over the graph,

.. math::
    S = \\mathcal{S}^{s}\\big([X, \\hat A X, \\dots, \\hat A^{h} X]\\,B + \\mathbf 1 c^\\top\\big),
    \\qquad B = \\arg\\min_B \\lVert D_{fit} B - Y \\rVert^2 + \\lambda \\lVert B \\rVert^2

(:math:`\\hat A` the GCN-normalised adjacency, :math:`\\mathcal S^{s}` ``s`` further smoothing steps
with :math:`\\hat A`), then :math:`g_k(i) = \\max(S_{ik}, 0) / \\sum_k \\max(S_{ik}, 0)`.

Targets ``Y`` never use labels:

- ``owner``: one-hot of *which parent was trained on the node*, known on the parents'
  training nodes only (the fit set);
- ``confidence``: each parent's own max-softmax confidence, normalised over the parents, on a
  seeded subsample of :data:`CONFIDENCE_FIT_NODES` nodes (or the anchors, if given);
- ``auto`` (default): ``owner``, unless its cross-validated misrouting is near chance -- the parents'
  regions cannot be told apart from the features (random halves) -- then no gate at all: every
  parent on every node with equal weights (:func:`~hpcsoup.merge.hgrama.merge` then averages
  logits: the ensemble, run fused as one :class:`~hpcsoup.merge.child.MergedGNN`). Measured
  (benchmarks/RESULTS.md, merge): on random halves one parent per node loses up to 8 points to
  the ensemble, whatever the gate's target (owner -2.9 / -8.0, confidence -1.9 / -4.8 on Cora's
  GCN+GAT / GCN+SAGE+GAT): the ensemble's gain is the average itself.

``lambda`` and ``s`` are chosen by k-fold cross-validation of the same target on held-out fit nodes
(label-free): fewest held-out nodes routed to the wrong parent, squared error breaking ties
(squared error alone preferred unsmoothed gates that misroute more).

At inference the descriptors are never built: by linearity
:math:`\\sum_h \\hat A^h X B_h = B_0' X + \\hat A(X B_1' + \\hat A(\\dots))`, i.e. one narrow projection
of ``X`` and ``h + s`` propagations of width ``K`` (Horner's rule).

A sparse gate saves compute: :func:`sparsify` drops parents whose weight is below a threshold
(the top parent is always kept), and the merged child computes each parent only on its rows.
"""
from __future__ import annotations

import dataclasses

import torch

from hpcsoup.errors import MergeError
from hpcsoup.merge.umpm import GraphOps, propagate_static

TARGETS = ("auto", "owner", "confidence")

#: ``auto`` drops the owner target when its held-out misrouting exceeds this fraction of chance
#: (1 - 1/K). Measured (benchmarks/RESULTS.md, merge): random halves 0.94-1.0 of chance, METIS and
#: class halves 0.1-0.46, Minesweeper's METIS halves (features carry no position) 0.85.
AUTO_CHANCE_FRACTION = 0.75

#: seeded nodes the confidence target is fitted on when no anchors are given, as many as the
#: owner target has on Cora's halves (~70-140 training nodes): the ridge fit's cost grows with
#: nodes x descriptors (on every node of Cora, 3 x 1433 descriptors, it took 27 s, not 1 s)
CONFIDENCE_FIT_NODES = 256


def smooth(ops: GraphOps, scores: torch.Tensor, steps: int) -> torch.Tensor:
    """``A_hat^steps @ scores`` with the GCN-normalised adjacency."""
    block = ops.full()
    for _ in range(steps):
        scores = propagate_static(block, [("gcn", scores)])[0]
    return scores


def descriptors(x: torch.Tensor, ops: GraphOps, hops: int) -> list[torch.Tensor]:
    """``[X, A_hat X, ..., A_hat^hops X]`` (dense), the gate's node descriptors."""
    x = x.to_dense() if x.layout != torch.strided else x
    out = [x.float()]
    for _ in range(hops):
        out.append(smooth(ops, out[-1], 1))
    return out


@dataclasses.dataclass
class RidgeGate:
    """A fitted gate: ``scores = smooth^s(sum_h A_hat^h X B_h + c)``.

    ``coef`` has shape ``[hops + 1, F, K]``; ``intercept`` ``[K]``.
    """

    coef: torch.Tensor
    intercept: torch.Tensor
    smooth_steps: int = 0
    lam: float = 0.0
    cv_error: float = float("nan")
    target: str = "owner"

    @property
    def hops(self) -> int:
        return self.coef.size(0) - 1

    @property
    def num_parents(self) -> int:
        return self.coef.size(2)

    def projection(self) -> torch.Tensor:
        """``[B_0 | ... | B_hops]``, ``[F, (hops + 1) K]``: what :meth:`scores` multiplies ``X`` by."""
        return self.coef.permute(1, 0, 2).reshape(self.coef.size(1), -1)

    def scores(self, x: torch.Tensor, ops: GraphOps, proj: torch.Tensor | None = None) -> torch.Tensor:
        """Raw gate scores ``[N, K]`` (one narrow projection, Horner's rule over the hops).

        ``proj``: ``x @ self.projection()``, if the caller computed it with other columns.
        """
        hops, k = self.hops, self.num_parents
        if proj is None:
            proj = x @ self.projection()
        out = proj[:, hops * k:]
        for h in range(hops - 1, -1, -1):
            out = smooth(ops, out.contiguous(), 1) + proj[:, h * k:(h + 1) * k]
        out = out + self.intercept
        return smooth(ops, out.contiguous(), self.smooth_steps)

    def __call__(self, x: torch.Tensor, ops: GraphOps) -> torch.Tensor:
        return normalise(self.scores(x, ops))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"coef": self.coef, "intercept": self.intercept}

    def meta(self) -> dict:
        return {"smooth_steps": self.smooth_steps, "lam": self.lam, "cv_error": self.cv_error,
                "target": self.target}


def normalise(scores: torch.Tensor) -> torch.Tensor:
    """Gate weights from scores: clip at 0, divide by the row sum (uniform where all are <= 0)."""
    g = scores.clamp_min(0.0)
    total = g.sum(1, keepdim=True)
    uniform = torch.full_like(g, 1.0 / g.size(1))
    return torch.where(total > 1e-12, g / total.clamp_min(1e-12), uniform)


def sparsify(gate: torch.Tensor, threshold: float, budget: float = -1.0) -> torch.Tensor:
    """Keep each node's top parent, and other parents whose weight reaches ``threshold``, within
    a ``budget``; renormalise.

    ``threshold = 0`` keeps every parent with a positive weight (dense mixture); ``threshold >
    1/2`` for two parents, or ``1.0`` for any number, routes each node to its top parent only.

    ``budget`` caps the parents computed beyond each node's top one at ``budget * N`` (a mean of
    at most ``1 + budget`` parents per node): of the weights that pass ``threshold``, the largest
    are kept -- for two parents, the nodes with the smallest margin between them, where the gate
    is least sure and a single parent most likely the wrong one. A negative budget is no cap.
    """
    top = torch.zeros_like(gate, dtype=torch.bool)
    top.scatter_(1, gate.argmax(1, keepdim=True), True)
    extra = (gate >= threshold) & (gate > 0) & ~top
    if not bool(extra.any()):  # one parent per node: no weights to renormalise
        return top.to(gate.dtype)
    allowed = budget * gate.size(0)
    if budget >= 0 and int(extra.sum()) > allowed:
        allowed = int(allowed)
        weights = torch.where(extra, gate, torch.full_like(gate, -1.0)).view(-1)
        keep = weights.argsort(descending=True, stable=True)[:allowed]
        extra = torch.zeros_like(extra).view(-1)
        extra[keep] = True
        extra = extra.view_as(gate)
    g = torch.where(top | extra, gate, torch.zeros_like(gate))
    return g / g.sum(1, keepdim=True)


def owner_targets(trained_on: torch.Tensor, num_parents: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(node ids, one-hot targets)`` from ``trained_on`` (parent index per node, -1 = none)."""
    nodes = (trained_on >= 0).nonzero().view(-1)
    if nodes.numel() == 0:
        raise MergeError("routing target 'owner' needs the nodes each parent was trained on, "
                         "but trained_on marks none; pass the specialists' regions and train mask "
                         "or use merge.route_target='confidence'")
    present = torch.bincount(trained_on[nodes], minlength=num_parents)
    if bool((present == 0).any()):
        missing = (present == 0).nonzero().view(-1).tolist()
        raise MergeError(f"routing target 'owner': parents {missing} were trained on no node of "
                         f"trained_on; check the parents' regions")
    return nodes, torch.nn.functional.one_hot(trained_on[nodes], num_parents).float()


def confidence_targets(parent_logits: list[torch.Tensor]) -> torch.Tensor:
    """Each parent's max-softmax confidence, normalised over the parents, ``[N, K]``."""
    conf = torch.stack([z.softmax(-1).max(-1).values for z in parent_logits], 1)
    return conf / conf.sum(1, keepdim=True)


def fit_routing_gate(x: torch.Tensor, ops: GraphOps, target: str, trained_on: torch.Tensor | None,
                     parent_logits: list[torch.Tensor], anchors: torch.Tensor | None = None,
                     seed: int = 0, **fit_options) -> tuple[RidgeGate | None, dict]:
    """The gate for ``target`` (one of :data:`TARGETS`) and what was decided, as a dict.

    ``auto`` fits the owner gate when ``trained_on`` marks nodes and keeps it unless its
    cross-validated misrouting exceeds ``AUTO_CHANCE_FRACTION * (1 - 1/K)``; otherwise, and
    without ``trained_on``, it returns no gate (``used="mixture"``): the caller then runs every
    parent on every node with equal weights.
    """
    if target not in TARGETS:
        raise MergeError(f"routing target {target!r} is unknown; choose from {list(TARGETS)}")
    k = len(parent_logits)
    decision: dict = {"target": target}
    has_owners = trained_on is not None and bool((trained_on >= 0).any())
    if target == "owner" or (target == "auto" and has_owners):
        if trained_on is None:
            raise MergeError("routing target 'owner' needs trained_on (which parent was trained on "
                             "each node); use route_target='confidence' or 'auto'")
        gate = fit_gate(x, ops, *owner_targets(trained_on, k), seed=seed, **fit_options)
        chance = 1.0 - 1.0 / k
        decision.update(owner_cv_error=gate.cv_error, chance=chance)
        if target == "owner" or gate.cv_error <= AUTO_CHANCE_FRACTION * chance:
            return gate, dict(decision, used="owner")
    if target == "auto":
        return None, dict(decision, used="mixture")
    nodes = anchors
    if nodes is None:
        nodes = torch.arange(x.size(0))
        if x.size(0) > CONFIDENCE_FIT_NODES:
            generator = torch.Generator().manual_seed(seed)
            nodes = torch.randperm(x.size(0), generator=generator)[:CONFIDENCE_FIT_NODES].sort().values
    gate = fit_gate(x, ops, nodes, confidence_targets(parent_logits)[nodes], seed=seed, **fit_options)
    gate.target = "confidence"
    return gate, dict(decision, used="confidence")


#: rows per block of the gate's predictions while it is fitted (:func:`fit_gate`)
PREDICT_BLOCK = 65536


def fit_gate(x: torch.Tensor, ops: GraphOps, nodes: torch.Tensor, targets: torch.Tensor, *,
             hops: int = 2, standardize: bool = False,
             lambdas: tuple = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0),
             smooth_grid: tuple = (0, 1, 2, 4, 8), folds: int = 5, seed: int = 0) -> RidgeGate:
    """Fit a :class:`RidgeGate` on ``targets`` ``[len(nodes), K]`` at ``nodes``.

    Descriptors are centred over all nodes (transductive, label-free) and scaled per hop block to
    unit mean row norm (``standardize=False``) or per column to unit variance. ``lambdas`` are
    relative to the mean diagonal of the Gram matrix. The pair (``lambda``, smoothing steps) with
    the smallest k-fold squared error on held-out fit nodes wins (ties: the first in grid order).
    """
    blocks = descriptors(x, ops, hops)
    means = [b.mean(0) for b in blocks]
    if standardize:
        scales = [b.std(0).clamp_min(1e-6) for b in blocks]
    else:
        scales = [((b - m).norm(dim=1).mean().clamp_min(1e-12)).expand(b.size(1))
                  for b, m in zip(blocks, means)]

    def design(rows) -> torch.Tensor:
        """Rows of the standardised descriptors ``[X, A_hat X, ...]``, in double."""
        return torch.cat([(b[rows] - m) / s for b, m, s in zip(blocks, means, scales)], 1).double()

    def predict(coef) -> torch.Tensor:
        """``design @ weight + bias`` for every node, in blocks of rows: the whole design in
        double would be 8 (hops + 1) F bytes per node (2.45M nodes, F = 100: 5.9 GB)."""
        out = torch.empty(x.size(0), coef[0].size(1))
        for start in range(0, x.size(0), PREDICT_BLOCK):
            rows = slice(start, start + PREDICT_BLOCK)
            out[rows] = (design(rows) @ coef[0] + coef[1]).float()
        return out

    fit_design = design(nodes)
    y = targets.double()
    n = nodes.numel()
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)
    k = max(2, min(folds, n))
    errors = torch.zeros(len(lambdas), len(smooth_grid), dtype=torch.float64)
    for held in order.chunk(k):
        fit_mask = torch.ones(n, dtype=torch.bool)
        fit_mask[held] = False
        if not bool(fit_mask.any()):
            continue
        for li, coef in enumerate(_ridge_path(fit_design[fit_mask], y[fit_mask], lambdas)):
            pred = predict(coef)
            for si, steps in enumerate(smooth_grid):
                sm = smooth(ops, pred, steps) if steps else pred
                held_pred = sm[nodes[held]].double()
                # misrouted held-out nodes first (what costs retention), squared error breaks ties
                misrouted = (held_pred.argmax(1) != y[held].argmax(1)).sum()
                errors[li, si] += misrouted + 1e-3 * ((held_pred - y[held]) ** 2).sum()
    best = int(errors.argmin())
    li, si = divmod(best, len(smooth_grid))
    weight, bias = _ridge_path(fit_design, y, (lambdas[li],))[0]
    # fold centring and scaling into per-hop coefficients and one intercept
    coef, intercept, start = [], bias.clone(), 0
    for b, m, s in zip(blocks, means, scales):
        w = weight[start:start + b.size(1)] / s.double().unsqueeze(1)
        intercept -= m.double() @ w
        coef.append(w)
        start += b.size(1)
    return RidgeGate(torch.stack(coef).float(), intercept.float(), smooth_grid[si],
                     float(lambdas[li]), float(errors[li, si] / max(n, 1)))


def _ridge_path(design: torch.Tensor, y: torch.Tensor, lambdas) -> list:
    """Ridge solutions ``(W, b)`` for each relative ``lambda`` (intercept unpenalised).

    Uses the dual (``n x n``) or primal (``p x p``) eigendecomposition, whichever is smaller, so
    every ``lambda`` costs one back-substitution.
    """
    mean_d, mean_y = design.mean(0), y.mean(0)
    d, yc = design - mean_d, y - mean_y
    n, p = d.shape
    out = []
    if n <= p:
        gram = d @ d.t()
        evals, evecs = torch.linalg.eigh(gram)
        scale = float(gram.diagonal().mean().clamp_min(1e-12))
        proj = evecs.t() @ yc
        for lam in lambdas:
            alpha = evecs @ (proj / (evals + lam * scale).clamp_min(1e-12).unsqueeze(1))
            w = d.t() @ alpha
            out.append((w, mean_y - mean_d @ w))
    else:
        gram = d.t() @ d
        evals, evecs = torch.linalg.eigh(gram)
        scale = float(gram.diagonal().mean().clamp_min(1e-12))
        proj = evecs.t() @ (d.t() @ yc)
        for lam in lambdas:
            w = evecs @ (proj / (evals + lam * scale * p / n).clamp_min(1e-12).unsqueeze(1))
            out.append((w, mean_y - mean_d @ w))
    return out
