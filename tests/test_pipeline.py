"""The whole pipeline: `hpcsoup run` here, and `hpcsoup submit` on a real SLURM."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcsoup.cli import main
from hpcsoup.pipeline import submit
from hpcsoup.config import load_config
from hpcsoup.store import Store

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "jobs" / "quickstart.toml"
TINY = ["experts.count=2", "experts.epochs=3", "specialists.epochs=3",
        'soup.methods=["uniform","pls"]', "soup.pls.partitions=4", "soup.pls.steps=5"]


def _check_store(path: Path) -> None:
    store = Store.open(path)
    experts = store.groups("experts")
    assert sorted(g.id for g in experts) == ["gat-s1", "gcn-s0", "sage-e000", "sage-e001"]
    soups = {g.attrs["method"]: g.attrs for g in store.groups("soups")}
    assert set(soups) == {"uniform", "pls"}
    assert soups["pls"]["ranks"] == 2
    assert 0 < soups["uniform"]["metrics"]["test"] <= 1
    merges = store.groups("merges")
    assert len(merges) == 1 and sorted(merges[0].attrs["parents"]) == ["gat-s1", "gcn-s0"]
    assert set(merges[0].attrs["metrics"]["retention"]) == {"gat-s1", "gcn-s0"}
    report = Path(str(path) + ".report")
    assert "## Soups (2)" in (report / "report.md").read_text()


@pytest.mark.slow
def test_run_every_stage_locally(tmp_path, data_root, mpiexec):
    """`hpcsoup run` of a small quickstart: results on stdout, a short log on a non-terminal stderr."""
    store = tmp_path / "run.zarr"
    args = ["run", str(QUICKSTART), "--store", str(store),
            "--set", f'data.root="{data_root}"'] + [a for kv in TINY for a in ("--set", kv)]
    done = subprocess.run([sys.executable, "-m", "hpcsoup", *args], capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    _check_store(store)
    err = done.stderr.splitlines()
    # the line budget of a quickstart on a SLURM log or a pipe: no per-epoch or per-step detail
    assert len(err) <= 60, f"{len(err)} lines on stderr:\n{done.stderr}"
    assert not any(" epoch 1/" in line for line in err), done.stderr
    assert any(line.startswith("train: 12/12 epochs in ") for line in err), done.stderr
    assert any(line.startswith("merge: 4/4 phases in ") for line in err), done.stderr
    # the results, on stdout
    out = done.stdout
    assert "sage-e000  trained" in out and "pls (2 ranks)" in out and "merge: gcn-s0 + gat-s1" in out
    assert f"report: {store}.report/report.md" in out


def test_submit_dry_run_chains_stages(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(QUICKSTART, TINY)
    result = submit(cfg, str(QUICKSTART), TINY, dry_run=True)
    jobs = result["jobs"]
    assert "--array=0-3" in jobs["train"] and "--export=NONE" in jobs["train"]
    assert "--dependency=afterok:<train>" in jobs["soup"]
    assert "--dependency=afterok:<train>" in jobs["merge"]
    assert "--dependency=afterok:<soup>:<merge>" in jobs["report"]
    assert all("--kill-on-invalid-dep=yes" in jobs[s] for s in ("soup", "merge", "report"))
    assert f"{tmp_path}/slurm-logs/scripts/quickstart-soup.sh {QUICKSTART}" in jobs["soup"]
    from hpcsoup import summary
    text = summary.submit(result)  # what `hpcsoup submit` prints on stdout
    assert f"logs:  {tmp_path}/slurm-logs" in text and "  report: sbatch --parsable" in text
    assert not (tmp_path / "slurm-logs").exists()  # a dry run writes nothing


def _train(config: Path, *tasks: int) -> None:
    for task in tasks:
        assert main(["train", "--config", str(config), "--task-id", str(task)]) == 0


def test_soup_refuses_missing_experts_unless_allow_partial(tmp_path, data_root, capsys):
    config = tmp_path / "p.json"
    config.write_text(json.dumps({
        "store": str(tmp_path / "p.zarr"), "threads": 1, "data": {"dataset": "Cora", "root": str(data_root)},
        "experts": {"count": 3, "epochs": 2, "hidden": 8, "progress_every": 100},
        "soup": {"methods": ["uniform"]}}))
    _train(config, 0, 2)
    capsys.readouterr()
    assert main(["soup", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "soup: 1 of the 3 experts the config asks for are not complete" in err and "sage-e001" in err
    assert "--allow-partial" in err and Store.open(tmp_path / "p.zarr").groups("soups") == []
    assert main(["soup", "--config", str(config), "--allow-partial", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out.strip().splitlines()[-1])["ingredients"] == ["sage-e000", "sage-e002"]
    assert "using 2 of 3 experts; missing sage-e001" in err


def test_require_experts_names_what_is_missing_and_keeps_a_minimum(tmp_path):
    from hpcsoup.errors import ExpertsMissingError
    from hpcsoup.train.sweep import require_experts

    store = Store.create(tmp_path / "r.zarr")
    store.write_group("experts", "gcn-s0", {"w": __import__("torch").ones(2)}, {"role": "specialist"})
    assert require_experts(store, ["gcn-s0"], "merge") == ["gcn-s0"]
    with pytest.raises(ExpertsMissingError, match="1 of the 2 .* gat-s1; wait for"):
        require_experts(store, ["gcn-s0", "gat-s1"], "merge")
    with pytest.raises(ExpertsMissingError, match="merge needs at least 2"):
        require_experts(store, ["gcn-s0", "gat-s1"], "merge", allow_partial=True, at_least=2)


def test_submit_needs_a_config_file():
    with pytest.raises(ValueError, match="needs the config as a file"):
        submit(load_config(None), None)


def _wait(job_id: str, timeout: float = 600) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
        state = out.split("JobState=")[1].split()[0] if "JobState=" in out else "GONE"
        if state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED"):
            return state
        time.sleep(2)
    raise TimeoutError(f"job {job_id} still running after {timeout} s")


@pytest.mark.slurm
@pytest.mark.slow
def test_submit_runs_the_chain_on_slurm(slurm_cluster, tmp_path, data_root, monkeypatch):
    monkeypatch.chdir(tmp_path)  # logs land in ./slurm-logs
    store = tmp_path / "submit.zarr"
    args = ["submit", str(QUICKSTART), "--store", str(store), "--json",
            "--set", f'data.root="{data_root}"'] + [a for kv in TINY for a in ("--set", kv)]
    # The jobs run under --export=NONE: what this test's environment adds must come as set-up lines
    # (as a site's module loads would), e.g. the PYTHONPATH of a checkout that is not installed.
    if os.environ.get("PYTHONPATH"):
        args += ["--set", "slurm.setup=" + json.dumps([f"export PYTHONPATH={os.environ['PYTHONPATH']}"])]
    done = subprocess.run([sys.executable, "-m", "hpcsoup"] + args, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    jobs = json.loads(done.stdout.strip().splitlines()[-1])["jobs"]
    logs = "\n".join(f"== {p}\n{p.read_text()[-1500:]}" for p in (tmp_path / "slurm-logs").glob("*.out"))
    assert _wait(jobs["report"]) == "COMPLETED", logs
    _check_store(store)


def test_submit_from_the_package_alone_renders_and_submits_every_stage(tmp_path):
    """What a wheel holds: the package without the repository's slurm/ folder. sbatch is a stub
    that records its argv and the script it was given (the real chain runs in the slurm test)."""
    import shutil

    site = tmp_path / "site"
    shutil.copytree(REPO / "hpcsoup", site / "hpcsoup",
                    ignore=shutil.ignore_patterns("__pycache__", "shipped"))
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "sbatch").write_text(
        "#!/usr/bin/env bash\n"
        f'n=$(( $(wc -l < {tmp_path}/sbatch.log 2>/dev/null || echo 0) + 1 ))\n'
        f'echo "$@" >> {tmp_path}/sbatch.log\n'
        'for a in "$@"; do [[ $a == *.sh ]] && cp "$a" ' f'"{tmp_path}/submitted-$n.sh"; done\n'
        'echo "$(( 100 + n ))"\n')
    (bin_ / "sbatch").chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site), PATH=f"{bin_}:{os.environ['PATH']}")
    done = subprocess.run([sys.executable, "-m", "hpcsoup", "submit", str(QUICKSTART), *TINY,
                           "--json"], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["jobs"] == {"train": "101", "soup": "102", "merge": "103", "report": "104"}
    calls = (tmp_path / "sbatch.log").read_text().splitlines()
    assert calls[1].startswith("--parsable --dependency=afterok:101 --kill-on-invalid-dep=yes "
                               f"--export=NONE {work}/slurm-logs/scripts/quickstart-soup.sh")
    assert "--dependency=afterok:102:103" in calls[3]
    train = (tmp_path / "submitted-1.sh").read_text()
    assert "#SBATCH --job-name=quickstart-train" in train and "#SBATCH --time=00:30:00" in train
    assert f'PY="${{HPCSOUP_PYTHON:-{sys.executable}}}"' in train
    assert "#SBATCH --ntasks=2" in (tmp_path / "submitted-2.sh").read_text()
    from hpcsoup import summary
    text = summary.submit(result)  # what the command prints on stdout without --json
    assert f"logs:  {work}/slurm-logs" in text and "follow: squeue --jobs=101,102,103,104" in text
    assert "soup    102  after train succeed" in text
