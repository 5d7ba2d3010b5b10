"""Each dataset's standard score.

- ``accuracy``: Planetoid and OGB node sets, computed with ogb's ``Evaluator``
  for ``ogbn-*`` (identical arithmetic for the others).
- ``rocauc``: binary, imbalanced sets (Minesweeper, Tolokers), as in Platonov et
  al., "A critical look at the evaluation of GNNs under heterophily", ICLR 2023:
  ROC-AUC of the positive-class probability.
"""
from __future__ import annotations

import torch

from hpcsoup.errors import DatasetError

METRICS = ("accuracy", "rocauc")


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    if y.numel() == 0:
        return float("nan")
    return (logits.argmax(-1) == y).float().mean().item()


def rocauc(logits: torch.Tensor, y: torch.Tensor) -> float:
    """ROC-AUC of the positive-class probability ``softmax(logits)[:, 1]`` (scikit-learn)."""
    y = y.view(-1)
    if y.numel() == 0 or bool((y == y[0]).all()):
        return float("nan")
    # imported here: scikit-learn costs ~1-2 s of every process's start-up, and only rocauc sets need it
    from sklearn.metrics import roc_auc_score

    positive = logits.float().softmax(-1)[:, 1] if logits.dim() == 2 else logits.float()
    return float(roc_auc_score(y.cpu().numpy(), positive.detach().cpu().numpy()))


def score(metric: str, logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """The dataset's standard score of ``logits`` against ``y`` on the nodes in ``mask``."""
    if mask is not None:
        logits, y = logits[mask], y[mask]
    if metric == "accuracy":
        return accuracy(logits, y)
    if metric == "rocauc":
        return rocauc(logits, y)
    raise DatasetError(f"unknown metric {metric!r}; choose from {list(METRICS)}")
