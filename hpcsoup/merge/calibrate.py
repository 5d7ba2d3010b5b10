"""Label-free calibration: match the child's activation statistics to its parents', in the weights.

Deep Graph Mating (Jing et al., 2024) and H-GRAMA's LFNorm (arXiv 2602.19332) correct the drift of
message statistics that merging causes, without labels or training. Where the child's stream mixes
parents (rows next to another parent's region, or soft gates), parent ``j``'s pre-activation
:math:`Z^{child}_j` drifts from what parent ``j`` computes alone, :math:`Z_j`. Per channel ``c``,
over the rows the gate sends to ``j`` (weighted by the gate):

.. math::
    s_c = \\frac{\\sigma_c(Z_j)}{\\sigma_c(Z^{child}_j)}, \\qquad
    t_c = \\mu_c(Z_j) - s_c\\, \\mu_c(Z^{child}_j), \\qquad Z' = s \\odot Z^{child}_j + t,

and the affine map is folded into the layer: the projection columns are scaled by ``s`` (every
source matrix :math:`M_{kj}`), the bias becomes :math:`s \\odot b + t`, and GAT's attention
vectors are divided by ``s`` so the attention logits, computed from the projection, are unchanged.
Rows where the child is already exact give ``s = 1, t = 0``.
"""
from __future__ import annotations

import torch

from hpcsoup.merge.umpm import UMPMLayer


def weighted_stats(z: torch.Tensor, weights: torch.Tensor | None = None):
    """Per-channel mean and standard deviation of ``z`` ``[n, c]`` (rows weighted)."""
    if weights is None:
        weights = torch.ones(z.size(0), 1)
    w = weights.view(-1, 1).double()
    total = w.sum().clamp_min(1e-12)
    zd = z.double()
    mean = (zd * w).sum(0) / total
    var = (((zd - mean) ** 2) * w).sum(0) / total
    return mean, var.clamp_min(0).sqrt()


def affine_match(child: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None,
                 max_scale: float = 10.0):
    """``(s, t)`` with ``s * child + t`` matching ``target``'s per-channel mean and std.

    Channels where either side is (nearly) constant are only shifted (``s = 1``); ``s`` is clipped
    to ``[1/max_scale, max_scale]`` so a near-dead channel cannot blow up.
    """
    mu_c, sd_c = weighted_stats(child, weights)
    mu_t, sd_t = weighted_stats(target, weights)
    ok = (sd_c > 1e-6) & (sd_t > 1e-6)
    scale = torch.where(ok, sd_t / sd_c.clamp_min(1e-12), torch.ones_like(sd_c))
    scale = scale.clamp(1.0 / max_scale, max_scale)
    shift = mu_t - scale * mu_c
    return scale.float(), shift.float()


def fold(layer: UMPMLayer, sources: list[torch.Tensor], scale: torch.Tensor,
         shift: torch.Tensor) -> tuple[UMPMLayer, list[torch.Tensor]]:
    """Fold ``Z' = scale * Z + shift`` into a layer and its per-source projection matrices."""
    cols = scale
    if layer.prop == "gat":
        heads = layer.heads
        if not layer.concat and heads > 1:
            return layer, sources  # a head-mean output has no per-head channel to scale
        proj_scale = scale if layer.concat else scale.repeat(heads)
        c = layer.proj_dim // heads
        per_head = proj_scale.view(heads, c)
        layer = layer.replace(att_src=layer.att_src / per_head, att_dst=layer.att_dst / per_head)
        cols = proj_scale
    elif layer.has_self:
        cols = torch.cat([scale, scale])
    sources = [m * cols for m in sources]
    layer = layer.replace(bias=layer.bias * scale + shift,
                          weight=layer.weight * cols)
    return layer, sources
