"""The interface every souping method shares: ingredients in, one soup out.

A *soup* of experts :math:`w_1, \\dots, w_n` (one architecture, one shared
initialisation) mixes them tensor by tensor,

.. math::
    W_p = \\sum_{i=1}^{n} c_{p,i}\\, W_{i,p}, \\qquad \\sum_i c_{p,i} = 1,

where :math:`p` runs over the parameter tensors of the state_dict. Methods
differ only in how they choose the coefficients :math:`c` (one row per tensor):
uniform, greedy and GIS use one row for every tensor, learned (LS) and
partition learned souping (PLS) learn one row per tensor.

- :class:`Ingredients`: expert ids, their :class:`~hpcsoup.models.ModelSpec`,
  their stacked tensors ``{name: Tensor[n, *shape]}`` and validation scores;
- :class:`SoupResult`: the soup's state_dict, its coefficients ``[P][n]`` as
  nested lists, the method name and extras (steps, evaluations, ...);
- :class:`SoupMethod`: a method declares ``name`` and ``parameters`` (its
  settings) and implements ``soup(ingredients, evaluator, seed=...)``.
"""
from __future__ import annotations

import abc
import dataclasses
import logging
from typing import Any, ClassVar, Iterable, Sequence

import torch

from hpcsoup.errors import ConfigError, SoupError
from hpcsoup.models import ModelSpec
from hpcsoup.settings import Setting

log = logging.getLogger("hpcsoup.soup")

MERGE_HINT = ("souping mixes tensors of one architecture and one shape; to combine different "
              "architectures use `hpcsoup merge` (H-GRAMA)")


@dataclasses.dataclass
class Ingredients:
    """Experts to soup: ``params[name]`` stacks the ``n`` experts' tensors on dim 0.

    Args:
        spec: the experts' common model spec.
        params: ``{name: Tensor[n, *shape]}`` in state_dict order (floating point).
        ids: one id per expert (default: ``"0" .. "n-1"``).
        val_scores: each expert's validation score with the dataset's metric, or
            ``None`` (methods that sort by it then evaluate the experts themselves).
    """

    spec: ModelSpec
    params: dict[str, torch.Tensor]
    ids: list[str]
    val_scores: list[float] | None = None

    def __post_init__(self):
        counts = {t.size(0) for t in self.params.values()}
        if len(counts) != 1:
            raise SoupError(f"ingredients: stacked tensors disagree on the expert count {counts}")
        if len(self.ids) != self.n:
            raise SoupError(f"ingredients: {len(self.ids)} ids for {self.n} experts")
        if self.val_scores is not None and len(self.val_scores) != self.n:
            raise SoupError(f"ingredients: {len(self.val_scores)} val scores for {self.n} experts")

    @property
    def n(self) -> int:
        return next(iter(self.params.values())).size(0)

    @property
    def names(self) -> list[str]:
        return list(self.params)

    @property
    def num_tensors(self) -> int:
        return len(self.params)

    def to(self, device: str | torch.device) -> "Ingredients":
        return dataclasses.replace(self, params={k: v.to(device) for k, v in self.params.items()})

    def expert(self, i: int) -> dict[str, torch.Tensor]:
        """Expert ``i``'s own state_dict."""
        return {k: v[i] for k, v in self.params.items()}

    def mean(self, subset: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        """Arithmetic mean of the experts (or of ``subset``), tensor by tensor."""
        if subset is None:
            return {k: v.mean(0) for k, v in self.params.items()}
        index = torch.as_tensor(list(subset), dtype=torch.long, device=self.device)
        return {k: v.index_select(0, index).mean(0) for k, v in self.params.items()}

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    def mix(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{name: sum_i weights[p, i] * W_{i,p}}``; differentiable in ``weights``.

        ``weights`` is ``[P, n]`` (one row per tensor, in :attr:`names` order) or
        ``[n]`` (the same row for every tensor).
        """
        if weights.dim() == 1:
            weights = weights.expand(self.num_tensors, -1)
        if tuple(weights.shape) != (self.num_tensors, self.n):
            raise SoupError(f"mixing weights of shape {tuple(weights.shape)}: expected "
                            f"({self.num_tensors}, {self.n}) = (tensors, experts)")
        first = next(iter(self.params.values()))
        weights = weights.to(device=first.device, dtype=first.dtype)
        return {name: torch.tensordot(weights[p], stack, dims=1)
                for p, (name, stack) in enumerate(self.params.items())}

    @classmethod
    def from_state_dicts(cls, spec: ModelSpec, state_dicts: Sequence[dict],
                         ids: Sequence[str] | None = None,
                         val_scores: Sequence[float] | None = None) -> "Ingredients":
        """Stack experts given as state_dicts of one architecture and shape."""
        if not state_dicts:
            raise SoupError("no experts to soup: train some first (`hpcsoup train`)")
        ids = [str(i) for i in (ids if ids is not None else range(len(state_dicts)))]
        first = state_dicts[0]
        for expert_id, sd in zip(ids, state_dicts):
            if list(sd) != list(first):
                missing = sorted(set(first) ^ set(sd))
                raise SoupError(f"expert '{expert_id}' has tensors {missing[:4]} that expert "
                                f"'{ids[0]}' does not (or vice versa); {MERGE_HINT}")
            for name, tensor in sd.items():
                if tensor.shape != first[name].shape:
                    raise SoupError(f"expert '{expert_id}' tensor '{name}' has shape "
                                    f"{tuple(tensor.shape)}, expert '{ids[0]}' has "
                                    f"{tuple(first[name].shape)}; {MERGE_HINT}")
        for name, tensor in first.items():
            if not tensor.is_floating_point():
                raise SoupError(f"tensor '{name}' has dtype {tensor.dtype}; only floating-point "
                                f"tensors can be souped")
        params = {name: torch.stack([sd[name].detach() for sd in state_dicts])
                  for name in first}
        return cls(spec, params, ids, list(map(float, val_scores)) if val_scores is not None
                   else None)

    @classmethod
    def from_store(cls, store, infos: Iterable) -> "Ingredients":
        """Load complete expert groups (``GroupInfo``\\ s of ``store.groups("experts")``).

        Every expert must have the same ``attrs['model']`` (architecture and shape)
        and the same ``init_id``; otherwise :class:`SoupError` points to ``hpcsoup merge``.
        """
        infos = list(infos)
        if not infos:
            raise SoupError("no complete experts to soup in the store: train some first "
                            "(`hpcsoup train --all`)")
        first = infos[0]
        spec = ModelSpec.from_dict(first.attrs["model"])
        for info in infos[1:]:
            other = ModelSpec.from_dict(info.attrs["model"])
            if other.arch != spec.arch:
                raise SoupError(f"expert '{info.id}' is {other.arch!r} but expert '{first.id}' is "
                                f"{spec.arch!r}; {MERGE_HINT}")
            if other != spec:
                raise SoupError(f"expert '{info.id}' has model {other.to_dict()} but expert "
                                f"'{first.id}' has {spec.to_dict()}; {MERGE_HINT}")
        inits = {info.attrs.get("init_id") for info in infos}
        if len(inits) > 1:
            raise SoupError(f"experts come from different initialisations {sorted(map(str, inits))}; "
                            f"souping needs one shared init (train them with one experts.init_seed)")
        state_dicts, vals = [], []
        for info in infos:
            sd, attrs = store.load_group("experts", info.id)
            state_dicts.append(sd)
            vals.append((attrs.get("metrics") or {}).get("val"))
        val_scores = vals if all(v is not None for v in vals) else None
        return cls.from_state_dicts(spec, state_dicts, [i.id for i in infos], val_scores)


@dataclasses.dataclass
class SoupResult:
    """One soup: its weights, the coefficients that made it, and how it was found.

    ``coefficients[p][i]`` is expert ``i``'s weight in tensor ``p`` (state_dict
    order); every row sums to 1. ``extras`` holds method facts such as ``steps``,
    ``evaluations`` (full-graph inference forwards) or ``best_step``.
    """

    method: str
    state_dict: dict[str, torch.Tensor]
    coefficients: list[list[float]]
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)

    @staticmethod
    def rows(weights: torch.Tensor, num_tensors: int) -> list[list[float]]:
        """Coefficients ``[P][n]`` as nested lists from a ``[P, n]`` or ``[n]`` tensor."""
        weights = weights.detach().cpu().double()
        if weights.dim() == 1:
            weights = weights.expand(num_tensors, -1)
        return weights.tolist()


class SoupMethod(abc.ABC):
    """A souping method: ``name``, ``parameters`` (its declared settings) and :meth:`soup`.

    ``parameters`` maps each setting to a :class:`~hpcsoup.settings.Setting` (default,
    type, choices, help): declared once here, they are also the ``[soup.<name>]``
    section of an experiment file. ``SoupMethod(**settings)`` validates the given
    settings over the defaults; an unknown or bad one raises :class:`SoupError`.
    """

    name: ClassVar[str]
    parameters: ClassVar[dict[str, Setting]] = {}
    #: whether this process shows the method's progress (False on MPI ranks other than 0)
    show_progress: bool = True

    def __init__(self, **settings: Any):
        unknown = sorted(set(settings) - set(self.parameters))
        if unknown:
            raise SoupError(f"souping method '{self.name}' has no setting {unknown[0]!r}; "
                            f"valid settings: {sorted(self.parameters) or 'none'}")
        checked = {}
        for key, value in settings.items():
            try:
                checked[key] = self.parameters[key].validate(f"soup.{self.name}.{key}", value)
            except ConfigError as exc:
                raise SoupError(str(exc).replace("config key", "setting", 1)) from None
        self.settings = {**self.defaults(), **checked}

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {key: setting.default for key, setting in cls.parameters.items()}

    @abc.abstractmethod
    def soup(self, ingredients: Ingredients, evaluator, *, seed: int = 0) -> SoupResult:
        """Soup ``ingredients``; ``evaluator`` (:class:`~hpcsoup.soup.evaluate.Evaluator`)
        holds the graph and runs every forward."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.settings})"


def val_scores(ingredients: Ingredients, evaluator) -> list[float]:
    """The experts' validation scores: the recorded ones, else one evaluation each."""
    if ingredients.val_scores is not None:
        return list(ingredients.val_scores)
    return [evaluator.evaluate(ingredients.expert(i), "val") for i in range(ingredients.n)]
