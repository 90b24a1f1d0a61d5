"""Every shipped config file is exercised: the YAML configs validate, the cluster entrypoints use real flags."""

import shlex
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from swm_ray.cli import app
from swm_ray.config import build_config, load_yaml_text

ROOT = Path(__file__).resolve().parent.parent


SHIPPED = sorted((ROOT / "swm_ray" / "configs").glob("*.yaml"))


def test_configs_are_shipped_in_one_place():
    assert {p.stem for p in SHIPPED} >= {"best", "paper", "cka", "grid-smollm2"}
    assert not (ROOT / "configs").exists()  # one home: swm_ray/configs (installed with the package)


@pytest.mark.parametrize("path", [p for p in SHIPPED if not p.stem.startswith("zoo-")], ids=lambda p: p.name)
def test_configs_validate(path):
    _, data = load_yaml_text(str(path))
    cfg = build_config(data)
    assert cfg.select.criterion in ("output", "cka", "kl")


@pytest.mark.parametrize("path", [p for p in SHIPPED if p.stem.startswith("zoo-")], ids=lambda p: p.name)
def test_zoo_files_validate(path, tmp_path):
    from swm_ray.jobs.zoo import load_zoo

    entries, opts = load_zoo(str(path), str(tmp_path / "zoo"))
    assert entries and len({e.cfg.out for e in entries}) == len(entries)
    assert all(e.cfg.eval.enabled and e.cfg.select.layers for e in entries)
    assert opts["concurrency"] in (None, *range(1, 64))


def _help(command: str) -> str:
    return CliRunner().invoke(app, [command, "--help"], terminal_width=200).output


def test_cluster_entrypoints_use_existing_flags():
    job = yaml.safe_load((ROOT / "cluster" / "kuberay-rayjob.yaml").read_text())
    args = shlex.split(job["spec"]["entrypoint"])
    assert args[0] == "swm-ray"
    help_text = _help(args[1])
    for flag in (a for a in args if a.startswith("--")):
        assert flag in help_text, flag
    cluster = yaml.safe_load((ROOT / "cluster" / "ray-up-aws.yaml").read_text())
    assert cluster["head_node_type"] in cluster["available_node_types"]


def test_the_paper_config_is_what_paper_sets():
    """`--config paper` and `--paper` are one procedure: the file sets every key the flag does, to its value."""
    from swm_ray.commands.compress import PAPER

    _, data = load_yaml_text(str(ROOT / "swm_ray" / "configs" / "paper.yaml"))
    cfg = build_config(data)
    for dotted, value in PAPER.items():
        section, key = dotted.split(".")
        assert getattr(getattr(cfg, section), key) == value, dotted
