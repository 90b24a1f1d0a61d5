"""`swm-ray compress` end to end on a tiny model."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from swm_ray.cli import app
from swm_ray.config import build_config
from swm_ray.edits.merge import apply_windows
from swm_ray.jobs.compress import run_compress


def _cfg(model_dir, data, out, **sets):
    base = {"model.source": str(model_dir), "data.source": str(data), "data.samples": 16, "data.seq_len": 16,
            "data.batch_size": 4, "out": str(out), "ray.actors": 1, "select.method": "swm"}
    return build_config(flags=base, sets=sets)


@pytest.mark.parametrize("criterion", ["output", "kl", "nll"])
def test_distributed_and_single_choose_the_same_windows(ray_session, tiny_llama_dir, tokens_parquet, tmp_path,
                                                       criterion):
    one = run_compress(_cfg(tiny_llama_dir, tokens_parquet, tmp_path / "a", **{
        "select.layers": 2, "select.criterion": criterion}))
    two = run_compress(_cfg(tiny_llama_dir, tokens_parquet, tmp_path / "b", **{
        "select.layers": 2, "select.criterion": criterion, "ray.actors": 2}))
    assert one["plan"]["windows"] == two["plan"]["windows"]
    np.testing.assert_allclose(one["plan"]["similarities"], two["plan"]["similarities"], rtol=1e-9)
    assert one["plan"]["num_layers_after"] == 4


def test_saved_folder_reloads_with_the_merged_logits(ray_session, tiny_llama_dir, tokens_parquet, tmp_path):
    out = tmp_path / "m"
    res = run_compress(_cfg(tiny_llama_dir, tokens_parquet, out, **{"select.layers": 2, "merge.method": "mean"}))
    plan = json.loads((out / "plan.json").read_text())
    assert plan["windows"] == res["plan"]["windows"] and plan["merge"] == "mean"
    for key in ("removed_layers", "num_layers_before", "num_layers_after", "params_before", "params_after",
                "criterion", "threshold", "similarities"):
        assert key in plan
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    expected = apply_windows(AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval(), plan["windows"], "mean")
    ids = torch.tensor([[5, 9, 17, 33, 65, 100, 7]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected(ids).logits)
    assert reloaded.config.num_hidden_layers == 4
    assert [layer.self_attn.layer_idx for layer in reloaded.model.layers] == [0, 1, 2, 3]
    for f in ("README.md", "config.yaml", "config.resolved.yaml", "tokenizer.json", "generation_config.json"):
        assert (out / f).exists(), f


def test_paper_loop_cka_and_ratio_targets(ray_session, tiny_llama_dir, tokens_parquet, tmp_path):
    paper = run_compress(_cfg(tiny_llama_dir, tokens_parquet, tmp_path / "p", **{
        "select.search": "top-down", "select.layers": 1}))
    assert paper["plan"]["search"] == "top-down" and paper["plan"]["windows"]
    assert all(w[1] <= 4 for w in paper["plan"]["windows"])  # the last layer is never merged
    cka = run_compress(_cfg(tiny_llama_dir, tokens_parquet, tmp_path / "c", **{
        "select.criterion": "cka", "select.layers": 2, "merge.method": "keep-first"}))
    assert cka["plan"]["criterion"] == "cka"
    assert (tmp_path / "c" / "mergekit_config.yml").exists()
    ratio = run_compress(_cfg(tiny_llama_dir, tokens_parquet, tmp_path / "r", **{"select.ratio": 0.2}))
    p = ratio["plan"]
    removed = p["num_layers_before"] - p["num_layers_after"]
    per_layer = sum(t.numel() for t in AutoModelForCausalLM.from_pretrained(tiny_llama_dir).model.layers[0]
                    .parameters())
    assert p["params_before"] - p["params_after"] == removed * per_layer  # whole layers went, nothing else
    # the paper's ratio: the layer count whose share of all parameters is closest to 0.2
    share = {k: k * per_layer / p["params_before"] for k in range(1, p["num_layers_before"] - 1)}
    assert removed == min(share, key=lambda k: abs(share[k] - 0.2))
    assert sum(hi - lo for lo, hi in p["windows"]) == removed


runner = CliRunner()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--threshold", "1.5"], "out of range"),
        (["--criterion", "kl", "--threshold", "-1"], "> 0"),
        (["--ratio", "0.95"], "largest reachable"),
        (["--layers", "2", "--merge", "average"], "merge.method"),
        ([], "give a target"),
        (["--layers", "2", "--threshold", "0.5"], "only one of"),
    ],
)
def test_bad_input(ray_session, tiny_llama_dir, tokens_parquet, tmp_path, extra, message):
    out = tmp_path / "out"
    res = runner.invoke(app, ["compress", str(tiny_llama_dir), "--data", str(tokens_parquet), "--samples", "16",
                              "--seq-len", "16", "--set", "data.batch_size=4", "--method", "swm", "--out", str(out),
                              *extra])
    assert res.exit_code != 0 and message in res.output and "Traceback" not in res.output
    assert not out.exists()


def test_unsupported_architecture(ray_session, tokens_parquet, tmp_path):
    from tiny_models import tiny_gpt2, tiny_tokenizer

    d = tmp_path / "gpt2"
    tiny_gpt2().save_pretrained(d)
    tiny_tokenizer(d)
    res = runner.invoke(app, ["compress", str(d), "--data", str(tokens_parquet), "--samples", "16",
                              "--set", "data.batch_size=4", "--layers", "1", "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "not supported" in res.output and not (tmp_path / "o").exists()


def test_compress_eval_puts_metrics_into_the_card(ray_session, tiny_llama_dir, tokens_parquet, tmp_path):
    out = tmp_path / "ev"
    res = run_compress(_cfg(tiny_llama_dir, tokens_parquet, out, **{
        "select.layers": 1, "eval.enabled": True, "eval.tasks": ["piqa"], "eval.limit": 4,
        "eval.ppl_max_tokens": 256}))
    m = res["metrics"]
    assert m["tasks"]["piqa"]["n"] == 4 and 0 <= m["tasks"]["piqa"]["value"] <= 1
    assert m["ppl"]["ppl"] > 1
    card = (out / "README.md").read_text()
    assert "piqa" in card.lower() and "ppl" in card.lower()


def test_checkpoint_dtype_is_kept(ray_session, tokens_parquet, tmp_path):
    from tiny_models import tiny_model, tiny_tokenizer

    src = tmp_path / "bf16"
    model, _ = tiny_model("llama", n_layers=4)
    model.to(torch.bfloat16).save_pretrained(src)
    tiny_tokenizer(src)
    out = tmp_path / "o"
    run_compress(_cfg(src, tokens_parquet, out, **{"select.layers": 1}))
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert next(reloaded.parameters()).dtype == torch.bfloat16


def test_paper_switch_selects_the_authors_procedure(ray_session, tiny_llama_dir, tokens_parquet, tmp_path):
    out = tmp_path / "paper"
    res = runner.invoke(app, ["compress", str(tiny_llama_dir), "--data", str(tokens_parquet), "--samples", "16",
                              "--seq-len", "16", "--set", "data.batch_size=4", "--paper", "--layers", "1",
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    plan = json.loads((out / "plan.json").read_text())
    assert (plan["criterion"], plan["search"], plan["merge"]) == ("output", "top-down", "reference")
    assert plan["extra"]["paper_loop"] is True and plan["threshold"] is not None
    assert "windows (original layers, inclusive)" in res.output
