"""User mistakes that were let through, crashed with a traceback, or were found only after the work: each is
refused in one line, with exit code 2, before anything is written at the output path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from swm_ray.cli import app
from swm_ray.config import build_config
from swm_ray.errors import UserError
from swm_ray.plan.plan import Plan

runner = CliRunner()


def _refused(args, said: str, out: Path | None = None) -> str:
    res = runner.invoke(app, [*map(str, args)])
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2, res.output[-3000:]
    assert len(lines) == 1 and said in lines[0], res.output[-3000:]
    assert "Traceback" not in res.output
    if out is not None:
        assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))
    return lines[0]


def test_a_config_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "u16.yaml"
    path.write_bytes("data:\n  samples: 5\n".encode("utf-16"))
    _refused(["config", path], "is not UTF-8 text")
    _refused(["compress", "-c", path, "--out", tmp_path / "o"], "is not UTF-8 text", tmp_path / "o")


def test_a_list_given_as_a_scalar_says_how_to_write_a_list():
    for key, value in (("eval.tasks", "boolq"), ("grid.layers", "2,4")):
        with pytest.raises(UserError, match=rf"write a list, e.g. {key}=\[{value}\]"):
            build_config(sets={key: value})


def test_unknown_tasks_are_refused_when_the_config_is_read(tmp_path):
    from swm_ray.config import PAPER_TASKS
    from swm_ray.evaluation.zeroshot import TASKS

    assert tuple(TASKS) == PAPER_TASKS  # the config checks names against the tasks the evaluation has
    with pytest.raises(UserError, match="unknown task.*nosuch"):
        build_config(sets={"eval.tasks": ["piqa", "nosuch"]})
    assert build_config(sets={"eval.tasks": ["none"]}).eval.tasks == ("none",)
    assert build_config(sets={"eval.tasks": ["PIQA"]}).eval.tasks == ("PIQA",)
    # the grid ran all its trials and wrote a table of errors; compress --eval compressed first
    _refused(["grid", "--layers", "2", "--tasks", "nosuch", "--out", tmp_path / "g"], "unknown task", tmp_path / "g")
    _refused(["compress", "--method", "shortgpt", "--layers", "2", "--eval", "--set", "eval.tasks=[nosuch]", "--out",
              tmp_path / "c"], "unknown task", tmp_path / "c")


def test_settings_out_of_range_or_empty():
    with pytest.raises(UserError, match="heal.target_modules"):
        build_config(sets={"heal.target_modules": []})
    with pytest.raises(UserError, match=">= 0"):
        build_config(sets={"select.protected_layers": [-1]})
    with pytest.raises(UserError, match="output path is empty"):
        build_config(flags={"out": " "})


def test_protected_layers_beyond_the_model(tiny_llama_dir, tokens_parquet, tmp_path):
    from swm_ray.recipes.preflight import check_targets

    cfg = build_config(flags={"model.source": str(tiny_llama_dir), "data.source": str(tokens_parquet),
                              "select.method": "shortgpt", "select.layers": 1},
                       sets={"select.protected_layers": [2, 6]})
    with pytest.raises(UserError, match=r"protected_layers \[6\]: the model has 6 decoder layers \(0-5\)"):
        check_targets(cfg)


def test_flags_the_method_or_mode_would_ignore(tmp_path):
    out = tmp_path / "o"
    for flag, value in (("--criterion", "kl"), ("--search", "top-down"), ("--merge", "mean")):
        _refused(["compress", "--method", "shortgpt", "--layers", "2", flag, value, "--out", out],
                 f"{flag} is a setting of --method swm", out)
    _refused(["compress", "--method", "shortgpt", "--layers", "2", "--heal-data", tmp_path / "t.txt", "--out", out],
             "--heal-data is the training text of --heal", out)
    folder = tmp_path / "model"  # refused before the folder is read
    for extra, said in ((["--mode", "local", "--keep-adapter"], "--keep-adapter is a setting of --mode lora"),
                        (["--mode", "local", "--resume"], "--resume is a setting of --mode lora"),
                        (["--mode", "local", "--workers", "2"], "--workers is a setting of --mode lora"),
                        (["--source", "x"], "--source is a setting of --mode local")):
        _refused(["heal", folder, *extra, "--out", out], said, out)


def test_config_and_zoo_names_are_not_crossed(tmp_path):
    _refused(["config", "zoo-smollm2"], "is a shipped zoo file: run `swm-ray zoo zoo-smollm2`")
    _refused(["zoo", "best", "--out", tmp_path / "z"], "is a shipped config, not a zoo file", tmp_path / "z")
    line = _refused(["zoo", "zoo-nosuch", "--out", tmp_path / "z"], "shipped zoo files: zoo-smollm2", tmp_path / "z")
    assert "best" not in line
    assert "zoo-smollm2" not in _refused(["config", "nosuch"], "shipped configs:")


def _zoo(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "zoo.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_zoo_mistakes_found_before_any_entry_runs(tmp_path):
    from swm_ray.jobs.zoo import load_zoo

    cases = (
        ({"defaults": [1], "models": ["a"]}, "defaults must be a mapping"),
        ({"models": ["a"]}, r"model 1 \(a\): give a target"),
        ({"models": [{"source": "a", "select": {"method": "flap", "layers": 2}}]}, "give --ratio"),
        ({"models": [{"source": "a", "select": {"method": "shortgpt", "threshold": 0.5}}]}, "ranks layers once"),
    )
    for data, said in cases:
        with pytest.raises(UserError, match=said) as e:
            load_zoo(str(_zoo(tmp_path, data)), str(tmp_path / "o"))
        assert "\n" not in str(e.value)
    zoo = _zoo(tmp_path, {"defaults": {"select": {"layers": 2}}, "models": ["a"]})
    assert load_zoo(str(zoo), str(tmp_path / "o"))[0][0].cfg.select.layers == 2
    _refused(["zoo", zoo, "--retry-failed", "--out", tmp_path / "o"], "no earlier zoo run", tmp_path / "o")


def test_a_plan_of_the_wrong_shape(tmp_path):
    with pytest.raises(UserError, match="compensation must be a JSON object"):
        Plan.from_dict({"windows": [[1, 2]], "num_layers_before": 6, "merge": "mean", "compensation": "garbage"})
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"windows": [[1, 2]], "num_layers_before": 6, "merge": "mean", "extra": [1]}))
    _refused(["apply", path, "--out", tmp_path / "o"], "extra must be a JSON object", tmp_path / "o")
    # a hand-edited window with the counts of the plan before: described by its windows
    stale = Plan.from_dict({"windows": [[0, 5]], "num_layers_before": 6, "merge": "mean", "removed_layers": [4, 5],
                            "num_layers_after": 4})
    assert stale.removed_layers == [1, 2, 3, 4, 5] and stale.num_layers_after == 1
    assert Plan.from_dict({"windows": [[3, 3]], "num_layers_before": 6, "merge": "mean"}).num_layers_after == 6


def test_a_folder_given_for_a_file_names_the_plan_only_where_there_is_one(tmp_path):
    empty, run = tmp_path / "empty", tmp_path / "run"
    empty.mkdir()
    run.mkdir()
    (run / "plan.json").write_text("{}")
    assert "plan.json" not in _refused(["apply", empty, "--out", tmp_path / "o"], "is a folder where a file")
    assert f"(a plan: {run}/plan.json)" in _refused(["apply", run, "--out", tmp_path / "o"], "is a folder where")


def test_eval_refuses_a_missing_or_empty_perplexity_text_before_any_model(tmp_path):
    from swm_ray.jobs.eval import run_eval

    (tmp_path / "empty.txt").write_text("\n  \n")
    for text, said in ((tmp_path / "nosuch.txt", "nosuch.txt: file not found"),
                       (tmp_path / "empty.txt", "the text is empty")):
        cfg = build_config(sets={"eval.tasks": [], "eval.ppl_data": str(text)})
        with pytest.raises(UserError, match=said):  # the model does not exist: it was never opened
            run_eval(cfg, [str(tmp_path / "no-model")], use_ray=False)


def test_a_malformed_memory_size_is_refused_when_the_settings_are_read(tmp_path):
    """It was found only once a job had started its actors."""
    for value, said in (("abc", "expected a size such as 2GB"), ("0GB", "must be more than zero")):
        with pytest.raises(UserError, match=said):
            build_config(sets={"model.max_memory": value})
        _refused(["compress", "--layers", "2", "--max-memory", value, "--out", tmp_path / "o"], said, tmp_path / "o")
    assert build_config(sets={"model.max_memory": "1.5GiB"}).model.max_memory == "1.5GiB"


def test_heal_without_a_model_folder(tmp_path):
    """It trained the builtin original model, which is not a compressed folder."""
    _refused(["heal", "--out", tmp_path / "h"], "no model folder given", tmp_path / "h")
    _refused(["heal", "--mode", "local", "--out", tmp_path / "h"], "no model folder given", tmp_path / "h")


def test_an_empty_task_list_is_not_taken_for_none(tmp_path):
    """`--tasks ""` (an unset variable) ran no zero-shot task without a word; `none` says that."""
    _refused(["eval", "--tasks", "", "--out", tmp_path / "e.json"], "names no task", tmp_path / "e.json")
    _refused(["grid", "--layers", "2", "--tasks", " , ", "--out", tmp_path / "g"], "names no task", tmp_path / "g")
