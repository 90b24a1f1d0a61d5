"""Local healing: each merged layer named by `plan.json` is trained alone, bottom-up, to reproduce what the
original model computes over its window (Adam on the MSE of hidden states; the first positions may be left
out). Its inputs are the compressed model's own hidden states, through the layers already healed below it;
the original model's layers come from a `LayerStack`. No gradient flows through more than one layer."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from swm_ray.errors import UserError
from swm_ray.heal.lora import DEFAULT_LR

DEFAULT_LOCAL_STEPS = 400


# -- local: each merged layer refit to its window ------------------------------------------------------------
def _plain(obj: Any) -> Any:
    """A copy of `obj` whose tensors are ordinary (inference-mode tensors cannot enter autograd)."""
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, tuple):
        return tuple(_plain(o) for o in obj)
    if isinstance(obj, list):
        return [_plain(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj


def _run(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    from swm_ray.compute.stack import first_tensor

    return first_tensor(layer(hidden, **kwargs))


def fit_error(layer: nn.Module, inputs: list[torch.Tensor], targets: list[torch.Tensor], kwargs: list[dict],
              skip: int) -> float:
    """Relative squared error of `layer` over all rows: Σ‖f(x) − y‖² / Σ‖y‖², positions ≥ skip."""
    num = den = 0.0
    with torch.no_grad():
        for x, y, kw in zip(inputs, targets, kwargs):
            out = _run(layer, x, kw)[:, skip:].float()
            y = y[:, skip:].float()
            num += float(((out - y) ** 2).sum())
            den += float((y ** 2).sum())
    return num / max(den, 1e-30)


def fit_layer(layer: nn.Module, inputs: list[torch.Tensor], targets: list[torch.Tensor], kwargs: list[dict], *,
              steps: int, lr: float, skip: int, seed: int) -> list[float]:
    """Adam on `layer`'s weights alone: each step one minibatch, MSE between its output and the target at
    positions ≥ skip. Returns the per-step losses."""
    params = list(layer.parameters())
    saved = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    rng = np.random.default_rng(seed)
    losses = []
    try:
        with torch.enable_grad():
            for _ in range(steps):
                b = int(rng.integers(len(inputs)))
                out = _run(layer, inputs[b], kwargs[b])
                loss = nn.functional.mse_loss(out[:, skip:].float(), targets[b][:, skip:].float())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
    finally:
        for p, s in zip(params, saved):
            p.requires_grad_(s)
            p.grad = None
    return losses


def positions_of(plan) -> list[tuple[int, int]]:
    """(low, high) original layers behind each layer of the compressed model, bottom first."""
    from swm_ray.edits.windows import new_layer_sources

    return [(low, high) for low, high, _ in new_layer_sources(plan.num_layers_before, plan.windows, None)]


@dataclass
class LocalFit:
    """What fitting one merged layer did (relative squared errors, see `fit_error`)."""

    window: list[int]
    position: int
    error_before: float
    error_after: float
    steps: int
    first_loss: float
    last_loss: float
    seconds: float


def heal_local(model: nn.Module, source, plan, input_ids: torch.Tensor, *, steps: int, lr: float, rows: int,
               skip: int, target: str = "original", seed: int = 0, layers: str = "merged",
               on_fit: Callable[[LocalFit], None] | None = None) -> list[LocalFit]:
    """Refit every merged layer of `model` (the compressed model, in memory, trained in place) bottom-up.

    `layers="above"` (with `target="original"`) also refits every layer above the lowest merged one, each to the
    original model's hidden state after its original layer, from the compressed model's (healed) states below it.

    `source`: a `LayerStack` of the original model (in memory or streaming); `plan`: the compressed model's
    plan; `input_ids` (N, T): calibration rows, run in minibatches of `rows`. A merged layer at position p of
    window [low, high] learns from the compressed model's hidden states entering p (through the layers already
    healed below it) either the original model's hidden state after layer `high` (`target="original"`) or the
    output of the original layers low..high on the same input (`"window"`).
    """
    from swm_ray.compute.stack import InMemoryStack

    comp = InMemoryStack(model)
    pos = positions_of(plan)
    if comp.num_layers != len(pos):
        raise UserError(f"the model has {comp.num_layers} decoder layers but its plan.json describes "
                        f"{len(pos)}: it is not the folder the plan was written with")
    if source.num_layers != plan.num_layers_before:
        raise UserError(f"the source model has {source.num_layers} decoder layers, plan.json says "
                        f"{plan.num_layers_before}: give the model the plan was made from (heal.source)")
    merged = [p for p, (low, high) in enumerate(pos) if high > low]
    if not merged:
        return []
    if layers not in ("merged", "above"):
        raise UserError(f"heal.local_layers {layers!r}: choose merged or above")
    if layers == "above" and target != "original":
        raise UserError("heal.local_layers above refits the unmerged layers to the original model's hidden states: "
                        "set heal.local_target original")
    fitted = set(merged) if layers == "merged" else set(range(merged[0], len(pos)))
    model.requires_grad_(False)
    chunks = [input_ids[i:i + rows] for i in range(0, len(input_ids), rows)]
    pro_c = [comp.prologue(c) for c in chunks]
    pro_o = [source.prologue(c) for c in chunks]
    hc = [_plain(p.hidden) for p in pro_c]
    ho = [_plain(p.hidden).to(source.device) for p in pro_o]
    kw_c = [[_plain(k) for k in p.kwargs] for p in pro_c]
    kw_o = [p.kwargs for p in pro_o]

    def advance(hidden: list[torch.Tensor], low: int, high: int) -> list[torch.Tensor]:
        """The original layers low..high applied to every chunk of `hidden` (one layer resident at a time)."""
        out = list(hidden)
        for k in range(low, high + 1):
            with source.layer(k) as layer, torch.no_grad():
                dev = next(layer.parameters()).device
                out = [source.run(layer, h.to(dev), kw_o[b][k]).clone() for b, h in enumerate(out)]
        return out

    fits: list[LocalFit] = []
    for p in range(max(fitted) + 1):
        low, high = pos[p]
        layer = comp.layers[p]
        kw = [k[p] for k in kw_c]
        if p not in fitted:
            if target == "original":
                ho = advance(ho, low, low)
            with torch.no_grad():
                hc = [_run(layer, h, k) for h, k in zip(hc, kw)]
            continue
        t0 = time.perf_counter()
        if target == "original":
            ho = advance(ho, low, high)
            goal = [h.to(comp.device) for h in ho]
        else:
            goal = [h.to(comp.device) for h in advance([h.to(source.device) for h in hc], low, high)]
        before = fit_error(layer, hc, goal, kw, skip)
        saved = {k: v.detach().clone() for k, v in layer.state_dict().items()}
        losses = fit_layer(layer, hc, goal, kw, steps=steps, lr=lr, skip=skip, seed=seed + p)
        after = fit_error(layer, hc, goal, kw, skip)
        if after > before:  # the fit made the layer worse on its own rows: it keeps the weights it had
            layer.load_state_dict(saved)
            after = before
        fit = LocalFit([low, high], p, before, after, steps, losses[0] if losses else float("nan"),
                       losses[-1] if losses else float("nan"), round(time.perf_counter() - t0, 2))
        fits.append(fit)
        if on_fit is not None:
            on_fit(fit)
        with torch.no_grad():
            hc = [_run(layer, h, k) for h, k in zip(hc, kw)]
    return fits


@dataclass
class LocalSettings:
    """What `heal_local` is run with under a config's `heal` section (its defaults resolved)."""

    calib: Any  # data.Calibration: the rows the merged layers are refit on
    steps: int
    lr: float
    rows: int
    skip: int
    target: str
    seed: int
    layers: str = "merged"

    def run(self, model: nn.Module, source, plan, on_fit: Callable[[LocalFit], None] | None = None) -> list[LocalFit]:
        return heal_local(model, source, plan, torch.from_numpy(self.calib.input_ids), steps=self.steps, lr=self.lr,
                          rows=self.rows, skip=self.skip, target=self.target, seed=self.seed, layers=self.layers,
                          on_fit=on_fit)

    def record(self, source: str) -> dict:
        """The settings as kept in heal.json."""
        return {"lr": self.lr, "steps": self.steps, "local_target": self.target, "local_layers": self.layers,
                "skip_first_tokens": self.skip,
                "samples": int(self.calib.input_ids.shape[0]), "seq_len": int(self.calib.input_ids.shape[1]),
                "rows_per_step": self.rows, "source": source}


def local_settings(cfg, tokenizer, model_type: str | None, data: str) -> LocalSettings:
    """`heal.*` resolved for a local heal: `heal.local_samples` × `heal.local_seq_len` calibration rows of
    `data`, `heal.steps` (default DEFAULT_LOCAL_STEPS) per merged layer at `heal.lr` (default DEFAULT_LR)."""
    from swm_ray.io.data import build_calibration

    h, d = cfg.heal, cfg.data
    calib = build_calibration(data, tokenizer, samples=h.local_samples, seq_len=h.local_seq_len, batch_size=4,
                              seed=h.seed, mode=d.mode, bos=d.bos, model_type=model_type, text_column=d.text_column)
    return LocalSettings(calib, h.steps or DEFAULT_LOCAL_STEPS, h.lr or DEFAULT_LR["local"], h.micro_batch_size,
                         h.skip_first_tokens, h.local_target, h.seed, h.local_layers)
