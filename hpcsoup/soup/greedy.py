r"""Greedy souping: add experts to a running mean while validation does not drop.

Wortsman et al., "Model soups", ICML 2022 (https://arxiv.org/abs/2203.05482),
Recipe 1 (*greedy soup*): sort the experts by validation score
:math:`v_{(1)} \ge v_{(2)} \ge \dots`; start from :math:`S = \{(1)\}` and for
:math:`j = 2..n`

.. math::
    S \leftarrow S \cup \{(j)\} \quad \text{if} \quad
    \mathrm{val}\Big(\tfrac{1}{|S|+1} \sum_{i \in S \cup \{(j)\}} W_i\Big) \ge \mathrm{val}(S)

The soup is the mean of :math:`S`; its validation score is never below the best
expert's. Cost: :math:`n - 1` full-graph evaluations (plus :math:`n` when the
experts' validation scores are not recorded).
"""
from __future__ import annotations

import logging
from typing import Callable

import torch

from hpcsoup.soup.base import Ingredients, SoupMethod, SoupResult, val_scores

log = logging.getLogger("hpcsoup.soup")


def greedy_selection(scores: list[float], score_of: Callable[[list[int]], float],
                     until_drop: bool = False) -> tuple[list[int], float]:
    """Recipe 1's selection: ``(chosen, best)`` from the experts' validation ``scores`` and
    ``score_of(subset)``, the validation score of a candidate soup of ``subset``;
    ``until_drop``: stop at the first expert that would lower it (a prefix of the order)."""
    # stable sort: equal scores keep the ingredients' order (deterministic)
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    chosen, best = [order[0]], scores[order[0]]
    for j in order[1:]:
        score = score_of(chosen + [j])
        kept = score >= best
        log.debug("greedy: expert %d val %.4f -> soup val %.4f (%s, %d in soup)",
                  j, scores[j], score, "kept" if kept else "dropped", len(chosen) + kept)
        if kept:
            chosen.append(j)
            best = score
        elif until_drop:
            break
    return sorted(chosen), best


class GreedySoup(SoupMethod):
    """Greedy soup (no settings)."""

    name = "greedy"

    def soup(self, ingredients: Ingredients, evaluator, *, seed: int = 0) -> SoupResult:
        start = evaluator.evaluations
        chosen, best = greedy_selection(
            val_scores(ingredients, evaluator),
            lambda subset: evaluator.evaluate(ingredients.mean(subset), "val"))
        weights = torch.zeros(ingredients.n, dtype=torch.float64)
        weights[chosen] = 1.0 / len(chosen)
        return SoupResult(self.name, ingredients.mean(chosen),
                          SoupResult.rows(weights, ingredients.num_tensors),
                          {"evaluations": evaluator.evaluations - start, "val": best,
                           "chosen": [ingredients.ids[i] for i in chosen]})
