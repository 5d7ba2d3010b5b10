"""Experiment configs: the quick-start file, --set overrides and clear errors."""
from pathlib import Path

import pytest

from hpcsoup.config import SCHEMA, build_config, load_config, parse_override
from hpcsoup.errors import ConfigError

QUICKSTART = Path(__file__).resolve().parents[1] / "jobs" / "quickstart.toml"


def test_quickstart_loads_with_defaults_filled_in():
    cfg = load_config(QUICKSTART)
    assert cfg.name == "quickstart" and cfg.store == "runs/quickstart.zarr"
    assert cfg.data.dataset == "Cora" and cfg.data.root == ""
    assert (cfg.experts.arch, cfg.experts.count, cfg.experts.epochs) == ("sage", 8, 100)
    assert cfg.specialists.archs == ["gcn", "gat"]
    assert cfg.soup.methods == ["uniform", "greedy", "gis", "learned", "pls"]
    assert (cfg.soup.pls.partitions, cfg.soup.pls.per_step, cfg.soup.pls.ranks) == (8, 2, 2)
    assert cfg.soup.gis.granularity == 20                       # a default
    assert cfg["soup.pls.partitions"] == 8
    assert build_config(cfg.to_dict()).to_dict() == cfg.to_dict()


def test_defaults_only():
    cfg = load_config(None)
    assert cfg.experts.lr == 0.01 and cfg.soup.pls.partitions == 32


def test_overrides_parse_toml_values():
    cfg = load_config(QUICKSTART, overrides=[
        "experts.count=4", "experts.lr=0.05", "soup.methods=['uniform', 'pls']",
        "merge.calibration=false", "data.dataset=synthetic-products", "experts.lr = 1",
        'store="runs/x.zarr"'])
    assert cfg.experts.count == 4 and isinstance(cfg.experts.count, int)
    assert cfg.experts.lr == 1.0 and isinstance(cfg.experts.lr, float)   # int -> float field
    assert cfg.soup.methods == ["uniform", "pls"]
    assert cfg.merge.calibration is False
    assert cfg.data.dataset == "synthetic-products"                   # bare string fallback
    assert cfg.store == "runs/x.zarr"
    assert parse_override("soup.pls.ranks=4") == (["soup", "pls", "ranks"], 4)


def test_unknown_key_names_it_and_the_allowed_keys():
    with pytest.raises(ConfigError, match=r"unknown config key 'experts.cnt'; allowed in "
                                          r"'experts': \[.*'count'.*\]"):
        load_config(None, overrides=["experts.cnt=3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'soup.pls.nope'.*'per_step'"):
        build_config({"soup": {"pls": {"nope": 1}}})
    with pytest.raises(ConfigError, match=r"unknown config key 'bogus'; allowed in '<top level>'"):
        build_config({"bogus": 1})
    with pytest.raises(ConfigError, match=r"'experts' must be a \[section\]"):
        build_config({"experts": 3})


def test_bad_choice_lists_the_choices():
    with pytest.raises(ConfigError, match=r"'experts.arch' = 'mlp': 'mlp' is not allowed; "
                                          r"choose from \['gcn', 'sage', 'gat', 'gin'\]"):
        load_config(None, overrides=["experts.arch=mlp"])
    with pytest.raises(ConfigError, match=r"'soup.methods'.*'best' is not allowed.*'pls'"):
        load_config(None, overrides=["soup.methods=['uniform', 'best']"])


def test_bad_type_and_bad_value():
    with pytest.raises(ConfigError, match=r"'experts.count' = 'four': expected int"):
        load_config(None, overrides=["experts.count=four"])
    with pytest.raises(ConfigError, match=r"'experts.count' = True: expected int"):
        load_config(None, overrides=["experts.count=true"])
    with pytest.raises(ConfigError, match=r"'experts.dropout' = 1.5: in \[0, 1\)"):
        load_config(None, overrides=["experts.dropout=1.5"])
    with pytest.raises(ConfigError, match=r"'device' = 'tpu'.*'cpu', 'cuda' or 'cuda:N'"):
        load_config(None, overrides=["device=tpu"])
    with pytest.raises(ConfigError, match=r"expected key=value"):
        load_config(None, overrides=["experts.count"])


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[experts\ncount = 3\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(bad)


def test_section_access_errors_name_the_key():
    cfg = load_config(None)
    with pytest.raises(AttributeError, match="config has no key 'soup.pls.nope'"):
        cfg.soup.pls.nope
    assert set(SCHEMA) >= {"store", "data", "experts", "soup", "merge", "slurm"}


def test_bare_key_value_arguments_are_overrides_anywhere_on_the_line(capsys):
    from hpcsoup.cli import build_parser, overrides_of, parse_args

    args = parse_args(build_parser(), ["merge", "--config", "x.toml", "merge.threshold=0.3", "--json",
                                       "merge.seed=2", "--set", "store=\"s\"", "--store", "t"])
    assert args.json and args.config == "x.toml"
    assert overrides_of(args) == ["store=\"s\"", "merge.threshold=0.3", "merge.seed=2", "store=\"t\""]
    for bad in (["merge", "--config", "x.toml", "stray"], ["data", "info", "Cora", "k=v"]):
        with pytest.raises(SystemExit):
            parse_args(build_parser(), bad)
        assert "unrecognized arguments" in capsys.readouterr().err
