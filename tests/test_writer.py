"""The saved folder: contents, reload with plain transformers, atomicity, mergekit recipe, plan JSON."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from tiny_models import ARCHS, tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from swm_ray.edits.merge import apply_windows
from swm_ray.errors import UserError
from swm_ray.io.anatomy import count_parameters
from swm_ray.io.fs import OWNER_MARK
from swm_ray.plan import sources, writer
from swm_ray.plan.card import render_metrics_table, render_model_card
from swm_ray.plan.mergekit import render_mergekit_config
from swm_ray.plan.plan import Plan, removed_from_windows
from swm_ray.plan.sources import SOURCE_PLACEHOLDER

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


def _eval_result(model, tok, out: Path, text_file: Path, tasks: dict | None = None) -> dict:
    """What `compress --eval` puts into the card: `jobs.eval.merge_parts` over `evaluate_model`'s real result
    (perplexity measured on `text_file`, a local file) for the folder `out`; `tasks` rows as `zeroshot` makes them."""
    from swm_ray.evaluation.suite import evaluate_model
    from swm_ray.jobs.eval import merge_parts

    part = {"model": str(out), **evaluate_model(model, tok, tasks=[], ppl_data=str(text_file), ppl_chunk=8,
                                                ppl_max_tokens=64, ppl_batch_size=2)}
    names = list(tasks or {})
    if tasks:
        part.update(tasks=tasks, mode="offline", task_source="offline", splits={t: r["split"] for t, r in
                                                                                  tasks.items()},
                    raw={"results": {t: {"acc,none": r["value"]} for t, r in tasks.items()}})
    return merge_parts([part], names)


TASK_ROWS = {"arc_easy": {"metric": "acc", "value": 0.61, "stderr": 0.0204, "n": 570, "split": "validation",
                          "source": "offline"},
             "hellaswag": {"metric": "acc_norm", "value": 0.42, "stderr": None, "n": 200, "split": "validation",
                           "source": "offline"}}
ABSOLUTE_PATH = re.compile(r"(?<![\w:/.~-])(?:~|/[\w.-]+)(?:/[^\s`'\"|<>()]*)+")  # /a/b or ~/a, not s3://b/k


def _metrics_section(card: str) -> str:
    return card[card.index("## Metrics"):card.index("## How to load")]


def test_model_card_contents(tmp_path):
    model, tok, plan = _compressed("llama")
    out = tmp_path / "card"
    text = tmp_path / "held-out.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    metrics = _eval_result(model, tok, out, text, TASK_ROWS)
    _save(model, tok, plan, out, metrics=metrics)
    card = (out / "README.md").read_text()
    assert "tiny-llama" in card and "`reference`" in card and "top layer" in card
    assert "[4, 5]" in card and "[1, 2]" in card
    assert "| decoder layers | 6 | 4 |" in card
    assert f"{plan.params_before:,}" in card and f"{plan.params_after:,}" in card
    assert "AutoModelForCausalLM.from_pretrained" in card
    assert RESOLVED.strip() in card  # no local path in it: shown as written
    table = _metrics_section(card)
    ppl = metrics["ppl"]
    assert f"| perplexity | {ppl['ppl']:,.2f} |  | a local folder or file (`held-out.txt`), {ppl['tokens']} tokens, " \
           f"{ppl['chunks']} chunks of 8, BOS: stream |" in table
    assert "| ARC-e (acc, %) | 61.00 | ± 2.04 | validation split, offline tasks, 570 items |" in table
    assert "| HellaSwag (acc_norm, %) | 42.00 |  | validation split, offline tasks, 200 items |" in table
    assert "| mean accuracy (%) | 51.50 |  | plain mean over 2 tasks |" in table
    assert f"| parameters | {metrics['params']:,} |  |  |" in table


def test_metrics_table_has_no_dict_reprs_and_no_paths(tmp_path):
    """`make demo`'s metrics (`eval.tasks=[]`: no tasks, an empty raw block, the output folder's absolute path)
    and a result with tasks render as rows of numbers and words only."""
    model, tok, _ = _compressed("llama")
    out = tmp_path / "runs" / "demo"
    text = tmp_path / "texts" / "wiki.txt"
    text.parent.mkdir()
    text.write_text("a b c d e f g h i j k l m n o p. " * 30)
    for metrics in (_eval_result(model, tok, out, text), _eval_result(model, tok, out, text, TASK_ROWS),
                    {"ppl": 12.5, "note": str(out), "extra": {"nested": {"x": 1.5}, "where": [str(text)]}}):
        table = render_metrics_table(metrics)
        assert table.startswith("| metric | value | ± stderr | measured on |")
        assert not any(c in table for c in "{}'[]"), table  # no dict, list or string reprs
        assert str(tmp_path) not in table and not ABSOLUTE_PATH.search(table), table
        assert "raw" not in table and "| model |" not in table
        assert "| perplexity |" in table
    assert "| extra / nested / x | 1.5000 |  |  |" in table and "note" not in table  # the path is left out
    assert render_metrics_table({}) == ""


def _auto_record() -> dict:
    cand = {"compensate": "none", "seconds": 1.0}
    return {"chosen": "replaceme", "original_validation_ppl": 20.5, "validation_rows": 8, "validation_tokens": 1016,
            "candidates": [
                {**cand, "candidate": "swm", "method": "swm", "merge": "reference", "windows": [[3, 4]],
                 "validation_ppl": 40.25, "error": None},
                {**cand, "candidate": "sleb", "method": "sleb", "merge": "keep-first", "windows": [],
                 "validation_ppl": None, "error": "no window to merge at this target"},
                {**cand, "candidate": "replaceme", "method": "replaceme", "merge": "keep-first",
                 "windows": [[3, 4]], "validation_ppl": 30.75, "error": None}]}


@pytest.mark.parametrize("kind", ["merge", "drop", "keep-last", "auto"])
def test_card_says_what_the_plan_did_and_which_method_chose_it(kind):
    method, merge, extra = {"merge": ("swm", "reference", {}), "drop": ("shortgpt", "keep-first", {}),
                            "keep-last": ("swm", "keep-last", {}),
                            "auto": ("auto", "keep-first", {"auto": _auto_record()})}[kind]
    plan = Plan(windows=[[3, 4], [0, 1]] if kind != "auto" else [[3, 4]], num_layers_before=6, merge=merge,
                source_model="org/base", method=method, similarities=[0.9, 0.8])
    plan.extra = extra
    card = render_model_card(plan)
    produced = next(line for line in card.splitlines() if line.startswith("Produced by"))
    if kind == "merge":
        assert "by merging 2 windows of consecutive decoder layers into one layer each" in produced
        assert "dropping" not in produced and "Method: **`swm`**: sliding-window merging" in card
        assert "| [3, 4] | 2 | one merged layer (reference) | 0.9000 |" in card
    else:
        removed = 1 if kind == "auto" else 2
        kept = "top" if kind == "keep-last" else "bottom"
        assert f"by dropping {removed} of its 6 decoder layers" in produced and "no layers were merged" in produced
        assert f"only the {kept} layer of each was kept" in produced and "merging" not in produced
        assert "layer-dropping" in card and "layer-merging" not in card
    if kind == "drop":
        assert "Method: **`shortgpt`**: ShortGPT" in card
        assert "| [3, 4] | 2 | layer 3 kept, 1 dropped | 0.9000 |" in card
    if kind == "keep-last":
        assert "| [3, 4] | 2 | layer 4 kept at position 3, 1 dropped |" in card
    if kind == "auto":
        assert "Method: **`auto`**" in card and "Chosen: **`replaceme`** (ReplaceMe:" in card
        assert "validation perplexity on 8 held-out rows, 1016 tokens; the original model: 20.50" in card
        assert "| **replaceme** (chosen) | keep-first | none | [3, 4] | 30.75 |" in card
        assert "| swm | reference | none | [3, 4] | 40.25 |" in card
        assert "| sleb | keep-first | none | - | not scored: no window to merge at this target |" in card
    else:
        assert "Chosen:" not in card


def test_card_carries_no_local_path(tmp_path, monkeypatch):
    """Source, output folder, data paths (absolute or relative), metrics: the card names none of them by path."""
    monkeypatch.chdir(tmp_path)
    model, tok, plan = _compressed("llama", method="keep-first")
    (tmp_path / "models" / "base").mkdir(parents=True)
    (tmp_path / "texts.parquet").write_text("")
    plan.source_model = str(tmp_path / "models" / "base")
    out = tmp_path / "runs" / "demo"
    resolved = (f"model:\n  source: {tmp_path / 'models' / 'base'}\ndata:\n  source: texts.parquet\n"
                f"  mode: crops\ngrid:\n  models:\n  - ./models/base\n  - org/hub-model\n  - s3://bucket/m\n"
                f"out: runs/demo\nheal:\n  data: ~/texts.jsonl\n")
    metrics = {"model": str(out), "ppl": {"data": str(tmp_path / "texts.parquet"), "ppl": 9.5, "tokens": 64}}
    writer.save_model_folder(model, tok, str(out), plan=plan, raw_yaml=RAW, resolved_yaml=resolved, metrics=metrics,
                             verify=False)
    card = (out / "README.md").read_text()
    config = card[card.index("```yaml\n") + 8:card.rindex("\n```")]
    assert str(tmp_path) not in card and not ABSOLUTE_PATH.search(card)
    assert "from a local folder or file (`base`)" in card
    assert "texts.parquet" not in config and "runs/demo" not in config and "./models" not in config
    assert "- org/hub-model\n  - s3://bucket/m" in config and "  mode: crops" in config  # not paths: kept
    assert config.count("<local path>") == 5  # model, data, a grid model, out, heal data
    assert yaml.safe_load(config)["out"] == "<local path>"  # still YAML
    assert "a local folder or file (`texts.parquet`), 64 tokens" in card
    assert (out / "config.resolved.yaml").read_text() == resolved  # the run's own record keeps everything


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
    recipe = yaml.safe_load(render_mergekit_config(plan))
    assert [s["sources"][0]["layer_range"] for s in recipe["slices"]] == [[0, 1], [2, 4], [5, 6]]
    assert render_mergekit_config(Plan(windows=[[1, 2]], num_layers_before=6, merge="mean")) is None


def _recipe(source: str, revision: str | None = None) -> tuple[set[str], str]:
    text = render_mergekit_config(Plan(windows=[[1, 2]], num_layers_before=4, merge="keep-first",
                                              source_model=source, source_revision=revision))
    return {s["sources"][0]["model"] for s in yaml.safe_load(text)["slices"]}, text


def test_mergekit_recipe_names_a_source_mergekit_can_open(tmp_path, monkeypatch):
    """mergekit opens hub ids (`id@revision`) and local folders, not `builtin:` or s3://."""
    models, text = _recipe("builtin:smollm2-135m")
    assert models == {"HuggingFaceTB/SmolLM2-135M-Instruct"} and "builtin:" not in yaml.safe_dump(yaml.safe_load(text))
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in text and "resolve_model_path" in text and "converted" in text
    monkeypatch.setitem(sources.BUILTIN_HUB_IDS, "smollm2-135m", None)  # a builtin without a known original
    models, text = _recipe("builtin:smollm2-135m")
    assert models == {SOURCE_PLACEHOLDER} and "put the local path of that converted folder" in text
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my-model").mkdir()
    models, text = _recipe("my-model")  # relative, as the user typed it: the recipe gets the resolved folder
    assert models == {str(tmp_path / "my-model")} and "# model: the local folder swm-ray read" in text
    models, text = _recipe("org/name", "v1.0")
    assert models == {"org/name@v1.0"} and "hub id" in text
    models, text = _recipe("s3://bucket/model")
    assert models == {SOURCE_PLACEHOLDER} and "s3://bucket/model" in text and "copy that folder" in text
    models, _ = _recipe("")
    assert models == {SOURCE_PLACEHOLDER}


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
    for bad in ({"similarities": [None, 0.8]}, {"windows": [["a", 9]]}, {"num_layers_before": None}):
        with pytest.raises(UserError, match="wrong kind"):
            Plan.from_dict({**plan.to_dict(), **bad})


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
