"""`--method auto`: the validation loss is the compressed model's own NLL, the held-out rows are never seen by
a planner, auto is never worse on them than the best single method (every supported architecture), and the
actors compute the same choice and losses as one process."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_models import ARCHS, tiny_model

from swm_ray.auto import LocalValidation, compensation_config, mean_nll, plan_nll, run_auto
from swm_ray.compensation import compensate_model, stack_site
from swm_ray.config import build_config
from swm_ray.data import Calibration, split_calibration
from swm_ray.errors import UserError
from swm_ray.merge import apply_windows
from swm_ray.planners import LocalScoring, compensate_plan, plan_windows
from swm_ray.stack import InMemoryStack

RNG = np.random.default_rng(11)
IDS = RNG.integers(4, 256, size=(20, 12))


def _calibs():
    calib = Calibration(IDS, [(0, 4), (4, 8), (8, 12)], False, True, "test")
    plan, val, fit = split_calibration(calib, 12, 8, 4)
    assert fit is plan  # no rows beyond the validation rows: the fit uses the planning rows
    return plan, val


def _nll_by_hand(model, ids: np.ndarray) -> float:
    with torch.no_grad():
        logits = model(torch.tensor(ids)).logits.float()
    logp = F.log_softmax(logits, dim=-1)
    t = torch.tensor(ids)
    return float(-logp[:, :-1].gather(-1, t[:, 1:, None]).squeeze(-1).double().mean())


def test_split_keeps_the_planning_rows_and_holds_out_the_rest():
    plan, val = _calibs()
    assert np.array_equal(plan.input_ids, IDS[:12]) and plan.batches == [(0, 4), (4, 8), (8, 12)]
    assert np.array_equal(val.input_ids, IDS[12:]) and val.batches == [(0, 4), (4, 8)]
    with pytest.raises(UserError, match="holds out"):
        split_calibration(Calibration(IDS[:12], [(0, 4)], False, True, "t"), 12, 4, 4)


def test_split_gives_the_fit_the_planning_rows_and_the_rows_after_the_validation_rows():
    """[planning | validation | more fit rows]: the fit sees the planning rows and the further rows, never a
    validation row; without validation the fit is the first rows of the draw."""
    calib = Calibration(IDS, [(0, 4)], False, True, "test")
    plan, val, fit = split_calibration(calib, 8, 4, 4)
    assert np.array_equal(plan.input_ids, IDS[:8]) and np.array_equal(val.input_ids, IDS[8:12])
    assert np.array_equal(fit.input_ids, np.concatenate([IDS[:8], IDS[12:]]))
    assert fit.batches == [(0, 4), (4, 8), (8, 12), (12, 16)]
    plan, val, fit = split_calibration(calib, 8, 0, 4)
    assert val is None and np.array_equal(fit.input_ids, IDS) and plan.batches == [(0, 4), (4, 8)]


@pytest.mark.parametrize("arch", ARCHS)
def test_plan_nll_is_the_compressed_models_own_loss(arch):
    """plan_nll (layer stack, merged windows, fits folded) equals the NLL of the model that apply_windows and
    compensate_model build, computed by hand from its logits."""
    model, _ = tiny_model(arch, n_layers=6)
    _, val = _calibs()
    windows, merge = [(1, 2), (3, 5)], "reference"
    stack = InMemoryStack(model)
    scoring = LocalScoring(stack, _calibs()[0])
    cfg = build_config(flags={"merge.skip_first": 0})
    comp = compensate_plan(cfg, scoring, windows, merge, stack_site(stack), "scale")
    got = mean_nll(plan_nll(stack, val.input_ids, val.batches, windows, merge, "global", comp.fits))
    plain = mean_nll(plan_nll(stack, val.input_ids, val.batches, [], merge, "global"))
    assert plain == pytest.approx(_nll_by_hand(model, val.input_ids), abs=1e-5)
    edited, _ = tiny_model(arch, n_layers=6)
    apply_windows(edited, windows, merge)
    compensate_model(edited, windows, comp.fits)
    assert got == pytest.approx(_nll_by_hand(edited, val.input_ids), abs=1e-5)
    assert got != pytest.approx(plain, abs=1e-4)  # the plan changed the model


def _auto_cfg(**flags):
    return build_config(flags={"select.method": "auto", "select.layers": 2, "merge.skip_first": 0,
                               "select.auto_compensate": ["none", "scale", "lstsq:1"], **flags})


@pytest.mark.parametrize("arch", ARCHS)
def test_auto_is_never_worse_than_the_best_single_method(arch):
    """Each method run on its own (planning rows only, each compensation fitted separately) and judged on the
    held-out rows: auto's choice has the lowest of those losses, and its record lists the same values."""
    model, _ = tiny_model(arch, n_layers=6, seed=3)
    plan_calib, val = _calibs()
    stack = InMemoryStack(model)
    cfg = _auto_cfg()
    res = run_auto(cfg, LocalScoring(stack, plan_calib), 6, 2, lambda: stack_site(stack),
                   LocalValidation(stack, val))
    singles = {}
    for spec in cfg.select.auto_candidates:
        method, _, merge = spec.partition("/")
        one = build_config(flags={"select.method": method, "select.layers": 2, "merge.skip_first": 0,
                                  **({"merge.method": merge} if merge else {})})
        fresh = LocalScoring(InMemoryStack(model), plan_calib)  # nothing shared with auto's run
        planned = plan_windows(one, fresh, 6, 2)
        for c in cfg.select.auto_compensate:
            method_c, cfg_c = compensation_config(one, c)  # lstsq:1 = lstsq with merge.ridge 1
            comp = compensate_plan(cfg_c, fresh, planned.selection.windows, planned.merge, stack_site(stack),
                                   method_c) if method_c != "none" else None
            loss = mean_nll(plan_nll(stack, val.input_ids, val.batches, planned.selection.windows, planned.merge,
                                     "global", comp.fits if comp else None))
            singles[spec if c == "none" else f"{spec}+{c}"] = (loss, [list(w) for w in planned.selection.windows])
    record = {o["candidate"]: o for o in res.record()["candidates"]}
    assert record.keys() == singles.keys()
    for name, (loss, windows) in singles.items():
        assert record[name]["windows"] == windows
        assert record[name]["validation_nll"] == pytest.approx(loss, abs=1e-6)
    best = min(loss for loss, _ in singles.values())
    assert res.chosen.val_nll <= best + 1e-9
    assert res.record()["chosen"] == res.chosen.name and res.original_nll < math.inf


def test_auto_needs_a_size_not_a_threshold(tiny_llama_dir, tokens_parquet, tmp_path):
    from swm_ray.jobs.compress import run_compress

    cfg = build_config(flags={"model.source": str(tiny_llama_dir), "data.source": str(tokens_parquet),
                              "select.method": "auto", "select.threshold": 0.9, "out": str(tmp_path / "o")})
    with pytest.raises(UserError, match="give --layers or --ratio") as e:
        run_compress(cfg)
    assert "\n" not in str(e.value) and not (tmp_path / "o").exists()
    with pytest.raises(UserError, match="is not a candidate"):
        build_config(flags={"select.auto_candidates": ["shortgpt/mean"]})


def test_auto_on_actors_equals_one_process(ray_session, tiny_llama_dir, tokens_parquet, tmp_path):
    """`compress --method auto` with 2 actors and the in-process pipeline (zoo's path) make the same choice
    from the same losses; the folder's plan records every candidate and reloads with transformers."""
    from transformers import AutoModelForCausalLM

    from swm_ray.jobs.compress import run_compress
    from swm_ray.pipeline import compress_here

    flags = {"model.source": str(tiny_llama_dir), "data.source": str(tokens_parquet), "data.samples": 16,
             "data.seq_len": 16, "data.batch_size": 4, "select.method": "auto", "select.layers": 2,
             "select.auto_candidates": ["swm", "swm/keep-first", "shortgpt", "sleb"],
             "select.auto_compensate": ["none", "scale"]}
    ray_res = run_compress(build_config(flags={**flags, "ray.actors": 2, "out": str(tmp_path / "ray")}))
    here = compress_here(build_config(flags={**flags, "out": str(tmp_path / "here")}))
    a, b = ray_res["plan"]["extra"]["auto"], here["plan"]["extra"]["auto"]
    assert a["chosen"] == b["chosen"] and a["validation_rows"] == 8 and len(a["candidates"]) == 8
    for x, y in zip(a["candidates"], b["candidates"]):
        assert x["candidate"] == y["candidate"] and x["windows"] == y["windows"]
        assert x["validation_nll"] == pytest.approx(y["validation_nll"], abs=1e-9)
    assert ray_res["plan"]["windows"] == here["plan"]["windows"] and ray_res["plan"]["method"] == "auto"
    plan = json.loads(Path(tmp_path / "ray" / "plan.json").read_text())
    assert plan["extra"]["auto"]["chosen"] == a["chosen"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ray")
    assert model.config.num_hidden_layers == 4


def test_auto_is_a_grid_row_with_its_plan(tiny_llama_dir, tokens_parquet, tmp_path):
    """`grid.baselines: [auto]`: one row per target, the chosen plan (and its compensation tensors) in the row,
    applicable with `apply` to the same folder that `compress --method auto` writes."""
    import base64

    from swm_ray.data import calibration_for
    from swm_ray.jobs.apply import run_apply
    from swm_ray.pipeline import compress_here
    from swm_ray.sweep import run_trial

    flags = {"model.source": str(tiny_llama_dir), "data.source": str(tokens_parquet), "data.samples": 16,
             "data.seq_len": 16, "data.batch_size": 4, "eval.tasks": [], "eval.ppl_data": None,
             "select.auto_candidates": ["swm", "shortgpt"], "select.auto_compensate": ["none", "lstsq:1"]}
    cfg = build_config(flags={**flags, "grid.layers": [1, 2], "grid.baselines": ["auto"]})
    _, calib, _ = calibration_for(cfg)
    rows: list[dict] = []
    run_trial({"model": str(tiny_llama_dir), "method": "auto"}, cfg, str(tiny_llama_dir), calib, None, rows.append)
    assert [r["status"] for r in rows] == ["ok", "ok"] and [r["removed_layers"] for r in rows] == [1, 2]
    row = rows[1]
    plan = json.loads(row["plan"])
    assert plan["method"] == "auto" and row["note"] == f"auto chose {plan['extra']['auto']['chosen']}"
    (tmp_path / "p.json").write_text(row["plan"])
    if row.get("plan_tensors"):
        (tmp_path / "p.tensors").write_bytes(base64.b64decode(row["plan_tensors"]))
    run_apply(build_config(flags={"out": str(tmp_path / "a")}), str(tmp_path / "p.json"))
    here = compress_here(build_config(flags={**flags, "select.method": "auto", "select.layers": 2,
                                             "out": str(tmp_path / "c")}))
    assert here["plan"]["windows"] == plan["windows"]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "c" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("arch,same", [("llama", True), ("qwen2", True), ("qwen3", False), ("gemma2", False)])
def test_consistent_merge_is_not_searched_twice_where_it_equals_reference(arch, same):
    from swm_ray.auto import effective_spec

    names = dict(tiny_model(arch, n_layers=2)[0].model.layers[0].state_dict())
    assert (effective_spec("swm/consistent", names) == "swm") == same
    assert effective_spec("swm/reference", names) == "swm" and effective_spec("swm/keep-first", names) == \
        "swm/keep-first"
