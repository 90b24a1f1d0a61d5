"""The config tree: validation, precedence, --set parsing."""

import pytest
from pydantic import ValidationError

from swm_ray.config import RunConfig, build_config, dump_yaml, parse_set
from swm_ray.errors import UserError


def test_defaults_are_the_papers():
    cfg = RunConfig()
    assert (cfg.data.samples, cfg.data.seq_len, cfg.data.seed) == (10, 128, 1234)
    assert cfg.model.source == "builtin:smollm2-135m" and cfg.data.source == "builtin:lambada"
    assert cfg.select.criterion == "output" and cfg.select.search == "best-first"


def test_precedence_yaml_flags_set():
    cfg = build_config({"data": {"samples": 20, "seq_len": 64}}, {"data.samples": 30, "data.seed": None},
                       parse_set(["data.seq_len=32", "stats.kernel=rbf"]))
    assert (cfg.data.samples, cfg.data.seq_len, cfg.data.seed, cfg.stats.kernel) == (30, 32, 1234, "rbf")


def test_unknown_keys_and_bad_values_are_one_line_errors():
    with pytest.raises(UserError, match="data.sampels: unknown key"):
        build_config({"data": {"sampels": 3}})
    with pytest.raises(UserError, match="stats.kernel"):
        build_config(sets={"stats.kernel": "cubic"})
    with pytest.raises(UserError, match="batch size must be at least 4"):
        build_config(sets={"data.batch_size": 2})
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        parse_set(["novalue"])


def test_frozen_and_round_trip():
    cfg = RunConfig()
    with pytest.raises(ValidationError):
        cfg.data.samples = 3
    import yaml

    assert RunConfig.model_validate(yaml.safe_load(dump_yaml(cfg))) == cfg


def test_fingerprint_counts_only_settings_that_differ_from_their_defaults():
    """A zoo entry or a partial state stays valid when a setting is spelled out at its default value (or a
    new setting is added at a default that keeps the old behaviour); any real change is a new fingerprint."""
    from swm_ray.io.runstate import fingerprint

    plain = build_config(flags={"select.layers": 4})
    spelled = build_config(flags={"select.layers": 4, "merge.method": "reference", "select.search": "best-first"})
    assert fingerprint(plain) == fingerprint(spelled)
    assert fingerprint(plain) != fingerprint(build_config(flags={"select.layers": 6}))
    assert fingerprint(plain) != fingerprint(build_config(flags={"select.layers": 4, "merge.method": "mean"}))
    assert fingerprint(plain) == fingerprint(build_config(flags={"select.layers": 4, "model.stream": "always"}))
