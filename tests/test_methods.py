"""One pipeline for every method: `compress --method`, `apply` replaying a plan byte for byte, grid rows equal
to `compress` runs, and `zoo` batches with a manifest, skips and retries."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from tiny_models import tiny_model
from typer.testing import CliRunner

from swm_ray.cli import app
from swm_ray.config import BASELINES, build_config
from swm_ray.errors import UserError
from swm_ray.jobs.apply import run_apply
from swm_ray.jobs.compress import run_compress


def _cfg(model_dir, data, out, **flags):
    base = {"model.source": str(model_dir), "data.source": str(data), "data.samples": 16, "data.seq_len": 16,
            "data.batch_size": 4, "out": str(out), "select.layers": 2, "ray.actors": 2, "select.method": "swm"}
    return build_config(flags={**base, **flags})


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.suffix == ".safetensors" or p.name in (
        "config.json", "model.safetensors.index.json", "generation_config.json", "tokenizer.json")}


def test_apply_reproduces_compress_byte_for_byte(ray_session, tiny_llama_dir, tokens_parquet, tmp_path):
    res = run_compress(_cfg(tiny_llama_dir, tokens_parquet, tmp_path / "c", **{"merge.method": "mean"}))
    plan = tmp_path / "c" / "plan.json"
    applied = run_apply(build_config(flags={"out": str(tmp_path / "a")}), str(plan))
    assert applied["checked"] and applied["source"] == str(tiny_llama_dir)
    a, b = _files(tmp_path / "c"), _files(tmp_path / "a")
    assert a.keys() == b.keys() and "config.json" in a
    assert all(a[k] == b[k] for k in a)  # tensors and config, byte for byte
    assert json.loads((tmp_path / "a" / "plan.json").read_text())["windows"] == res["plan"]["windows"]


def test_apply_refuses_other_weights_unless_forced(ray_session, tiny_llama_dir, tokens_parquet, tmp_path):
    run_compress(_cfg(tiny_llama_dir, tokens_parquet, tmp_path / "c"))
    other = tmp_path / "other"
    model, tok = tiny_model("llama", n_layers=6, seed=9)  # same shape, other weights
    model.save_pretrained(other)
    tok.save_pretrained(other)
    with pytest.raises(UserError, match="not those the plan was made from") as e:
        run_apply(build_config(flags={"out": str(tmp_path / "x")}), str(tmp_path / "c" / "plan.json"),
                  model=str(other))
    assert "\n" not in str(e.value) and not (tmp_path / "x").exists()
    forced = run_apply(build_config(flags={"out": str(tmp_path / "x")}), str(tmp_path / "c" / "plan.json"),
                       model=str(other), force=True)
    assert not forced["checked"] and (tmp_path / "x" / "config.json").exists()
    deeper = tmp_path / "deeper"
    tiny_model("llama", n_layers=8)[0].save_pretrained(deeper)
    tok.save_pretrained(deeper)
    with pytest.raises(UserError, match="has 8 decoder layers but the plan was made for 6"):
        run_apply(build_config(flags={"out": str(tmp_path / "y")}), str(tmp_path / "c" / "plan.json"),
                  model=str(deeper))


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory) -> Path:
    """12 layers: Shortened-LLM keeps blocks 0-3 and the last two, so a 6-layer model has none to remove."""
    d = tmp_path_factory.mktemp("deep-llama")
    model, tok = tiny_model("llama", n_layers=12, seed=4)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.mark.parametrize("method", BASELINES)
def test_compress_method_equals_the_grid_row(ray_session, deep_llama, tokens_parquet, tmp_path, method):
    """The baseline through `compress --method` (Ray actors) and through a grid trial (in process) is the same
    computation: same windows, same scores, and the grid row's plan applies to the same folder."""
    from swm_ray.io.data import calibration_for
    from swm_ray.recipes.trial import run_trial

    flags = {"select.method": method, "select.laco_layers": 2, "select.laco_interval": 1}
    res = run_compress(_cfg(deep_llama, tokens_parquet, tmp_path / "c", **flags))
    cfg = build_config(flags={"model.source": str(deep_llama), "data.source": str(tokens_parquet),
                              "data.samples": 16, "data.seq_len": 16, "data.batch_size": 4, "grid.layers": [2],
                              "grid.baselines": [method], "eval.tasks": [], "eval.ppl_data": None,
                              "select.laco_layers": 2, "select.laco_interval": 1})
    _, calib, _ = calibration_for(cfg)
    rows: list[dict] = []
    run_trial({"model": str(deep_llama), "method": method}, cfg, str(deep_llama), calib, None, rows.append)
    (row,) = rows
    assert row["status"] == "ok" and json.loads(row["windows"]) == res["plan"]["windows"]
    grid_plan = json.loads(row["plan"])
    assert grid_plan["similarities"] == res["plan"]["similarities"] and grid_plan["merge"] == res["plan"]["merge"]
    plan_file = tmp_path / "row-plan.json"
    plan_file.write_text(row["plan"])
    if row.get("plan_tensors"):  # a compensated plan (replaceme): its matrices beside it, as the grid writes them
        import base64

        (tmp_path / "row-plan.tensors").write_bytes(base64.b64decode(row["plan_tensors"]))
    run_apply(build_config(flags={"out": str(tmp_path / "a")}), str(plan_file))
    a, b = _files(tmp_path / "c"), _files(tmp_path / "a")
    assert all(a[k] == b[k] for k in a if k != "tokenizer.json")


def test_method_targets_are_checked_before_models_load(tiny_llama_dir, tokens_parquet, tmp_path):
    cfg = _cfg(tiny_llama_dir, tokens_parquet, tmp_path / "o", **{"select.method": "shortgpt"})
    cfg = cfg.model_copy(update={"select": cfg.select.model_copy(update={"layers": None, "threshold": 0.5})})
    with pytest.raises(UserError, match="ranks layers once"):
        run_compress(cfg)
    with pytest.raises(UserError, match="never removes blocks 0-3 and the last two: 0 of 6 may go"):
        run_compress(_cfg(tiny_llama_dir, tokens_parquet, tmp_path / "o", **{"select.method": "shortened-ppl"}))
    assert not (tmp_path / "o").exists()


def _zoo(tmp_path: Path, models: list[dict], data, text) -> Path:
    zoo = {"defaults": {"data": {"source": str(data), "samples": 16, "seq_len": 16, "batch_size": 4},
                        "select": {"layers": 1, "method": "swm"},
                        "eval": {"tasks": [], "ppl_data": str(text), "ppl_chunk": 16, "ppl_bos": "none"}},
           "models": models}
    path = tmp_path / "zoo.yaml"
    path.write_text(yaml.safe_dump(zoo))
    return path


def test_zoo_with_a_broken_model_reruns_and_retries(ray_session, tiny_llama_dir, tokens_parquet, text_jsonl,
                                                   tmp_path):
    from swm_ray.jobs.zoo import run_zoo

    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama_dir, broken)
    raw = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    qwen = tmp_path / "qwen"
    model, tok = tiny_model("qwen3", n_layers=6)
    model.save_pretrained(qwen)
    tok.save_pretrained(qwen)
    zoo = _zoo(tmp_path, [{"source": str(tiny_llama_dir), "name": "llama", "select": {"method": "sleb"}},
                          {"source": str(broken), "name": "broken"},
                          {"source": str(qwen), "name": "qwen"}], tokens_parquet, text_jsonl)
    prefix = tmp_path / "out"
    first = run_zoo(str(zoo), str(prefix))
    assert (first["ran"], first["kept"], first["errors"]) == (3, 0, 1)
    manifest = json.loads((prefix / "manifest.json").read_text())
    assert [r["name"] for r in manifest] == ["llama", "broken", "qwen"]
    assert [r["status"] for r in manifest] == ["ok", "error", "ok"]
    assert str(broken) in manifest[1]["error"] and "damaged or incomplete" in manifest[1]["error"]
    assert "\n" not in manifest[1]["error"]
    assert manifest[0]["method"] == "sleb" and manifest[0]["layers_removed"] == 1 and manifest[0]["ppl"] > 0
    for f in ("manifest.parquet", "manifest.csv", "manifest.md"):
        assert (prefix / f).exists()
    assert (prefix / "llama" / "config.json").exists() and not (prefix / "broken").exists()
    again = run_zoo(str(zoo), str(prefix))  # the two complete ones are kept, the broken one runs again
    assert (again["ran"], again["kept"]) == (1, 2)
    retry = run_zoo(str(zoo), str(prefix), retry_failed=True)
    assert (retry["ran"], retry["kept"], retry["errors"]) == (1, 2, 1)
    zoo.write_text(zoo.read_text().replace("method: sleb", "method: shortgpt"))
    changed = run_zoo(str(zoo), str(prefix))  # llama's settings changed: it runs again
    assert changed["ran"] == 2 and json.loads((prefix / "manifest.json").read_text())[0]["method"] == "shortgpt"


def test_zoo_errors_are_one_line(tmp_path, tokens_parquet, text_jsonl):
    from swm_ray.jobs.zoo import load_zoo

    bad = _zoo(tmp_path, [{"source": "a", "name": "x"}, {"source": "b", "name": "x"}], tokens_parquet, text_jsonl)
    with pytest.raises(UserError, match="distinct names"):
        load_zoo(str(bad), str(tmp_path / "o"))
    (tmp_path / "z2.yaml").write_text("models: [{source: a, select: {layers: 0}}]\n")
    with pytest.raises(UserError, match=r"model 1 \(a\): config select.layers"):
        load_zoo(str(tmp_path / "z2.yaml"), str(tmp_path / "o"))


def test_zoo_options_of_the_wrong_kind_are_one_line(tmp_path, tokens_parquet, text_jsonl):
    from swm_ray.jobs.zoo import load_zoo

    zoo = _zoo(tmp_path, [{"source": "a", "name": "x"}], tokens_parquet, text_jsonl)
    data = yaml.safe_load(zoo.read_text())
    for key, value, message in (("concurrency", "2", "concurrency must be"), ("concurrency", 0, "concurrency must"),
                                ("gpu_memory_gb", "80GB", "gpu_memory_gb must"), ("gpu_memory_gb", -1, "positive")):
        zoo.write_text(yaml.safe_dump({**data, key: value}))
        with pytest.raises(UserError, match=message) as e:
            load_zoo(str(zoo), str(tmp_path / "o"))
        assert "\n" not in str(e.value)
    zoo.write_text(yaml.safe_dump({**data, "concurrency": 2, "gpu_memory_gb": None}))
    assert load_zoo(str(zoo), str(tmp_path / "o"))[1] == {"concurrency": 2, "gpu_memory_gb": 80.0}
    for flag, value in (("--concurrency", "-1"), ("--cpus-per-model", "0")):
        res = CliRunner().invoke(app, ["zoo", str(zoo), flag, value, "--out", str(tmp_path / "o")])
        lines = [line for line in res.output.splitlines() if line.strip()]
        assert res.exit_code == 2 and len(lines) == 1 and flag in lines[0], res.output


def test_zoo_builds_again_an_entry_whose_model_folder_was_rewritten(tiny_llama_dir, tokens_parquet, text_jsonl,
                                                                   tmp_path):
    """Same settings, but the local model folder holds other weights now: the entry is not kept."""
    from swm_ray.jobs.zoo import BUILD, KEEP, _state, load_zoo
    from swm_ray.recipes.pipeline import compress_here

    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    zoo = _zoo(tmp_path, [{"source": str(model), "name": "llama"}], tokens_parquet, text_jsonl)
    (entry,), _ = load_zoo(str(zoo), str(tmp_path / "out"))
    entry.cfg = entry.cfg.model_copy(update={"eval": entry.cfg.eval.model_copy(update={"enabled": False})})
    compress_here(entry.cfg)
    assert _state(entry)[0] == KEEP
    (model / "eval.json").write_text("{}")  # an evaluation's report beside the weights is no other model
    assert _state(entry)[0] == KEEP
    other, _ = tiny_model("llama", n_layers=6, seed=7)
    other.save_pretrained(model)
    assert _state(entry)[:2] == (BUILD, "model folder rewritten")


def _manifest(prefix: Path) -> dict[str, dict]:
    return {r["name"]: r for r in json.loads((prefix / "manifest.json").read_text())}


def _set_eval(zoo: Path, **settings) -> None:
    data = yaml.safe_load(zoo.read_text())
    data["defaults"]["eval"].update(settings)
    zoo.write_text(yaml.safe_dump(data))


def test_zoo_reevaluates_an_entry_whose_evaluation_changed(ray_session, tiny_llama_dir, tokens_parquet, text_jsonl,
                                                          tmp_path):
    """Other eval settings re-evaluate the existing folder (not recompressed) and the manifest gets the new
    numbers; with the evaluation off the entry is kept without the old numbers."""
    from swm_ray.jobs.zoo import run_zoo

    zoo = _zoo(tmp_path, [{"source": str(tiny_llama_dir), "name": "llama", "select": {"method": "sleb"}}],
               tokens_parquet, text_jsonl)
    prefix = tmp_path / "out"
    run_zoo(str(zoo), str(prefix))
    folder = prefix / "llama"
    weights = (folder / "model.safetensors").stat().st_mtime_ns
    first = _manifest(prefix)["llama"]["ppl"]
    _set_eval(zoo, ppl_chunk=8)
    again = run_zoo(str(zoo), str(prefix))
    metrics = json.loads((folder / "metrics.json").read_text())
    row = _manifest(prefix)["llama"]
    assert row["ppl"] == metrics["ppl"]["ppl"] != first and row["status"] == "ok" and row["layers_removed"] == 1
    assert again["reevaluated"] == ["llama"] and again["rebuilt"] == [] and again["kept"] == 0
    assert (folder / "model.safetensors").stat().st_mtime_ns == weights  # evaluated again, not recompressed
    assert metrics["evaluated_with"]["eval"]["ppl_chunk"] == 8
    assert "ppl_chunk: 8" in (folder / "config.resolved.yaml").read_text()
    same = run_zoo(str(zoo), str(prefix))
    assert (same["ran"], same["kept"]) == (0, 1)
    _set_eval(zoo, enabled=False)
    off = run_zoo(str(zoo), str(prefix))
    assert (off["ran"], off["kept"]) == (0, 1) and _manifest(prefix)["llama"]["ppl"] is None


def test_zoo_refuses_heal_after_compress(tmp_path, tokens_parquet, text_jsonl):
    from swm_ray.jobs.zoo import load_zoo

    models = [{"source": "a", "name": "x"}, {"source": "b", "name": "y", "heal": {"after_compress": "lora"}}]
    zoo = _zoo(tmp_path, models, tokens_parquet, text_jsonl)
    with pytest.raises(UserError, match=r"model 2 \(y\): heal.after_compress .*swm-ray heal") as e:
        load_zoo(str(zoo), str(tmp_path / "o"))
    assert "\n" not in str(e.value)


def test_zoo_entry_stopped_before_its_evaluation_is_evaluated(ray_session, tiny_llama_dir, tokens_parquet,
                                                             text_jsonl, tmp_path):
    """A folder written but not evaluated (the driver stopped in between) is evaluated on the rerun, and a kept
    row is rebuilt from the folder's own files, never copied from a manifest that disagrees with them."""
    from swm_ray.jobs.zoo import run_zoo

    zoo = _zoo(tmp_path, [{"source": str(tiny_llama_dir), "name": "llama", "select": {"method": "sleb"}}],
               tokens_parquet, text_jsonl)
    prefix = tmp_path / "out"
    run_zoo(str(zoo), str(prefix))
    folder = prefix / "llama"
    (folder / "metrics.json").unlink()  # as write_model_folder leaves it before the evaluation
    stale = json.loads((prefix / "manifest.json").read_text())
    stale[0].update(ppl=999.0, layers_removed=3, layers_after=3)  # a row of other, older settings
    (prefix / "manifest.json").write_text(json.dumps(stale))
    again = run_zoo(str(zoo), str(prefix))
    assert (folder / "metrics.json").exists(), "the folder was never evaluated"
    metrics = json.loads((folder / "metrics.json").read_text())
    row = _manifest(prefix)["llama"]
    assert row["ppl"] == metrics["ppl"]["ppl"] != 999.0 and row["layers_removed"] == 1
    assert again["reevaluated"] == ["llama"] and again["kept"] == 0
    (prefix / "manifest.json").write_text(json.dumps(stale))  # a complete folder, a row that disagrees with it
    kept = run_zoo(str(zoo), str(prefix))
    assert (kept["ran"], kept["kept"]) == (0, 1)
    row = _manifest(prefix)["llama"]
    assert row["ppl"] == metrics["ppl"]["ppl"] and (row["layers_removed"], row["layers_after"]) == (1, 5)
