r"""Uniform souping: the arithmetic mean of all experts.

.. math::
    W_p = \frac{1}{n} \sum_{i=1}^{n} W_{i,p}

"Model soups: averaging weights of multiple fine-tuned models improves accuracy
without increasing inference time", Wortsman et al., ICML 2022
(https://arxiv.org/abs/2203.05482), the *uniform soup*. No evaluation at all.
"""
from __future__ import annotations

import torch

from hpcsoup.soup.base import Ingredients, SoupMethod, SoupResult


class UniformSoup(SoupMethod):
    """Mean of all experts (no settings, no evaluation)."""

    name = "uniform"

    def soup(self, ingredients: Ingredients, evaluator=None, *, seed: int = 0) -> SoupResult:
        weights = torch.full((ingredients.n,), 1.0 / ingredients.n, dtype=torch.float64)
        return SoupResult(self.name, ingredients.mean(),
                          SoupResult.rows(weights, ingredients.num_tensors),
                          {"evaluations": 0})
