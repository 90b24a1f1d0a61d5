"""Merging a window of consecutive decoder layers into one layer ("parameter consolidation").

Methods (layers of a window given bottom-to-top, `low..high`):

- `reference`: what produced the paper's published numbers. The released code telescopes to the
  attention and MLP weights of the TOP layer, while every norm weight (input/post-attention norms and
  extra per-layer norms such as `q_norm`, `k_norm`, `pre_feedforward_layernorm`, ...) is the BOTTOM layer's.
- `paper`: the formula as printed, θ_low + Σ_{k=low+1..high} (θ_k − θ_low) over attention and MLP weights;
  norms of the bottom layer.
- `mean`: elementwise mean of attention and MLP weights over the window; norms of the bottom layer.
- `keep-first`: the bottom layer unchanged (the others are deleted).
- `keep-last`: every weight of the top layer (norms included).

The merged layer always takes the bottom layer's POSITION: its module is a copy of the bottom layer (so
position-dependent attributes such as Gemma's/Qwen's `layer_type`, `is_sliding`, `sliding_window` and the
config's `layer_types` entry are the bottom layer's), and the chosen weights are loaded into it. A
parameter is a norm when its name contains "norm"; everything else (self_attn.*, mlp.*, biases) is an
attention/MLP weight.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from transformers import PreTrainedConfig

from swm_ray.architectures import check_supported, slice_per_layer_config
from swm_ray.errors import UserError
from swm_ray.models import decoder_layers, inner_model, text_config

MERGE_METHODS = ("reference", "paper", "mean", "keep-first", "keep-last")
DROP_ONLY_METHODS = ("keep-first", "keep-last")  # plans that only delete layers (mergekit passthrough works)
METHOD_DESCRIPTIONS = {
    "reference": "attention and MLP weights of each window's top layer, all norm weights of its bottom layer "
    "(the behaviour of the paper's released code, which produced its published numbers)",
    "paper": "θ_low + Σ_{k=low+1..high} (θ_k − θ_low) over attention and MLP weights (the formula as printed "
    "in the paper), norm weights of the bottom layer",
    "mean": "elementwise mean of the window's attention and MLP weights, norm weights of the bottom layer",
    "keep-first": "each window's bottom layer kept unchanged, the layers above it deleted",
    "keep-last": "each window's top layer kept unchanged (at the bottom layer's position), the others deleted",
}


def check_method(method: str) -> None:
    if method not in MERGE_METHODS:
        raise UserError(f"unknown merge method {method!r}: choose one of {', '.join(MERGE_METHODS)}")


def is_norm_param(name: str) -> bool:
    """True for norm weights (`input_layernorm.weight`, `self_attn.q_norm.weight`, ...)."""
    return "norm" in name


def copy_layer(layer: nn.Module) -> nn.Module:
    """Deep copy of one decoder layer that shares (does not copy) the config objects it references."""
    memo: dict[int, object] = {}
    for module in layer.modules():
        for value in vars(module).values():
            if isinstance(value, PreTrainedConfig):
                memo[id(value)] = value
    return copy.deepcopy(layer, memo)


def _combine(tensors: list[torch.Tensor], method: str) -> torch.Tensor:
    """One attention/MLP tensor of the merged layer from the window's tensors (bottom first), same shape."""
    base = tensors[0]
    if method == "reference":
        return tensors[-1]
    if not base.is_floating_point():
        return base
    acc = base.float().clone()
    if method == "paper":
        for t in tensors[1:]:
            acc += t.float() - base.float()
    elif method == "mean":
        for t in tensors[1:]:
            acc += t.float()
        acc /= len(tensors)
    else:
        raise ValueError(f"no combination rule for merge method {method!r}")
    return acc.to(base.dtype)


def merged_state(layers: Sequence[nn.Module], method: str) -> dict[str, torch.Tensor]:
    """State dict of the merged layer: {name: tensor}, shapes as in each layer's own state dict."""
    states = [layer.state_dict() for layer in layers]
    names = list(states[0])
    for i, state in enumerate(states[1:], start=1):
        if list(state) != names:
            raise ValueError(f"layer {i} of the window has different parameters from the bottom layer")
    if method == "keep-first":
        return dict(states[0])
    if method == "keep-last":
        return dict(states[-1])
    out = {}
    for name in names:
        if is_norm_param(name):
            out[name] = states[0][name]
        else:
            out[name] = _combine([s[name] for s in states], method)
    return out


@torch.no_grad()
def merge_layers(layers: Sequence[nn.Module], method: str) -> nn.Module:
    """A NEW decoder layer merging `layers` (consecutive, bottom-to-top). The inputs are left untouched."""
    check_method(method)
    if len(layers) == 0:
        raise ValueError("merge_layers needs at least one layer")
    merged = copy_layer(layers[0])
    if method != "keep-first":
        merged.load_state_dict(merged_state(layers, method), strict=True)
    return merged


def set_layer_index(layer: nn.Module, index: int) -> None:
    """Set every integer `layer_idx` attribute in the layer (the layer itself, `self_attn`, ...) to `index`.

    The KV cache is indexed by `self_attn.layer_idx`, so it must equal the layer's position in the stack.
    """
    for module in layer.modules():
        if isinstance(getattr(module, "layer_idx", None), int):
            module.layer_idx = index


def validate_windows(windows: Iterable[Sequence[int]], num_layers: int) -> list[tuple[int, int]]:
    """Check windows (inclusive 0-based [low, high] pairs) and return them sorted bottom-first.

    Raises UserError for a malformed, out-of-range, reversed or overlapping window.
    """
    out = []
    for w in windows:
        if len(w) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in w):
            raise UserError(f"window {list(w)!r}: expected two integer layer indices [low, high]")
        low, high = int(w[0]), int(w[1])
        if low > high:
            raise UserError(f"window [{low}, {high}]: low must not exceed high")
        if low < 0 or high >= num_layers:
            raise UserError(f"window [{low}, {high}] is outside the model's layers 0..{num_layers - 1}")
        out.append((low, high))
    out.sort()
    for (a_low, a_high), (b_low, b_high) in itertools.pairwise(out):
        if b_low <= a_high:
            raise UserError(f"windows [{a_low}, {a_high}] and [{b_low}, {b_high}] overlap")
    return out


def kept_layers(num_layers: int, windows: Iterable[Sequence[int]]) -> list[int]:
    """Original index of the layer at each new position: every index outside windows, and each window's low."""
    removed = {i for low, high in validate_windows(windows, num_layers) for i in range(low + 1, high + 1)}
    return [i for i in range(num_layers) if i not in removed]


@torch.no_grad()
def apply_windows(model, windows: Iterable[Sequence[int]], method: str):
    """Replace each window of ORIGINAL layers by one merged layer, in place; returns `model`.

    Afterwards `self_attn.layer_idx` runs 0..L'-1, `num_hidden_layers` = L', every per-layer config list
    is sliced to the kept layers (a merged layer keeps its bottom layer's entry), `max_window_layers` is
    recounted. Windows: inclusive 0-based [low, high], disjoint, in any order.
    """
    check_supported(model)
    check_method(method)
    layers = decoder_layers(model)
    wins = validate_windows(windows, len(layers))
    by_low = {low: high for low, high in wins}
    kept = kept_layers(len(layers), wins)
    new_layers = []
    for i in kept:
        high = by_low.get(i, i)
        new_layers.append(merge_layers(list(layers[i : high + 1]), method) if high > i else layers[i])
    for pos, layer in enumerate(new_layers):
        set_layer_index(layer, pos)
    inner = inner_model(model)
    inner.layers = nn.ModuleList(new_layers)
    cfg = text_config(model)
    slice_per_layer_config(cfg, kept)
    if hasattr(inner, "has_sliding_layers") and isinstance(getattr(cfg, "layer_types", None), list):
        inner.has_sliding_layers = "sliding_attention" in cfg.layer_types
    return model


def build_candidate_layers(current_layers: Sequence[nn.Module], low: int, high: int, method: str) -> list[nn.Module]:
    """The stack `current_layers` with POSITIONS low..high (inclusive) collapsed into one merged layer.

    Nothing is copied except the merged layer (a new module whose `layer_idx` is `low`); the other entries
    are the same module objects, so the caller's stack is untouched. Run the candidate without a KV cache
    (use_cache=False): the layers above keep their old `layer_idx`. For models with per-layer attention
    types, position `low` keeps the type of `current_layers[low]`.
    """
    check_method(method)
    if not 0 <= low <= high < len(current_layers):
        raise UserError(f"window [{low}, {high}] is outside the current layers 0..{len(current_layers) - 1}")
    merged = merge_layers(list(current_layers[low : high + 1]), method)
    set_layer_index(merged, low)
    return [*current_layers[:low], merged, *current_layers[high + 1 :]]
