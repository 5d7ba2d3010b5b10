"""Learned souping (LS): gradient descent on per-tensor mixing logits.

Zuber, Sarkar, Jennings, Jannesari, "Enhanced Soups for Graph Neural Networks",
arXiv 2503.11612 (2025), Learned Souping; after Wortsman et al., "Model soups"
(ICML 2022), appendix I (learned soup by layer). With logits
:math:`R \\in \\mathbb{R}^{P \\times n}` (one row per parameter tensor :math:`p`)

.. math::
    W_p(R) = \\sum_{i=1}^{n} \\mathrm{softmax}(R_p)_i \\, W_{i,p}, \\qquad
    R \\leftarrow R - \\eta \\nabla_R \\,
        \\frac{1}{|V_{val}|} \\sum_{v \\in V_{val}} \\ell\\big(f(X, A; W(R))_v, y_v\\big)

on the full graph, the validation nodes being the souping objective (as in the
paper), computed on the validation nodes' receptive field
(:meth:`hpcsoup.soup.evaluate.Evaluator.val_logits`: the same loss and gradient).
Only :math:`R` is learned: the experts' tensors enter through
``torch.func.functional_call`` and never get gradients.

The start (``init``, default ``greedy``): the greedy soup (:mod:`hpcsoup.soup.greedy`,
:math:`n-1` evaluations) with the other experts at a logit gap of :data:`GREEDY_GAP`.
Measured on Cora, CiteSeer and Tolokers (benchmarks/RESULTS.md, ``## soup``): from the
uniform start LS ended 0.25-0.53 points of validation below GIS on Cora and Tolokers;
from the greedy start (lr 0.1, at most 14 steps) it is within 0.2 points on all three,
in fewer steps.

The objective :math:`\\ell` (``objective``): cross-entropy (``ce``), or for binary
datasets scored by ROC-AUC a pairwise logistic surrogate of the AUC (``auc``,
Herschtal & Raskutti, ICML 2004):
:math:`\\frac{1}{|P||N|} \\sum_{i \\in P, j \\in N} \\log(1 + e^{-(s_i - s_j)})` with
:math:`s = z_1 - z_0` the logit margin, :math:`P` / :math:`N` the positive / negative
validation nodes. ``auto`` picks ``auc`` for ROC-AUC datasets, ``ce`` otherwise
(measured: benchmarks/RESULTS.md, ``## soup``).

Stopping and selection (:class:`Stopper`): every ``eval_every`` steps the current
logits are checked. The **kept** logits are those with the best validation
*metric* (ties: the lower validation loss); learning **stops** when the
validation *loss* has not fallen by a relative ``min_delta`` for ``patience``
checks, and never before ``min_steps`` steps. Stopping on the metric instead
stopped LS on its uniform start while the loss still fell (accuracy moves in
steps of one node and dips before it rises). LS's check is free: the step's own
forward gives the validation logits of the current :math:`R` (no dropout in
inference mode), so they are scored before the update. A soup that ends on its
start says so (``extras["moved"]``).

The official code's learnable logit scale is not used: it is discarded at the
end, so the soup returned would differ from the one scored.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn.functional as F

from hpcsoup.errors import SoupError
from hpcsoup.progress import Progress
from hpcsoup.settings import Setting, nonnegative, positive
from hpcsoup.soup.base import Ingredients, SoupMethod, SoupResult
from hpcsoup.soup.greedy import greedy_selection

log = logging.getLogger("hpcsoup.soup")

OBJECTIVES = ("auto", "ce", "auc")
INITS = ("uniform", "validation", "greedy", "greedy_prefix")
#: the starts chosen by checks of greedy candidates (:func:`greedy_start`)
GREEDY_INITS = ("greedy", "greedy_prefix")

#: the settings LS declares (PLS declares them too, with its own defaults)
OPTIM_SETTINGS = {
    "steps": Setting(14, (int,), **positive(), help="the most optimizer steps"),
    "lr": Setting(0.1, (float,), **positive(),
                  help="learning rate (Adam: 0.1 from the greedy start, 0.3 from uniform; "
                       "SGD needs 5-80)"),
    "optimizer": Setting("adam", (str,), choices=("adam", "sgd"), help="optimizer of the logits"),
    "momentum": Setting(0.9, (float,), **nonnegative(), help="SGD momentum"),
    "schedule": Setting("none", (str,), choices=("none", "cosine", "cosine_warm_restarts"),
                        help="learning-rate schedule"),
    "restart": Setting(10, (int,), **positive(), help="steps per cosine_warm_restarts period"),
    "init": Setting("greedy", (str,), choices=INITS,
                    help="start: equal weights, weights from the experts' validation scores, "
                         "the greedy soup (n - 1 evaluations) or greedy_prefix: the greedy "
                         "soup's order up to the first expert that lowers validation"),
    "objective": Setting("auto", (str,), choices=OBJECTIVES,
                         help="loss on the validation nodes: ce, auc (ROC-AUC surrogate) or "
                              "auto (auc for ROC-AUC datasets)"),
    "patience": Setting(10, (int,), **positive(),
                        help="checks without a fall of the validation loss before stopping"),
    "min_delta": Setting(1e-3, (float,), **nonnegative(),
                         help="relative fall of the validation loss that counts as progress"),
    "min_steps": Setting(10, (int,), **nonnegative(), help="steps before stopping is allowed"),
    "eval_every": Setting(1, (int,), **positive(), help="steps between validation checks"),
}


def resolve_objective(objective: str, metric: str) -> str:
    """``ce`` or ``auc`` for a dataset scored by ``metric`` (``auto``: auc for ROC-AUC)."""
    if objective not in OBJECTIVES:
        raise SoupError(f"souping objective={objective!r} is unknown; choose from {list(OBJECTIVES)}")
    if objective == "auto":
        return "auc" if metric == "rocauc" else "ce"
    return objective


def validation_loss(out: torch.Tensor, y: torch.Tensor, objective: str,
                    reduction: str = "mean") -> torch.Tensor:
    """The souping loss of logits ``out`` against labels ``y`` (validation nodes only).

    ``reduction="sum"`` returns the sum of the terms (CE: one per node; AUC: one per
    positive/negative pair), for objectives that are sums of per-partition terms.
    """
    if objective == "ce":
        return F.cross_entropy(out, y, reduction=reduction)
    margin = out[:, 1] - out[:, 0]
    pos, neg = margin[y == 1], margin[y == 0]
    terms = F.softplus(neg.unsqueeze(0) - pos.unsqueeze(1))
    if reduction == "sum":
        return terms.sum()
    return terms.mean() if terms.numel() else out.sum() * 0


def loss_terms(y: torch.Tensor, objective: str) -> int:
    """How many terms :func:`validation_loss` sums for labels ``y`` (its normaliser)."""
    if objective == "ce":
        return int(y.numel())
    positives = int((y == 1).sum())
    return positives * (int(y.numel()) - positives)


#: logit gap between the greedy soup's experts and the others at ``init = "greedy"``: the
#: others then weigh e^-8 (3e-4) each, so the start is the greedy soup to float rounding
GREEDY_GAP = 8.0


def init_logits(ingredients: Ingredients, how: str, val_scores: list[float] | None,
                device: torch.device, evaluator=None) -> torch.Tensor:
    """Initial logits ``[P, n]`` (float32, a fresh leaf that requires grad).

    ``uniform``: zeros; ``validation``: :math:`100 (v_i - \\max_j v_j)` from the experts'
    validation scores; ``greedy``: the greedy soup's experts (:mod:`hpcsoup.soup.greedy`,
    ``n - 1`` evaluations on ``evaluator``) at 0, the others at ``-GREEDY_GAP``.
    """
    shape = (ingredients.num_tensors, ingredients.n)
    if how == "uniform":
        logits = torch.zeros(shape)
    elif how in GREEDY_INITS:
        if evaluator is None or evaluator.graph is None:
            raise SoupError(f"learned souping init={how!r} needs the full graph to choose the "
                            f"start's experts; use init='uniform' or 'validation'")
        logits, _ = greedy_start(ingredients, lambda params: (evaluator.evaluate(params), None),
                                 until_drop=how == "greedy_prefix")
    elif how == "validation":
        if val_scores is None:
            raise SoupError("learned souping init='validation' needs the experts' validation "
                            "scores (metrics.val in the store); use init='uniform'")
        v = torch.tensor(val_scores, dtype=torch.float32)
        logits = (100.0 * (v - v.max())).expand(shape).clone()
    else:
        raise SoupError(f"learned souping init={how!r} is unknown; choose from {list(INITS)}")
    return logits.to(device).requires_grad_(True)


def greedy_start(ingredients: Ingredients, check: Callable[[dict], tuple],
                 until_drop: bool = False) -> tuple[torch.Tensor, tuple | None]:
    """``(logits, start_check)``: the ``[P, n]`` logits of the greedy soup (its experts at 0,
    the others at ``-GREEDY_GAP``) and ``check``'s result on exactly them, when made.
    ``until_drop``: greedy's order up to the first expert that lowers the score (PLS's
    default: 1 check instead of ``n - 1`` where the best expert is best alone).

    ``check(params) -> (score, loss)`` scores a soup on validation (LS: an evaluation; PLS:
    its check, which MPI ranks make collectively without the graph). The candidates are
    scored as these logits mix them (the others at e^-8 each), not as plain means, so the
    kept candidate's check is the start's own: PLS, whose checks are whole evaluations,
    starts without one more (``None`` when greedy kept the best expert alone, which it did
    not evaluate).
    """
    def logits_of(subset):
        chosen = torch.zeros(ingredients.n, dtype=torch.bool)
        chosen[list(subset)] = True
        return torch.where(chosen, 0.0, -GREEDY_GAP).float().expand(
            ingredients.num_tensors, ingredients.n).clone()

    checks = {}

    def score_of(subset):
        key = tuple(sorted(subset))
        checks[key] = check(ingredients.mix(logits_of(subset).softmax(-1)))
        return checks[key][0]

    scores = ingredients.val_scores
    if scores is None:  # not recorded: one check per expert
        scores = [check(ingredients.expert(i))[0] for i in range(ingredients.n)]
    chosen, _ = greedy_selection(list(scores), score_of, until_drop=until_drop)
    return logits_of(chosen), checks.get(tuple(chosen))


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
    """Keeps the logits with the best validation metric; stops when the loss stops falling.

    ``check(step, score, loss, logits)`` records one check of ``logits``:

    - **selection**: a higher ``score`` (ties: a lower ``loss``) replaces the kept logits;
    - **stopping**: a ``loss`` below ``(1 - min_delta)`` times the lowest loss so far resets
      the patience count, any other check adds one; it returns True once ``patience``
      checks in a row brought no such fall and ``step >= min_steps``.
    """

    def __init__(self, patience: int, min_delta: float = 0.0, min_steps: int = 0):
        self.patience, self.min_delta = int(patience), float(min_delta)
        self.min_steps = int(min_steps)
        self.best = float("-inf")
        self.best_loss = float("inf")      # the loss of the kept logits
        self.lowest_loss = float("inf")    # the lowest loss seen (the stopping reference)
        self.best_step = -1
        self.best_logits: torch.Tensor | None = None
        self.stale = 0
        self.checks = 0

    def check(self, step: int, score: float, loss: float, logits: torch.Tensor) -> bool:
        self.checks += 1
        if score != score:  # NaN (e.g. ROC-AUC of one class): never an improvement
            score = float("-inf")
        if self.best_logits is None or score > self.best or (score == self.best
                                                             and loss < self.best_loss):
            self.best, self.best_loss, self.best_step = score, loss, step
            self.best_logits = logits.detach().clone()
        if loss < self.lowest_loss * (1.0 - self.min_delta) or self.checks == 1:
            self.stale = 0
        else:
            self.stale += 1
        self.lowest_loss = min(self.lowest_loss, loss)
        return self.stale >= self.patience and step >= self.min_steps


class StepProgress:
    """A learned method's steps: a :class:`~hpcsoup.progress.Progress` line or bar (count, ETA,
    best check) for people, each step's loss and check as DEBUG detail (``-v``)."""

    def __init__(self, method: str, steps: int, show: bool = True):
        self.method = method
        self.bar = Progress(f"soup {method}", total=steps, unit="steps", show=show)

    def step(self, step: int, loss: float, score: float | None, best: float) -> None:
        log.debug("%s: step %d loss %.4f val %s best %.4f", self.method, step, loss,
                  "-" if score is None else f"{score:.4f}", best)
        self.bar.update(postfix=f"best val {best:.3f}")

    def close(self) -> None:
        self.bar.close()


def learned_result(method: str, ingredients: Ingredients, stopper: Stopper,
                   start: torch.Tensor, extras: dict, say: bool = True) -> SoupResult:
    """The soup of the kept logits, with what every learned method reports.

    ``extras["moved"]``: whether the kept logits left their start (False: the soup
    *is* its start, e.g. the uniform soup, and the log says so unless ``say`` is False:
    the MPI ranks other than 0, which reach the same soup).
    """
    weights = stopper.best_logits.softmax(-1)
    shift = float((weights - start.softmax(-1)).abs().max())
    moved = shift > 1e-6
    if not moved and say:
        log.warning("%s did not move: the soup is its start (%s); nothing in %d checks beat it",
                    method, extras.get("init", "uniform" if bool((start == 0).all()) else "set"),
                    stopper.checks)
    uniform_shift = float((weights - 1.0 / ingredients.n).abs().max())
    return SoupResult(method, ingredients.mix(weights),
                      SoupResult.rows(weights, ingredients.num_tensors),
                      {**extras, "checks": stopper.checks, "best_step": stopper.best_step,
                       "check_val": stopper.best, "check_loss": stopper.best_loss,
                       "moved": moved, "shift_from_start": shift,
                       "shift_from_uniform": uniform_shift,
                       "logits": stopper.best_logits.cpu().tolist()})


class LearnedSoup(SoupMethod):
    """Learned souping (LS) on the full graph; see the module docstring."""

    name = "learned"
    parameters = OPTIM_SETTINGS

    def soup(self, ingredients: Ingredients, evaluator, *, seed: int = 0) -> SoupResult:
        s = self.settings
        steps, every = int(s["steps"]), int(s["eval_every"])
        objective = resolve_objective(s["objective"], evaluator.metric)
        start_evals = evaluator.evaluations
        logits = init_logits(ingredients, s["init"], ingredients.val_scores, evaluator.device,
                             evaluator)
        start = logits.detach().clone()
        optimizer, scheduler = make_optimizer(logits, s)
        stopper = Stopper(s["patience"], s["min_delta"], s["min_steps"])
        progress = StepProgress(self.name, steps, show=self.show_progress)
        y_val = evaluator.y[evaluator.masks["val"]]
        updates, loss_value, stopped = 0, float("nan"), False
        for step in range(steps + 1):
            # the last pass only checks the final update's logits
            with torch.set_grad_enabled(step < steps):
                out = evaluator.val_logits(ingredients.mix(logits.softmax(-1)))
                loss = validation_loss(out, y_val, objective)
            loss_value = float(loss.detach())
            score = None
            if step % every == 0 or step == steps:
                score = evaluator.score_val(out.detach())
                if stopper.check(step, score, loss_value, logits):
                    stopped = step < steps
                    break
            if step == steps:
                break
            progress.step(step, loss_value, score, stopper.best)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            updates += 1
        progress.close()
        return learned_result(self.name, ingredients, stopper, start, {
            "init": s["init"], "steps": updates, "forwards": updates + 1, "stopped_early": stopped,
            "objective": objective, "evaluations": evaluator.evaluations - start_evals})
