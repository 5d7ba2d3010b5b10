"""jobs/products.toml, the ogbn-products study: it loads, validates and plans (nothing is run)."""
from pathlib import Path

import pytest

from hpcsoup.config import load_config
from hpcsoup.pipeline import submit
from hpcsoup.train import sweep

JOB = Path(__file__).resolve().parents[1] / "jobs" / "products.toml"


def test_products_job_loads_and_describes_the_study():
    cfg = load_config(JOB)
    assert (cfg.data.dataset, cfg.data.nodes) == ("synthetic-products", 2_450_000)
    e = cfg.experts
    assert e.batching == "partitions" and e.patience > 0
    assert e.batch_partitions == cfg.soup.pls.partitions       # one partition for both stages
    assert set(cfg.soup.methods) == {"uniform", "greedy", "gis", "learned", "pls"}
    assert cfg.soup.pls.ranks == 2
    archs = cfg.specialists.archs
    assert len(archs) == 2 and len(set(archs)) == 2            # a heterogeneous pair for H-GRAMA
    assert len(sweep.tasks(cfg)) == e.count + 2


def test_real_products_is_one_key_away_and_submit_sends_the_same_file():
    cfg = load_config(JOB, ["data.dataset=ogbn-products"])
    assert cfg.data.dataset == "ogbn-products"
    plan = submit(cfg, str(JOB), dry_run=True)["jobs"]
    assert set(plan) == {"train", "soup", "merge", "report"}
    assert all(command.endswith(str(JOB)) for command in plan.values())
    assert "--array=0-5" in plan["train"]
    from hpcsoup.jobscripts import render_stage
    assert "#SBATCH --ntasks=2" in render_stage("soup", cfg)  # PLS on 2 ranks


def test_a_study_that_cannot_fit_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    """The estimate (graph tensors x the measured stage factor) against the SLURM job's mem for
    `submit` and against this machine's room for `run` (mocked: 4 GiB, this machine has more):
    both refuse 2.45M nodes at once, naming the key and the estimate; nothing is written."""
    from hpcsoup import pipeline
    from hpcsoup.cli import main
    from hpcsoup.data.footprint import slurm_bytes
    from hpcsoup.errors import ConfigError

    assert [slurm_bytes(m) for m in ("16G", "500M", "2048", "1.5T", "", "lots")] == \
        [16 * 2**30, 500 * 2**20, 2048 * 2**20, int(1.5 * 2**40), None, None]
    monkeypatch.chdir(tmp_path)
    small = load_config(JOB, ["slurm.mem=4G"])
    with pytest.raises(ConfigError, match=r"data.nodes = 2,450,000: the train stage "
                                          r"needs about \d+\.\d GiB .*the train job \(slurm mem = "
                                          r"'4G'\) can get 4\.0 GiB; lower data.nodes"):
        submit(small, str(JOB), dry_run=True)
    papers = load_config(JOB, ["data.dataset=ogbn-papers100M"])
    with pytest.raises(ConfigError, match=r"data.dataset = 'ogbn-papers100M' \(111,059,956 nodes\)"
                                          r".* use a smaller dataset"):
        submit(papers, str(JOB), dry_run=True)
    monkeypatch.setattr(pipeline, "available_bytes", lambda: 4 * 2**30)
    code = main(["run", str(JOB), "--store", str(tmp_path / "s.zarr")])
    err = capsys.readouterr().err
    assert code == 2 and "this machine can get 4.0 GiB" in err and "Traceback" not in err
    assert "the merge stage needs about" in err  # run checks the largest stage it will run
    assert list(tmp_path.iterdir()) == []  # no store, no partition, no logs
