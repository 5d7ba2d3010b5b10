"""hpcsoup.slurm and hpcsoup.jobscripts (pure rendering, environment) and slurm/train.sh, no cluster.

slurm/train.sh runs here with a stub interpreter (HPCSOUP_PYTHON) and stub ``sbatch`` /
``scontrol`` / ``srun`` on PATH that record their arguments (the real SLURM runs them in
tests/train/test_train_slurm.py).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from hpcsoup.cli import main
from hpcsoup.config import build_config
from hpcsoup.errors import ConfigError
from hpcsoup.jobscripts import STAGES, render_stage, stage_options
from hpcsoup.slurm import (SlurmEnv, SlurmError, afterok, array_spec, format_command,
                           render_sbatch_script, sbatch, sbatch_command, sbatch_options)

REPO = Path(__file__).resolve().parent.parent
TRAIN_SH = REPO / "slurm" / "train.sh"

EXPECTED_SCRIPT = """\
#!/usr/bin/env bash
# hpcsoup soup stage
# (generated)
#SBATCH --job-name=hpcsoup-soup
#SBATCH --output=slurm-logs/%x-%j.out
#SBATCH --ntasks=2
#SBATCH --cpus-per-task=1
#SBATCH --time=00:30:00
#SBATCH --dependency=afterok:12:13
#SBATCH --comment="two words"
#SBATCH --requeue
set -euo pipefail
srun --mpi=pmi2 python -m hpcsoup soup --config jobs/quickstart.toml
"""


def test_render_sbatch_script_matches_stored_text():
    text = render_sbatch_script(
        "srun --mpi=pmi2 python -m hpcsoup soup --config jobs/quickstart.toml",
        header="hpcsoup soup stage\n(generated)", setup=["set -euo pipefail"],
        job_name="hpcsoup-soup", output="slurm-logs/%x-%j.out", ntasks=2, cpus_per_task=1,
        time="00:30:00", partition="", account=None, dependency=afterok("12", "13"),
        comment="two words", requeue=True, exclusive=False)
    assert text == EXPECTED_SCRIPT


def test_sbatch_command_is_kebab_case_and_quoted():
    argv = sbatch_command("slurm/train.sh", ["jobs/my exp.toml", "--set", "store=runs/a b.zarr"],
                          array="0-9%2", cpus_per_task=2, gpus_per_task=None, mem="", requeue=True,
                          kill_on_invalid_dep="yes")
    assert argv == ["sbatch", "--parsable", "--array=0-9%2", "--cpus-per-task=2", "--requeue",
                    "--kill-on-invalid-dep=yes", "slurm/train.sh", "jobs/my exp.toml", "--set",
                    "store=runs/a b.zarr"]
    assert format_command(argv) == ("sbatch --parsable --array=0-9%2 --cpus-per-task=2 --requeue "
                                    "--kill-on-invalid-dep=yes slurm/train.sh 'jobs/my exp.toml' "
                                    "--set 'store=runs/a b.zarr'")
    assert sbatch_options({"nodelist": ["n1", "n2"]}) == ["--nodelist=n1,n2"]
    assert sbatch("slurm/train.sh", ["x.toml"], dry_run=True, array="0-1") == \
        "sbatch --parsable --array=0-1 slurm/train.sh x.toml"


def test_array_spec_and_afterok():
    assert array_spec(10) == "0-9" and array_spec(8, 2) == "0-7%2"
    with pytest.raises(SlurmError, match="at least one task, got 0"):
        array_spec(0)
    assert afterok("5") == "afterok:5" and afterok(["5", "6"], "7") == "afterok:5:6:7"


# --------------------------------------------------------------- stage scripts from a config

SITE = {"name": "exp1", "soup": {"pls": {"ranks": 4}},
        "slurm": {"partition": "gpu", "account": "proj42", "qos": "normal", "constraint": "a100",
                  "time": "02:00:00", "mem": "8G", "gpus_per_task": 1, "mpi": "pmix",
                  "python": "/opt/env/bin/python", "log_dir": "logs/exp1",
                  "extra": ["--mail-type=END", "#SBATCH --exclusive"],
                  "setup": ["module load cuda/12.1", "source /opt/env/bin/activate"],
                  "soup": {"time": "00:20:00", "cpus_per_task": 2, "extra": ["--nodes=2"]},
                  "report": {"gpus_per_task": 0}}}

#: the soup script's directives and set-up for SITE (from its first #SBATCH line to PY=)
EXPECTED_SOUP = """\
#SBATCH --job-name=exp1-soup
#SBATCH --output=logs/exp1/%x-%j.out
#SBATCH --partition=gpu
#SBATCH --account=proj42
#SBATCH --qos=normal
#SBATCH --constraint=a100
#SBATCH --time=00:20:00
#SBATCH --ntasks=4
#SBATCH --cpus-per-task=2
#SBATCH --mem=8G
#SBATCH --gpus-per-task=1
#SBATCH --signal=TERM@60
#SBATCH --export=NONE
#SBATCH --mail-type=END
#SBATCH --exclusive
#SBATCH --nodes=2
# site set-up ([slurm] setup)
module load cuda/12.1
source /opt/env/bin/activate
set -euo pipefail
# srun steps and resubmissions keep this environment, also where sbatch runs --export=NONE
export SLURM_EXPORT_ENV=ALL
PY="${HPCSOUP_PYTHON:-/opt/env/bin/python}"
"""


def _directives_to_py(text: str) -> str:
    lines = text.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    last = next(i for i, line in enumerate(lines) if line.startswith("PY="))
    return "\n".join(lines[first:last + 1]) + "\n"


def test_a_stage_script_is_rendered_from_the_site_config():
    text = render_stage("soup", build_config(SITE))
    assert _directives_to_py(text) == EXPECTED_SOUP
    assert "exec srun --mpi=pmix --kill-on-bad-exit=1" in text
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0
    report = stage_options(build_config(SITE), "report")
    assert report["gpus_per_task"] is None and report["ntasks"] == 1 and report["time"] == "02:00:00"
    train = render_stage("train", build_config(SITE))
    assert "#SBATCH --output=logs/exp1/%x-%A_%a.out" in train and "mkdir -p logs/exp1" in train
    no_mpi = render_stage("soup", build_config(SITE, ['slurm.mpi=""']))
    assert "exec srun --kill-on-bad-exit=1" in no_mpi
    with pytest.raises(ConfigError, match="give sbatch options such as"):
        render_stage("merge", build_config(SITE, ['slurm.extra=["mail-type END"]']))
    with pytest.raises(ConfigError, match="unknown stage 'bake'"):
        render_stage("bake")


@pytest.mark.parametrize("stage", STAGES)
def test_the_repository_scripts_are_the_generic_rendering(stage):
    """slurm/<stage>.sh is what `hpcsoup slurm init` writes without a config (one source)."""
    assert (REPO / "slurm" / f"{stage}.sh").read_text() == render_stage(stage), \
        "regenerate: python -c 'from hpcsoup.jobscripts import write_scripts; write_scripts(\"slurm\")'"
    assert os.access(REPO / "slurm" / f"{stage}.sh", os.X_OK)


def test_slurm_init_writes_editable_scripts_and_the_log_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "exp.json"
    config.write_text(json.dumps(SITE))
    assert main(["slurm", "init", "mine", "--config", str(config), "--set", "slurm.time='03:00:00'"]) == 0
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == [f"{s}.sh" for s in sorted(STAGES)]
    train = (tmp_path / "mine" / "train.sh").read_text()
    assert "#SBATCH --time=03:00:00" in train and "#SBATCH --job-name=exp1-train" in train
    assert (tmp_path / "logs" / "exp1").is_dir() and "wrote" in capsys.readouterr().out
    assert main(["slurm", "init", "generic"]) == 0
    assert (tmp_path / "generic" / "soup.sh").read_text() == render_stage("soup")


def test_slurm_env_reads_the_job_environment():
    env = SlurmEnv.from_env({
        "SLURM_JOB_ID": "42", "SLURM_ARRAY_JOB_ID": "40", "SLURM_ARRAY_TASK_ID": "2",
        "SLURM_ARRAY_TASK_COUNT": "8", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "1",
        "SLURM_CPUS_PER_TASK": "4", "SLURM_JOB_GPUS": "0,1", "SLURM_RESTART_COUNT": "1",
        "SLURM_JOB_NUM_NODES": "1"})
    assert env.in_job and env.array_task_id == 2 and env.cpus_per_task == 4 and env.gpus == "0,1"
    assert env.task_label == "40_2" and env.restart_count == 1 and env.array_task_count == 8
    assert env.to_dict()["job_id"] == "42"
    empty = SlurmEnv.from_env({})
    assert not empty.in_job and empty.array_task_id is None and empty.task_label is None


# --------------------------------------------------------------- slurm/train.sh

def test_train_sh_asks_for_signal_requeue_and_logs():
    text = TRAIN_SH.read_text()
    directives = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --signal=B:USR1@90" in directives
    assert "#SBATCH --requeue" in directives
    assert "#SBATCH --output=slurm-logs/%x-%A_%a.out" in directives
    assert 'CONFIG="${1:-jobs/quickstart.toml}"' in text and "HPCSOUP_PYTHON" in text
    assert subprocess.run(["bash", "-n", str(TRAIN_SH)]).returncode == 0
    assert os.access(TRAIN_SH, os.X_OK)


@pytest.fixture
def stubs(tmp_path):
    """A stub interpreter and stub sbatch/scontrol that log their argv to files."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    py = bin_ / "python-stub"
    py.write_text(f"""#!/usr/bin/env bash
echo "$@" >> {tmp_path}/python.log
case "$*" in *--array-spec*) echo 0-4; exit 0;; esac
case "${{STUB_MODE:-ok}}" in
  ok) exit 0 ;;
  fail) exit 3 ;;
  early) kill -USR1 $$; sleep 5 ;;  # dies of USR1 before any handler exists (exit 138)
  preempt) trap 'echo got USR1 >> {tmp_path}/python.log; exit 75' USR1
           trap 'echo got TERM >> {tmp_path}/python.log; exit 75' TERM
           touch {tmp_path}/ready
           for i in $(seq 1 300); do sleep 0.1; done; exit 0 ;;
esac
""")
    for name, out in (("sbatch", "77;cluster"),
                      ("scontrol", "JobId=101 JobState=${STUB_STATE:-RUNNING} Restarts=0")):
        (bin_ / name).write_text(f"#!/usr/bin/env bash\necho \"$@\" >> {tmp_path}/{name}.log\n"
                                 f"echo \"{out}\"\n")
    # srun: drop its options, run the program (exec: signals reach it as srun forwards them)
    (bin_ / "srun").write_text(f"#!/usr/bin/env bash\necho \"$@\" >> {tmp_path}/srun.log\n"
                               f"while [[ $1 == -* ]]; do shift; done\nexec \"$@\"\n")
    for f in bin_.iterdir():
        f.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_}:{env['PATH']}", HPCSOUP_PYTHON=str(py))
    return tmp_path, env


def _log(tmp: Path, name: str) -> list[str]:
    path = tmp / f"{name}.log"
    return path.read_text().splitlines() if path.exists() else []


def test_train_sh_array_task_passes_config_overrides_and_task_id(stubs):
    tmp, env = stubs
    env.update(SLURM_JOB_ID="101", SLURM_ARRAY_JOB_ID="100", SLURM_ARRAY_TASK_ID="3")
    proc = subprocess.run(["bash", str(TRAIN_SH), "jobs/x.toml", "experts.epochs=5", "--set",
                           "store=runs/y.zarr"], env=env, cwd=tmp, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert _log(tmp, "python") == ["-m hpcsoup train --config jobs/x.toml --set experts.epochs=5 "
                                   "--set store=runs/y.zarr --task-id 3"]
    assert _log(tmp, "srun")[0].startswith("--ntasks=1 --mpi=none ")  # a job step
    assert _log(tmp, "scontrol") == []


def test_train_sh_default_config_and_exit_status(stubs):
    tmp, env = stubs
    env.update(SLURM_JOB_ID="101", SLURM_ARRAY_TASK_ID="0", STUB_MODE="fail")
    proc = subprocess.run(["bash", str(TRAIN_SH)], env=env, cwd=tmp, capture_output=True, text=True)
    assert proc.returncode == 3
    assert _log(tmp, "python") == ["-m hpcsoup train --config jobs/quickstart.toml --task-id 0"]


def test_train_sh_without_array_submits_itself_as_an_array_and_waits_for_it(stubs):
    tmp, env = stubs
    env.update(SLURM_JOB_ID="55", SLURM_JOB_PARTITION="debug")
    proc = subprocess.run(["bash", str(TRAIN_SH), "jobs/x.toml", "a=1"], env=env, cwd=tmp,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert _log(tmp, "python") == ["-m hpcsoup train --config jobs/x.toml --set a=1 --array-spec"]
    assert _log(tmp, "sbatch") == [f"--wait --parsable --array=0-4 --partition=debug {TRAIN_SH} "
                                   f"jobs/x.toml a=1"]
    assert proc.stdout.strip() == "77" and (tmp / "slurm-logs").is_dir()
    assert "every task completed" in proc.stderr


def test_train_sh_outside_slurm_trains_all(stubs):
    tmp, env = stubs
    proc = subprocess.run(["bash", str(TRAIN_SH), "jobs/x.toml"], env=env, cwd=tmp,
                          capture_output=True, text=True)
    assert proc.returncode == 0
    assert _log(tmp, "python") == ["-m hpcsoup train --config jobs/x.toml --all"]


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_train_sh_forwards_the_signal_and_requeues(stubs, sig):
    """SLURM signals the batch shell (B:USR1); the trainer gets it, exits 75; the task is requeued."""
    tmp, env = stubs
    env.update(SLURM_JOB_ID="101", SLURM_ARRAY_JOB_ID="100", SLURM_ARRAY_TASK_ID="1",
               STUB_MODE="preempt")
    proc = subprocess.Popen(["bash", str(TRAIN_SH), "jobs/x.toml"], env=env, cwd=tmp,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not (tmp / "ready").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 75, err
    assert f"got {sig.name[3:]}" in _log(tmp, "python")
    assert "requeue 101" in _log(tmp, "scontrol")
    assert "checkpointed on a signal; requeueing job 101" in err
    assert "job 101 requeued: when it runs again it continues from its last" in err


def test_train_sh_requeues_a_trainer_killed_by_the_signal_at_start_up(stubs):
    """The FAILED 138 path: USR1 reached the trainer before it installed its handler."""
    tmp, env = stubs
    env.update(SLURM_JOB_ID="101", SLURM_ARRAY_TASK_ID="1", STUB_MODE="early")
    proc = subprocess.run(["bash", str(TRAIN_SH), "jobs/x.toml"], env=env, cwd=tmp,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 75, proc.stderr
    assert "stopped by a signal before it could checkpoint (exit 138)" in proc.stderr
    assert "requeue 101" in _log(tmp, "scontrol")


def test_train_sh_does_not_requeue_a_cancelled_job_and_says_when_slurm_refuses(stubs, tmp_path):
    tmp, env = stubs
    env.update(SLURM_JOB_ID="101", SLURM_ARRAY_TASK_ID="1", STUB_MODE="early", STUB_STATE="CANCELLED")
    proc = subprocess.run(["bash", str(TRAIN_SH), "jobs/x.toml"], env=env, cwd=tmp,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 138 and "cancelled: not requeueing" in proc.stderr
    assert "requeue 101" not in _log(tmp, "scontrol")
    scontrol = tmp / "bin" / "scontrol"  # a SLURM that refuses the requeue
    scontrol.write_text(scontrol.read_text().replace('echo "JobId', 'case "$1" in requeue) exit 1;; '
                                                     'esac\necho "JobId'))
    env.update(STUB_STATE="RUNNING")
    proc = subprocess.run(["bash", str(TRAIN_SH), "jobs/x.toml"], env=env, cwd=tmp,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 75 and "SLURM refused the requeue (scontrol exit 1" in proc.stderr
    assert "requeued:" not in proc.stderr
