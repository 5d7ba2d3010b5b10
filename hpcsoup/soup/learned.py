"""Learned souping (LS): gradient descent on per-tensor mixing logits.

Zuber, Sarkar, Jennings, Jannesari, "Enhanced Soups for Graph Neural Networks",
arXiv 2503.11612 (2025), Learned Souping; after Wortsman et al., "Model soups"
(ICML 2022), appendix I (learned soup by layer). With logits
:math:`R \\in \\mathbb{R}^{P \\times n}` (one row per parameter tensor :math:`p`)

.. math::
    W_p(R) = \\sum_{i=1}^{n} \\mathrm{softmax}(R_p)_i \\, W_{i,p}, \\qquad
    R \\leftarrow R - \\eta \\nabla_R \\,
        \\frac{1}{|V_{val}|} \\sum_{v \\in V_{val}} \\mathrm{CE}\\big(f(X, A; W(R))_v, y_v\\big)

on the full graph, the validation nodes being the souping objective (as in the
paper). Only :math:`R` is learned: the experts' tensors enter through
``torch.func.functional_call`` and never get gradients.

Stopping: every ``eval_every`` steps the validation score of the current
logits is checked and the best logits are kept (ties keep the latest); learning
stops after ``patience`` checks without a strict improvement. LS's check is
free: the step's own forward already gives the full-graph logits of the
current :math:`R` (inference mode has no dropout), so it is scored before the
update. When ``steps`` run out, the final logits get one extra evaluation.

Settings (defaults chosen by measurement, see benchmarks/RESULTS.md):
``steps``, ``lr``, ``optimizer`` (``adam`` | ``sgd``; the official code uses
SGD with lr 5-80 and cosine annealing with warm restarts), ``momentum`` (SGD),
``schedule`` (``none`` | ``cosine`` | ``cosine_warm_restarts``), ``restart``
(the warm-restart period in steps), ``init`` (``uniform``: :math:`R = 0`;
``validation``: :math:`R_{p,i} = 100 (v_i - \\max_j v_j)`), ``patience``,
``min_delta`` (the smallest validation gain that counts as an improvement),
``eval_every``. The official code's learnable logit scale is not used: it is
discarded at the end, so the soup returned would differ from the one scored.
"""
from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F

from hpcsoup.errors import SoupError
from hpcsoup.soup.base import Ingredients, SoupMethod, SoupResult

log = logging.getLogger("hpcsoup.soup")

#: settings LS and PLS share, with their defaults
OPTIM_DEFAULTS = {
    "steps": 100,
    "lr": 0.3,
    "optimizer": "adam",
    "momentum": 0.9,
    "schedule": "none",
    "restart": 10,
    "init": "uniform",
    "patience": 5,
    "min_delta": 1e-3,
    "eval_every": 1,
}


def init_logits(ingredients: Ingredients, how: str, val_scores: list[float] | None,
                device: torch.device) -> torch.Tensor:
    """Initial logits ``[P, n]`` (float32, a fresh leaf that requires grad)."""
    shape = (ingredients.num_tensors, ingredients.n)
    if how == "uniform":
        logits = torch.zeros(shape)
    elif how == "validation":
        if val_scores is None:
            raise SoupError("learned souping init='validation' needs the experts' validation "
                            "scores (metrics.val in the store); use init='uniform'")
        v = torch.tensor(val_scores, dtype=torch.float32)
        logits = (100.0 * (v - v.max())).expand(shape).clone()
    else:
        raise SoupError(f"learned souping init={how!r} is unknown; choose 'uniform' or 'validation'")
    return logits.to(device).requires_grad_(True)


def make_optimizer(logits: torch.Tensor, settings: dict):
    """The optimizer and learning-rate schedule over the logits alone."""
    lr = float(settings["lr"])
    if settings["optimizer"] == "adam":
        optimizer = torch.optim.Adam([logits], lr=lr)
    elif settings["optimizer"] == "sgd":
        optimizer = torch.optim.SGD([logits], lr=lr, momentum=float(settings["momentum"]))
    else:
        raise SoupError(f"souping optimizer={settings['optimizer']!r} is unknown; "
                        f"choose 'adam' or 'sgd'")
    schedule = settings["schedule"]
    if schedule == "none":
        scheduler = None
    elif schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer,
                                                               T_max=max(1, settings["steps"]))
    elif schedule == "cosine_warm_restarts":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
            optimizer, T_0=max(1, int(settings["restart"])))
    else:
        raise SoupError(f"souping schedule={schedule!r} is unknown; choose 'none', 'cosine' "
                        f"or 'cosine_warm_restarts'")
    return optimizer, scheduler


class Stopper:
    """Keeps the best logits by validation score; says when to stop.

    ``check(step, score, logits)`` records the score of ``logits``: a score
    ``>=`` the best replaces the kept logits (ties keep the latest, which has the
    lower training loss); a score above the best of the last reset by more than
    ``min_delta`` resets the patience count (so a crawl of one validation node at
    a time on a large graph does not keep learning alive). It returns True after
    ``patience`` checks without such an improvement.
    """

    def __init__(self, patience: int, min_delta: float = 0.0):
        self.patience = int(patience)
        self.min_delta = float(min_delta)
        self.reference = float("-inf")  # the score that last reset the patience count
        self.best = float("-inf")
        self.best_step = -1
        self.best_logits: torch.Tensor | None = None
        self.stale = 0
        self.checks = 0

    def check(self, step: int, score: float, logits: torch.Tensor) -> bool:
        self.checks += 1
        if score != score:  # NaN (e.g. ROC-AUC of one class): never an improvement
            score = float("-inf")
        if score > self.reference + self.min_delta or self.checks == 1:
            self.stale, self.reference = 0, score
        else:
            self.stale += 1
        if score >= self.best or self.best_logits is None:
            self.best, self.best_step = score, step
            self.best_logits = logits.detach().clone()
        return self.stale >= self.patience


class Progress:
    """Logs a method's steps at a sane rate: about 20 lines per run, plus the last."""

    def __init__(self, method: str, steps: int):
        self.method, self.every = method, max(1, steps // 20)
        self.start = time.perf_counter()

    def step(self, step: int, loss: float, score: float | None, best: float, force=False):
        if force or step % self.every == 0:
            shown = "-" if score is None else f"{score:.4f}"
            log.info("%s: step %d loss %.4f val %s best %.4f (%.1fs)", self.method, step, loss,
                     shown, best, time.perf_counter() - self.start)


class LearnedSoup(SoupMethod):
    """Learned souping (LS) on the full graph; see the module docstring."""

    name = "learned"
    defaults = dict(OPTIM_DEFAULTS)

    def soup(self, ingredients: Ingredients, evaluator, *, seed: int = 0) -> SoupResult:
        s = self.settings
        steps, every = int(s["steps"]), int(s["eval_every"])
        start_evals = evaluator.evaluations
        logits = init_logits(ingredients, s["init"], ingredients.val_scores, evaluator.device)
        optimizer, scheduler = make_optimizer(logits, s)
        stopper = Stopper(s["patience"], s["min_delta"])
        progress = Progress(self.name, steps)
        val = evaluator.masks["val"]
        y_val = evaluator.y[val]
        updates, loss_value = 0, float("nan")
        stopped = False
        for step in range(steps):
            out = evaluator.forward(ingredients.mix(logits.softmax(-1)))
            loss = F.cross_entropy(out[val], y_val)
            loss_value = float(loss.detach())
            score = None
            if step % every == 0:
                score = evaluator.score(out.detach(), "val")
                if stopper.check(step, score, logits):
                    progress.step(step, loss_value, score, stopper.best, force=True)
                    stopped = True
                    break
            progress.step(step, loss_value, score, stopper.best)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            updates += 1
        if not stopped:  # the last update's logits have not been scored yet
            stopper.check(steps, evaluator.evaluate(ingredients.mix(logits.detach().softmax(-1))),
                          logits)
            progress.step(steps, loss_value, stopper.best, stopper.best, force=True)
        weights = stopper.best_logits.softmax(-1)
        return SoupResult(self.name, ingredients.mix(weights),
                          SoupResult.rows(weights, ingredients.num_tensors),
                          {"steps": updates, "forwards": updates + stopped,
                           "checks": stopper.checks, "best_step": stopper.best_step,
                           "val": stopper.best, "stopped_early": stopped,
                           "evaluations": evaluator.evaluations - start_evals,
                           "logits": stopper.best_logits.cpu().tolist()})
