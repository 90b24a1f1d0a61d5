"""Width pruning: plans that keep whole KV groups and MLP channels reload with plain transformers and equal slicing
by hand, FLAP's statistics and bias compensation, Taylor scores against a hand computation, the `compress
--method flap` command, depth + width in one plan, and the one-line refusals."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from tiny_models import ARCHS, tiny_model
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from swm_ray.compute.stack import InMemoryStack
from swm_ray.compute.width_stats import add_width_sums, width_stats_sums
from swm_ray.config import build_config
from swm_ray.edits.width import Geometry
from swm_ray.errors import UserError
from swm_ray.methods.width_scores import choose, flap_biases, flap_scores, taylor_scores
from swm_ray.methods.width_targets import width_counts
from swm_ray.plan.plan import Plan
from swm_ray.plan.writer import write_model_folder

HD, GROUP = 8, 2  # the tiny models: head_dim 8, 4 query heads over 2 KV heads, 64 MLP channels


def _save(model, tok, path):
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _ranges(heads, width=HD):
    return torch.cat([torch.arange(h * width, (h + 1) * width) for h in heads])


@torch.no_grad()
def _by_hand(model, kv_groups, channels, biases=None):
    """The pruned model built directly from the original's modules: rows of q (query heads of the kept groups),
    k, v (the kept KV heads), columns of o, rows of gate/up and columns of down of the kept channels."""
    cfg = copy.deepcopy(model.config)
    cfg.num_key_value_heads = len(kv_groups[0])
    cfg.num_attention_heads = len(kv_groups[0]) * GROUP
    cfg.intermediate_size = len(channels[0])
    if biases:
        cfg.attention_bias = cfg.mlp_bias = True
    pruned = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    state = model.state_dict()
    new = {k: v for k, v in state.items() if ".layers." not in k}
    for i, (groups, chans) in enumerate(zip(kv_groups, channels)):
        pre = f"model.layers.{i}."
        q = _ranges([g * GROUP + j for g in groups for j in range(GROUP)])
        kv = _ranges(groups)
        ch = torch.tensor(chans)
        for k, v in state.items():
            if not k.startswith(pre):
                continue
            rest = k[len(pre):]
            if rest.startswith("self_attn.q_proj."):
                v = v[q]
            elif rest.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
                v = v[kv]
            elif rest == "self_attn.o_proj.weight":
                v = v[:, q]
            elif rest.startswith(("mlp.gate_proj.", "mlp.up_proj.")):
                v = v[ch]
            elif rest == "mlp.down_proj.weight":
                v = v[:, ch]
            new[k] = v
        if biases:
            for name, size in (("q_proj", len(q)), ("k_proj", len(kv)), ("v_proj", len(kv))):
                new[f"{pre}self_attn.{name}.bias"] = torch.zeros(size)
            new[f"{pre}mlp.gate_proj.bias"] = torch.zeros(len(ch))
            new[f"{pre}mlp.up_proj.bias"] = torch.zeros(len(ch))
            new[f"{pre}self_attn.o_proj.bias"] = biases[f"width.{i}.self_attn.o_proj.bias"]
            new[f"{pre}mlp.down_proj.bias"] = biases[f"width.{i}.mlp.down_proj.bias"]
    missing, unexpected = pruned.load_state_dict(new, strict=False)
    assert not unexpected and all(k.endswith("lm_head.weight") for k in missing)
    return pruned


IDS = torch.tensor([[1, 5, 9, 33, 70, 200, 7, 300, 41, 12, 99, 5]])


@pytest.mark.parametrize("arch", ARCHS)
def test_width_plan_reloads_and_equals_slicing_by_hand(arch, tmp_path):
    model, tok = tiny_model(arch, n_layers=3, seed=2)
    src = _save(model, tok, tmp_path / "src")
    rng = np.random.default_rng(1)
    kv_groups = [[1], [0], [1]]  # different groups per layer, the same count
    channels = [sorted(rng.choice(64, 40, replace=False).tolist()) for _ in range(3)]
    biases = None
    width = {"method": "manual", "kv_groups": kv_groups, "channels": channels}
    plan = Plan(windows=[], num_layers_before=3, merge="keep-first", width=width)
    if arch == "llama":  # FLAP-style biases: the flags go on, q/k/v/gate/up get zero biases
        biases = {f"width.{i}.{n}": torch.randn(32) for i in range(3)
                  for n in ("self_attn.o_proj.bias", "mlp.down_proj.bias")}
        width["bias"] = {"attention": True, "mlp": True}
        plan.tensors = dict(biases)
    res = write_model_folder(str(src), plan, str(tmp_path / "out"), raw_yaml="", resolved_yaml="")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    c = loaded.config.get_text_config()
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size) == (2, 1, 8, 40)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["head_dim"] == 8
    with torch.no_grad():
        got = loaded(IDS).logits
        want = _by_hand(model, kv_groups, channels, biases)(IDS).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert res["params_after"] == sum(p.numel() for p in loaded.parameters())
    saved = Plan.load(tmp_path / "out" / "plan.json")
    assert saved.version == 4 and saved.width["kv_groups"] == kv_groups
    if biases:
        assert saved.width["tensors_file"] == "plan.tensors"
        assert all(torch.equal(saved.tensors[k], v) for k, v in biases.items())
    assert not (tmp_path / "out" / "mergekit_config.yml").exists()
    assert "Width pruning" in (tmp_path / "out" / "README.md").read_text()


def test_depth_and_width_in_one_plan(tmp_path):
    """Width indices refer to the layers AFTER the windows: merge first (keep-first drops layer 2), then slice."""
    model, tok = tiny_model("qwen3", n_layers=4, seed=3)
    src = _save(model, tok, tmp_path / "src")
    width = {"method": "manual", "kv_groups": [[0], [1], [0]], "channels": [list(range(0, 64, 2))] * 3}
    plan = Plan(windows=[[1, 2]], num_layers_before=4, merge="keep-first", width=width)
    write_model_folder(str(src), plan, str(tmp_path / "out"), raw_yaml="", resolved_yaml="")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    depth = copy.deepcopy(model)
    from swm_ray.edits.merge import apply_windows

    apply_windows(depth, [(1, 2)], "keep-first")
    with torch.no_grad():
        want = _by_hand(depth, width["kv_groups"], width["channels"])(IDS).logits
        torch.testing.assert_close(loaded(IDS).logits, want, rtol=1e-5, atol=1e-5)


def test_per_layer_sizes_and_bad_widths_are_refused_in_one_line(tiny_llama_dir, tmp_path):
    def write(width, n=6):
        plan = Plan(windows=[], num_layers_before=6, merge="keep-first", width=width)
        write_model_folder(str(tiny_llama_dir), plan, str(tmp_path / "o"), raw_yaml="", resolved_yaml="")

    uneven = {"kv_groups": [[0]] * 5 + [[0, 1]], "channels": [list(range(32))] * 6}
    with pytest.raises(UserError, match="one num_attention_heads and intermediate_size for all layers") as e:
        write(uneven)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="after depth merging"):
        write({"kv_groups": [[0]] * 4, "channels": [list(range(32))] * 4})
    with pytest.raises(UserError, match="at least one must stay"):
        write({"kv_groups": [[]] * 6, "channels": [list(range(32))] * 6})
    for bad in ("a", 1.5, True):  # a hand edit: an index that is not an integer
        with pytest.raises(UserError, match="lists of integers"):
            write({"kv_groups": [[0, bad]] * 6, "channels": [list(range(32))] * 6})
    assert not (tmp_path / "o").exists()


def test_a_compensated_plan_forced_onto_a_model_of_another_size_is_one_line(tiny_llama_dir, tokens_parquet,
                                                                             tmp_path):
    """`apply --force` onto another model: a FLAP bias or a fitted map of another hidden size is refused in one
    line, and nothing is written."""
    from tiny_models import _COMMON, tiny_tokenizer
    from transformers import AutoConfig

    from swm_ray.recipes.pipeline import compress_here

    other = tmp_path / "h48"
    config = AutoConfig.for_model("llama", num_hidden_layers=6, **{**_COMMON, "hidden_size": 48, "head_dim": 8})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(other)
    tiny_tokenizer(other)
    base = {"model.source": str(tiny_llama_dir), "data.source": str(tokens_parquet), "data.samples": 8,
            "data.seq_len": 16, "data.batch_size": 4}
    for name, flags in (("flap", {"select.method": "flap", "select.ratio": 0.2, "select.width_bias": True}),
                        ("lstsq", {"select.method": "swm", "select.layers": 2, "merge.compensate": "lstsq"})):
        plan = Plan.load(compress_here(build_config(flags={**base, **flags, "out": str(tmp_path / name)}))["out"]
                         + "/plan.json")
        assert plan.tensors, name
        with pytest.raises(UserError, match="another size") as e:
            write_model_folder(str(other), plan, str(tmp_path / f"{name}-o"), raw_yaml="", resolved_yaml="")
        assert "\n" not in str(e.value) and not (tmp_path / f"{name}-o").exists()


def _calib(n=8, t=12, seed=0):
    ids = np.random.default_rng(seed).integers(4, 500, size=(n, t))
    return ids, [(0, 4), (4, 8)][: n // 4]


def test_flap_compensation_keeps_each_projections_mean_output():
    """On the calibration rows, W[:, kept] x[kept] + b has the mean of W x, for o_proj and down_proj alike;
    whole KV groups go; the sums are additive over minibatches."""
    model, _ = tiny_model("llama", n_layers=3, seed=5)
    stack = InMemoryStack(model)
    ids, batches = _calib()
    parts = width_stats_sums(stack, ids, batches)
    total = add_width_sums(parts)
    whole = add_width_sums(width_stats_sums(stack, ids, [(0, 8)]))
    np.testing.assert_allclose(total["attn_sq"], whole["attn_sq"], rtol=1e-10)
    assert total["tokens"] == ids.size
    geo = Geometry.of(model.config)
    o_w = [layer.self_attn.o_proj.weight.detach() for layer in model.model.layers]
    d_w = [layer.mlp.down_proj.weight.detach() for layer in model.model.layers]
    choice = choose(*flap_scores(total, o_w, d_w, geo), 1, 40)
    assert all(len(g) == 1 for g in choice.kv_groups) and choice.group_scores.shape == (3, 2)
    biases = flap_biases(total, o_w, d_w, choice, geo, attention=True, mlp=True)
    inputs: dict = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, name=name: inputs.setdefault(name, []).append(a[0].detach()))
             for name, m in model.named_modules() if name.endswith(("o_proj", "down_proj"))]
    with torch.no_grad():
        model(torch.tensor(ids))
    for h in hooks:
        h.remove()
    for i in range(3):
        q = _ranges([g * GROUP + j for g in choice.kv_groups[i] for j in range(GROUP)])
        for name, w, kept, b in ((f"model.layers.{i}.self_attn.o_proj", o_w[i], q, "self_attn.o_proj.bias"),
                                 (f"model.layers.{i}.mlp.down_proj", d_w[i], torch.tensor(choice.channels[i]),
                                  "mlp.down_proj.bias")):
            x = inputs[name][0].reshape(-1, w.shape[1]).double()
            full = (x @ w.double().T).mean(0)
            pruned = (x[:, kept] @ w.double()[:, kept].T + biases[f"width.{i}.{b}"].double()).mean(0)
            torch.testing.assert_close(pruned, full, rtol=1e-5, atol=1e-5)
            assert not torch.allclose((x[:, kept] @ w.double()[:, kept].T).mean(0), full, atol=1e-3)


def test_flap_score_is_variance_times_column_norm():
    geo = Geometry(heads=4, kv_heads=2, head_dim=2, intermediate=3, hidden=2)
    x = np.array([[1.0, 2, 3, 4, 5, 6, 7, 8], [3.0, 2, 1, 4, 5, 6, 7, 0]])  # 2 tokens, 8 o_proj inputs
    m = np.array([[1.0, 0, 2], [3.0, 0, 2]])
    total = {"tokens": 2, "attn_sum": x.sum(0)[None], "attn_sq": (x * x).sum(0)[None],
             "mlp_sum": m.sum(0)[None], "mlp_sq": (m * m).sum(0)[None]}
    o = torch.ones(2, 8)
    d = torch.tensor([[1.0, 1, 1], [0, 1, 1]])
    groups, chans = flap_scores(total, [o], [d], geo)
    var = x.var(0, ddof=1) * 2  # ‖column‖² = 2
    np.testing.assert_allclose(groups[0], [var[:4].sum(), var[4:].sum()])
    np.testing.assert_allclose(chans[0], [2.0 * 1, 0.0, 0.0])


def test_taylor_scores_equal_a_hand_computation():
    model, _ = tiny_model("qwen2", n_layers=2, seed=4)  # q/k/v biases take part in a group
    with torch.no_grad():  # a channel with no weights has no first-order importance at all
        layer = model.model.layers[1].mlp
        layer.gate_proj.weight[5] = 0
        layer.up_proj.weight[5] = 0
        layer.down_proj.weight[:, 5] = 0
    ids, batches = _calib(n=4)
    groups, chans = taylor_scores(model, ids, batches)
    assert all(p.grad is None for p in model.parameters())
    out = model(torch.tensor(ids), labels=torch.tensor(ids))  # HF's mean next-token loss: the same L
    out.loss.backward()
    for i, layer in enumerate(model.model.layers):
        a, m = layer.self_attn, layer.mlp

        def wg(p):
            return (p.detach() * p.grad).double()

        for g in range(2):
            q = _ranges([g * GROUP, g * GROUP + 1])
            kv = _ranges([g])
            s = (wg(a.q_proj.weight)[q].sum() + wg(a.q_proj.bias)[q].sum() + wg(a.k_proj.weight)[kv].sum()
                 + wg(a.k_proj.bias)[kv].sum() + wg(a.v_proj.weight)[kv].sum() + wg(a.v_proj.bias)[kv].sum()
                 + wg(a.o_proj.weight)[:, q].sum())
            assert groups[i, g] == pytest.approx(abs(float(s)), rel=1e-4, abs=1e-10)
        hand = (wg(m.gate_proj.weight).sum(1) + wg(m.up_proj.weight).sum(1) + wg(m.down_proj.weight).sum(0)).abs()
        np.testing.assert_allclose(chans[i], hand.numpy(), rtol=1e-4, atol=1e-10)
    assert chans[1, 5] == 0 and 5 not in choose(groups, chans, 1, 63).channels[1]


def test_width_counts_prune_both_parts_and_refuse_too_much():
    geo = Geometry(heads=9, kv_heads=3, head_dim=64, intermediate=1536, hidden=576)  # SmolLM2-135M
    params = 134_515_008
    kg, kc = width_counts(geo, 30, 0.2 * params)
    assert kg == 2 and 1100 < kc < 1300
    removed = 30 * ((3 - kg) * 576 * 64 * 8 + (1536 - kc) * 3 * 576)
    assert abs(removed - 0.2 * params) < 30 * 3 * 576
    with pytest.raises(UserError, match="leaves no MLP channel"):
        width_counts(geo, 30, 0.95 * params)


@pytest.mark.parametrize("geo", [Geometry(heads=9, kv_heads=3, head_dim=64, intermediate=1536, hidden=576),
                                 Geometry(heads=4, kv_heads=2, head_dim=8, intermediate=64, hidden=32)])
def test_width_reach_is_the_most_width_counts_takes(geo):
    """`width_reach` (what the up-front target check names): exactly reachable, one channel more is refused."""
    from swm_ray.methods.width_targets import channel_params, width_reach

    most = width_reach(geo, 30)
    assert width_counts(geo, 30, most) == (1, 1)
    with pytest.raises(UserError, match="leaves no MLP channel"):
        width_counts(geo, 30, most + 30 * channel_params(geo))


def test_check_width_target_names_the_largest_fraction(tiny_llama_dir):
    from swm_ray.methods.width_targets import check_width_target
    from swm_ray.recipes.preflight import model_facts

    cfg = build_config(flags={"model.source": str(tiny_llama_dir)})
    f = model_facts(cfg)
    assert check_width_target(cfg, f.config, f.layer_names, "taylor", 0.2, 6, f.params, "--ratio") == (1, 49)
    with pytest.raises(UserError, match=r"^--ratio 0.52: width pruning of the 6 decoder layers can remove at most "
                                        r"0.514 of the parameters") as e:
        check_width_target(cfg, f.config, f.layer_names, "taylor", 0.52, 6, f.params, "--ratio")
    assert "\n" not in str(e.value)


runner = CliRunner()


def test_cli_flap_writes_a_folder_that_reloads_and_applies(ray_session, tiny_llama_dir, tokens_parquet, tmp_path):
    from swm_ray.cli import app
    from swm_ray.jobs.apply import run_apply

    out = tmp_path / "flap"
    res = runner.invoke(app, ["compress", str(tiny_llama_dir), "--data", str(tokens_parquet), "--samples", "16",
                              "--seq-len", "16", "--method", "flap", "--ratio", "0.2", "--actors", "2", "--out",
                              str(out), "--set", "data.batch_size=4"])
    assert res.exit_code == 0, res.output
    assert "width (flap)" in res.output
    plan = json.loads((out / "plan.json").read_text())
    assert plan["method"] == "flap" and plan["windows"] == [] and plan["width"]["bias"] == {"attention": True,
                                                                                             "mlp": True}
    assert abs(1 - plan["params_after"] / plan["params_before"] - 0.2) < 0.03
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.config.attention_bias and loaded.config.num_key_value_heads == plan["width"]["kv_heads_after"]
    assert sum(p.numel() for p in loaded.parameters()) == plan["params_after"]
    applied = run_apply(build_config(flags={"out": str(tmp_path / "a")}), str(out / "plan.json"))
    assert applied["checked"]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_depth_then_width_in_process(tiny_llama_dir, tokens_parquet, tmp_path):
    from swm_ray.recipes.pipeline import compress_here

    cfg = build_config(flags={"model.source": str(tiny_llama_dir), "data.source": str(tokens_parquet),
                              "data.samples": 8, "data.seq_len": 16, "data.batch_size": 4, "out": str(tmp_path / "o"),
                              "select.layers": 1, "select.then_width": 0.15, "select.width_method": "taylor",
                              "select.method": "swm"})
    res = compress_here(cfg)
    p = res["plan"]
    assert p["num_layers_after"] == 5 and len(p["width"]["kv_groups"]) == 5 and p["width"]["method"] == "taylor"
    assert p["width"]["bias"] == {"attention": False, "mlp": False}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    assert loaded.config.num_hidden_layers == 5 and loaded.config.intermediate_size == p["width"]["intermediate_after"]


@pytest.mark.parametrize("flags, message", [
    ({"select.method": "flap", "select.layers": 2}, "prunes width to a parameter ratio: give --ratio"),
    ({"select.method": "taylor", "select.ratio": 0.2, "select.width_bias": True}, "bias compensation is FLAP's"),
    ({"select.layers": 1, "select.then_width": 0.1, "merge.compensate": "lstsq"}, "compensated depth plan"),
    ({"select.method": "flap", "select.ratio": 0.2, "resume": True}, "keeps no partial state"),
])
def test_unsupported_combinations_are_one_line_errors(tiny_llama_dir, tokens_parquet, tmp_path, flags, message):
    from swm_ray.jobs.compress import run_compress

    cfg = build_config(flags={"model.source": str(tiny_llama_dir), "data.source": str(tokens_parquet),
                              "data.samples": 8, "data.seq_len": 16, "data.batch_size": 4, "out": str(tmp_path / "o"),
                              **flags})
    with pytest.raises(UserError, match=message) as e:
        run_compress(cfg)
    assert "\n" not in str(e.value) and not (tmp_path / "o").exists()


def test_bias_compensation_where_the_architecture_cannot_hold_it(tokens_parquet, tmp_path):
    """Mistral has no o_proj/down_proj bias and no flag that adds one: compensation asked for is refused; left
    unset, FLAP prunes without it."""
    from swm_ray.recipes.pipeline import compress_here

    src = _save(*tiny_model("mistral", n_layers=2), tmp_path / "mistral")
    base = {"model.source": str(src), "data.source": str(tokens_parquet), "data.samples": 8, "data.seq_len": 16,
            "data.batch_size": 4, "select.method": "flap", "select.ratio": 0.2}
    with pytest.raises(UserError, match="no bias on o_proj and down_proj") as e:
        compress_here(build_config(flags={**base, "out": str(tmp_path / "x"), "select.width_bias": True}))
    assert "\n" not in str(e.value) and not (tmp_path / "x").exists()
    res = compress_here(build_config(flags={**base, "out": str(tmp_path / "y")}))
    assert res["plan"]["width"]["bias"] == {"attention": False, "mlp": False}
    AutoModelForCausalLM.from_pretrained(tmp_path / "y")


def test_cli_depth_then_flap_on_the_merged_model(ray_session, tiny_llama_dir, tokens_parquet, tmp_path):
    """`compress --then-width`: the depth plan's merged model gets FLAP's width (statistics from the actors)."""
    from swm_ray.cli import app

    out = tmp_path / "both"
    res = runner.invoke(app, ["compress", str(tiny_llama_dir), "--data", str(tokens_parquet), "--samples", "8",
                              "--seq-len", "16", "--layers", "1", "--method", "swm", "--then-width", "0.15",
                              "--actors", "1", "--out", str(out), "--set", "data.batch_size=4"])
    assert res.exit_code == 0, res.output
    plan = Plan.load(out / "plan.json")
    assert len(plan.windows) == 1 and plan.num_layers_after == 5 and len(plan.width["channels"]) == 5
    assert plan.width["method"] == "flap" and set(plan.tensors) == {f"width.{i}.{n}" for i in range(5) for n in (
        "self_attn.o_proj.bias", "mlp.down_proj.bias")}
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.config.num_hidden_layers == 5 and loaded.config.mlp_bias
