"""The command line's conventions and what reaches stdout and stderr (hpcsoup/cli.py,
hpcsoup/progress.py, hpcsoup/summary.py)."""
import argparse
import io
import json
import re

import pytest
import torch

import hpcsoup
from hpcsoup import progress
from hpcsoup.cli import build_parser, main
from hpcsoup.progress import Progress, configure, duration, significant
from hpcsoup.store import Store


@pytest.fixture(autouse=True)
def unconfigured():
    """Each test starts and ends with the library's default output (no handler of ours)."""
    progress.reset()
    yield
    progress.reset()


def _subcommands() -> dict:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


# ------------------------------------------------------------------ conventions

def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"hpcsoup {hpcsoup.__version__}"


RST = re.compile(r"``|:(func|class|mod|meth|data|attr):`")


@pytest.mark.parametrize("command", [None, *_subcommands()])
def test_help_is_plain_text_and_every_argument_is_explained(command, capsys):
    argv = ["--help"] if command is None else [command, "--help"]
    with pytest.raises(SystemExit):
        main(argv)
    text = capsys.readouterr().out
    assert text.startswith("usage: hpcsoup")
    assert not RST.search(text), f"RST markup in `hpcsoup {command or ''} --help`:\n{text}"
    parser = build_parser() if command is None else _subcommands()[command]
    unexplained = [a.option_strings or a.dest for a in parser._actions
                   if not a.help or a.help == argparse.SUPPRESS]
    assert not unexplained, f"`hpcsoup {command}`: arguments without help text: {unexplained}"


def _tiny_store(path) -> Store:
    store = Store.create(path, attrs={"name": "cli-test", "config": {}})
    store.write_group("experts", "sage-e000", {"w": torch.ones(2, 3)},
                      {"arch": "sage", "role": "expert", "dataset": "Cora", "seed": 0,
                       "metrics": {"metric": "accuracy", "val": 0.75, "test": 0.8},
                       "train_seconds": 1.5})
    return store


def test_store_commands_take_store_as_an_option(tmp_path, capsys):
    path = tmp_path / "s.zarr"
    _tiny_store(path)
    assert main(["store", "ls", "--store", str(path)]) == 0
    assert "sage-e000" in capsys.readouterr().out
    assert main(["store", "show", "experts/sage-e000", "--store", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["group"] == "experts/sage-e000"
    assert main(["store", "ls", str(path)]) == 0  # the positional form still works
    assert main(["store", "ls"]) == 2
    assert "needs a store" in capsys.readouterr().err


def test_report_prints_where_report_and_plots_are(tmp_path, capsys):
    path = tmp_path / "s.zarr"
    _tiny_store(path)
    assert main(["report", "--store", str(path), "--out", str(tmp_path / "r")]) == 0
    captured = capsys.readouterr()
    assert f"report: {tmp_path / 'r' / 'report.md'}" in captured.out
    assert (tmp_path / "r" / "report.md").is_file()
    assert captured.err == ""  # results on stdout, nothing else happened


def test_submit_dry_run_prints_store_logs_and_jobs(tmp_path, capsys):
    from pathlib import Path
    quickstart = Path(__file__).resolve().parent.parent / "jobs" / "quickstart.toml"
    assert main(["submit", str(quickstart), "--store", str(tmp_path / "x.zarr"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"store: {tmp_path / 'x.zarr'}" in out and "logs:" in out
    for stage in ("train", "soup", "merge", "report"):
        assert re.search(rf"^  {stage}: .*sbatch", out, re.M), out


def test_submit_text_names_dependencies_and_how_to_follow():
    from hpcsoup.summary import submit
    text = submit({"store": "runs/x.zarr", "dry_run": False, "logs": "slurm-logs/",
                   "jobs": {"train": "11", "soup": "12", "merge": "13", "report": "14"},
                   "after": {"soup": ["train"], "merge": ["train"], "report": ["soup", "merge"]}})
    assert "report  14  after soup and merge succeed" in text
    assert "squeue --jobs=11,12,13,14" in text and "tail -f slurm-logs/*" in text


# ------------------------------------------------------------------ progress

class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_plain_lines_every_interval_with_eta_and_a_last_line():
    out = io.StringIO()
    configure(0, stream=out, interval=0)
    with Progress("train", total=4, unit="epochs") as p:
        for _ in range(4):
            p.update(postfix="experts 0/1 done")
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("train: 1/4 epochs (25%), experts 0/1 done, ")
    assert "ETA" in lines[1] and "ETA" not in lines[3]  # no ETA once done
    assert re.fullmatch(r"train: 4/4 epochs in \d\.\d s \(experts 0/1 done\)", lines[-1])


def test_plain_lines_are_sparse_and_quiet_shows_none():
    out = io.StringIO()
    configure(0, stream=out, interval=3600)
    with Progress("soup learned", total=1000, unit="steps") as p:
        for _ in range(1000):
            p.update()
    assert out.getvalue().splitlines() == [out.getvalue().splitlines()[-1]]  # only the last line
    out = io.StringIO()
    configure(-1, stream=out, interval=0)
    with Progress("x", total=3) as p:
        p.update(3)
    assert out.getvalue() == ""


def test_terminal_gets_a_bar_and_logs_above_it():
    out = _Terminal()
    display = configure(0, stream=out)
    assert display.bars
    import logging
    with Progress("merge", total=4, unit="phases") as p:
        p.set(2, "evaluate")
        logging.getLogger("hpcsoup.merge").info("a result line")
    text = out.getvalue()
    assert "merge:" in text and "2/4 [" in text and "phases/s, evaluate" in text
    assert "\r" in text  # tqdm redraws in place
    assert "a result line\n" in text


def test_library_attaches_no_handler(caplog, capsys):
    """Without the CLI, progress lines are INFO records of hpcsoup.progress, shown nowhere."""
    import logging
    import hpcsoup.merge.run  # noqa: F401  (the modules that log, imported: still no handler)
    import hpcsoup.pipeline  # noqa: F401
    import hpcsoup.train.run  # noqa: F401
    assert logging.getLogger("hpcsoup").handlers == []
    with caplog.at_level(logging.INFO, logger="hpcsoup.progress"):
        with Progress("x", total=2) as p:
            p.update(2)
    assert [r.getMessage() for r in caplog.records][-1].startswith("x: 2/2 it in ")
    assert capsys.readouterr().err == ""


def test_number_formats():
    assert [significant(v) for v in (95.9959, 525.4023, 0.4179, 0.999, 12345.0, None)] == \
        ["96", "530", "0.42", "1.0", "12000", "-"]
    assert [duration(s) for s in (0.42, 17.2, 95, 3700)] == ["0.4 s", "17 s", "1 min 35 s", "1 h 01 min"]


# ------------------------------------------------------------------ a real task

def test_per_epoch_lines_only_with_verbose(tmp_path, data_root, capsys):
    """One real expert (Cora, 3 epochs): -v shows each epoch on stderr, the default does not."""
    args = ["train", "--task-id", "0", "--set", "experts.count=1", "--set", "experts.epochs=3",
            "--set", "specialists.archs=[]", "--set", f'data.root="{data_root}"']
    assert main(args + ["--store", str(tmp_path / "a.zarr")]) == 0
    quiet = capsys.readouterr()
    assert "epoch 1/3" not in quiet.err
    assert re.search(r"\[sage-e000\] trained: val 0\.\d{3} test 0\.\d{3}", quiet.err)
    assert re.search(r"^sage-e000 +trained +accuracy +0\.\d{3} +0\.\d{3}", quiet.out, re.M)
    assert main(args + ["--store", str(tmp_path / "b.zarr"), "-v"]) == 0
    loud = capsys.readouterr()
    assert all(f"[sage-e000] epoch {e}/3 " in loud.err for e in (1, 2, 3)), loud.err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch sees a GPU: device='cuda' is valid")
@pytest.mark.parametrize("command", [["train", "--task-id", "0"], ["soup"], ["merge"]])
def test_cuda_asked_for_without_a_gpu_is_a_one_line_config_error(command, tmp_path, capsys):
    """Every stage checks ``device`` before any work: no traceback, the key and the fix named."""
    code = main(command + ["--store", str(tmp_path / "s.zarr"), "--set", 'device="cuda"'])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "device='cuda'" in err and "sees no CUDA device" in err and "--set device=cpu" in err
    assert "Traceback" not in err
    assert not (tmp_path / "s.zarr").exists()
