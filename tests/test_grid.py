"""`swm-ray grid`: the trial list, bad input, and a real Ray Tune grid on a tiny model."""

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from swm_ray.cli import app
from swm_ray.config import build_config
from swm_ray.errors import UserError
from swm_ray.recipes.results import finalize_rows, markdown_table
from swm_ray.recipes.specs import check_grid, trial_specs


def test_trial_specs_cover_the_grid():
    cfg = build_config(sets={"grid.criteria": ["output", "cka"], "grid.searches": ["best-first", "top-down"],
                             "grid.merges": ["reference", "mean"], "grid.layers": [2, 4],
                             "grid.models": ["a", "b"]})
    specs = trial_specs(cfg)
    per_model = [s for s in specs if s["model"] == "a"]
    # original + shortgpt + output (2 searches × 2 merges) + cka (2 searches; merge does not change CKA windows)
    assert len(per_model) == 1 + 1 + 4 + 2
    assert {s["method"] for s in per_model} == {"original", "shortgpt", "swm"}
    assert len(specs) == 2 * len(per_model)
    # thresholds: baselines need a layer count, so they are left out
    cfg = build_config(sets={"grid.thresholds": [0.9]})
    assert [s["method"] for s in trial_specs(cfg)] == ["original", "swm"]


@pytest.mark.parametrize("sets, msg", [
    ({}, "give the grid's targets"),
    ({"grid.thresholds": [1.5]}, "out of range"),
    ({"grid.thresholds": [0.5], "grid.criteria": ["kl", "output"]}, None),
    ({"grid.thresholds": [0.5], "grid.criteria": []}, "baselines need layer counts or ratios"),
    ({"grid.layers": [2], "grid.criteria": [], "grid.baselines": []}, "the grid is empty"),
])
def test_check_grid(sets, msg):
    cfg = build_config(sets=sets)
    if msg is None:
        check_grid(cfg)
    else:
        with pytest.raises(UserError, match=msg):
            check_grid(cfg)


def test_grid_config_rejects_two_target_kinds_and_bad_ratios():
    with pytest.raises(UserError, match="only one kind of target"):
        build_config(sets={"grid.layers": [2], "grid.ratios": [0.1]})
    with pytest.raises(UserError, match=r"ratios must lie in \(0, 1\)"):
        build_config(sets={"grid.ratios": [1.2]})


@pytest.mark.parametrize("args, msg", [
    (["--criteria", "output"], "give the grid's targets"),
    (["--layers", "2,x"], "comma-separated list of numbers"),
    (["--layers", "2", "--criteria", "magic"], "grid.criteria"),
    (["--thresholds", "0.5", "--criteria", "output,cka"], None),  # valid: fails later on the missing model
])
def test_grid_cli_bad_input_is_one_line(tmp_path, args, msg):
    out = tmp_path / "g"
    res = CliRunner().invoke(app, ["grid", str(tmp_path / "no-such-model"), *args, "--out", str(out)])
    assert res.exit_code != 0
    assert "Traceback" not in res.output
    if msg:
        assert msg in res.output
    assert len(res.output.strip().splitlines()) <= 2
    assert not out.exists()


def test_finalize_rows_ratio_and_table():
    rows = [
        {"model": "m", "method": "original", "target": 0, "status": "ok", "ppl": 10.0, "removed_layers": 0},
        {"model": "m", "method": "swm", "criterion": "output", "search": "best-first", "merge": "reference",
         "target": 2, "status": "ok", "ppl": 25.0, "removed_layers": 2, "task_piqa": 0.6},
    ]
    out = finalize_rows(rows)
    assert [r["method"] for r in out] == ["original", "swm"]
    assert out[1]["ppl_ratio"] == pytest.approx(2.5) and out[0]["ppl_ratio"] == pytest.approx(1.0)
    assert out[0]["task_piqa"] is None and out[1]["task_piqa"] == 0.6
    md = markdown_table(out)
    assert "output / best-first / reference" in md and "2.50" in md


def test_sleb_baseline_is_greedy_block_removal_by_calibration_nll(tiny_llama_dir, tokens_parquet, text_jsonl):
    """The SLEB trial equals SLEB done by hand: repeatedly delete the block (never layer 0) whose removal
    leaves the lowest calibration loss."""
    import copy

    import torch

    from swm_ray.io.data import calibration_for
    from swm_ray.io.models import load_model
    from swm_ray.recipes.trial import run_trial

    cfg = build_config(flags={"model.source": str(tiny_llama_dir), "data.source": str(tokens_parquet),
                              "data.samples": 8, "data.seq_len": 16, "data.batch_size": 4, "eval.tasks": [],
                              "eval.ppl_data": str(text_jsonl), "eval.ppl_chunk": 16, "eval.ppl_max_tokens": 128},
                       sets={"grid.layers": [1, 2], "grid.baselines": ["sleb"], "grid.criteria": []})
    _, calib, _ = calibration_for(cfg)
    rows = []
    run_trial({"model": str(tiny_llama_dir), "method": "sleb"}, cfg, str(tiny_llama_dir), calib, None, rows.append)
    model, _ = load_model(str(tiny_llama_dir))
    ids = torch.tensor(calib.input_ids)
    kept = list(range(6))
    removed = []
    for _ in range(2):
        losses = {}
        for layer in kept[1:]:
            cand = copy.deepcopy(model)
            cand.model.layers = torch.nn.ModuleList([cand.model.layers[i] for i in kept if i != layer])
            cand.config.num_hidden_layers = len(cand.model.layers)
            with torch.no_grad():
                losses[layer] = cand(ids, labels=ids, use_cache=False).loss.item()
        drop = min(losses, key=losses.get)
        kept.remove(drop)
        removed.append(drop)
    assert [r["removed_layers"] for r in rows] == [1, 2]
    assert all(r["status"] == "ok" and r["criterion"] == "nll" and r["merge"] == "keep-first" for r in rows)
    from swm_ray.methods.baselines import drop_windows

    assert json.loads(rows[0]["windows"]) == [list(w) for w in drop_windows(removed[:1])]
    assert json.loads(rows[1]["windows"]) == [list(w) for w in drop_windows(removed)]


def test_grid_runs_as_tune_trials(ray_session, tiny_llama_dir, tokens_parquet, text_jsonl, tmp_path):
    """A real grid: 2 criteria × 2 layer counts + ShortGPT + SLEB + the original, each trial evaluated; the rows
    agree with `compress` run directly, and the outputs are written."""
    from swm_ray.jobs.compress import run_compress
    from swm_ray.jobs.grid import run_grid

    common = {"model.source": str(tiny_llama_dir), "data.source": str(tokens_parquet), "data.samples": 16,
              "data.seq_len": 16, "data.batch_size": 4, "ray.actors": 1, "eval.tasks": [],
              "eval.ppl_data": str(text_jsonl), "eval.ppl_chunk": 16, "eval.ppl_max_tokens": 256}
    out = tmp_path / "grid"
    cfg = build_config(flags={**common, "out": str(out)},
                       sets={"grid.criteria": ["output", "cka"], "grid.layers": [1, 2], "grid.concurrency": 2,
                             "grid.baselines": ["shortgpt", "sleb"]})
    res = run_grid(cfg)
    assert res["errors"] == 0
    rows = pq.read_table(out / "results.parquet").to_pylist()
    assert len(rows) == 1 + 2 * 2 + 2 * 2
    by = {(r["method"], r["criterion"], r["target"]): r for r in rows}
    orig = by[("original", None, 0)]
    assert orig["removed_layers"] == 0 and orig["ppl_ratio"] == pytest.approx(1.0)
    for r in rows:
        assert r["status"] == "ok", r
        assert np.isfinite(r["ppl"]) and r["ppl"] > 0
        assert r["removed_layers"] == r["target"]
        assert r["layers_after"] == 6 - r["target"]
        assert r["ppl_ratio"] == pytest.approx(r["ppl"] / orig["ppl"])
    # the grid's choice is the tool's choice: compress with the same settings picks the same windows
    direct = run_compress(build_config(flags={**common, "out": str(tmp_path / "c")},
                                       sets={"select.layers": 2, "select.criterion": "output",
                                             "select.method": "swm"}))
    assert json.loads(by[("swm", "output", 2)]["windows"]) == direct["plan"]["windows"]
    for f in ("results.csv", "results.md", "config.resolved.yaml", "summary.json", "plots/ppl_"):
        matches = list(out.glob(f + "*"))
        assert matches, f
    # every row was also appended to the experiment's rows.jsonl as it arrived (kept if a grid is interrupted)
    from pathlib import Path

    streamed = (Path(res["tune_experiment"]) / "rows.jsonl").read_text().splitlines()
    assert len(streamed) == len(rows)
    png = next(out.glob("plots/ppl_*.png")).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_interrupted_grid_resumes(ray_session, tiny_llama_dir, tokens_parquet, text_jsonl, tmp_path):
    """Trials that failed (here: the weights file held its header but no tensor data while they ran, which the
    grid's up-front checks, reading headers only, let through) run again on --resume; the grid's settings come
    from the experiment, and the finished table is complete."""
    import shutil
    import struct

    from swm_ray.jobs.grid import run_grid

    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    weights = model / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[: 8 + struct.unpack("<Q", whole[:8])[0]])  # the header, no tensor data
    cfg = build_config(flags={"model.source": str(model), "data.source": str(tokens_parquet), "data.samples": 8,
                              "data.seq_len": 16, "data.batch_size": 4, "eval.tasks": [],
                              "eval.ppl_data": str(text_jsonl), "eval.ppl_chunk": 16, "eval.ppl_max_tokens": 128,
                              "out": str(tmp_path / "first")},
                       sets={"grid.criteria": ["output"], "grid.layers": [1, 2], "grid.baselines": []})
    first = run_grid(cfg)
    assert first["errors"] == 2  # the original and output / best-first
    assert all(r["status"].startswith("error") for r in first["rows_table"])
    weights.write_bytes(whole)
    again = build_config(flags={"out": str(tmp_path / "second")})  # nothing but the output: settings are saved
    second = run_grid(again, resume=first["tune_experiment"])
    assert second["errors"] == 0 and second["tune_experiment"] == first["tune_experiment"]
    rows = pq.read_table(tmp_path / "second" / "results.parquet").to_pylist()
    assert sorted((r["method"], r["target"]) for r in rows) == [("original", 0), ("swm", 1), ("swm", 2)]
    assert all(r["status"] == "ok" and r["ppl"] > 0 for r in rows)
    with pytest.raises(UserError, match="not a local swm-ray grid experiment"):
        run_grid(again, resume=str(tmp_path))


def test_a_resumed_grid_refuses_changed_models_or_data(tmp_path):
    """A resume keeps the finished trials' rows: a model with rows whose folder was rewritten, or whose
    calibration rows differ, is refused in one line (its new rows would sit beside rows of other weights); a
    model with no rows yet (every trial failed) may have been mended."""
    import shutil

    from swm_ray.jobs import grid as grid_mod

    class Calib:
        def __init__(self, ids):
            self.input_ids = np.asarray(ids, dtype=np.int64)

    a, b = tmp_path / "a", tmp_path / "b"
    for m in (a, b):
        m.mkdir()
        (m / "model.safetensors").write_bytes(b"x" * 8)
    ctx = {str(a): {"calib": Calib([[1, 2, 3]])}, str(b): {"calib": Calib([[4, 5, 6]])}}
    saved = grid_mod._identities(ctx)
    assert saved[str(a)]["weights"] and saved[str(a)]["calibration"] != saved[str(b)]["calibration"]
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "rows.jsonl").write_text(json.dumps({"model": str(a), "method": "original", "ppl": 1.0}) + "\n")
    grid_mod._check_unchanged(exp, saved, grid_mod._identities(ctx))  # nothing changed
    shutil.rmtree(b)  # b has no rows: rewriting it is allowed
    b.mkdir()
    (b / "model.safetensors").write_bytes(b"y" * 9)
    grid_mod._check_unchanged(exp, saved, grid_mod._identities(ctx))
    (a / "model.safetensors").write_bytes(b"z" * 9)  # a has rows: refused
    with pytest.raises(UserError, match="model folder .* was rewritten since the grid started") as e:
        grid_mod._check_unchanged(exp, saved, grid_mod._identities(ctx))
    assert "\n" not in str(e.value)
    (a / "model.safetensors").write_bytes(b"x" * 8)
    changed = {**ctx, str(a): {"calib": Calib([[1, 2, 4]])}}
    os.utime(a / "model.safetensors", ns=(0, 0))  # the stamp includes the time: make a's identity the saved one
    saved = grid_mod._identities(ctx)
    with pytest.raises(UserError, match="calibration rows of a differ"):
        grid_mod._check_unchanged(exp, saved, grid_mod._identities(changed))
    grid_mod._check_unchanged(exp, None, grid_mod._identities(changed))  # a grid of a release that saved none


def test_a_trial_plans_on_its_own_models_calibration_rows(tmp_path, monkeypatch, tiny_llama_dir, text_jsonl):
    """A grid of two models names one of them in model.source; a trial of the other that draws further rows
    (replaceme's fit, auto's held-out rows) tokenizes the text with its own tokenizer, not the named model's."""
    import tiny_models

    from swm_ray.jobs.grid import _prepare
    from swm_ray.recipes.trial import Trial

    other = tmp_path / "other"
    model, _ = tiny_models.tiny_model("llama", n_layers=6, seed=1)
    model.save_pretrained(other)
    monkeypatch.setattr(tiny_models, "SENTENCES", [s[::-1] for s in tiny_models.SENTENCES])
    tiny_models.tiny_tokenizer(other)  # another vocabulary: the same text gives other ids
    a, b = str(tiny_llama_dir), str(other)
    cfg = build_config(flags={"model.source": a, "data.source": str(text_jsonl), "data.samples": 8,
                              "data.seq_len": 16, "data.batch_size": 4, "eval.tasks": [], "eval.ppl_data": None},
                       sets={"grid.models": [a, b], "grid.layers": [1], "grid.baselines": ["replaceme"]})
    ctx = _prepare(cfg, [a, b])
    own, named = ctx[b]["calib"].input_ids, ctx[a]["calib"].input_ids
    assert not np.array_equal(own, named)
    for method in ("replaceme", "auto"):
        trial = Trial({"model": b, "method": method}, cfg, b, ctx[b]["calib"], None, report=lambda row: None)
        assert trial.cfg.model.source == b
        assert np.array_equal(trial.calib.input_ids, own), method
        assert (trial.fit_calib if method == "replaceme" else trial.val_calib) is not None  # rows were drawn


def test_every_local_path_a_trial_opens_is_made_absolute(tmp_path, monkeypatch):
    """Tune runs each trial in its own folder: relative paths of the models, the data, the perplexity text and
    the heal section's data and source are resolved on the driver; builtin: and s3:// names stay as they are."""
    from swm_ray.jobs.grid import absolute_paths

    monkeypatch.chdir(tmp_path)
    for name in ("m", "calib.jsonl", "ppl.txt", "heal.jsonl", "src"):
        (tmp_path / name).write_text("x")
    cfg = build_config(flags={"data.source": "calib.jsonl", "eval.ppl_data": "ppl.txt"},
                       sets={"grid.models": ["m", "builtin:smollm2-135m", "s3://b/m"], "heal.data": "heal.jsonl",
                             "heal.source": "src"})
    got = absolute_paths(cfg)
    assert got.grid.models == (str(tmp_path / "m"), "builtin:smollm2-135m", "s3://b/m")
    assert (got.data.source, got.eval.ppl_data) == (str(tmp_path / "calib.jsonl"), str(tmp_path / "ppl.txt"))
    assert (got.heal.data, got.heal.source) == (str(tmp_path / "heal.jsonl"), str(tmp_path / "src"))


def test_a_row_cut_by_a_killed_driver_is_skipped_and_the_next_row_starts_its_own_line(tmp_path):
    from swm_ray.jobs.grid import _collector, _rows_from_file

    rows_file = tmp_path / "rows.jsonl"
    rows_file.write_text(json.dumps({"model": "m", "method": "original", "target": 0, "ppl": 3.0}) + "\n"
                         + '{"model": "m", "method": "swm", "target": 1, "pp')  # the driver died mid-line
    _collector(rows_file).on_trial_result(0, [], None, {"model": "m", "method": "shortgpt", "target": 2, "ppl": 5.0})
    rows = _rows_from_file(rows_file)
    assert sorted((r["method"], r["target"]) for r in rows) == [("original", 0), ("shortgpt", 2)]


def test_two_models_of_the_same_folder_name_get_their_own_labels_and_plots(tmp_path):
    from swm_ray.recipes.results import finalize_rows, write_results

    rows = []
    for model, ppl in (("/x/a/tiny", 10.0), ("/x/b/tiny", 50.0)):
        rows += [{"model": model, "method": "original", "target": 0, "removed_layers": 0, "ppl": ppl, "status": "ok"},
                 {"model": model, "method": "shortgpt", "target": 1, "removed_layers": 1, "ppl": 2 * ppl,
                  "status": "ok"}]
    files = write_results(tmp_path, finalize_rows(rows))
    plots = [f for f in files if f.startswith("plots/")]
    assert len(plots) == len(set(plots)) == 2 and all((tmp_path / f).exists() for f in plots)
    table = (tmp_path / "results.md").read_text()
    assert "| /x/a/tiny |" in table and "| /x/b/tiny |" in table


def _small_grid(tiny_llama_dir, tokens_parquet, text_jsonl, out, **sets):
    return build_config(flags={"model.source": str(tiny_llama_dir), "data.source": str(tokens_parquet),
                               "data.samples": 8, "data.seq_len": 16, "data.batch_size": 4, "eval.tasks": [],
                               "eval.ppl_data": str(text_jsonl), "eval.ppl_chunk": 16, "eval.ppl_max_tokens": 64,
                               "out": str(out)},
                        sets={"grid.criteria": ["output"], "grid.layers": [1], "grid.baselines": [], **sets})


def test_a_grid_that_tune_ended_early_writes_no_table(ray_session, tiny_llama_dir, tokens_parquet, text_jsonl,
                                                       tmp_path, monkeypatch):
    """On Ctrl-C Tune stops its trials and returns: the grid says so (exit 130, how to resume) and writes no
    table, and an earlier complete output given with --overwrite is kept as it was."""
    from ray import tune

    from swm_ray.jobs.grid import run_grid

    out = tmp_path / "grid"
    out.mkdir()
    (out / "results.md").write_text("complete\n")
    (out / ".swm-ray").write_text("")

    class Stopped:
        num_terminated, num_errors = 1, 0

        def __len__(self):
            return 2

    monkeypatch.setattr(tune.Tuner, "fit", lambda self: Stopped())
    with pytest.raises(UserError, match=r"1 of 2 trials did not finish.*--resume") as e:
        run_grid(_small_grid(tiny_llama_dir, tokens_parquet, text_jsonl, out).model_copy(update={"overwrite": True}))
    assert e.value.exit_code == 130
    assert (out / "results.md").read_text() == "complete\n"


def test_a_trial_asking_more_cpus_than_this_machine_has_is_one_line(ray_session, tiny_llama_dir, tokens_parquet,
                                                                     text_jsonl, tmp_path):
    from swm_ray.jobs.grid import run_grid

    cfg = _small_grid(tiny_llama_dir, tokens_parquet, text_jsonl, tmp_path / "g", **{"grid.cpus_per_trial": 64})
    with pytest.raises(UserError, match="--cpus-per-trial 64: this machine's Ray has 2 CPU") as e:
        run_grid(cfg)
    assert "\n" not in str(e.value) and not (tmp_path / "g").exists()
