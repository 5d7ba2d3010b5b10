"""The expert sweep of a config: which expert each SLURM array task trains.

Task ids ``0 .. experts.count-1`` are same-architecture **experts** (soup
ingredients): expert ``i`` is ``<arch>-e<iii>``, trains on every training node
with seed ``experts.seed + i`` and the per-expert hyper-parameters of
``[experts.sweep]`` (lists cycled by ``i``), all from **one shared
initialisation** (model-soup practice: ingredients must share their init to lie
in one basin; Wortsman et al., ICML 2022; the learned-souping code of Zuber et
al. 2025 trains every ingredient from one saved initial model).

The next ``len(specialists.archs)`` task ids are **specialists** (H-GRAMA
parents): specialist ``k`` is ``<arch>-s<k>`` and trains only on the training
nodes of region ``k`` of a ``specialists.split`` assignment
(:func:`hpcsoup.train.regions.specialist_regions`), with seed
``specialists.seed + k``.

An init is identified by what fixes its weights: the architecture, the layer
shapes (in/out channels, layers, hidden, heads) and the init seed — not the
dropout, which changes no weight, so a dropout sweep still shares one init.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging

from hpcsoup.errors import ConfigError, ExpertsMissingError
from hpcsoup.models import ModelSpec

log = logging.getLogger(__name__)

ROLES = ("expert", "specialist")


@dataclasses.dataclass(frozen=True)
class Task:
    """One array task: one expert to train."""

    task_id: int
    expert_id: str
    role: str                 # "expert" (soup ingredient) | "specialist" (merge parent)
    arch: str
    layers: int
    hidden: int
    heads: int
    dropout: float
    epochs: int
    lr: float
    weight_decay: float
    seed: int                 # data order, dropout, mini-batches
    init_seed: int            # the shared initialisation
    split: str = "all"        # "all" | "metis" | "random" | "class"
    region: int | None = None
    parents: int | None = None
    region_seed: int | None = None

    def model_spec(self, in_channels: int, out_channels: int) -> ModelSpec:
        return ModelSpec(self.arch, in_channels, out_channels, layers=self.layers,
                         hidden=self.hidden, heads=self.heads, dropout=self.dropout)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def init_id(spec: ModelSpec, init_seed: int) -> str:
    """``<arch>-<10 hex>``: a short hash of the weight-defining fields of ``spec`` and the seed."""
    fields = {k: v for k, v in spec.to_dict().items() if k != "dropout"}
    if spec.arch != "gat":
        fields.pop("heads")  # heads change only GAT's weights
    text = json.dumps({"model": fields, "init_seed": init_seed}, sort_keys=True)
    return f"{spec.arch}-{hashlib.sha1(text.encode()).hexdigest()[:10]}"


def _cycled(values: list, i: int, default, key: str):
    if not values:
        return default
    value = values[i % len(values)]
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ConfigError(f"config key 'experts.sweep.{key}' holds {value!r}; expected numbers, "
                          f"e.g. [0.01, 0.005]")
    return float(value)


def tasks(cfg) -> list[Task]:
    """Every task of the config's sweep, in task-id order."""
    e, s = cfg.experts, cfg.specialists
    out = []
    for i in range(e.count):
        out.append(Task(
            task_id=i, expert_id=f"{e.arch}-e{i:03d}", role="expert", arch=e.arch,
            layers=e.layers, hidden=e.hidden, heads=e.heads,
            dropout=_cycled(e.sweep.dropout, i, e.dropout, "dropout"), epochs=e.epochs,
            lr=_cycled(e.sweep.lr, i, e.lr, "lr"),
            weight_decay=_cycled(e.sweep.weight_decay, i, e.weight_decay, "weight_decay"),
            seed=e.seed + i, init_seed=e.init_seed))
    parents = len(s.archs)
    for k, arch in enumerate(s.archs):
        out.append(Task(
            task_id=e.count + k, expert_id=f"{arch}-s{k}", role="specialist", arch=arch,
            layers=s.layers, hidden=s.hidden, heads=s.heads if arch == "gat" else 1,
            dropout=s.dropout, epochs=s.epochs, lr=s.lr, weight_decay=s.weight_decay,
            seed=s.seed + k, init_seed=e.init_seed, split=s.split, region=k, parents=parents,
            region_seed=s.seed))
    return out


def array_size(cfg) -> int:
    """Number of array tasks the config needs: ``experts.count + len(specialists.archs)``."""
    return cfg.experts.count + len(cfg.specialists.archs)


def task(cfg, task_id: int) -> Task:
    """The task with id ``task_id``; :class:`ConfigError` naming the valid range otherwise."""
    n = array_size(cfg)
    if not isinstance(task_id, int) or not 0 <= task_id < n:
        raise ConfigError(f"task id {task_id!r} is out of range: this config has {n} tasks "
                          f"(ids 0..{n - 1}: {cfg.experts.count} experts, "
                          f"{len(cfg.specialists.archs)} specialists); submit with --array=0-{n - 1}")
    return tasks(cfg)[task_id]


def require_experts(store, wanted: list[str], stage: str, allow_partial: bool = False,
                    at_least: int = 1) -> list[str]:
    """The ``wanted`` expert ids that are complete in ``store``, in order.

    Raises :class:`~hpcsoup.errors.ExpertsMissingError` naming the missing ids when any is
    not complete (still training, failed, or never submitted), unless ``allow_partial``:
    then ``stage`` goes on with the complete ones (at least ``at_least``) and says so.
    """
    done = {g.id for g in store.groups("experts")}
    missing = [i for i in wanted if i not in done]
    if missing and (not allow_partial or len(wanted) - len(missing) < at_least):
        raise ExpertsMissingError(
            f"{stage}: {len(missing)} of the {len(wanted)} experts the config asks for are not "
            f"complete in store '{store.path}': {', '.join(missing)}; wait for their training "
            f"tasks (squeue --me), rerun them (`hpcsoup train --config <file> --task-id N`), or "
            f"pass --allow-partial to {stage} the complete one(s) ({stage} needs at least {at_least})")
    if missing:
        log.warning("%s --allow-partial: using %d of %d experts; missing %s", stage,
                    len(wanted) - len(missing), len(wanted), ", ".join(missing))
    return [i for i in wanted if i in done]


def soup_experts_ready(cfg, allow_partial: bool = False) -> list[str]:
    """:func:`require_experts` for ``hpcsoup soup``: the config's sweep experts (``<arch>-eNNN``).

    Checked when the store was filled by ``hpcsoup train`` (its experts carry ``task_id``) and
    the soup's architecture is the sweep's; a store assembled by other means is taken as it is.
    """
    from hpcsoup.store import Store

    store = Store.open(cfg.store)
    if (cfg.soup.arch or cfg.experts.arch) != cfg.experts.arch or not any(
            "task_id" in g.attrs for g in store.groups("experts", role="expert")):
        return []
    wanted = [t.expert_id for t in tasks(cfg) if t.role == "expert"]
    return require_experts(store, wanted, "soup", allow_partial)
