"""Message alignment: closed-form transport between two parents' hidden spaces.

Two GNNs trained apart compute similar features in unrelated bases. H-GRAMA (arXiv 2602.19332)
aligns them layer by layer with a transport fitted on unlabelled *anchor* nodes: the activations
``A`` (``[anchors, d_a]``) of one parent and ``B`` (``[anchors, d_b]``) of the reference parent at
the same layer, both centred (:math:`\\bar A = A - \\mu_A`).

- **Procrustes** (Schönemann, Psychometrika 1966): the (semi-)orthogonal
  :math:`T = \\arg\\min_{T} \\lVert \\bar A T - \\bar B \\rVert_F` with :math:`T^\\top T = I` or
  :math:`T T^\\top = I`, in closed form :math:`T = U V^\\top` from the thin SVD
  :math:`\\bar A^\\top \\bar B = U \\Sigma V^\\top`. For :math:`d_a \\le d_b` the rows of ``T``
  are orthonormal, so :math:`T T^\\top = I` and a parent's own activations survive the round trip
  to the reference basis and back exactly.
- **Permutation** (the unit matching of Git Re-Basin, Ainsworth et al., ICLR 2023): the
  (partial) permutation maximising :math:`\\mathrm{tr}(T^\\top \\bar A^\\top \\bar B)` by the
  Hungarian algorithm (``scipy.optimize.linear_sum_assignment``). A permutation commutes with
  ReLU, so it is exact through the nonlinearity.
- **none**: the identity (truncated or zero-padded for different widths), the ablation.

The transport of a centred activation is affine: :math:`h = (a - \\mu_A) T + \\mu_B`.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from hpcsoup.errors import MergeError

ALIGNMENTS = ("procrustes", "permutation", "none")


@dataclasses.dataclass
class Transport:
    """Affine map of one parent's activations into the reference basis: ``(a - mu_a) T + mu_b``."""

    matrix: torch.Tensor   # [d_a, d_b]
    mu_a: torch.Tensor     # [d_a]
    mu_b: torch.Tensor     # [d_b]

    def apply(self, a: torch.Tensor) -> torch.Tensor:
        return (a - self.mu_a) @ self.matrix + self.mu_b

    def invert(self, h: torch.Tensor) -> torch.Tensor:
        """Back to the parent's basis, ``(h - mu_b) T^T + mu_a`` (exact when ``T T^T = I``)."""
        return (h - self.mu_b) @ self.matrix.t() + self.mu_a


def procrustes(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Semi-orthogonal ``T`` ``[d_a, d_b]`` minimising ``||a T - b||_F`` (inputs already centred)."""
    _check_pair(a, b)
    cross = a.double().t() @ b.double()
    u, _, vh = torch.linalg.svd(cross, full_matrices=False)
    return (u @ vh).to(torch.float32)


def permutation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Partial permutation ``T`` ``[d_a, d_b]`` matching units by the correlation of ``a`` and ``b``.

    Units are matched on correlation (scale-free), ties broken by the Hungarian algorithm's
    deterministic order. With ``d_a != d_b`` the surplus units stay unmatched (zero rows/columns).
    """
    _check_pair(a, b)
    an = a.double() / a.double().norm(dim=0).clamp_min(1e-12)
    bn = b.double() / b.double().norm(dim=0).clamp_min(1e-12)
    corr = (an.t() @ bn).numpy()
    rows, cols = linear_sum_assignment(corr, maximize=True)
    t = torch.zeros(a.size(1), b.size(1))
    t[torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)] = 1.0
    return t


def identity(d_a: int, d_b: int) -> torch.Tensor:
    """The ablation: no alignment (``I`` truncated or zero-padded to ``[d_a, d_b]``)."""
    return torch.eye(d_a, d_b)


def fit_transport(a: torch.Tensor, b: torch.Tensor, method: str = "procrustes",
                  anchors: torch.Tensor | None = None) -> Transport:
    """Fit the transport of activations ``a`` onto reference activations ``b`` (same nodes).

    Args:
        a, b: ``[N, d_a]`` and ``[N, d_b]`` activations of the two parents at one layer.
        method: ``procrustes``, ``permutation`` or ``none`` (default: ``procrustes``).
        anchors: node ids to fit on (default: all nodes). No labels are involved.
    """
    if method not in ALIGNMENTS:
        raise MergeError(f"alignment {method!r} is unknown; choose from {list(ALIGNMENTS)}")
    if anchors is not None:
        a, b = a.index_select(0, anchors), b.index_select(0, anchors)
    mu_a, mu_b = a.mean(0), b.mean(0)
    if method == "none":
        return Transport(identity(a.size(1), b.size(1)), torch.zeros(a.size(1)),
                         torch.zeros(b.size(1)))
    fit = procrustes if method == "procrustes" else permutation
    return Transport(fit(a - mu_a, b - mu_b), mu_a, mu_b)


def anchor_nodes(num_nodes: int, count: int, seed: int = 0) -> torch.Tensor | None:
    """``count`` seeded anchor nodes (``None`` = every node when ``count`` is 0 or >= N)."""
    if count <= 0 or count >= num_nodes:
        return None
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(num_nodes, generator=generator)[:count].sort().values


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dim() != 2 or b.dim() != 2 or a.size(0) != b.size(0):
        raise MergeError(f"alignment needs activations of the same anchor nodes, got shapes "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    if not (np.isfinite(a.detach().numpy()).all() and np.isfinite(b.detach().numpy()).all()):
        raise MergeError("alignment activations contain NaN or inf; check the parents' weights")
