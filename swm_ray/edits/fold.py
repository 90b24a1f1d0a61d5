"""Folding a fitted compensation into weights: the fold site of an architecture (the MLP output projection,
or Gemma's post-feedforward norm), a window's `Fit` as stored in a plan, and the fold itself, computed in
float64 so every executor writes the same bytes (`methods/compensation.py` describes the fit)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from swm_ray.edits.windows import Group
from swm_ray.errors import UserError

UNIT_OFFSET_NORMS = ("gemma2", "gemma3", "gemma3_text")  # RMSNorm computes norm(x)·(1 + w)
TENSOR_PREFIX = "compensation"


# -- where a fit is folded -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Site:
    """The module whose output is m and the tensors of it a fit changes (names inside one decoder layer)."""

    module: str  # "mlp" (m = down_proj's output) or "post_feedforward_layernorm"
    names: tuple[str, ...]
    unit_offset: bool = False  # a norm weight w that scales by 1 + w

    @property
    def diagonal_only(self) -> bool:
        return self.module != "mlp"


def fold_site(model_type: str, layer_names: Iterable[str]) -> Site:
    """The fold site of a decoder layer with tensors `layer_names` of an architecture `model_type`."""
    names = set(layer_names)
    if "post_feedforward_layernorm.weight" in names:
        if model_type not in UNIT_OFFSET_NORMS:
            raise UserError(f"model type {model_type!r}: its MLP output passes through post_feedforward_layernorm "
                            f"and swm-ray knows no exact fold for that norm; use --compensate none")
        return Site("post_feedforward_layernorm", ("post_feedforward_layernorm.weight",), unit_offset=True)
    if "mlp.down_proj.weight" not in names:
        raise UserError(f"model type {model_type!r}: no mlp.down_proj.weight in its decoder layers to fold a "
                        f"compensation into; use --compensate none")
    return Site("mlp", tuple(n for n in ("mlp.down_proj.weight", "mlp.down_proj.bias") if n in names))


# -- fits ----------------------------------------------------------------------------------------------------
@dataclass
class Fit:
    """One window's fitted T as stored (float32) and folded, with what it achieved on calibration."""

    window: Group
    kind: str  # matrix | diagonal | scalar
    tensor: torch.Tensor  # float32: (d, d) | (d,) | (1,)
    tokens: int = 0
    error_before: float | None = None  # Σ‖y − h‖² / Σ‖y − x‖²: share of the window's update it misses
    error_after: float | None = None

    @property
    def name(self) -> str:
        return tensor_name(self.window)

    def record(self) -> dict:
        return {"window": list(self.window), "kind": self.kind, "tensor": self.name, "tokens": self.tokens,
                "error_before": self.error_before, "error_after": self.error_after}


def tensor_name(window: Sequence[int]) -> str:
    return f"{TENSOR_PREFIX}.{int(window[0])}-{int(window[1])}"


def fold(rest: str, tensor: torch.Tensor, fit: Fit, site: Site) -> torch.Tensor:
    """The compensated value of the layer tensor `rest` (a name inside the layer; `site.names`), computed in
    float64 and cast back to its dtype. Every executor folds with this, so all give the same bytes."""
    t = fit.tensor.to(device=tensor.device, dtype=torch.float64)
    w = tensor.to(torch.float64)
    d = w.shape[0]
    if (fit.kind == "matrix" and tuple(t.shape) != (d, d)) or (fit.kind == "diagonal" and tuple(t.shape) != (d,)):
        raise UserError(f"the plan's compensation {tensor_name(fit.window)} has shape {tuple(t.shape)} but {rest} "
                        f"has {d} channels: the plan was fitted on a model of another size (--force cannot apply "
                        f"a compensated plan to it)")
    if site.module == "mlp":  # rows of W (and b) are the d output channels: Tᵀ·W, Tᵀ·b
        if fit.kind == "matrix":
            out = t.T @ w
        else:
            scale = t if fit.kind == "diagonal" else t.expand(w.shape[0])
            out = scale.reshape(-1, *([1] * (w.dim() - 1))) * w
    else:  # a norm weight that scales by (1 + w): (1 + w)·t − 1, or w·t without the offset
        if fit.kind == "matrix":
            raise UserError("a full compensation matrix cannot be folded into a norm weight")
        scale = t if fit.kind == "diagonal" else t.expand(w.shape[0])
        out = (1 + w) * scale - 1 if site.unit_offset else w * scale
    return out.to(tensor.dtype)


def fold_state(state: Mapping[str, torch.Tensor], fit: Fit | None, site: Site) -> dict[str, torch.Tensor]:
    """A layer state with `fit` folded in (new tensors; `state` is left as it is)."""
    if fit is None:
        return dict(state)
    return {n: fold(n, v, fit, site) if n in site.names else v for n, v in state.items()}


@torch.no_grad()
def compensate_model(model, windows: Iterable[Sequence[int]], fits: Mapping[Group, Fit]) -> None:
    """Fold `fits` into a model that `merge.apply_windows(model, windows, ...)` already edited, in place."""
    from swm_ray.edits.windows import kept_layers
    from swm_ray.io.anatomy import decoder_layers, text_config

    if not fits:
        return
    layers = decoder_layers(model)
    windows = [(int(lo), int(h)) for lo, h in windows]
    kept = kept_layers(len(layers) + sum(h - lo for lo, h in windows), windows)  # the depth before the edit
    position = {orig: pos for pos, orig in enumerate(kept)}
    site = fold_site(text_config(model).model_type, layers[0].state_dict())
    for window, fit in fits.items():
        layer = layers[position[window[0]]]
        params = dict(layer.named_parameters())
        for name in site.names:
            params[name].copy_(fold(name, params[name].detach(), fit, site))


def stack_site(stack) -> Site:
    return fold_site(stack.config.model_type, stack.templates[0].state_dict())


def checkpoint_site(path: str, config, allow_pickle: bool = False) -> Site:
    """The fold site of the model at `path` (its config and the names of its first layer's tensors)."""
    from swm_ray.io.anatomy import text_config_of
    from swm_ray.io.checkpoint import Checkpoint

    return fold_site(text_config_of(config).model_type, Checkpoint(path, allow_pickle).layer_keys(0))


def fits_from_record(record: Mapping | None, tensors: Mapping[str, torch.Tensor]) -> dict[Group, Fit]:
    """The fits a plan's `compensation` entry and its tensors describe ({} for none)."""
    if not record or record.get("method") in (None, "none"):
        return {}
    fits = {}
    for w in record.get("windows", []):
        window = (int(w["window"][0]), int(w["window"][1]))
        name = w.get("tensor") or tensor_name(window)
        if name not in tensors:
            raise UserError(f"the plan's compensation tensor {name!r} is missing from its tensors file")
        fits[window] = Fit(window, w["kind"], tensors[name].to(torch.float32), int(w.get("tokens") or 0),
                           w.get("error_before"), w.get("error_after"))
    return fits


def plan_fits(plan) -> dict:
    """The compensation fits a `plan.Plan` carries ({} for none)."""
    return fits_from_record(plan.compensation, plan.tensors) if plan.compensated else {}
