"""The saved folder: contents, reload with plain transformers, atomicity, mergekit recipe, plan JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from tiny_models import ARCHS, tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from swm_ray import writer
from swm_ray.errors import UserError
from swm_ray.merge import apply_windows
from swm_ray.models import count_parameters
from swm_ray.plan import Plan, removed_from_windows
from swm_ray.storage import OWNER_MARK

IDS = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29, 33, 37, 41]])  # longer than the tiny sliding windows (4)
RAW = "model:\n  source: tiny\n"
RESOLVED = "model:\n  source: tiny\n  dtype: auto\nmerge:\n  method: reference\n"


def _compressed(arch: str, method: str = "reference", windows=((4, 5), (1, 2))):
    model, tok = tiny_model(arch)
    before = count_parameters(model)
    apply_windows(model, windows, method)
    plan = Plan(
        windows=[list(w) for w in windows], num_layers_before=6, merge=method, source_model=f"tiny-{arch}",
        criterion="output", search="top-down", threshold=0.5, similarities=[0.91, 0.87],
        params_before=before, params_after=count_parameters(model),
    )
    return model, tok, plan


@pytest.fixture
def work(tmp_path) -> Path:
    """An empty folder of its own (tmp_path may hold other fixtures' files, e.g. a cache)."""
    folder = tmp_path / "work"
    folder.mkdir()
    return folder


def _save(model, tok, plan, out: Path, **kwargs) -> str:
    return writer.save_model_folder(model, tok, str(out), plan=plan, raw_yaml=RAW, resolved_yaml=RESOLVED, **kwargs)


@pytest.mark.parametrize("arch", ARCHS)
def test_saved_folder_reloads_with_same_logits(tmp_path, arch):
    model, tok, plan = _compressed(arch)
    out = tmp_path / "out"
    _save(model, tok, plan, out, metrics={"ppl": 12.5}, max_shard_size="60KB")
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").exists()
    for name in ("config.json", "generation_config.json", "README.md", "config.yaml", "config.resolved.yaml",
                 "plan.json", "metrics.json", "tokenizer.json", "tokenizer_config.json", OWNER_MARK):
        assert (out / name).exists(), name
    assert not (out / "mergekit_config.yml").exists()  # reference changes weights: no passthrough recipe
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 4
    if "layer_types" in config:
        assert len(config["layer_types"]) == 4
    reloaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert [x.self_attn.layer_idx for x in reloaded.model.layers] == [0, 1, 2, 3]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, model(IDS).logits, rtol=1e-5, atol=1e-5)
    tok2 = AutoTokenizer.from_pretrained(str(out))
    assert tok2("hello world").input_ids == tok("hello world").input_ids
    assert (out / "config.yaml").read_text() == RAW
    assert Plan.load(out / "plan.json") == plan


def test_model_card_contents(tmp_path):
    model, tok, plan = _compressed("llama")
    out = tmp_path / "card"
    _save(model, tok, plan, out, metrics={"arc_easy": {"acc": 0.61, "acc_norm": 0.58}, "boolq": {"acc": 0.7}})
    card = (out / "README.md").read_text()
    assert "tiny-llama" in card and "`reference`" in card and "top layer" in card
    assert "[4, 5]" in card and "[1, 2]" in card
    assert "| decoder layers | 6 | 4 |" in card
    assert f"{plan.params_before:,}" in card and f"{plan.params_after:,}" in card
    assert "| arc_easy | 0.6100 | 0.5800 |" in card and "| boolq | 0.7000 |  |" in card
    assert "AutoModelForCausalLM.from_pretrained" in card
    assert RESOLVED.strip() in card


def test_existing_foreign_output_refused(work):
    model, tok, plan = _compressed("llama")
    out = work / "taken"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(UserError, match="not written by swm-ray"):
        _save(model, tok, plan, out)
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    assert sorted(p.name for p in work.iterdir()) == ["taken"]


def test_own_output_needs_overwrite(tmp_path):
    model, tok, plan = _compressed("llama")
    out = tmp_path / "mine"
    _save(model, tok, plan, out, verify=False)
    with pytest.raises(UserError, match="overwrite"):
        _save(model, tok, plan, out, verify=False)
    (out / "stale.txt").write_text("old")
    _save(model, tok, plan, out, overwrite=True, verify=False)
    assert not (out / "stale.txt").exists() and (out / "config.json").exists()


def test_failure_mid_write_leaves_nothing(work, monkeypatch):
    model, tok, plan = _compressed("llama")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(writer, "_write_text_files", boom)
    with pytest.raises(OSError, match="disk full"):
        _save(model, tok, plan, work / "out")
    assert list(work.iterdir()) == []


def test_non_finite_logits_rejected(work):
    model, tok, plan = _compressed("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite"):
        _save(model, tok, plan, work / "out")
    assert list(work.iterdir()) == []


def test_mergekit_recipe_keep_first(tmp_path):
    model, tok, plan = _compressed("qwen2", method="keep-first")
    out = tmp_path / "kf"
    _save(model, tok, plan, out, verify=False)
    recipe = yaml.safe_load((out / "mergekit_config.yml").read_text())
    assert recipe["merge_method"] == "passthrough" and recipe["dtype"] == "float32"
    ranges = [s["sources"][0]["layer_range"] for s in recipe["slices"]]
    assert ranges == [[0, 2], [3, 5]]  # kept original layers 0, 1, 3, 4 as half-open ranges
    assert all(s["sources"][0]["model"] == "tiny-qwen2" for s in recipe["slices"])


def test_mergekit_recipe_keep_last_keeps_tops():
    plan = Plan(windows=[[4, 5], [1, 2]], num_layers_before=6, merge="keep-last", source_model="m")
    recipe = yaml.safe_load(writer.render_mergekit_config(plan))
    assert [s["sources"][0]["layer_range"] for s in recipe["slices"]] == [[0, 1], [2, 4], [5, 6]]
    assert writer.render_mergekit_config(Plan(windows=[[1, 2]], num_layers_before=6, merge="mean")) is None


def test_plan_round_trip(tmp_path):
    plan = Plan(windows=[[7, 9], [2, 3]], num_layers_before=12, merge="paper", similarities=[0.9, 0.8],
                extra={"steps": 3})
    assert plan.removed_layers == [3, 8, 9] and plan.num_layers_after == 9
    assert plan.kept_layers == [0, 1, 2, 4, 5, 6, 7, 10, 11]
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    assert Plan.load(plan.save(tmp_path / "sub" / "plan.json")) == plan
    assert removed_from_windows([(5, 5), (0, 2)]) == [1, 2]
    with pytest.raises(UserError, match="unknown keys"):
        Plan.from_dict({**plan.to_dict(), "bogus": 1})


def test_tokenizer_that_would_reload_differently_rejected(work):
    """transformers 5 rebuilds a qwen2 folder's tokenizer as Qwen2Tokenizer (byte-level BPE from vocab/merges):
    a word-level tokenizer would silently change, so the writer refuses to publish it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    word = Tokenizer(models.WordLevel(unk_token="<unk>"))
    word.pre_tokenizer = pre_tokenizers.Whitespace()
    word.train_from_iterator(["the quick brown fox jumps over the lazy dog"],
                             trainers.WordLevelTrainer(special_tokens=["<pad>", "<s>", "</s>", "<unk>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=word, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    model, _, plan = _compressed("qwen2")
    with pytest.raises(RuntimeError, match="tokenizer"):
        _save(model, tok, plan, work / "out")
    assert list(work.iterdir()) == []
