"""Width in `swm-ray grid`: flap/taylor as width baselines to each ratio (rows that `swm-ray apply` replays),
`grid.then_width` as an axis after every depth row, the one-line refusals, and latency columns (tokens/s, time
to first token) in the rows and the table."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from swm_ray.config import build_config
from swm_ray.errors import UserError
from swm_ray.recipes.results import finalize_rows, markdown_table, write_results
from swm_ray.recipes.specs import check_grid, method_label
from swm_ray.recipes.trial import run_trial

SWM = {"method": "swm", "criterion": "output", "search": "best-first", "merge": "reference"}

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(model, calib_data, ppl_data, grid: dict, **flags):
    return build_config(flags={"model.source": str(model), "data.source": str(calib_data), "data.samples": 8,
                               "data.seq_len": 16, "data.batch_size": 4, "eval.tasks": [],
                               "eval.ppl_data": str(ppl_data), "eval.ppl_chunk": 16, "eval.ppl_max_tokens": 256,
                               **flags},
                        sets={"grid.criteria": ["output"], "grid.baselines": [], **grid})


def _run(cfg, model, spec) -> list[dict]:
    from swm_ray.io.data import calibration_for

    _, calib, _ = calibration_for(cfg)
    rows: list[dict] = []
    run_trial({"model": str(model), **spec}, cfg, str(model), calib, None, rows.append)
    return rows


def test_flap_baseline_row_is_replayed_by_apply(tiny_llama_dir, tokens_parquet, text_jsonl, tmp_path):
    """A flap row removes about its ratio by width alone (no layer removed), carries its plan and FLAP's biases,
    and `swm-ray apply` of its written plan gives the model the row evaluated: the same parameter count and
    the same perplexity. With eval.latency the row has tokens/s, latency and time to first token."""
    from swm_ray.evaluation.suite import evaluate_model
    from swm_ray.io.models import load_tokenizer
    from swm_ray.jobs.apply import run_apply

    cfg = _cfg(tiny_llama_dir, tokens_parquet, text_jsonl, {"grid.ratios": [0.2], "grid.baselines": ["flap"]},
               **{"eval.latency": True, "eval.latency_runs": 2, "eval.latency_warmup": 0,
                  "eval.latency_new_tokens": 4})
    check_grid(cfg)
    rows = _run(cfg, tiny_llama_dir, {"method": "flap"})
    assert len(rows) == 1
    r = rows[0]
    assert r["status"] == "ok" and r["width"] == "flap" and r.get("then_width") is None
    assert abs(r["params_removed"] - 0.2) < 0.03, r["params_removed"]
    assert (r["layers_after"], r["removed_layers"], r["windows"]) == (6, 0, "[]")
    plan = json.loads(r["plan"])
    assert plan["windows"] == [] and plan["method"] == "flap" and plan["width"]["fraction"] == 0.2
    assert plan["width"]["bias"] == {"attention": True, "mlp": True} and r["plan_tensors"]
    assert r["tokens_per_s"] == pytest.approx(4 / r["latency_s"]) and 0 < r["ttft_s"]
    assert method_label(r) == "flap"

    table = finalize_rows(rows)
    md = markdown_table(table)
    assert "| tokens/s | latency (s) | TTFT (s) |" in md and "| flap | 0.2000 | 6 → 6 |" in md
    files = write_results(tmp_path, table)
    plan_file = next(f for f in files if f.startswith("plans/") and f.endswith(".json"))
    assert plan_file.removesuffix(".json") + ".tensors" in files
    applied = run_apply(build_config(flags={"out": str(tmp_path / "applied")}), str(tmp_path / plan_file))
    assert applied["plan"]["width"]["kv_groups"] == plan["width"]["kv_groups"]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "applied").eval()
    assert loaded.config.mlp_bias and loaded.config.attention_bias  # FLAP's biases travelled with the plan
    assert sum(p.numel() for p in loaded.parameters()) == r["params_after"]
    metrics = evaluate_model(loaded, load_tokenizer(str(tiny_llama_dir)), cfg.eval.model_copy(
        update={"latency": False}))
    assert metrics["ppl"]["ppl"] == pytest.approx(r["ppl"], rel=1e-5)


def test_then_width_rows_follow_each_depth_row(tiny_llama_dir, tokens_parquet, text_jsonl):
    """grid.then_width: after the depth row, one row with the same windows and FLAP width on the merged model,
    which removes about the fraction more of the original's parameters; both render in one table."""
    cfg = _cfg(tiny_llama_dir, tokens_parquet, text_jsonl, {"grid.layers": [1], "grid.then_width": [0.15]})
    check_grid(cfg)
    rows = _run(cfg, tiny_llama_dir, SWM)
    assert [(r["status"], r.get("then_width")) for r in rows] == [("ok", None), ("ok", 0.15)]
    depth, both = rows
    assert both["windows"] == depth["windows"] and both["removed_layers"] == depth["removed_layers"] == 1
    assert both["width"] == "flap" and both["params_after"] < depth["params_after"]
    assert abs(both["params_removed"] - depth["params_removed"] - 0.15) < 0.03
    assert both["ppl"] != depth["ppl"]
    plan = json.loads(both["plan"])
    assert plan["windows"] == json.loads(depth["windows"]) and len(plan["width"]["channels"]) == 5
    assert json.loads(depth["plan"]).get("width") is None
    assert method_label(both) == "output / best-first / reference + width flap 15%"
    md = markdown_table(finalize_rows(rows))
    assert "reference + width flap 15% | 1 | 6 → 5 |" in md and "TTFT" not in md


def test_then_width_after_a_compensated_plan_is_a_skipped_row(tiny_llama_dir, tokens_parquet, text_jsonl):
    cfg = _cfg(tiny_llama_dir, tokens_parquet, text_jsonl, {"grid.layers": [1], "grid.then_width": [0.1],
                                                            "grid.compensate": ["lstsq"]})
    rows = _run(cfg, tiny_llama_dir, SWM)
    assert [(r["compensate"], r["status"], r.get("then_width")) for r in rows] == [("lstsq", "ok", None),
                                                                                 ("lstsq", "skipped", 0.1)]
    skipped = rows[1]
    assert "after a compensated depth plan is not supported" in skipped["note"] and "\n" not in skipped["note"]
    assert skipped["plan"] is None and skipped["plan_tensors"] is None and skipped.get("ppl") is None
    assert method_label(skipped) == "output / best-first / reference + lstsq + width flap 10%"


def test_width_rows_of_a_streaming_model_are_skipped(tiny_llama_dir, tokens_parquet, text_jsonl):
    cfg = _cfg(tiny_llama_dir, tokens_parquet, text_jsonl, {"grid.ratios": [0.1, 0.2], "grid.baselines": ["taylor"]},
               **{"model.stream": "always"})
    rows = _run(cfg, tiny_llama_dir, {"method": "taylor"})
    assert [(r["target"], r["status"]) for r in rows] == [(0.1, "skipped"), (0.2, "skipped")]
    assert all("needs the model in memory" in r["note"] and r["plan"] is None for r in rows)


@pytest.mark.parametrize("sets, msg", [
    ({"grid.layers": [2], "grid.baselines": ["flap"]}, "flap/taylor prune width to a parameter ratio: give --ratios"),
    ({"grid.ratios": [0.2], "grid.baselines": ["taylor"], "select.width_bias": True}, "bias compensation is FLAP's"),
    ({"grid.layers": [2], "grid.then_width": [0.1], "select.width_method": "taylor", "select.width_bias": True},
     "bias compensation is FLAP's"),
])
def test_check_grid_refuses_width_settings_in_one_line(sets, msg):
    with pytest.raises(UserError, match=msg) as e:
        check_grid(build_config(sets=sets))
    assert "\n" not in str(e.value)


def test_then_width_fractions_must_lie_in_the_unit_interval():
    with pytest.raises(UserError, match=r"then_width fractions must lie in \(0, 1\)"):
        build_config(sets={"grid.layers": [1], "grid.then_width": [0.1, 1.0]})
    check_grid(build_config(sets={"grid.ratios": [0.1], "grid.baselines": ["flap", "shortgpt"],
                                  "grid.then_width": [0.1]}))


def test_latency_measures_time_to_first_token(tiny_llama_dir):
    """`ttft_s`: one-token generations, faster than generating 8 tokens; the report and the comparison show it."""
    from swm_ray.evaluation.latency import compare_latency, measure_latency
    from swm_ray.evaluation.report import format_table
    from swm_ray.io.models import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    res = measure_latency(model, load_tokenizer(str(tiny_llama_dir)), new_tokens=8, warmup=0, runs=2)
    assert 0 < res["ttft_s"] < res["latency_s"] and res["runs"] == 2
    assert res["tokens_per_s"] == pytest.approx(8 / res["latency_s"])
    slower = {**res, "ttft_s": 4 * res["ttft_s"]}
    assert compare_latency(res, slower)["ttft_ratio"] == pytest.approx(0.25)
    assert "ttft_ratio" not in compare_latency(res, {k: v for k, v in res.items() if k != "ttft_s"})
    table = format_table({"model": "m", "params": 10, "latency": res, "baseline": {"model": "b", "latency": slower},
                          "comparison": compare_latency(res, slower)})
    line = next(ln for ln in table.splitlines() if ln.startswith("time to first token (s)"))
    assert f"{res['ttft_s']:.4f}" in line and "x0.250" in line
