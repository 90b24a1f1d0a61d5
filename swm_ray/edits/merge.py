"""Merging a window of consecutive decoder layers into one layer ("parameter consolidation").

Methods (layers of a window given bottom-to-top, `low..high`):

- `reference`: what produced the paper's published numbers. The released code telescopes to the
  attention and MLP weights of the TOP layer, while every norm weight (input/post-attention norms and
  extra per-layer norms such as `q_norm`, `k_norm`, `pre_feedforward_layernorm`, ...) is the BOTTOM layer's.
- `paper`: the formula as printed, θ_low + Σ_{k=low+1..high} (θ_k − θ_low) over attention and MLP weights;
  norms of the bottom layer.
- `mean`: elementwise mean of attention and MLP weights over the window; norms of the bottom layer.
- `consistent`: like `reference` (attention and MLP weights of the TOP layer), but every norm that FOLLOWS a
  weight takes that weight's layer: the post-norms of Gemma 2/3 (`post_attention_layernorm`,
  `post_feedforward_layernorm`, which scale o_proj's and down_proj's outputs) and `q_norm`/`k_norm` (which
  scale q_proj's and k_proj's outputs) come from the top layer; the pre-norms, which scale the window's
  INPUT, stay the bottom layer's. On architectures without such norms (Llama, Mistral, Qwen2) it equals
  `reference`.
- `keep-first`: the bottom layer unchanged (the others are deleted).
- `keep-last`: every weight of the top layer (norms included).

The merged layer takes the bottom layer's POSITION. Its attention type (Gemma's/Qwen's `layer_type`,
`sliding_window`, the config's `layer_types` entry and with it the RoPE base) is that of the window's
*anchor* layer: by default (`global`) a window that contains a full-attention layer stays full attention;
`bottom` reproduces the authors' code, where the bottom layer's type wins even when the window reaches a
global layer. Its module is a copy of the anchor layer with the chosen weights loaded into it. Every
executor (in memory, layer streaming, the streaming writer) computes tensors with `merge_tensor`. A
parameter is a norm when its name contains "norm"; everything else (self_attn.*, mlp.*, biases) is an
attention/MLP weight.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Collection, Iterable, Sequence

import torch
from torch import nn
from transformers import PreTrainedConfig

from swm_ray.config import MERGE_METHODS
from swm_ray.edits.architectures import check_supported, slice_per_layer_config
from swm_ray.edits.windows import layer_types_of, new_layer_sources
from swm_ray.errors import UserError
from swm_ray.io.anatomy import decoder_layers, inner_model, text_config

DROP_ONLY_METHODS = ("keep-first", "keep-last")  # plans that only delete layers (mergekit passthrough works)
METHOD_DESCRIPTIONS = {
    "reference": "attention and MLP weights of each window's top layer, all norm weights of its bottom layer "
    "(the behaviour of the paper's released code, which produced its published numbers)",
    "paper": "θ_low + Σ_{k=low+1..high} (θ_k − θ_low) over attention and MLP weights (the formula as printed "
    "in the paper), norm weights of the bottom layer",
    "mean": "elementwise mean of the window's attention and MLP weights, norm weights of the bottom layer",
    "consistent": "attention and MLP weights of each window's top layer with the norms that scale their outputs "
    "(post-attention/post-MLP norms, q/k norms), the norms that scale the window's input of its bottom layer",
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


def follows_weight(name: str, layer_names: Collection[str]) -> bool:
    """True for a norm that scales the OUTPUT of a weight of its own layer: `q_norm`/`k_norm`, Gemma's
    `post_feedforward_layernorm`, and `post_attention_layernorm` where the layer also has a
    `pre_feedforward_layernorm` (Gemma 2/3: there it follows o_proj; in Llama-style layers the same name is
    the norm BEFORE the MLP)."""
    if not is_norm_param(name):
        return False
    if "q_norm" in name or "k_norm" in name or "post_feedforward_layernorm" in name:
        return True
    return "post_attention_layernorm" in name and any("pre_feedforward_layernorm" in n for n in layer_names)


def selected_layer(name: str, n: int, method: str, layer_names: Collection[str] = ()) -> int | None:
    """The window layer (0 = bottom) whose tensor `name` the merged layer takes unchanged, or None when the
    method computes it (`paper` and `mean` on attention/MLP weights). A writer copies selected tensors'
    bytes as they are. `layer_names`: every tensor name of one decoder layer (`consistent` needs them)."""
    if method == "consistent" and follows_weight(name, layer_names):
        return n - 1
    if method == "keep-first" or (is_norm_param(name) and method != "keep-last"):
        return 0
    if method in ("reference", "consistent", "keep-last") or n == 1:
        return n - 1
    return None


def merge_tensor(name: str, read: Callable[[int], torch.Tensor], n: int, method: str,
                 layer_names: Collection[str] = ()) -> torch.Tensor:
    """One tensor of the merged layer of a window of `n` layers; `read(k)` gives layer k's tensor (0 = bottom).

    Reads only what the method needs, one layer at a time (a running float32 sum for `paper` and `mean`), so
    an executor never holds the whole window. Every executor (in memory, streaming, the writer) calls this.
    """
    taken = selected_layer(name, n, method, layer_names)
    if taken is not None:
        return read(taken)
    base = read(0)
    if not base.is_floating_point():
        return base
    acc = base.float().clone()
    if method == "paper":
        for k in range(1, n):
            acc += read(k).to(acc.device).float() - base.float()  # a device map: layers on several GPUs
    elif method == "mean":
        for k in range(1, n):
            acc += read(k).to(acc.device).float()
        acc /= n
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
    return {name: merge_tensor(name, lambda k, name=name: states[k][name], len(states), method, names)
            for name in names}


@torch.no_grad()
def merge_layers(layers: Sequence[nn.Module], method: str, anchor: int = 0) -> nn.Module:
    """A NEW decoder layer merging `layers` (consecutive, bottom-to-top); the module (attention type, sliding
    window) is a copy of `layers[anchor]` (see `anchor_layer`). The inputs are left untouched."""
    check_method(method)
    if len(layers) == 0:
        raise ValueError("merge_layers needs at least one layer")
    merged = copy_layer(layers[anchor])
    merged.load_state_dict(merged_state(layers, method), strict=True)
    return merged


def set_layer_index(layer: nn.Module, index: int) -> None:
    """Set every integer `layer_idx` attribute in the layer (the layer itself, `self_attn`, ...) to `index`.

    The KV cache is indexed by `self_attn.layer_idx`, so it must equal the layer's position in the stack.
    """
    for module in layer.modules():
        if isinstance(getattr(module, "layer_idx", None), int):
            module.layer_idx = index


def edit_config(config, sources: Sequence[tuple[int, int, int]]) -> None:
    """Make a (text) config describe the edited stack: depth, per-layer lists taken from each anchor layer."""
    slice_per_layer_config(config, [anchor for _, _, anchor in sources])


@torch.no_grad()
def apply_windows(model, windows: Iterable[Sequence[int]], method: str, attention: str = "global"):
    """Replace each window of ORIGINAL layers by one merged layer, in place; returns `model`.

    Afterwards `self_attn.layer_idx` runs 0..L'-1, `num_hidden_layers` = L', every per-layer config list
    is sliced to the kept layers (a merged layer takes the entry of its anchor layer, see `anchor_layer`),
    `max_window_layers` is recounted. Windows: inclusive 0-based [low, high], disjoint, in any order.
    """
    check_supported(model)
    check_method(method)
    layers = decoder_layers(model)
    cfg = text_config(model)
    sources = new_layer_sources(len(layers), windows, layer_types_of(cfg), attention, method)
    new_layers = []
    for low, high, anchor in sources:
        window = list(layers[low : high + 1])
        new_layers.append(merge_layers(window, method, anchor - low) if high > low else layers[low])
    for pos, layer in enumerate(new_layers):
        set_layer_index(layer, pos)
    inner = inner_model(model)
    inner.layers = nn.ModuleList(new_layers)
    edit_config(cfg, sources)
    if hasattr(inner, "has_sliding_layers") and isinstance(getattr(cfg, "layer_types", None), list):
        inner.has_sliding_layers = "sliding_attention" in cfg.layer_types
    return model
