"""Experiment configuration: ``jobs/*.toml`` files, loaded and validated here only.

A config is a TOML file whose keys are all declared in :data:`SCHEMA` with their
default, type and allowed values. Any key may be overridden with ``--set
section.key=value`` (the value is parsed as TOML, falling back to a string).
Unknown keys and bad values raise :class:`~hpcsoup.errors.ConfigError` naming
the key and what is allowed.

Example::

    cfg = load_config("jobs/quickstart.toml", overrides=["experts.count=4"])
    cfg.experts.count        # 4
    cfg.soup.pls.partitions  # 32
    cfg.to_dict()            # plain nested dict (stored as provenance)
"""
from __future__ import annotations

import copy
import json
import tomllib
from pathlib import Path
from typing import Any, Iterable, Sequence

from hpcsoup.errors import ConfigError
from hpcsoup.settings import Setting, nonnegative, positive

from hpcsoup.models import ARCHS
from hpcsoup.merge.hgrama import MERGE_SETTINGS
from hpcsoup.soup.registry import METHODS

SOUP_METHODS = tuple(METHODS)


Field = Setting  # a config key is a declared setting

_pos, _nonneg = positive, nonnegative


def _strings(hint: str) -> Field:
    return Field([], (list,), check=lambda v: all(isinstance(x, str) for x in v), hint=hint)


#: Every key a config may hold. Sections are nested dicts; leaves are Fields.
SCHEMA: dict = {
    "store": Field("runs/quickstart.zarr", (str,)),
    "name": Field("experiment", (str,)),
    "device": Field("cpu", (str,), check=lambda v: v == "cpu" or v.startswith("cuda"),
                    hint="'cpu', 'cuda' or 'cuda:N'"),
    "threads": Field(0, (int,), **_nonneg("torch threads per process; 0 = choose from the cores")),
    "data": {
        "dataset": Field("Cora", (str,)),
        "root": Field("", (str,), hint="folder with the datasets ('' = the default cache)"),
        "split": Field(0, (int,), **_nonneg()),
        "nodes": Field(100_000, (int,), **_pos("synthetic-products node count")),
        "seed": Field(0, (int,), hint="seed of synthetic-products and of a random split"),
        # graphs without masks get a seeded split (PyG's RandomNodeSplit conventions)
        "random_split": Field("train_rest", (str,), choices=("train_rest", "random"),
                              hint="for graphs without masks: val and test drawn, the rest "
                                   "trains; or num_train_per_class per class"),
        "num_train_per_class": Field(20, (int,), **_pos("training nodes per class (random)")),
        "num_val": Field(0.2, (float,), **_pos("a fraction of the nodes below 1, else a count")),
        "num_test": Field(0.2, (float,), **_pos("a fraction of the nodes below 1, else a count")),
    },
    "experts": {
        "arch": Field("sage", (str,), choices=ARCHS),
        "count": Field(8, (int,), **_nonneg()),
        "layers": Field(2, (int,), **_pos()),
        "hidden": Field(64, (int,), **_pos()),
        "heads": Field(1, (int,), **_pos()),
        "dropout": Field(0.5, (float,), check=lambda v: 0 <= v < 1, hint="in [0, 1)"),
        "epochs": Field(200, (int,), **_pos()),
        "lr": Field(0.01, (float,), **_pos()),
        "weight_decay": Field(5e-4, (float,), **_nonneg()),
        "init_seed": Field(0, (int,)),
        "seed": Field(0, (int,), hint="expert i trains with seed + i"),
        "batching": Field("full", (str,), choices=("full", "partitions")),
        "batch_partitions": Field(32, (int,), **_pos("METIS parts for cluster mini-batches")),
        "parts_per_batch": Field(4, (int,), **_pos()),
        "checkpoint_every": Field(10, (int,), **_pos("epochs between resume checkpoints")),
        "eval_every": Field(1, (int,), **_pos("epochs between validation checks (model selection)")),
        "patience": Field(0, (int,), **_nonneg("validation checks without a better score before "
                                               "training stops; 0 = train every epoch")),
        "progress_every": Field(1, (int,), **_pos("epochs between progress lines")),
        "workers": Field(0, (int,), **_nonneg("Dask worker processes for --all; 0 = one per core")),
        "sweep": {
            "lr": Field([], (list,), hint="per-expert learning rates, cycled"),
            "dropout": Field([], (list,), hint="per-expert dropout, cycled"),
            "weight_decay": Field([], (list,), hint="per-expert weight decay, cycled"),
        },
    },
    "specialists": {
        "archs": Field([], (list,), choices=ARCHS, hint="one specialist parent per entry"),
        "split": Field("metis", (str,), choices=("metis", "random", "class")),
        "layers": Field(2, (int,), **_pos()),
        "hidden": Field(64, (int,), **_pos()),
        "heads": Field(4, (int,), **_pos("GAT heads")),
        "dropout": Field(0.5, (float,), check=lambda v: 0 <= v < 1, hint="in [0, 1)"),
        "epochs": Field(200, (int,), **_pos()),
        "lr": Field(0.01, (float,), **_pos()),
        "weight_decay": Field(5e-4, (float,), **_nonneg()),
        "seed": Field(100, (int,)),
    },
    "soup": {
        "methods": Field(list(SOUP_METHODS), (list,), choices=SOUP_METHODS),
        "arch": Field("", (str,), hint="architecture to soup ('' = experts.arch)"),
        "seed": Field(0, (int,)),
        "reorder": Field(True, (bool,), hint="store the graph METIS-partition-contiguous for "
                                             "faster full-graph forwards (results unchanged)"),
        # each method's settings, as the method declares them (hpcsoup/soup/<method>.py)
        **{name: dict(cls.parameters) for name, cls in METHODS.items() if cls.parameters},
    },
    "merge": {
        "parents": Field([], (list,), hint="expert ids; [] = the config's specialists"),
        # H-GRAMA's settings, as the merge declares them (hpcsoup/merge/hgrama.py)
        **MERGE_SETTINGS,
        "repeats": Field(15, (int,), **_pos("interleaved timing rounds, child vs ensemble")),
        "timing_nodes": Field(1_000_000, (int,), **_nonneg(
            "time child vs ensemble on whole METIS partitions of at most this many nodes (the "
            "cached timing holds what it times); 0 = the whole graph")),
    },
    "slurm": {
        "partition": Field("", (str,)),
        "account": Field("", (str,)),
        "qos": Field("", (str,)),
        "constraint": Field("", (str,), hint="node features, e.g. 'a100' or 'skylake&ib'"),
        "time": Field("01:00:00", (str,)),
        "cpus_per_task": Field(1, (int,), **_pos()),
        "mem": Field("", (str,), hint="e.g. '8G' ('' = the cluster default)"),
        "gpus_per_task": Field(0, (int,), **_nonneg()),
        "max_parallel": Field(0, (int,), **_nonneg("array throttle %N; 0 = none")),
        "extra": _strings("more sbatch options for every stage, e.g. ['--mail-type=END'] "
                          "(dask-jobqueue's job_extra_directives)"),
        "setup": _strings("shell lines run before every stage, e.g. ['module load cuda', "
                          "'source ~/venv/bin/activate'] (dask-jobqueue's job_script_prologue)"),
        "mpi": Field("pmi2", (str,), hint="srun --mpi plugin of the soup ranks ('' = the site's "
                                          "default)"),
        "python": Field("", (str,), hint="interpreter on the compute nodes ('' = the one that "
                                         "runs `hpcsoup submit`)"),
        "log_dir": Field("slurm-logs", (str,), check=bool, hint="a folder name"),
        **{stage: {
            "time": Field("", (str,), hint="'' = slurm.time"),
            "cpus_per_task": Field(0, (int,), **_nonneg("0 = slurm.cpus_per_task")),
            "mem": Field("", (str,), hint="'' = slurm.mem"),
            "gpus_per_task": Field(-1, (int,), check=lambda v: v >= -1,
                                   hint="-1 = slurm.gpus_per_task"),
            "ntasks": Field(0, (int,), **_nonneg("0 = 1 (soup: soup.pls.ranks)")),
            "extra": _strings("more sbatch options for this stage only"),
        } for stage in ("train", "soup", "merge", "report")},
    },
}


# how many MPI ranks run PLS: the runner's choice, not the method's
SCHEMA["soup"]["pls"]["ranks"] = Field(1, (int,), **_pos("MPI ranks of partition learned souping"))


class Section:
    """Read-only attribute view of one validated config section."""

    def __init__(self, values: dict, path: str = ""):
        self._values = values
        self._path = path

    def __getattr__(self, key: str) -> Any:
        try:
            value = self._values[key]
        except KeyError:
            raise AttributeError(f"config has no key '{self._path}{key}'") from None
        return Section(value, f"{self._path}{key}.") if isinstance(value, dict) else value

    def __getitem__(self, dotted: str) -> Any:
        node: Any = self
        for part in dotted.split("."):
            node = getattr(node, part)
        return node

    def to_dict(self) -> dict:
        return copy.deepcopy(self._values)

    def __repr__(self) -> str:
        return f"Section({self._values!r})"


Config = Section


def _defaults(schema: dict) -> dict:
    return {k: _defaults(v) if isinstance(v, dict) else copy.deepcopy(v.default)
            for k, v in schema.items()}


def _merge(schema: dict, values: dict, into: dict, prefix: str = "") -> None:
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in schema:
            raise ConfigError(f"unknown config key '{name}'; allowed in "
                              f"'{prefix.rstrip('.') or '<top level>'}': {sorted(schema)}")
        spec = schema[key]
        if isinstance(spec, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{name}' must be a [section], got {value!r}")
            _merge(spec, value, into[key], name + ".")
        else:
            into[key] = spec.validate(name, value)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"soup.pls.ranks=4"`` -> (["soup", "pls", "ranks"], 4). Values are TOML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set experts.count=4")
    key, raw = (s.strip() for s in text.split("=", 1))
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.split("."), value


def check_parents(parents: Sequence, key: str = "merge.parents") -> list[str]:
    """Merge parents as strings; :class:`ConfigError` when one is listed twice."""
    ids = [str(p) for p in parents]
    twice = sorted({p for p in ids if ids.count(p) > 1})
    if twice:
        raise ConfigError(f"{key} = {ids}: {twice} listed more than once; a merge needs distinct "
                          f"parents, e.g. {sorted(set(ids))}")
    return ids


def _check_together(values: dict) -> None:
    """Rules that involve several keys (each key alone was checked by its Field)."""
    pls = values["soup"]["pls"]
    for key, why in (("per_step", "each step draws per_step of the partitions"),
                     ("ranks", "every rank needs at least one partition")):
        if pls[key] > pls["partitions"]:
            raise ConfigError(f"config key 'soup.pls.{key}' = {pls[key]} is more than "
                              f"'soup.pls.partitions' = {pls['partitions']}: {why}; lower "
                              f"soup.pls.{key} or raise soup.pls.partitions")
    check_parents(values["merge"]["parents"])


def build_config(values: dict | None = None, overrides: Iterable[str] = ()) -> Section:
    """Validate ``values`` (a nested dict, e.g. parsed TOML) plus ``--set`` overrides."""
    merged = _defaults(SCHEMA)
    _merge(SCHEMA, values or {}, merged)
    for text in overrides:
        path, value = parse_override(text)
        nested: Any = value
        for part in reversed(path):
            nested = {part: nested}
        _merge(SCHEMA, nested, merged)
    _check_together(merged)
    return Section(merged)


def load_config(path: str | Path | None, overrides: Iterable[str] = ()) -> Section:
    """Load a ``jobs/*.toml`` (or ``.json``) file; only defaults when ``path`` is None."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist; "
                              f"pass an experiment file such as jobs/quickstart.toml")
        try:
            # JSON is what a stage hands to its sub-processes (``Section.to_dict()``).
            values = (json.loads(path.read_text()) if path.suffix == ".json"
                      else tomllib.loads(path.read_text()))
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"config file '{path}' is not valid {path.suffix[1:].upper()}: {exc}") from exc
    return build_config(values, overrides)
