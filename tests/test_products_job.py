"""jobs/products.toml, the ogbn-products study: it loads, validates and plans (nothing is run)."""
from pathlib import Path

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
