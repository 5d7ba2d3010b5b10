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

from hpcsoup.errors import ConfigError
from hpcsoup.models import ModelSpec

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
