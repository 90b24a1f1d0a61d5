"""Scale-out: layer streaming agrees with in-memory runs, the streaming writer equals the in-memory edit, work
is split by rows (any number of actors up to the rows), and actor counts are checked before models load."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny_models import ARCHS, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

from swm_ray.compute.capture import compute_hsic_sums
from swm_ray.compute.memory import Footprint, choose_mode
from swm_ray.compute.stack import InMemoryStack, StackSpec, StreamingStack, open_stack
from swm_ray.config import build_config
from swm_ray.edits.merge import apply_windows
from swm_ray.errors import UserError
from swm_ray.io.checkpoint import Checkpoint, weights_checksum
from swm_ray.io.models import load_config
from swm_ray.io.sizes import parse_size
from swm_ray.jobs.analyze import run_analyze
from swm_ray.jobs.compress import run_compress
from swm_ray.plan.executor import PlanView, materialize
from swm_ray.plan.plan import Plan
from swm_ray.plan.writer import write_model_folder

IDS = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29, 33, 37, 41]])


def _saved(arch: str, folder: Path, n_layers: int = 6, dtype=torch.float32):
    model, tok = tiny_model(arch, n_layers=n_layers)
    model.to(dtype).save_pretrained(folder)
    tok.save_pretrained(folder)
    return model


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_streaming_statistics_equal_in_memory(tmp_path, arch):
    model = _saved(arch, tmp_path)
    ids = np.random.default_rng(0).integers(4, 256, size=(12, 11))
    batches = [(0, 4), (4, 8), (8, 12)]
    mem, _, _ = compute_hsic_sums(InMemoryStack(model), ids, batches, skip_first_tokens=1)
    stream = StreamingStack.from_path(str(tmp_path), torch.device("cpu"), torch.float32)
    streamed, _, _ = compute_hsic_sums(stream, ids, batches, skip_first_tokens=1)
    assert np.abs(mem - streamed).max() <= 1e-6 * np.abs(mem).max()
    assert stream.layer_loads == 6  # layer-major: every layer read once for all minibatches


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["reference", "mean", "keep-first"])
def test_streaming_writer_equals_in_memory_edit(tmp_path, arch, method):
    src = tmp_path / "src"
    model = _saved(arch, src)
    windows = [[4, 5], [1, 3]]
    plan = Plan(windows=windows, num_layers_before=6, merge=method, source_model="tiny")
    out = tmp_path / "out"
    res = write_model_folder(str(src), plan, str(out), raw_yaml="", resolved_yaml="", max_shard_size="40KB")
    assert len(res["files"]) > 2 and (out / "model.safetensors.index.json").exists()
    apply_windows(model, windows, method)
    want = {k: v for k, v in model.state_dict().items() if k in _tensors(out) or "lm_head" not in k}
    got = _tensors(out)
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3
    assert cfg.get("layer_types") == getattr(model.config, "layer_types", None)
    reloaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, model(IDS).logits)
    assert res["checksum"] == weights_checksum(Checkpoint(src)) == Plan.load(out / "plan.json").source_checksum
    assert res["params_after"] == sum(p.numel() for p in model.parameters())


def test_plan_view_streams_and_materializes_like_the_edit(tmp_path):
    model = _saved("gemma3", tmp_path)
    view = PlanView(Checkpoint(tmp_path), load_config(str(tmp_path)), [[1, 2]], "reference")
    apply_windows(model, [[1, 2]], "reference")
    with torch.no_grad():
        want = model(IDS).logits
        torch.testing.assert_close(materialize(view, view.config)(IDS).logits, want)
    stack = StreamingStack(view, view.config, torch.device("cpu"), torch.float32)
    pro = stack.prologue(IDS)
    h = pro.hidden
    for i in range(stack.num_layers):
        with stack.layer(i) as layer:
            h = stack.run(layer, h, pro.kwargs[i])
    torch.testing.assert_close(stack.logits(stack.final(h)), want)


def test_checksum_depends_on_values_not_read_order(tmp_path):
    _saved("llama", tmp_path / "a")
    ck = Checkpoint(tmp_path / "a")
    one = weights_checksum(ck)
    assert one == weights_checksum(Checkpoint(tmp_path / "a"))
    _saved("llama", tmp_path / "b", n_layers=5)
    assert weights_checksum(Checkpoint(tmp_path / "b")) != one


def test_bf16_checkpoint_streams_and_writes_bf16(tmp_path):
    src = tmp_path / "src"
    model = _saved("qwen3", src, dtype=torch.bfloat16)
    write_model_folder(str(src), Plan(windows=[[2, 3]], num_layers_before=6, merge="mean"), str(tmp_path / "o"),
                       raw_yaml="", resolved_yaml="")
    got = _tensors(tmp_path / "o")
    assert {t.dtype for t in got.values()} == {torch.bfloat16}
    apply_windows(model, [[2, 3]], "mean")
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items() if k in got)


def test_parse_size_and_budget_decisions():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("512MiB") == 512 * 2**20 and parse_size("1.5k") == 1500
    with pytest.raises(UserError, match="--max-memory"):
        parse_size("lots")
    fp = Footprint(weights=1000, resident=100, largest_layer=50, stream_bytes=10)
    assert choose_mode("auto", fp, 10_000, "m") == "memory"
    assert choose_mode("auto", fp, 1_000, "m") == "stream"  # weights do not fit 80% of the budget
    assert choose_mode("never", fp, 10, "m") == "memory"
    with pytest.raises(UserError, match="even one layer at a time"):
        choose_mode("always", fp, 200, "m")
    assert fp.max_streams(400) == int((0.9 * 400 - 100 - 150 - 10) // 10)


def test_budget_turns_streaming_on(tmp_path):
    _saved("llama", tmp_path)
    weights = Checkpoint(tmp_path).nbytes()
    small = open_stack(StackSpec(str(tmp_path), device="cpu", max_memory=weights * 3 // 4), rows=4, seq_len=8)
    big = open_stack(StackSpec(str(tmp_path), device="cpu", max_memory=weights * 10), rows=4, seq_len=8)
    forced = open_stack(StackSpec(str(tmp_path), device="cpu", stream="always"), rows=4, seq_len=8)
    assert (small.streaming, big.streaming, forced.streaming) == (True, False, True)
    assert small.max_streams >= 1


# -- through Ray -----------------------------------------------------------------------------------------
def _cfg(model_dir, data, out, **flags):
    base = {"model.source": str(model_dir), "data.source": str(data), "data.samples": 16, "data.seq_len": 16,
            "data.batch_size": 4, "out": str(out), "select.layers": 2, "ray.cpus_per_actor": 0.25,
            "select.method": "swm"}
    return build_config(flags={**base, **flags})


def test_more_actors_than_statistic_minibatches(ray_session, tiny_llama_dir, tokens_parquet, tmp_path):
    """16 rows in 4 minibatches of 4: 6 actors split the candidate rows (some get no minibatch for the
    statistics) and choose exactly what one actor chooses."""
    one = run_compress(_cfg(tiny_llama_dir, tokens_parquet, tmp_path / "one", **{"ray.actors": 1}))
    six = run_compress(_cfg(tiny_llama_dir, tokens_parquet, tmp_path / "six", **{"ray.actors": 6}))
    assert six["plan"]["windows"] == one["plan"]["windows"]
    assert six["plan"]["similarities"] == one["plan"]["similarities"]  # exact: per-row sums, fsum
    a, b = _tensors(tmp_path / "one"), _tensors(tmp_path / "six")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    m1 = run_analyze(_cfg(tiny_llama_dir, tokens_parquet, tmp_path / "a1", **{"ray.actors": 1}))
    m6 = run_analyze(_cfg(tiny_llama_dir, tokens_parquet, tmp_path / "a6", **{"ray.actors": 6}))
    assert (m1["actors"], m6["actors"]) == (1, 6)
    np.testing.assert_allclose(np.load(tmp_path / "a1" / "similarity.npy"),
                               np.load(tmp_path / "a6" / "similarity.npy"), atol=1e-9, rtol=0)


def test_actor_count_checked_before_any_model_loads(ray_session, tiny_llama_dir, tokens_parquet, tmp_path):
    """More actors than rows is refused before an actor starts: the weights here are unreadable, so an actor
    that had started would fail differently."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama_dir, broken)
    weights = broken / "model.safetensors"
    raw = weights.read_bytes()
    weights.write_bytes(raw[: len(raw) // 2])  # header intact, tensors truncated
    with pytest.raises(UserError, match=r"--actors 20 is more than the 16 calibration rows"):
        run_compress(_cfg(broken, tokens_parquet, tmp_path / "o", **{"ray.actors": 20}))
    assert not (tmp_path / "o").exists()


def test_streaming_compress_equals_in_memory(ray_session, tiny_llama_dir, tokens_parquet, tmp_path):
    mem = run_compress(_cfg(tiny_llama_dir, tokens_parquet, tmp_path / "m", **{"model.stream": "never",
                                                                                "ray.actors": 2}))
    streamed = run_compress(_cfg(tiny_llama_dir, tokens_parquet, tmp_path / "s", **{"model.stream": "always",
                                                                                     "ray.actors": 2}))
    budget = run_compress(_cfg(tiny_llama_dir, tokens_parquet, tmp_path / "b", **{"model.max_memory": "350KB"}))
    assert mem["plan"]["extra"]["actor_modes"] == ["memory"]
    assert streamed["plan"]["extra"]["actor_modes"] == budget["plan"]["extra"]["actor_modes"] == ["stream"]
    assert mem["plan"]["windows"] == streamed["plan"]["windows"] == budget["plan"]["windows"]
    a, b = _tensors(tmp_path / "m"), _tensors(tmp_path / "s")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    am = run_analyze(_cfg(tiny_llama_dir, tokens_parquet, tmp_path / "am", **{"model.stream": "never"}))
    ast = run_analyze(_cfg(tiny_llama_dir, tokens_parquet, tmp_path / "as", **{"model.stream": "always"}))
    assert (am["modes"], ast["modes"]) == (["memory"], ["stream"])
    assert np.abs(np.load(tmp_path / "am" / "similarity.npy") - np.load(tmp_path / "as" / "similarity.npy")).max() \
        <= 1e-6


def test_budget_below_one_layer_is_a_clear_error(ray_session, tiny_llama_dir, tokens_parquet, tmp_path):
    with pytest.raises(UserError, match="even one layer at a time"):
        run_compress(_cfg(tiny_llama_dir, tokens_parquet, tmp_path / "o", **{"model.max_memory": "1KB"}))
    assert not (tmp_path / "o").exists()


def test_tokenizer_of_source_is_copied(tmp_path):
    src = tmp_path / "src"
    _saved("llama", src)
    write_model_folder(str(src), Plan(windows=[[1, 2]], num_layers_before=6, merge="reference"),
                       str(tmp_path / "o"), raw_yaml="", resolved_yaml="")
    assert (tmp_path / "o" / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    tok = tiny_tokenizer()
    assert tok("hello world").input_ids


def test_streamed_perplexity_equals_in_memory(tmp_path, text_jsonl):
    from swm_ray.evaluation.suite import evaluate_source

    _saved("gemma3", tmp_path)
    opts = {"tasks": [], "ppl_data": str(text_jsonl), "ppl_chunk": 16, "ppl_batch_size": 3, "ppl_bos": "none"}
    mem = evaluate_source(str(tmp_path), {"stream": "never", "device": "cpu"}, opts)
    streamed = evaluate_source(str(tmp_path), {"stream": "always", "device": "cpu"}, opts)
    assert mem["ppl"]["tokens"] == streamed["ppl"]["tokens"] > 0
    assert streamed["ppl"]["ppl"] == pytest.approx(mem["ppl"]["ppl"], rel=1e-6)
    assert streamed["params"] == mem["params"]
    with pytest.raises(UserError, match="zero-shot tasks and latency need it whole"):
        evaluate_source(str(tmp_path), {"stream": "always", "device": "cpu"}, {**opts, "tasks": ["piqa"]})


def test_an_actor_with_several_gpus_streams_within_one(tmp_path, monkeypatch):
    """A model in memory spreads over an actor's GPUs, a streamed one runs on the first: whether streaming fits
    and how many candidate streams it keeps are decided by one device's free memory, not all of them."""
    import swm_ray.compute.memory as memory
    from swm_ray.compute.memory import footprint

    _saved("llama", tmp_path)
    ckpt = Checkpoint(tmp_path)
    from swm_ray.io.models import load_config

    fp = footprint(ckpt, load_config(str(tmp_path)), torch.float32, 4, 8)
    per_gpu = {"n": 0}
    monkeypatch.setattr(memory, "device_budget", lambda dev, gpus=1, share=1: per_gpu["n"] * max(1, gpus))
    per_gpu["n"] = fp.streaming_floor * 2 // 3  # two of them hold the floor, not the weights; one not the floor
    assert per_gpu["n"] < fp.streaming_floor <= 2 * per_gpu["n"] and not fp.fits_in_memory(2 * per_gpu["n"])
    with pytest.raises(UserError, match="even one layer at a time"):
        open_stack(StackSpec(str(tmp_path), device="cpu", gpus=2), rows=4, seq_len=8)
    per_gpu["n"] = fp.streaming_floor + 3 * fp.stream_bytes  # one device holds the floor and a few streams
    stack = open_stack(StackSpec(str(tmp_path), device="cpu", gpus=2, stream="always"), rows=4, seq_len=8)
    assert stack.streaming and stack.budget == per_gpu["n"]
    assert stack.max_streams == fp.max_streams(per_gpu["n"]) < fp.max_streams(2 * per_gpu["n"])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="a device map over two GPUs needs two")
def test_a_model_split_over_two_gpus_gives_the_numbers_of_one_gpu():
    """In memory with a device map (`--gpus-per-actor` ≥ 2) each layer's output stays on its GPU: the reference
    pass (Block Influence, HSIC), a window's fit sums, a merged window and a folded fit combine tensors of several
    GPUs and must give the values of the same model on one GPU."""
    from accelerate import dispatch_model

    from swm_ray.compute.fitpass import compensation_sums
    from swm_ray.compute.refpass import Needs, Reference

    ids = np.random.default_rng(0).integers(4, 256, size=(4, 10))
    one, _ = tiny_model("llama", n_layers=6)
    split = copy.deepcopy(one)
    one.to("cuda:0")
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": 1, "lm_head": 1,
                  **{f"model.layers.{i}": int(i >= 3) for i in range(6)}}
    split = dispatch_model(split, device_map=device_map)
    got = {}
    for name, model in (("one", one), ("split", split)):
        stack = InMemoryStack(model)
        ref = Reference(stack, ids, Needs(influence=True, hsic=True), hsic_batches={0: (0, 4)})
        sums = compensation_sums(stack, ids, [(0, 4)], [(2, 4)], "mean", "global", {}, [(2, 4)])
        merged = {n: t.float().cpu() for n, t in stack.state(2, 4, "mean").items()}
        got[name] = (ref.stats.influence, ref.stats.hsic[0], sums, merged)
    (inf1, hsic1, sums1, merged1), (inf2, hsic2, sums2, merged2) = got["one"], got["split"]
    np.testing.assert_allclose(inf2, inf1, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(hsic2, hsic1, rtol=1e-4, atol=1e-6)
    for n, t in merged1.items():
        torch.testing.assert_close(merged2[n], t)
    np.testing.assert_allclose(sums2[0].mtm, sums1[0].mtm, rtol=1e-4)
    np.testing.assert_allclose(sums2[0].gap, sums1[0].gap, rtol=1e-4)
