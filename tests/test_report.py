"""``hpcsoup report``: report.md, report.json and the plots of a store (hpcsoup/report.py).

The store is written through :class:`hpcsoup.store.Store` with attrs shaped like those the stages
write (hpcsoup/train/run.py, hpcsoup/soup/run.py, hpcsoup/distributed/pls.py, hpcsoup/merge/run.py),
not by training: a scaling sweep over graph sizes and ranks would take minutes. The numbers are
made up but plausible; tests/test_pipeline.py reports a store of real runs.
"""
import json
import re

import pytest
import torch

from hpcsoup.report import report
from hpcsoup.store import Store, provenance

CONFIG = {"name": "sweep", "data": {"dataset": "synthetic-products"}, "soup": {"methods": ["uniform"]}}
PNG = b"\x89PNG\r\n\x1a\n"


def _state():
    return {"w": torch.ones(2, 2)}


def _expert(store, gid, dataset, val, test, seconds, role="expert", arch="sage"):
    store.write_group("experts", gid, _state(), {
        "arch": arch, "role": role, "dataset": dataset, "seed": 0, "config": CONFIG,
        "metrics": {"metric": "accuracy", "val": val, "test": test, "best_epoch": 9},
        "train_seconds": seconds, "versions": provenance(),
        "slurm": {"job_id": "4242", "array_job_id": "4240"}})


def _soup(store, gid, dataset, method, test, seconds, rss_mib, seed=0, ranks=1, extras=None,
          metrics=None):
    store.write_group("soups", gid, _state(), {
        "method": method, "arch": "sage", "dataset": dataset, "ingredients": ["a", "b", "c"],
        "metrics": {"metric": "accuracy", "val": test - 0.01, "test": test, **(metrics or {})},
        "seconds": seconds, "peak_rss_bytes": int(rss_mib * 2**20), "ranks": ranks, "seed": seed,
        "settings": {}, "extras": extras or {}, "versions": provenance(), "config": CONFIG})


def _merge(store, gid, dataset):
    timing = {"child": {"uncached": 0.020, "cached": 0.012, "cached_attention": 0.010},
              "ensemble": {"uncached": 0.015, "cached": 0.0146, "cached_attention": 0.011},
              "speedup": {"uncached": 0.69, "cached": 1.26, "cached_attention": 1.1}}
    store.write_group("merges", gid, _state(), {
        "method": "hgrama", "parents": ["gcn-s0", "gat-s1"], "dataset": dataset,
        "metrics": {"metric": "accuracy", "val": 0.7, "test": 0.777, "ensemble_test": 0.790,
                    "parents": {"gcn-s0": {"test": 0.527}, "gat-s1": {"test": 0.604}},
                    "retention_mean": 0.9976, "retention_min": 0.9668,
                    "speedup_vs_ensemble": 1.26, "speedup_uncached": 0.69, "timing": timing},
        "seconds": {"merge": 11.8, "total": 14.2}, "versions": provenance(), "config": CONFIG})


@pytest.fixture
def sweep_store(tmp_path):
    """Soups, a merge and a scaling sweep: three graph sizes, PLS on 1, 2 and 4 ranks, two seeds."""
    store = Store.create(tmp_path / "sweep.zarr", attrs={"name": "sweep", "config": CONFIG,
                                                         "created": provenance()})
    for nodes, factor in ((1000, 1), (10000, 8), (100000, 70)):
        data = f"synthetic-products-{nodes}"
        for i in range(2):
            _expert(store, f"sage-e{i}-{nodes}", data, 0.80 + 0.01 * i, 0.79 + 0.01 * i,
                    95.9959 * factor * (1 + 0.1 * i))
        for seed in (0, 1):
            _soup(store, f"uniform-{nodes}-{seed}", data, "uniform", 0.811 + 0.002 * seed,
                  0.19 * factor, 525.4023 * factor ** 0.5, seed=seed)
        _soup(store, f"learned-{nodes}", data, "learned", 0.820, 4.3 * factor, 530 * factor ** 0.5,
              extras={"moved": True})
        for ranks in (1, 2, 4) if nodes == 100000 else (1,):
            for seed in (0, 1):
                extras = {"halo": 0 if ranks == 4 else 2, "moved": seed == 0, "ranks": ranks,
                          "core_nodes_per_rank": [nodes // ranks] * ranks}
                _soup(store, f"pls-{nodes}-{ranks}-{seed}", data, "pls", 0.805 + 0.004 * seed,
                      2.0 * factor / ranks * (1 + 0.1 * seed), 470 * factor ** 0.5 / ranks, seed=seed,
                      ranks=ranks, extras=extras, metrics={"exact": ranks < 4})
    _expert(store, "gcn-s0", "synthetic-products-1000", 0.55, 0.527, 14.6, role="specialist",
            arch="gcn")
    _merge(store, "hgrama-gcn-s0+gat-s1-1", "synthetic-products-1000")
    return store


def test_report_of_soups_merges_and_a_scaling_sweep(sweep_store, tmp_path):
    out = tmp_path / "out"
    result = report(sweep_store.path, out=out)
    for name in ("soups", "merges", "scaling"):
        png, pdf = result["plots"][name]
        assert png.endswith(f"{name}.png") and pdf.endswith(f"{name}.pdf")
        assert open(png, "rb").read(8) == PNG and open(pdf, "rb").read(5) == b"%PDF-"
    text = (out / "report.md").read_text()
    for name in ("soups", "merges", "scaling"):
        assert f"]({name}.png)" in text, f"report.md does not embed {name}.png"
    # paper precision: scores to 3 decimals, seconds and MiB to 2 significant figures
    assert "| uniform | 1 | - | yes | - | 2 | 0.802 ± 0.001 | 0.812 ± 0.001 | 0.19 ± 0 | 530 ± 0 |" \
        in text  # 0.19 s and 525.4023 MiB in both seeds
    assert "| synthetic-products-1000 | sage | expert | 2 | accuracy | 0.805 ± 0.007 | 0.795 ± 0.007 " \
           "| 100 ± 6.8 |" in text  # 95.9959 s and 105.6 s
    assert not re.search(r"\d\.\d{4,}", text.split("## Provenance")[0]), "a number with 4+ decimals"
    # PLS rows: ranks, halo, whether the score is exact, whether the coefficients moved
    pls = [line for line in text.splitlines() if line.startswith("| pls |")]
    assert len(pls) == 5  # 1 rank at each size, 2 and 4 ranks at the largest (seeds pooled)
    assert "| pls | 4 | 0 | no | yes | 2 | 0.797 ± 0.003 | 0.807 ± 0.003 | 37 ± 2.5 | 980 ± 0 |" in pls[-1]
    assert pls[0].startswith("| pls | 1 | 2 | yes | yes | 2 |")
    assert "| best expert (sage-e1-1000) |" in text
    # merges: child vs parents vs ensemble, retention, cached and uncached speedups
    assert "| gcn-s0 + gat-s1 | synthetic-products-1000 | accuracy | 0.777 | 0.790 | 0.527, 0.604 |" \
        in text and "0.998 / 0.967" in text and "1.3x / 0.69x" in text
    # scaling: every stage at every size, PLS at every rank count
    assert "## Scaling" in text and "| soup pls | synthetic-products-100000 | 100,000 | 4 | 2 |" in text
    assert "| train (per expert) | synthetic-products-100000 | 100,000 | 1 | 2 | 7100 ± 480 | - |" in text
    assert "| train (per specialist) | synthetic-products-1000 | 1,000 | 1 | 1 | 15 | - |" in text
    # provenance and configuration
    assert "## Provenance" in text and "SLURM jobs: 4240" in text and "- torch: " in text
    assert '"dataset": "synthetic-products"' in text
    saved = json.loads((out / "report.json").read_text())
    assert len(saved["soups"]) == 19 and all(s["peak_mib"] > 0 for s in saved["soups"])


def test_report_of_one_run_has_no_scaling_plot(tmp_path):
    store = Store.create(tmp_path / "one.zarr", attrs={"name": "one", "config": CONFIG})
    _expert(store, "sage-e000", "Cora", 0.78, 0.796, 17.0)
    _soup(store, "u", "Cora", "uniform", 0.799, 0.19, 510)
    result = report(store.path)
    assert set(result["plots"]) == {"soups"}
    text = (tmp_path / "one.zarr.report" / "report.md").read_text()
    assert "## Scaling" not in text and "## Merges" not in text
    assert result["markdown"] == str(tmp_path / "one.zarr.report" / "report.md")
