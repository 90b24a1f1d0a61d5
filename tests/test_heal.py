"""`swm-ray heal`: LoRA with Ray Train workers (the loss goes down, the merged weights are base + (alpha/r)·BA,
the folder reloads with plain transformers, a run resumes from its checkpoint step) and the layer-local refit
(each merged layer's fit error drops, nothing else changes); training data, schedule and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny_models import SENTENCES
from typer.testing import CliRunner

from swm_ray.cli import app
from swm_ray.config import build_config
from swm_ray.errors import UserError
from swm_ray.heal.examples import IGNORE, load_examples
from swm_ray.heal.lora import Schedule, apply_lora, merge_adapter

runner = CliRunner()
WINDOWS = [[3, 4], [1, 2]]  # of the 6-layer tiny Llama: positions 1 and 2 of the 4 left are merged


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def compressed_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    """The tiny Llama with windows [1, 2] and [3, 4] merged (reference), written by the writer with its plan."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from swm_ray.edits.merge import apply_windows
    from swm_ray.plan.plan import Plan
    from swm_ray.plan.writer import save_model_folder

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    apply_windows(model, WINDOWS, "reference")
    plan = Plan(windows=WINDOWS, num_layers_before=6, merge="reference", source_model=str(tiny_llama_dir))
    out = tmp_path_factory.mktemp("compressed") / "c"
    save_model_folder(model, AutoTokenizer.from_pretrained(tiny_llama_dir), str(out), plan=plan, raw_yaml="",
                      resolved_yaml="")
    return out


def _state(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _mean_nll(folder: Path, examples) -> float:
    from transformers import AutoModelForCausalLM

    from swm_ray.heal.lora import collate, nll_sum

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    idx = list(range(len(examples)))
    with torch.no_grad():
        total = float(nll_sum(model, collate(examples, idx, 0, "cpu")))
    return total / examples.loss_tokens(idx)


def _lora_flags(model: Path, data: Path, out: Path, **extra) -> dict:
    return {"model.source": str(model), "heal.data": str(data), "heal.lr": 1e-2, "heal.batch_size": 8,
            "heal.micro_batch_size": 4, "heal.warmup_steps": 0, "heal.cutoff": 16, "heal.log_every": 1,
            "out": str(out), **extra}


# -- LoRA ----------------------------------------------------------------------------------------------------------
def test_lora_with_two_ray_train_workers(ray_session, compressed_dir, text_jsonl, tmp_path):
    """A run stopped after step 3 resumes there; the loss goes down; merged weights = base + (alpha/r)·B·A; the
    folder reloads with plain transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from swm_ray.jobs.heal import _checkpoint_root, _claim_checkpoints, fit_lora, run_heal

    out = tmp_path / "healed"
    cfg = build_config(flags=_lora_flags(compressed_dir, text_jsonl, out, **{
        "heal.steps": 6, "heal.workers": 2, "heal.checkpoint_every": 2, "heal.keep_adapter": True}))
    tok = AutoTokenizer.from_pretrained(compressed_dir)
    examples = load_examples(str(text_jsonl), tok, cutoff=16)
    schedule = Schedule.of(len(examples), 8, 2, 6, 0, cfg.heal.seed)
    root = _checkpoint_root(cfg, str(out))
    run = _claim_checkpoints(cfg, str(out))  # what run_heal does first; then the run stops after step 3
    stopped = fit_lora(cfg, str(compressed_dir), examples, schedule, run, 2, tok.pad_token_id, stop_at=3)
    assert stopped["state"]["step"] == 3

    res = run_heal(cfg.model_copy(update={"resume": True}))
    record = res["record"]
    assert record.workers == 2 and record.steps == 6 and record.resumed_from_step == 3
    assert [h["step"] for h in record.history] == list(range(1, 7))
    assert record.history[:3] == stopped["state"]["history"]  # carried over from the checkpoint, not rerun
    assert min(h["loss"] for h in record.history[-2:]) < record.history[0]["loss"]
    assert record.tokens_per_s and record.tokens_per_s > 0
    assert not Path(root).exists()  # checkpoints go once the folder is written

    # the healed model predicts the training text better than the compressed one
    assert _mean_nll(out, examples) < _mean_nll(compressed_dir, examples) - 0.05

    # merged weights: W + (alpha / r) B A for every adapted linear layer, all other tensors untouched
    base, healed = _state(compressed_dir), _state(out)
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    scale = cfg.heal.lora_alpha / cfg.heal.lora_r
    adapted = set()
    for key, a in adapter.items():
        if ".lora_A." not in key:
            continue
        name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        b = adapter[key.replace(".lora_A.", ".lora_B.")]
        assert b.abs().max() > 0, f"{name}: B was never trained"
        torch.testing.assert_close(healed[name], base[name] + scale * b @ a, rtol=1e-5, atol=1e-6)
        adapted.add(name)
    assert len(adapted) == 7 * 4  # q k v o gate up down in each of the 4 layers
    for name in set(base) - adapted:
        assert torch.equal(healed[name], base[name]), name

    # a normal model folder: plain from_pretrained, the plan and the training record
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 4
    assert AutoTokenizer.from_pretrained(out)("the quick brown fox").input_ids
    saved = json.loads((out / "heal.json").read_text())
    assert saved["mode"] == "lora" and len(saved["history"]) == 6
    plan = json.loads((out / "plan.json").read_text())
    assert plan["windows"] == WINDOWS and plan["extra"]["heal"]["mode"] == "lora"
    assert "## Healing" in (out / "README.md").read_text()


def test_merge_adapter_adds_the_scaled_product(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from swm_ray.heal.lora import adapter_state

    h = build_config().heal
    load = lambda: AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)  # noqa: E731
    peft_model = apply_lora(load(), h, seed=0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    state = adapter_state(peft_model)
    base = dict(load().named_parameters())
    merged = dict(merge_adapter(load(), state, h).named_parameters())
    key = "base_model.model.model.layers.2.mlp.down_proj.lora_{}.weight"
    a, b = state[key.format("A")], state[key.format("B")]
    name = "model.layers.2.mlp.down_proj.weight"
    torch.testing.assert_close(merged[name], base[name] + (h.lora_alpha / h.lora_r) * b @ a)
    assert torch.equal(merged["model.layers.2.input_layernorm.weight"], base["model.layers.2.input_layernorm.weight"])


# -- local -----------------------------------------------------------------------------------------------------------
def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(((got[:, 1:] - want[:, 1:]) ** 2).sum() / (want[:, 1:] ** 2).sum())


def test_local_lowers_each_merged_layers_fit_error(compressed_dir, tiny_llama_dir, text_jsonl, tmp_path):
    """Bottom-up refit with the original streamed one layer at a time: each merged layer's output comes closer
    to the original model's after its window; kept layers, embeddings and head are untouched."""
    from transformers import AutoModelForCausalLM

    from swm_ray.jobs.heal import run_heal

    out = tmp_path / "local"
    cfg = build_config(flags={"model.source": str(compressed_dir), "heal.mode": "local", "heal.data": str(text_jsonl),
                              "heal.steps": 60, "heal.lr": 3e-3, "heal.local_samples": 24, "heal.local_seq_len": 16,
                              "model.stream": "always", "out": str(out)})
    fits = run_heal(cfg)["record"].fits
    assert [f["window"] for f in fits] == [[1, 2], [3, 4]] and [f["position"] for f in fits] == [1, 2]
    for f in fits:
        assert f["error_after"] < 0.8 * f["error_before"], f

    base, healed = _state(compressed_dir), _state(out)
    for name in base:
        changed = not torch.equal(base[name], healed[name])
        assert changed == name.startswith(("model.layers.1.", "model.layers.2.")), name

    # checked independently with plain transformers: hidden state after each merged layer vs the original's
    from transformers import AutoTokenizer

    rng = np.random.default_rng(11)  # held-out rows of the same kind of text
    rows = [" ".join(rng.choice(SENTENCES, size=3)) for _ in range(4)]
    ids = torch.tensor([r[:16] for r in AutoTokenizer.from_pretrained(out)(rows).input_ids])

    def hidden(folder):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            return model(ids, output_hidden_states=True).hidden_states

    orig, before, after = hidden(tiny_llama_dir), hidden(compressed_dir), hidden(out)
    for pos, top in ((1, 2), (2, 4)):  # hidden_states[i] enters layer i
        want = orig[top + 1]
        assert _relative_error(after[pos + 1], want) < 0.9 * _relative_error(before[pos + 1], want)
    assert json.loads((out / "heal.json").read_text())["mode"] == "local"
    assert "relative error before" in (out / "README.md").read_text()


def test_local_window_target_fits_the_window_on_the_same_input(tiny_llama_dir):
    """target=window: the merged layer learns the original layers low..high applied to its own input."""
    from transformers import AutoModelForCausalLM

    from swm_ray.compute.stack import InMemoryStack
    from swm_ray.edits.merge import apply_windows
    from swm_ray.heal.local import heal_local
    from swm_ray.plan.plan import Plan

    original = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    model = apply_windows(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval(),
                          [[2, 4]], "mean")
    plan = Plan(windows=[[2, 4]], num_layers_before=6, merge="mean")
    ids = torch.randint(4, 300, (8, 12), generator=torch.Generator().manual_seed(1))
    fits = heal_local(model, InMemoryStack(original), plan, ids, steps=50, lr=3e-3, rows=4, skip=1, target="window")
    assert len(fits) == 1 and fits[0].window == [2, 4] and fits[0].error_after < 0.8 * fits[0].error_before


def test_local_above_refits_every_layer_over_the_lowest_merge(tiny_llama_dir):
    """layers=above: the merged layer and each layer above it are fitted (layers below are not); the top
    layer's output comes closer to the original's last hidden state than with the merged layers alone; a window
    target is refused with it."""
    from transformers import AutoModelForCausalLM

    from swm_ray.compute.stack import InMemoryStack
    from swm_ray.edits.merge import apply_windows
    from swm_ray.heal.local import heal_local
    from swm_ray.plan.plan import Plan

    original = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    plan = Plan(windows=[[1, 3]], num_layers_before=6, merge="mean")
    ids = torch.randint(4, 300, (8, 12), generator=torch.Generator().manual_seed(1))

    def healed(layers):
        model = apply_windows(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval(),
                              [[1, 3]], "mean")
        before = {k: v.clone() for k, v in model.state_dict().items()}
        fits = heal_local(model, InMemoryStack(original), plan, ids, steps=40, lr=3e-3, rows=4, skip=1,
                          layers=layers)
        changed = {int(k.split(".")[2]) for k, v in model.state_dict().items()
                   if k.startswith("model.layers.") and not torch.equal(v, before[k])}
        return model, fits, changed

    merged, fits_m, changed_m = healed("merged")
    above, fits_a, changed_a = healed("above")
    assert [f.position for f in fits_m] == [1] and changed_m == {1}
    assert [f.position for f in fits_a] == [1, 2, 3] and changed_a == {1, 2, 3}  # 6 layers, 1-3 merged: 4 left
    assert [f.window for f in fits_a] == [[1, 3], [4, 4], [5, 5]]
    assert all(f.error_after < f.error_before for f in fits_a[1:])
    with torch.no_grad():
        want = original(ids, output_hidden_states=True).hidden_states[-1]
        got = {n: m(ids, output_hidden_states=True).hidden_states[-1] for n, m in (("m", merged), ("a", above))}
    assert _relative_error(got["a"], want) < 0.8 * _relative_error(got["m"], want)
    with pytest.raises(UserError, match="local_target original"):
        heal_local(merged, InMemoryStack(original), plan, ids, steps=1, lr=1e-3, rows=4, skip=1, target="window",
                   layers="above")


def test_a_fit_that_makes_a_layer_worse_keeps_its_weights(tiny_llama_dir):
    """A refit that ends with a larger error on its own rows than it started with (here: a step size far too
    large) leaves the layer as it was; the record says so (error after = error before)."""
    from transformers import AutoModelForCausalLM

    from swm_ray.compute.stack import InMemoryStack
    from swm_ray.edits.merge import apply_windows
    from swm_ray.heal.local import heal_local
    from swm_ray.plan.plan import Plan

    original = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    model = apply_windows(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval(),
                          [[1, 3]], "mean")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(4, 300, (8, 12), generator=torch.Generator().manual_seed(1))
    fits = heal_local(model, InMemoryStack(original), Plan(windows=[[1, 3]], num_layers_before=6, merge="mean"),
                      ids, steps=5, lr=10.0, rows=4, skip=1, layers="above")
    assert len(fits) == 3
    for f in fits:
        assert f.error_after <= f.error_before * (1 + 1e-6), f
        assert f.last_loss > f.first_loss  # the steps did diverge
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# -- data and schedule ---------------------------------------------------------------------------------------------
def test_instruction_records_mask_the_prompt(tmp_path):
    from tiny_models import tiny_tokenizer

    tok = tiny_tokenizer()
    path = tmp_path / "alpaca.json"
    records = [{"instruction": "merge the layers", "input": "", "output": "the quick brown fox"},
               {"instruction": "say hello", "input": "world", "output": "hello world"}]
    path.write_text(json.dumps(records))
    ex = load_examples(str(path), tok, cutoff=256)
    assert ex.kind == "instruction" and len(ex) == 2
    for ids, labels, rec in zip(ex.input_ids, ex.labels, records):
        answer = tok(rec["output"], add_special_tokens=False).input_ids + [tok.eos_token_id]
        assert list(ids[-len(answer):]) == answer
        assert list(labels[-len(answer):]) == answer and (labels[:-len(answer)] == IGNORE).all()
    (tmp_path / "t.txt").write_text("\n\n".join(SENTENCES * 4))
    text = load_examples(str(tmp_path / "t.txt"), tok, cutoff=8)
    assert text.kind == "text" and all(len(x) == 8 and (x == y).all() for x, y in zip(text.input_ids, text.labels))


def test_schedule_splits_each_global_batch_over_the_workers():
    s = Schedule.of(examples=50, batch_size=8, epochs=2, steps=None, warmup=3, seed=0)
    assert s.total_steps == 14 and s.lr_factor(0) == 0 and s.lr_factor(3) == 1 and s.lr_factor(14) == 0
    for step in (0, 6, 7, 13):
        batch = s.batch(step)
        shards = [batch[r::3] for r in range(3)]
        assert sorted(np.concatenate(shards)) == sorted(batch)
    epoch = np.concatenate([s.batch(k) for k in range(7)])
    assert sorted(epoch) == list(range(50))  # one epoch sees every example once


def _lora_run(compressed_dir, text_jsonl, world: int, dropout: float) -> tuple[list[float], dict]:
    """The LoRA trainer's steps with `world` workers, each in a thread of this process, their gradients summed by
    an in-process all-reduce (what Ray Train's workers do over the network)."""
    import copy
    import threading

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from swm_ray.heal.lora import LoraTrainer, adapter_state

    h = build_config(flags={"heal.lora_dropout": dropout, "heal.lr": 1e-2, "heal.batch_size": 8,
                            "heal.micro_batch_size": 2, "heal.warmup_steps": 0, "heal.cutoff": 16}).heal
    tok = AutoTokenizer.from_pretrained(compressed_dir)
    examples = load_examples(str(text_jsonl), tok, cutoff=16)
    schedule = Schedule.of(len(examples), 8, 1, 3, 0, h.seed)
    base = AutoModelForCausalLM.from_pretrained(compressed_dir, dtype=torch.float32)
    base.config.use_cache = False
    peft = apply_lora(base, h, seed=h.seed)
    models = [peft] + [copy.deepcopy(peft) for _ in range(world - 1)]
    barrier, slots = threading.Barrier(world), [None] * world
    turn = threading.Lock()  # one worker computes at a time: torch's random generator is one per process

    def reducer(rank):
        def all_reduce(t):
            slots[rank] = t.clone()
            turn.release()
            barrier.wait()
            t.copy_(sum(slots))
            barrier.wait()
            turn.acquire()
        return all_reduce

    trainers = [LoraTrainer(m, examples, schedule, h, device="cpu", pad_id=tok.pad_token_id or 0, rank=r,
                            world=world, all_reduce=reducer(r) if world > 1 else None) for r, m in enumerate(models)]
    losses: list[list[float]] = [[] for _ in range(world)]

    def work(r):
        with turn:
            for step in range(schedule.total_steps):
                losses[r].append(trainers[r].step(step)["loss"])

    threads = [threading.Thread(target=work, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return losses[0], adapter_state(models[0])


def test_lora_with_dropout_does_not_depend_on_the_worker_count(compressed_dir, text_jsonl):
    """Dropout masks are drawn per micro-batch of the global batch, not per worker: with the default dropout, 1 and
    2 workers give the same losses and the same adapter (up to the order of float sums)."""
    one_loss, one = _lora_run(compressed_dir, text_jsonl, 1, 0.05)
    two_loss, two = _lora_run(compressed_dir, text_jsonl, 2, 0.05)
    assert len(one_loss) == 3 and one_loss[-1] < one_loss[0]
    assert np.allclose(one_loss, two_loss, rtol=1e-5, atol=1e-6), (one_loss, two_loss)
    assert max(float((one[k] - two[k]).abs().max()) for k in one) < 1e-5
    assert max(float(v.abs().max()) for k, v in one.items() if "lora_B" in k) > 1e-4  # it trained


# -- user mistakes -----------------------------------------------------------------------------------------------------
def _error(*args: str) -> str:
    res = runner.invoke(app, ["heal", *args])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    return lines[0]


def test_user_mistakes_are_one_line_errors(tiny_llama_dir, compressed_dir, text_jsonl, tmp_path):
    out = str(tmp_path / "o")
    assert "no plan.json" in _error(str(tiny_llama_dir), "--mode", "local", "--data", str(text_jsonl), "--out", out)
    assert "file not found" in _error(str(compressed_dir), "--data", str(tmp_path / "missing.jsonl"), "--out", out)
    assert "no interrupted heal" in _error(str(compressed_dir), "--data", str(text_jsonl), "--resume", "--out", out,
                                           "--set", "heal.cutoff=16")
    assert "not linear layers" in _error(str(compressed_dir), "--data", str(text_jsonl), "--out", out,
                                         "--set", "heal.target_modules=[c_attn]")
    assert "unknown key" in _error(str(compressed_dir), "--set", "heal.rank=4")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "completion": "y"}) + "\n")
    assert "instruction and output" in _error(str(compressed_dir), "--data", str(bad), "--out", out)


def test_apply_refuses_a_healed_models_plan_and_a_folder_or_binary_given_as_plan(compressed_dir, tmp_path):
    """A healed folder's plan.json replays the un-healed model: refused in one line, as are a model folder and a
    weights file given where the plan file belongs."""
    from swm_ray.plan.plan import Plan

    plan = Plan.load(compressed_dir / "plan.json")
    plan.extra = {**plan.extra, "heal": {"mode": "local", "steps": 4}}
    plan.save(tmp_path / "healed.json")
    out = str(tmp_path / "o")
    for given, message in ((tmp_path / "healed.json", "healed model"), (compressed_dir, "is a folder"),
                           (compressed_dir / "model.safetensors", "not a text file")):
        res = runner.invoke(app, ["apply", str(given), "--out", out])
        lines = [line for line in res.output.splitlines() if line.strip()]
        assert res.exit_code == 2 and len(lines) == 1 and message in lines[0], res.output
        assert not Path(out).exists()


def test_a_healed_width_pruned_models_card_still_describes_its_pruning():
    """Only a model swm-ray did not compress loses the plan's description; a width-only plan (no windows) keeps it."""
    from swm_ray.heal.folder import HealRecord, healed_card
    from swm_ray.plan.plan import Plan

    width = {"method": "flap", "kv_groups": [[0]] * 6, "channels": [list(range(32))] * 6, "kv_heads_after": 1,
             "intermediate_after": 32}
    record = HealRecord("lora", "/home/someone/runs/flap", "/home/someone/data.jsonl",
                        {"lora_r": 8, "target_modules": ["q_proj"]}, steps=2)
    plan = Plan(windows=[], num_layers_before=6, merge="none", source_model="builtin:smollm2-135m", method="flap",
                width=width, params_before=100_000, params_after=80_000)
    card = healed_card(plan, record, metrics=None, resolved_yaml="", name="h")
    assert "Produced by **swm-ray**" in card and "flap" in card and "## Healing" in card
    assert "/home/someone" not in card  # a card is published: local paths are scrubbed
    none = Plan(windows=[], num_layers_before=6, merge="none", source_model="x", method="none")
    assert "Healed by **swm-ray** from" in healed_card(none, record, metrics=None, resolved_yaml="", name="h")


def test_an_unclaimed_checkpoint_folder_needs_resume(compressed_dir, text_jsonl, tmp_path):
    from swm_ray.jobs.heal import MARKER, _claim_checkpoints

    out = str(tmp_path / "o")
    cfg = build_config(flags=_lora_flags(compressed_dir, text_jsonl, tmp_path / "o"))
    run = _claim_checkpoints(cfg, out)  # a fresh run marks its own folder beside the output
    assert Path(run).parent == tmp_path / ".o.heal" and (Path(run) / MARKER).exists()
    with pytest.raises(UserError, match="add --resume"):
        _claim_checkpoints(cfg, out)
    assert _claim_checkpoints(cfg.model_copy(update={"resume": True}), out) == run
    other = build_config(flags=_lora_flags(compressed_dir, text_jsonl, tmp_path / "o", **{"heal.lr": 1e-3}))
    with pytest.raises(UserError, match="with other settings left its checkpoints"):
        _claim_checkpoints(other, out)
    with pytest.raises(UserError, match="other settings; run the identical command"):
        _claim_checkpoints(other.model_copy(update={"resume": True}), out)


def test_compress_then_heal_in_one_run(ray_session, tiny_llama_dir, tokens_parquet, tmp_path):
    """`compress --heal local`: the healed folder lands at --out with the compress plan and the heal record; the
    unhealed intermediate is gone."""
    from swm_ray.jobs.heal import run_compress_and_heal

    out = tmp_path / "c2"
    cfg = build_config(flags={
        "model.source": str(tiny_llama_dir), "data.source": str(tokens_parquet), "data.samples": 16,
        "data.seq_len": 16, "data.batch_size": 4, "out": str(out), "ray.actors": 1, "select.layers": 2,
        "select.method": "swm", "heal.after_compress": "local", "heal.steps": 20, "heal.lr": 3e-3,
        "heal.local_samples": 8, "heal.local_seq_len": 16})
    res = run_compress_and_heal(cfg)
    plan = json.loads((out / "plan.json").read_text())
    assert res["out"] == str(out.resolve()) and plan["windows"] == res["plan"]["windows"]
    assert plan["extra"]["heal"]["mode"] == "local" and len(res["heal"].fits) == len(plan["windows"])
    assert all(f["error_after"] < f["error_before"] for f in res["heal"].fits)
    assert not (tmp_path / ".c2.unhealed").exists()


def _compress_heal_flags(tiny_llama_dir, tokens_parquet, out: Path, **extra) -> dict:
    return {"model.source": str(tiny_llama_dir), "data.source": str(tokens_parquet), "data.samples": 16,
            "data.seq_len": 16, "data.batch_size": 4, "out": str(out), "ray.actors": 1, "select.layers": 2,
            "select.method": "swm", **extra}


def test_compress_then_heal_resumes_an_interrupted_lora_heal(ray_session, tiny_llama_dir, tokens_parquet, text_jsonl,
                                                             tmp_path, monkeypatch):
    """`compress --heal lora` stopped during the heal: without --resume a one-line error says to add it; with
    --resume the compression is not redone and the heal continues in the checkpoint folder the stopped run
    claimed (that a heal continues from the checkpoints there: test_lora_with_two_ray_train_workers)."""
    import swm_ray.jobs.compress
    import swm_ray.jobs.heal as job

    out = tmp_path / "ch"
    cfg = build_config(flags=_compress_heal_flags(tiny_llama_dir, tokens_parquet, out, **{
        "heal.after_compress": "lora", "heal.data": str(text_jsonl), "heal.steps": 2, "heal.workers": 1,
        "heal.lr": 1e-2, "heal.batch_size": 8, "heal.micro_batch_size": 4, "heal.warmup_steps": 0,
        "heal.cutoff": 16}))
    fit_lora, roots = job.fit_lora, []

    def stopped(cfg, path, examples, schedule, root, *args, **kwargs):  # the driver is lost as training starts
        roots.append(root)
        raise RuntimeError("driver lost")

    monkeypatch.setattr(job, "fit_lora", stopped)
    with pytest.raises(RuntimeError, match="driver lost"):
        job.run_compress_and_heal(cfg)
    staging = tmp_path / ".ch.unhealed"
    assert (staging / "plan.json").exists() and not out.exists() and (Path(roots[0]) / job.MARKER).exists()
    plan = json.loads((staging / "plan.json").read_text())

    def resumed(cfg, path, examples, schedule, root, *args, **kwargs):
        assert cfg.resume and path == str(staging)
        roots.append(root)
        return fit_lora(cfg, path, examples, schedule, root, *args, **kwargs)

    def compress_again(*args, **kwargs):
        raise AssertionError("the finished compression ran again")

    monkeypatch.setattr(job, "fit_lora", resumed)
    monkeypatch.setattr(swm_ray.jobs.compress, "run_compress", compress_again)
    with pytest.raises(UserError, match=r"left its compressed model at .*\.ch\.unhealed: add --resume"):
        job.run_compress_and_heal(cfg)
    res = job.run_compress_and_heal(cfg.model_copy(update={"resume": True}))
    assert roots[1] == roots[0] and res["heal"].steps == 2 and len(res["heal"].history) == 2
    assert res["out"] == str(out.resolve()) and res["plan"]["windows"] == plan["windows"]
    saved = json.loads((out / "plan.json").read_text())
    assert saved["windows"] == plan["windows"] and saved["extra"]["heal"]["mode"] == "lora"
    assert not staging.exists() and not (tmp_path / ".ch.heal").exists()


def test_compress_then_heal_resumes_an_interrupted_compression(ray_session, tiny_llama_dir, tokens_parquet,
                                                               tmp_path, monkeypatch):
    """Stopped during the window search: --resume continues the compression from its partial state, then heals."""
    from swm_ray.io.runstate import RunState
    from swm_ray.jobs.heal import run_compress_and_heal

    out = tmp_path / "cc"
    cfg = build_config(flags=_compress_heal_flags(tiny_llama_dir, tokens_parquet, out, **{
        "heal.after_compress": "local", "heal.steps": 5, "heal.lr": 3e-3, "heal.local_samples": 4,
        "heal.local_seq_len": 16}))
    save_json = RunState.save_json

    def stopped(self, name, obj):  # the driver is lost right after the first candidate scores are saved
        save_json(self, name, obj)
        raise RuntimeError("driver lost")

    monkeypatch.setattr(RunState, "save_json", stopped)
    with pytest.raises(RuntimeError, match="driver lost"):
        run_compress_and_heal(cfg)
    assert (tmp_path / "..cc.unhealed.partial" / "state.json").exists() and not out.exists()
    monkeypatch.setattr(RunState, "save_json", save_json)
    with pytest.raises(UserError, match="add --resume"):
        run_compress_and_heal(cfg)
    res = run_compress_and_heal(cfg.model_copy(update={"resume": True}))
    assert json.loads((out / "plan.json").read_text())["extra"]["heal"]["mode"] == "local"
    assert len(res["heal"].fits) == len(res["plan"]["windows"])
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith((".cc", "..cc"))]


def test_compress_then_heal_resume_mistakes_are_one_line_errors(tiny_llama_dir, tokens_parquet, tmp_path):
    args = ["compress", str(tiny_llama_dir), "--data", str(tokens_parquet), "--layers", "2", "--heal", "lora",
            "--out", str(tmp_path / "x"), "--resume"]
    res = runner.invoke(app, args)
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert lines[0].startswith("error: --resume: no interrupted compress --heal of") and "without --resume" in lines[0]


def test_compress_then_heal_refuses_checkpoints_of_another_compressed_model(tiny_llama_dir, tokens_parquet, tmp_path):
    """Heal checkpoints left for the staging folder while that folder is gone (or about to be compressed again
    with other settings) were trained on another model: refused before anything runs, never continued."""
    from swm_ray.io import fs as storage
    from swm_ray.jobs.heal import _claim_checkpoints, run_compress_and_heal

    out = tmp_path / "cs"
    cfg = build_config(flags=_compress_heal_flags(tiny_llama_dir, tokens_parquet, out, **{
        "heal.after_compress": "lora"}))
    staging = storage.sibling(str(out), ".unhealed")
    heal_cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"source": staging}),
                                      "heal": cfg.heal.model_copy(update={"mode": "lora"})})
    _claim_checkpoints(heal_cfg, str(out))  # an interrupted heal of the compressed folder, which is gone
    for resume in (False, True):
        with pytest.raises(UserError, match="belong to an interrupted compress --heal .* gone or had other settings"):
            run_compress_and_heal(cfg.model_copy(update={"resume": resume}))
