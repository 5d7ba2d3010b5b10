"""The ``hpcsoup`` command line: a thin layer over the Python API of each stage.

Every command that reads a store accepts ``--store PATH``; the stage commands also take repeatable
``--set key=value`` and ``--json`` (one JSON object of the results as the last line of stdout).
Results go to stdout (:mod:`hpcsoup.summary`), progress and logs to stderr; ``-v`` and ``-q``
choose how much (:func:`hpcsoup.progress.configure`, called here and nowhere else in a run).
This is the only module that reads config files from the command line.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import hpcsoup
from hpcsoup import summary
from hpcsoup.config import SOUP_METHODS, check_parents, load_config
from hpcsoup.errors import ConfigError, HpcsoupError
from hpcsoup.progress import configure

DESCRIPTION = ("Combine trained Graph Neural Networks at HPC scale: train experts, soup them, merge "
               "them, report. Results go to stdout; progress and logs to stderr.")


def add_output_options(parser: argparse.ArgumentParser, json_help: str | None = None) -> None:
    """``-v``, ``-q`` (what reaches stderr) and ``--json`` (what reaches stdout)."""
    loud = parser.add_mutually_exclusive_group()
    loud.add_argument("-v", "--verbose", action="count", default=0,
                      help="also show per-epoch and per-step lines on stderr")
    loud.add_argument("-q", "--quiet", action="store_true",
                      help="show only warnings and errors on stderr (no progress)")
    parser.add_argument("--json", action="store_true",
                        help=json_help or "print one JSON object of the results on stdout instead "
                                          "of the text summary")


def add_common_options(parser: argparse.ArgumentParser, config: str = "option") -> None:
    """``--config`` (or a positional config), ``--store``, ``--set``, ``--json``, ``-v``, ``-q``."""
    if config == "option":
        parser.add_argument("--config", "-c", help="experiment file, e.g. jobs/quickstart.toml "
                                                   "(default: the built-in quickstart settings)")
    elif config == "positional":
        parser.add_argument("config", help="experiment file, e.g. jobs/quickstart.toml")
    parser.add_argument("--store", metavar="PATH",
                        help="Zarr store path (default: the config's store key)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set experts.count=4 (repeatable; a bare "
                             "KEY=VALUE means the same)")
    add_output_options(parser)


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None):
    """``parser.parse_args``, also taking bare ``KEY=VALUE`` anywhere as ``--set KEY=VALUE``.

    (The sbatch scripts pass their arguments on as users give them; argparse alone would take only
    one unbroken run of such positionals.)
    """
    args, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.assignments = rest
    return args


def overrides_of(args) -> list[str]:
    """The command line's config overrides: ``--set``, bare ``KEY=VALUE``, then ``--store``."""
    overrides = [*args.overrides, *args.assignments]
    if getattr(args, "store", None):
        overrides.append(f"store={json.dumps(args.store)}")
    return overrides


def config_from_args(args):
    return load_config(getattr(args, "config", None), overrides_of(args))


def cmd_train(args) -> dict:
    from hpcsoup.train.run import run_train
    if args.array_spec:  # for `sbatch --array=$(hpcsoup train --config X --array-spec)`
        from hpcsoup.slurm import array_spec
        from hpcsoup.train.sweep import array_size
        cfg = config_from_args(args)
        spec = array_spec(array_size(cfg), cfg.slurm.max_parallel)
        print(spec)
        return {"array": spec, "tasks": array_size(cfg)}
    return run_train(config_from_args(args), task_id=args.task_id, all_tasks=args.all,
                     force=args.force)


def cmd_soup(args) -> dict:
    from hpcsoup.distributed.mpi import world

    cfg, comm = config_from_args(args), world()
    if comm.size > 1:  # under mpiexec / srun: PLS over graph shards, the rest on rank 0
        from hpcsoup.distributed.pls import run_soup_distributed
        return run_soup_distributed(cfg, args.method or None, comm, args.allow_partial)
    from hpcsoup.soup.run import run_soup
    return run_soup(cfg, methods=args.method or None, allow_partial=args.allow_partial)


def cmd_partition(args) -> dict:
    from hpcsoup.distributed.pls import prepare_from_config
    from hpcsoup.distributed.shards import open_parts

    cfg = config_from_args(args)
    if "pls" not in (args.method or cfg.soup.methods):
        return {"partitioned": None, "reason": "no pls among the methods"}
    path = prepare_from_config(cfg)
    attrs = open_parts(path)
    return {"partitioned": str(path), "partitions": attrs["partitions"],
            "nodes": attrs["num_nodes"], "scope": attrs.get("scope", "partition"),
            "halo": attrs["halo"]}


def cmd_merge(args) -> dict:
    from hpcsoup.merge.run import run_merge
    parents = check_parents([p for p in args.parents.split(",") if p], "--parents") \
        if args.parents else None
    return run_merge(config_from_args(args), parents=parents, allow_partial=args.allow_partial)


def cmd_run(args) -> dict:
    from hpcsoup.pipeline import run_local
    return run_local(config_from_args(args))


def cmd_submit(args) -> dict:
    from hpcsoup.pipeline import submit
    return submit(config_from_args(args), config_path=args.config, overrides=overrides_of(args),
                  dry_run=args.dry_run)


def cmd_report(args) -> dict:
    from hpcsoup.report import report
    return report(args.store or config_from_args(args).store, out=args.out)


def cmd_store(args) -> dict:
    from hpcsoup.store import describe_store, remove_group
    path, group = args.path, args.group
    if args.store:  # `store show GROUP --store PATH`: the one positional is the group
        path, group = args.store, group or path
    if not path:
        raise HpcsoupError(f"hpcsoup store {args.action} needs a store: pass its path, e.g. "
                           f"`hpcsoup store {args.action} runs/quickstart.zarr`, or --store PATH")
    if args.action == "rm":
        if not group:
            raise ConfigError("hpcsoup store rm needs the group to remove, e.g. "
                              f"`hpcsoup store rm {path} experts/sage-e003`")
        return remove_group(path, group, echo=not args.json)
    return describe_store(path, group=group if args.action == "show" else None, echo=not args.json)


def cmd_slurm(args) -> dict:
    from hpcsoup.jobscripts import write_scripts
    cfg = config_from_args(args) if args.config or overrides_of(args) else None  # else: generic
    paths = write_scripts(args.dir, cfg)
    logs = Path(cfg.slurm.log_dir if cfg else "slurm-logs")
    logs.mkdir(parents=True, exist_ok=True)  # SLURM cannot start a job whose log folder is missing
    if not args.json:
        which = f"for {args.config}" if cfg else "generic: python on PATH or $HPCSOUP_PYTHON"
        print(f"wrote {', '.join(map(str, paths.values()))} ({which}) and the log folder {logs}/; "
              f"edit them, then submit from here: sbatch {paths['train']} <config>")
    return {"scripts": {k: str(v) for k, v in paths.items()}, "logs": str(logs)}


def cmd_data(args) -> dict:
    from hpcsoup.data import load_dataset
    info = load_dataset(args.name, args.root, split=args.split, nodes=args.nodes).info()
    if not args.json:
        for key, value in info.items():
            print(f"{key:>10}: {value}")
    return info


def cmd_export(args) -> dict:
    from hpcsoup.export import export_group
    result = export_group(args.store, args.group, args.out)
    if not args.json:
        print(f"{result['group']} -> {result['out']} ({result['model']}; load it with "
              f"hpcsoup.load_model({result['out']!r}))")
    return result


#: each command's text on stdout (commands that print their own text, or none, are absent)
SUMMARIES = {"train": summary.train, "soup": summary.soup, "merge": summary.merge,
             "run": summary.run, "submit": summary.submit, "report": summary.report,
             "partition": summary.partition}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hpcsoup", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"%(prog)s {hpcsoup.__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="what to do (hpcsoup COMMAND --help explains each)")

    p = sub.add_parser("train", help="train experts (one task = one expert) into the store",
                       description="Train experts into the store: one task, or all of them here.")
    add_common_options(p)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--task-id", type=int, metavar="N",
                       help="expert index to train (default: $SLURM_ARRAY_TASK_ID)")
    group.add_argument("--all", action="store_true",
                       help="train every expert here, in parallel Dask worker processes")
    group.add_argument("--array-spec", action="store_true",
                       help="print the --array value the config needs (e.g. 0-9) and exit")
    p.add_argument("--force", action="store_true",
                   help="retrain experts that are already complete, replacing them (e.g. a corrupt one)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("soup", help="soup same-architecture experts",
                       description="Soup the store's same-architecture experts with each method.")
    add_common_options(p)
    p.add_argument("--method", action="append", choices=SOUP_METHODS,
                   help="souping method (repeatable; default: the config's soup.methods)")
    p.add_argument("--allow-partial", action="store_true",
                   help="soup the complete experts even if the config asks for more")
    p.set_defaults(func=cmd_soup)

    p = sub.add_parser("partition", help="cut the graph into the store's PLS partitions once",
                       description="Cut the config's graph into the store's PLS partitions once, "
                                   "before a distributed soup (no rank then needs the whole graph).")
    add_common_options(p)
    p.add_argument("--method", action="append", choices=SOUP_METHODS,
                   help="the soup's methods: nothing to do without pls (default: soup.methods)")
    p.add_argument("--allow-partial", action="store_true",
                   help="accepted for the soup's sake (the partitions do not need the experts)")
    p.set_defaults(func=cmd_partition)

    p = sub.add_parser("merge", help="merge heterogeneous experts with H-GRAMA",
                       description="Merge experts of different architectures with H-GRAMA.")
    add_common_options(p)
    p.add_argument("--parents", metavar="ID,ID",
                   help="comma-separated expert ids (default: the config's specialists)")
    p.add_argument("--allow-partial", action="store_true",
                   help="merge the complete parents (at least 2) even if some are missing")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("run", help="every stage on this machine (the embedded default)",
                       description="Train, soup, merge and report on this machine.")
    add_common_options(p, config="positional")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("submit", help="every stage as SLURM jobs chained with afterok",
                       description="Submit train, soup, merge and report as SLURM jobs chained "
                                   "with afterok; prints the jobs and how to follow them.")
    add_common_options(p, config="positional")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch commands only")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("report", help="tables and plots of what a store holds",
                       description="Write report.md (tables, embedded plots, config, provenance), "
                                   "report.json and the plots (PNG and PDF) of a store.")
    add_common_options(p)
    p.add_argument("--out", metavar="DIR",
                   help="folder for report.md, report.json and plots (default: <store>.report)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("store", help="inspect a store, or remove a group from it",
                       description="List what a store holds (ls), show one group (show) or remove "
                                   "one (rm, e.g. a corrupt expert before retraining it).")
    p.add_argument("action", choices=("ls", "show", "rm"),
                   help="ls: every group; show: one group; rm: remove one group")
    p.add_argument("path", nargs="?", help="store path (or give --store PATH)")
    p.add_argument("group", nargs="?",
                   help="with show / rm: a group such as experts/<id> or a graph's shard set "
                        "graphs/<graph>/<set>, or a bare id (show)")
    p.add_argument("--store", metavar="PATH", help="store path (instead of the positional one)")
    add_output_options(p)
    p.set_defaults(func=cmd_store)

    p = sub.add_parser("export", help="write a soup, merge or expert as a file for "
                                      "hpcsoup.load_model",
                       description="Write a soup, merge or expert of a store as one file that "
                                   "hpcsoup.load_model(FILE) loads back.")
    p.add_argument("store", help="store path")
    p.add_argument("group", help="soups/<id>, merges/<id> or experts/<id>")
    p.add_argument("--out", required=True, help="the file to write, e.g. soup.pt")
    add_output_options(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("slurm", help="write the sbatch scripts of every stage, to edit",
                       description="Write editable sbatch scripts of every stage (rendered from "
                                   "the config, or generic without one) and the log folder.")
    p.add_argument("action", choices=("init",), help="init: write the scripts")
    p.add_argument("dir", help="folder for train.sh, soup.sh, merge.sh, report.sh")
    add_common_options(p)
    p.set_defaults(func=cmd_slurm)

    p = sub.add_parser("data", help="dataset information",
                       description="Load a dataset and print its size, split and metric.")
    p.add_argument("action", choices=("info",), help="info: size, features, classes, split, metric")
    p.add_argument("name", help="Cora, CiteSeer, Minesweeper, Tolokers, ogbn-*, pyg/<Class>/<name>, "
                                "synthetic-products")
    p.add_argument("--root", help="dataset folder (default: $HPCSOUP_DATA or ~/.cache/hpcsoup/data)")
    p.add_argument("--split", type=int, default=0,
                   help="which split of datasets that ship several (default: 0)")
    p.add_argument("--nodes", type=int, default=100_000,
                   help="synthetic-products size in nodes (default: 100000)")
    add_output_options(p)
    p.set_defaults(func=cmd_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    configure(-1 if args.quiet else args.verbose)
    try:
        result = args.func(args)
    except HpcsoupError as exc:
        print(f"hpcsoup {args.command}: error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)  # 75 (EX_TEMPFAIL): stopped by a signal, resumable
    except OSError as exc:  # a file system refusal outside the store's own checks: one line, no traceback
        where = f" '{exc.filename}'" if exc.filename else ""
        print(f"hpcsoup {args.command}: error: {exc.strerror or exc}{where}; check that path "
              f"(free space, permissions, a folder where a file is)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hpcsoup {args.command}: interrupted", file=sys.stderr)
        return 130
    # Under MPI every rank returns a result; only rank 0 prints it (lines that several ranks
    # print at once interleave in the launcher's output): one result per job.
    if isinstance(result, dict) and result.get("rank", 0) != 0:
        return 0
    if args.json:
        print(json.dumps(result, default=str))
    elif args.command in SUMMARIES and not getattr(args, "array_spec", False):
        print(SUMMARIES[args.command](result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
