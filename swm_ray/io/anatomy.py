"""Where things sit inside a transformers causal LM: the decoder stack and its layers, the text config (the
text part of a multimodal config), and the unique parameter count."""

from __future__ import annotations

from typing import TYPE_CHECKING

from swm_ray.errors import UserError

if TYPE_CHECKING:
    import torch


def inner_model(model) -> torch.nn.Module:
    """The decoder stack (`embed_tokens`, `layers`, `norm`, `rotary_emb`) inside a causal LM."""
    if getattr(model.config, "is_encoder_decoder", False):
        raise UserError(f"{type(model).__name__} is an encoder-decoder: swm-ray needs a decoder-only model")
    for cand in (getattr(model, "model", None), getattr(getattr(model, "model", None), "language_model", None)):
        if cand is not None and hasattr(cand, "layers") and hasattr(cand, "embed_tokens"):
            return cand
    raise UserError(f"{type(model).__name__} has no decoder layer list (model.layers): not supported")


def decoder_layers(model) -> torch.nn.ModuleList:
    import torch

    layers = inner_model(model).layers
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise UserError(f"{type(model).__name__}: model.layers is not a list of decoder layers")
    return layers


def text_config(model):
    """The config that holds num_hidden_layers and the per-layer lists (text part of multimodal configs)."""
    return text_config_of(model.config)


def text_config_of(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def count_parameters(model) -> int:
    """Unique parameters (tied embeddings counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
