r"""Greedy interpolation souping (GIS).

Jaiswal et al., "Graph Ladling: Shockingly Simple Parallel GNN Training without
Intermediate Communication", ICML 2023 (https://arxiv.org/abs/2306.10466).
Sort the experts by validation score; the soup starts as the best one and, for
each next expert :math:`W_j`, moves to the best point on the segment

.. math::
    S \leftarrow \alpha^* S + (1 - \alpha^*) W_j, \qquad
    \alpha^* = \arg\max_{\alpha \in \mathrm{linspace}(0, 1, G)} \mathrm{val}(\alpha S + (1-\alpha) W_j)

with granularity :math:`G` (20 in the paper). Nominal cost: :math:`n + (n-1) G`
full-graph evaluations. The two endpoints of each segment are already scored
(:math:`\alpha = 1` is the current soup, :math:`\alpha = 0` the expert), so
this implementation evaluates only the :math:`G - 2` inner points: a baseline
is never slowed down. With :math:`G = 2` it reduces to keeping the better of
the soup and the expert. Ties keep the larger :math:`\alpha` (more soup).
"""
from __future__ import annotations

import logging

import torch

from hpcsoup.settings import Setting
from hpcsoup.soup.base import Ingredients, SoupMethod, SoupResult, val_scores

log = logging.getLogger("hpcsoup.soup")


class GISSoup(SoupMethod):
    """Greedy interpolation soup; ``granularity`` = number of alphas in [0, 1] (default 20)."""

    name = "gis"
    parameters = {"granularity": Setting(20, (int,), check=lambda v: v >= 2, hint="must be >= 2",
                                         help="points on each segment, its ends included")}

    def soup(self, ingredients: Ingredients, evaluator, *, seed: int = 0) -> SoupResult:
        grid = int(self.settings["granularity"])
        start = evaluator.evaluations
        scores = val_scores(ingredients, evaluator)
        order = sorted(range(ingredients.n), key=lambda i: -scores[i])
        # the soup is a convex combination of the experts: track its weights
        weights = torch.zeros(ingredients.n, dtype=torch.float64)
        weights[order[0]] = 1.0
        best = scores[order[0]]
        alphas = torch.linspace(1.0, 0.0, grid, dtype=torch.float64).tolist()  # 1 first: ties keep soup
        for j in order[1:]:
            onehot = torch.zeros_like(weights)
            onehot[j] = 1.0
            top_alpha, top = 1.0, best
            for alpha in alphas[1:]:
                if alpha == 0.0:
                    score = scores[j]
                else:
                    score = evaluator.evaluate(ingredients.mix(alpha * weights + (1 - alpha) * onehot),
                                               "val")
                if score > top:
                    top_alpha, top = alpha, score
            weights = top_alpha * weights + (1 - top_alpha) * onehot
            best = top
            log.debug("gis: expert %s (val %.4f): alpha %.3f -> soup val %.4f",
                      ingredients.ids[j], scores[j], top_alpha, best)
        return SoupResult(self.name, ingredients.mix(weights),
                          SoupResult.rows(weights, ingredients.num_tensors),
                          {"evaluations": evaluator.evaluations - start, "val": best,
                           "nominal_evaluations": ingredients.n + (ingredients.n - 1) * grid})
