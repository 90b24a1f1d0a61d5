"""Merge methods against hand-computed tensors, and the structural edits of `apply_windows`."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import ARCHS, tiny_gpt2, tiny_model, tiny_t5

from swm_ray.edits.architectures import check_supported, per_layer_config_keys, slice_per_layer_config
from swm_ray.edits.merge import MERGE_METHODS, apply_windows, merge_layers
from swm_ray.edits.windows import anchor_layer, kept_layers, validate_windows
from swm_ray.errors import UserError
from swm_ray.io.anatomy import decoder_layers

IDS = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29, 33, 37, 41]])  # longer than the tiny sliding windows (4)


def _param(layer, name: str) -> torch.Tensor:
    return layer.get_parameter(name).detach().clone()


@pytest.fixture
def llama():
    model, _ = tiny_model("llama")
    return model


def test_reference_takes_top_weights_and_bottom_norms(llama):
    layers = list(decoder_layers(llama))[1:4]
    merged = merge_layers(layers, "reference")
    bottom, top = layers[0], layers[-1]
    for name in ("self_attn.q_proj.weight", "self_attn.o_proj.weight", "mlp.down_proj.weight", "mlp.gate_proj.weight"):
        assert torch.equal(_param(merged, name), _param(top, name))
        assert not torch.equal(_param(merged, name), _param(bottom, name))
    for name in ("input_layernorm.weight", "post_attention_layernorm.weight"):
        assert torch.equal(_param(merged, name), _param(bottom, name))
        assert not torch.equal(_param(merged, name), _param(top, name))


def test_paper_formula(llama):
    layers = list(decoder_layers(llama))[1:4]
    merged = merge_layers(layers, "paper")
    name = "self_attn.k_proj.weight"
    t1, t2, t3 = (_param(x, name) for x in layers)
    expected = t1 + (t2 - t1) + (t3 - t1)  # θ_low + Σ_{k=low+1..high}(θ_k − θ_low)
    torch.testing.assert_close(_param(merged, name), expected)
    u1, u2, u3 = (_param(x, "mlp.up_proj.weight") for x in layers)
    torch.testing.assert_close(_param(merged, "mlp.up_proj.weight"), u2 + u3 - u1)
    assert torch.equal(_param(merged, "input_layernorm.weight"), _param(layers[0], "input_layernorm.weight"))


def test_mean(llama):
    layers = list(decoder_layers(llama))[2:5]
    merged = merge_layers(layers, "mean")
    for name in ("self_attn.v_proj.weight", "mlp.gate_proj.weight"):
        expected = (_param(layers[0], name) + _param(layers[1], name) + _param(layers[2], name)) / 3
        torch.testing.assert_close(_param(merged, name), expected)
    assert torch.equal(_param(merged, "post_attention_layernorm.weight"),
                       _param(layers[0], "post_attention_layernorm.weight"))


@pytest.mark.parametrize(("method", "source"), [("keep-first", 0), ("keep-last", -1)])
def test_keep_first_and_last(llama, method, source):
    layers = list(decoder_layers(llama))[0:3]
    merged = merge_layers(layers, method)
    for name, p in merged.named_parameters():
        assert torch.equal(p, _param(layers[source], name)), name


def test_merged_layer_is_new_and_inputs_untouched(llama):
    layers = list(decoder_layers(llama))[1:3]
    before = {n: p.clone() for n, p in layers[0].named_parameters()}
    for method in MERGE_METHODS:
        merged = merge_layers(layers, method)
        assert merged is not layers[0] and merged is not layers[1]
        with torch.no_grad():
            for p in merged.parameters():
                p.add_(1.0)
        for n, p in layers[0].named_parameters():
            assert torch.equal(p, before[n])
        assert merged.self_attn.config is llama.config  # config shared, not deep-copied


@pytest.mark.parametrize("arch", ["qwen3", "gemma2", "gemma3"])
def test_reference_extra_norms_from_bottom(arch):
    model, _ = tiny_model(arch)
    layers = list(decoder_layers(model))[2:5]
    merged = merge_layers(layers, "reference")
    norms = [n for n, _ in merged.named_parameters() if "norm" in n]
    expected_extra = {
        "qwen3": {"self_attn.q_norm.weight", "self_attn.k_norm.weight"},
        "gemma2": {"pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight"},
        "gemma3": {"self_attn.q_norm.weight", "pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight"},
    }[arch]
    assert expected_extra <= set(norms)
    for name in norms:
        assert torch.equal(_param(merged, name), _param(layers[0], name)), name
        assert not torch.equal(_param(merged, name), _param(layers[-1], name)), name
    assert torch.equal(_param(merged, "self_attn.q_proj.weight"), _param(layers[-1], "self_attn.q_proj.weight"))


@pytest.mark.parametrize("arch", ARCHS)
def test_consistent_takes_the_norms_that_follow_a_weight_from_that_weights_layer(arch):
    """`consistent`: post-attention/post-MLP norms of Gemma 2/3 and q/k norms come from the top layer, with the
    weights whose outputs they scale; the norms before attention and MLP stay the bottom layer's."""
    model, _ = tiny_model(arch)
    layers = list(decoder_layers(model))[1:4]
    merged = merge_layers(layers, "consistent")
    follow = {
        "llama": set(), "mistral": set(), "qwen2": set(),
        "qwen3": {"self_attn.q_norm.weight", "self_attn.k_norm.weight"},
        "gemma2": {"post_attention_layernorm.weight", "post_feedforward_layernorm.weight"},
        "gemma3": {"self_attn.q_norm.weight", "self_attn.k_norm.weight", "post_attention_layernorm.weight",
                   "post_feedforward_layernorm.weight"},
    }[arch]
    reference = merge_layers(layers, "reference")
    for name, p in merged.named_parameters():
        top = torch.equal(p, _param(layers[-1], name))
        if "norm" in name and name not in follow:
            assert torch.equal(p, _param(layers[0], name)) and not top, name
        else:
            assert top, name
        assert torch.equal(p, _param(reference, name)) == (name not in follow), name


def test_apply_windows_renumbers_and_runs_with_cache(llama):
    original = [copy.deepcopy(x) for x in decoder_layers(llama)]
    apply_windows(llama, [(3, 5), (0, 1)], "reference")  # any order
    layers = decoder_layers(llama)
    assert len(layers) == 3 and llama.config.num_hidden_layers == 3
    assert [x.self_attn.layer_idx for x in layers] == [0, 1, 2]
    assert torch.equal(_param(layers[0], "self_attn.q_proj.weight"), _param(original[1], "self_attn.q_proj.weight"))
    assert torch.equal(_param(layers[0], "input_layernorm.weight"), _param(original[0], "input_layernorm.weight"))
    assert torch.equal(_param(layers[1], "mlp.up_proj.weight"), _param(original[2], "mlp.up_proj.weight"))
    assert torch.equal(_param(layers[2], "self_attn.o_proj.weight"), _param(original[5], "self_attn.o_proj.weight"))
    out = llama.generate(IDS[:, :4], max_new_tokens=3, do_sample=False)  # exercises the KV cache
    assert out.shape == (1, 7)
    with torch.no_grad():
        cached = llama(IDS, use_cache=True).logits
        uncached = llama(IDS, use_cache=False).logits
    torch.testing.assert_close(cached, uncached)


def test_gemma3_layer_types_sliced_with_anchor_entry():
    model, _ = tiny_model("gemma3")
    cfg = model.config
    assert cfg.layer_types == ["sliding_attention", "sliding_attention", "full_attention"] * 2
    apply_windows(model, [(2, 3)], "reference")
    assert cfg.num_hidden_layers == 5
    assert cfg.layer_types == ["sliding_attention", "sliding_attention", "full_attention",
                               "sliding_attention", "full_attention"]
    layers = decoder_layers(model)
    assert layers[2].self_attn.is_sliding is False  # a window holding a global layer stays global
    assert [x.layer_idx for x in layers] == list(range(5))
    assert [x.self_attn.layer_idx for x in layers] == list(range(5))
    cfg.validate()  # transformers' own check: len(layer_types) == num_hidden_layers
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()


def test_qwen2_max_window_layers_recounted():
    model, _ = tiny_model("qwen2")
    cfg = model.config
    assert cfg.max_window_layers == 3 and cfg.layer_types[:4] == ["full_attention"] * 3 + ["sliding_attention"]
    apply_windows(model, [(1, 2), (4, 5)], "mean")
    assert cfg.num_hidden_layers == 4
    assert cfg.max_window_layers == 2
    assert cfg.layer_types == ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]
    assert "layer_types" in per_layer_config_keys(cfg)
    cfg.validate()


def test_max_window_layers_above_depth_clamped():
    model, _ = tiny_model("qwen3")
    model.config.max_window_layers = 28
    slice_per_layer_config(model.config, [0, 2, 5])
    assert model.config.max_window_layers == 3 and model.config.num_hidden_layers == 3


def test_per_layer_keys_ignore_token_lists():
    model, _ = tiny_model("llama", n_layers=2)
    model.config.eos_token_id = [2, 3]
    assert per_layer_config_keys(model.config) == []


@pytest.mark.parametrize("factory", [tiny_gpt2, tiny_t5])
def test_unsupported_architecture(factory):
    model = factory()
    with pytest.raises(UserError, match="not supported") as info:
        check_supported(model)
    assert model.config.model_type in str(info.value) and "llama" in str(info.value)
    with pytest.raises(UserError):
        apply_windows(model, [(0, 1)], "reference")


@pytest.mark.parametrize(
    "windows",
    [[(0, 6)], [(-1, 2)], [(3, 2)], [(0, 2), (2, 3)], [(1, 4), (2, 3)], [(0, 1.5)], [(1, 2, 3)]],
)
def test_bad_windows(llama, windows):
    with pytest.raises(UserError):
        apply_windows(llama, windows, "reference")
    assert len(decoder_layers(llama)) == 6 and llama.config.num_hidden_layers == 6


def test_bad_method(llama):
    with pytest.raises(UserError, match="keep-first"):
        apply_windows(llama, [(0, 1)], "average")


def test_validate_and_kept_layers():
    assert validate_windows([[4, 5], [0, 2]], 6) == [(0, 2), (4, 5)]
    assert kept_layers(6, [(4, 5), (0, 2)]) == [0, 3, 4]
    assert kept_layers(6, []) == list(range(6))


def test_anchor_rule():
    types = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
    assert anchor_layer(types, (0, 1)) == 0  # all local: the bottom
    assert anchor_layer(types, (1, 3)) == 2  # contains a global layer: that layer's type
    assert anchor_layer(types, (1, 3), "bottom") == 1  # the authors' code: the bottom's type
    assert anchor_layer(None, (1, 3)) == 1  # no per-layer types (Llama): the bottom
    # plans that only drop layers keep the kept layer's own type, whatever the rule
    assert anchor_layer(types, (1, 3), "global", "keep-first") == 1
    assert anchor_layer(types, (0, 2), "global", "keep-last") == 2 and anchor_layer(types, (2, 3), "bottom",
                                                                                       "keep-last") == 3
    with pytest.raises(UserError, match="attention rule"):
        anchor_layer(types, (0, 1), "top")


def _reach(model, position: int) -> bool:
    """Does the hidden state after decoder layer `position` at the last token depend on token 0?"""
    x = IDS.clone()
    y = IDS.clone()
    y[0, 0] = 99
    seen = []
    hook = decoder_layers(model)[position].register_forward_hook(lambda m, a, o: seen.append(o[0] if isinstance(
        o, tuple) else o))
    with torch.no_grad():
        model(x, use_cache=False)
        model(y, use_cache=False)
    hook.remove()
    return not torch.allclose(seen[0][0, -1], seen[1][0, -1])


@pytest.mark.parametrize("arch", ["gemma3", "gemma2"])
def test_window_reaching_a_global_layer_stays_global(arch):
    """11 tokens, sliding windows of 4: a local layer above local layers cannot see token 0 from the last
    position, a global one can. A window from a local layer up to a global one must stay global (default),
    and becomes local under the authors' rule (`bottom`)."""
    model, _ = tiny_model(arch)
    types = model.config.layer_types
    low = next(i for i in range(5) if types[i] != types[i + 1] and types[i] == "sliding_attention"
               and all(t == "sliding_attention" for t in types[:i]))
    high = low + 1
    assert types[high] == "full_attention"
    glob, local = copy.deepcopy(model), copy.deepcopy(model)
    apply_windows(glob, [(low, high)], "reference")
    apply_windows(local, [(low, high)], "reference", attention="bottom")
    assert glob.config.layer_types[low] == "full_attention" and local.config.layer_types[low] == "sliding_attention"
    assert _reach(glob, low) and not _reach(local, low)


@pytest.mark.parametrize("arch", ["gemma3", "gemma2"])
@pytest.mark.parametrize("rule", ["global", "bottom"])
def test_dropping_layers_keeps_every_kept_layer_as_it_was(arch, rule):
    """ShortGPT, SLEB and ReplaceMe delete layers: a keep-first window that drops a global layer leaves the kept
    local layer local (its own sliding window and RoPE), so the edited model equals the original with those
    layers deleted by hand, under either attention rule."""
    from transformers import AutoModelForCausalLM

    model, _ = tiny_model(arch)
    types = list(model.config.layer_types)
    low = next(i for i in range(5) if types[i] == "sliding_attention" and types[i + 1] == "full_attention")
    edited = apply_windows(copy.deepcopy(model), [(low, low + 1)], "keep-first", attention=rule)
    assert edited.config.layer_types[low] == "sliding_attention"
    by_hand = copy.deepcopy(model)
    kept = [i for i in range(len(types)) if i != low + 1]
    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers, cfg.layer_types = len(kept), [types[i] for i in kept]
    fresh = AutoModelForCausalLM.from_config(cfg).eval()
    state = {k: v for k, v in by_hand.state_dict().items() if ".layers." not in k}
    for new, old in enumerate(kept):
        prefix = f"model.layers.{old}."
        state.update({f"model.layers.{new}.{k[len(prefix):]}": v for k, v in by_hand.state_dict().items()
                      if k.startswith(prefix)})
    fresh.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(edited(IDS).logits, fresh(IDS).logits, rtol=0, atol=1e-5)
    assert not _reach(edited, low)  # still local: it cannot see token 0 from the last position


@pytest.mark.parametrize("arch", ["gemma3", "qwen2"])
def test_generation_with_kv_cache_after_merging_hybrid(arch):
    model, _ = tiny_model(arch)
    apply_windows(model, [(1, 2), (4, 5)], "reference")
    out = model.generate(IDS[:, :8], max_new_tokens=6, do_sample=False)  # exercises the KV cache
    assert out.shape == (1, 14)
    with torch.no_grad():
        cached = model(IDS, use_cache=True).logits
        uncached = model(IDS, use_cache=False).logits
        torch.testing.assert_close(cached, uncached)
        # greedy continuation with the cache equals recomputing the whole prefix each step
        seq = IDS[:, :8]
        for _ in range(6):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)
