"""Compensation: a linear correction fitted on calibration rows and folded into the compressed model's weights,
so the output is still a plain model of the same architecture (ReplaceMe, arXiv 2505.02819; Prune&Comp,
arXiv 2507.18212; see METHOD.md §7).

For every window [low, high] of a plan (a merged window, or, for the drop baselines, the kept layer `low`
below the cut) the new layer at `low`'s position is fitted. On calibration tokens (row vectors of width d):

- x: the hidden state entering that layer: the COMPRESSED model's own (windows below merged and already
  compensated, `input="compressed"`, the default) or the original's (`input="original"`, a local fit);
- m: what the layer's MLP adds to the residual stream (`down_proj`'s output; on Gemma 2/3 the output of
  `post_feedforward_layernorm`, which follows the MLP);
- h: the layer's output hidden state, h = (h − m) + m;
- y: the ORIGINAL model's hidden state after layer `high`, the target.

The fit asks `(h − m) + m·T ≈ y`, i.e. `m·T ≈ b` with `b = y − h + m`. Over all tokens (M, B: N×d) the
float64 sums MᵀM and MᵀB are additive over rows: every actor returns them over its rows, the driver adds them
in a fixed order (`add_sums`) and solves (`solve`):

- `lstsq`, full matrix: T = (MᵀM + λ·tr(MᵀM)/d·I)⁻¹ (MᵀB + λ·tr(MᵀM)/d·I): least squares with a ridge that
  pulls T towards I, the uncompensated layer (`merge.ridge_prior=zero`: towards 0, the textbook ridge), folded
  as `down_proj.weight ← Tᵀ·down_proj.weight`
  (row vectors: m·T = x·Wᵀ·T = x·(TᵀW)ᵀ; a bias b becomes Tᵀb);
- `lstsq` on Gemma 2/3, diagonal: m = norm(z)·(1 + w) passes through `post_feedforward_layernorm`, and
  norm(z)·T is not norm(z·T') for a full T; a diagonal T = diag(t) is exact there: (1 + w)·t = 1 + w', so
  `w' = (1 + w)·t − 1` (Gemma's norms scale by 1 + w). t_j = ((MᵀB)_jj + λ') / ((MᵀM)_jj + λ'), λ' = λ·tr(MᵀM)/d;
- `scale`: one factor, T = s·I with the least-squares s = tr(MᵀB) / tr(MᵀM) (with a ridge pulled towards 1):
  Prune&Comp's idea of a single magnitude factor, here on the MLP output of the layer at the cut, so it folds into
  the same tensor (Prune&Comp scales the whole residual stream by mean‖after‖/mean‖before‖; that ratio taken on m,
  Σ‖b‖/Σ‖m‖, raised the fit error and the perplexity on SmolLM2, BENCHMARKS.md).

Windows are fitted bottom-up (`fit_windows`): with `input="compressed"` each fit sees the corrections below
it, so it also absorbs their remaining error. What a fit changes is exactly `m·(T − I)` at that layer.
The first `skip_first` positions of every row (the attention sink) can be left out of the sums.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from swm_ray.config import COMPENSATION_INPUTS
from swm_ray.errors import UserError
from swm_ray.methods.selection import Group

UNIT_OFFSET_NORMS = ("gemma2", "gemma3", "gemma3_text")  # RMSNorm computes norm(x)·(1 + w)
TENSOR_PREFIX = "compensation"
RIDGE_PRIORS = ("identity", "zero")  # what the ridge pulls T towards (`solve`)
FEW_TOKENS = 10  # a full d×d fit from fewer tokens per dimension overfits (SmolLM2, 1,270 tokens: BENCHMARKS.md)


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


def fit_kind(method: str, site: Site) -> str:
    """matrix | diagonal | scalar: the shape of T a method fits at a site."""
    if method == "scale":
        return "scalar"
    if method == "lstsq":
        return "diagonal" if site.diagonal_only else "matrix"
    raise ValueError(f"no fit for compensation {method!r}")


# -- the additive sums ---------------------------------------------------------------------------------------
@dataclass
class CompSums:
    """Sums over calibration tokens for one window (float64; see the module docstring)."""

    mtm: np.ndarray  # (d, d) Σ mᵀm
    mtb: np.ndarray  # (d, d) Σ mᵀb
    bb: float = 0.0  # Σ ‖b_t‖²
    gap: float = 0.0  # Σ ‖y_t − x_t‖²: the window's whole update of the residual stream (the error scale)
    tokens: int = 0

    @classmethod
    def zeros(cls, d: int) -> CompSums:
        return cls(np.zeros((d, d)), np.zeros((d, d)))

    def add_(self, other: CompSums) -> CompSums:
        self.mtm += other.mtm
        self.mtb += other.mtb
        self.bb += other.bb
        self.gap += other.gap
        self.tokens += other.tokens
        return self


def add_sums(parts: Sequence[CompSums]) -> CompSums:
    """The sum of shards' sums, added in the order given (the driver passes them in row order)."""
    total = CompSums.zeros(parts[0].mtm.shape[0])
    for p in parts:
        total.add_(p)
    return total


def accumulate(sums: CompSums, x: torch.Tensor, m: torch.Tensor, h: torch.Tensor, y: torch.Tensor,
               skip_first: int) -> None:
    """Add one batch: x (window input), m (MLP output), h (layer output), y (target), each (b, T, d)."""
    d = m.shape[-1]
    x, m, h, y = (t[:, skip_first:, :].reshape(-1, d).to(torch.float64) for t in (x, m, h, y))
    b = y - h + m
    sums.mtm += (m.T @ m).cpu().numpy()
    sums.mtb += (m.T @ b).cpu().numpy()
    sums.bb += float((b * b).sum())
    sums.gap += float(((y - x) ** 2).sum())
    sums.tokens += int(m.shape[0])


# -- the solve -----------------------------------------------------------------------------------------------
def solve(sums: CompSums, kind: str, ridge: float = 0.0, prior: str = "identity") -> np.ndarray:
    """T as float64: (d, d) for `matrix`, (d,) for `diagonal`, (1,) for `scalar`. The ridge pulls T towards
    `prior`: `identity` (no correction: a large λ gives back the uncompensated layer) or `zero` (the textbook
    ridge, which also shrinks the MLP output the map multiplies)."""
    if sums.tokens == 0:
        raise UserError("no calibration tokens left to fit the compensation (rows shorter than merge.skip_first)")
    if prior not in RIDGE_PRIORS:
        raise UserError(f"merge.ridge_prior {prior!r}: choose {' or '.join(RIDGE_PRIORS)}")
    d = sums.mtm.shape[0]
    tr = float(np.trace(sums.mtm))
    reg = ridge * tr / d
    p = 1.0 if prior == "identity" else 0.0
    if kind == "scalar":
        den = tr * (1 + ridge)
        return np.array([(float(np.trace(sums.mtb)) + p * ridge * tr) / den if den > 0 else 1.0])
    if kind == "diagonal":
        den = np.diag(sums.mtm) + reg
        return np.where(den > 0, (np.diag(sums.mtb) + p * reg) / np.where(den > 0, den, 1.0), 1.0)
    a = sums.mtm + reg * np.eye(d)
    rhs = sums.mtb + p * reg * np.eye(d)
    try:
        return np.linalg.solve(a, rhs)
    except np.linalg.LinAlgError:  # singular normal equations: the minimum-norm solution
        return np.linalg.lstsq(a, rhs, rcond=None)[0]


def as_matrix(kind: str, value: np.ndarray, d: int) -> np.ndarray:
    if kind == "matrix":
        return value
    if kind == "diagonal":
        return np.diag(value)
    return float(value[0]) * np.eye(d)


def residual(sums: CompSums, t: np.ndarray) -> float:
    """Σ‖b − m·T‖² from the sums, T a (d, d) matrix."""
    return float(sums.bb - 2 * np.sum(t * sums.mtb) + np.sum(t * (sums.mtm @ t)))


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


def make_fit(window: Group, sums: CompSums, method: str, site: Site, ridge: float = 0.0,
             prior: str = "identity") -> Fit:
    kind = fit_kind(method, site)
    tensor = torch.from_numpy(solve(sums, kind, ridge, prior)).to(torch.float32)
    d = sums.mtm.shape[0]
    t = as_matrix(kind, tensor.double().numpy(), d)  # the error of what is stored and folded
    scale = sums.gap if sums.gap > 0 else 1.0
    return Fit(tuple(window), kind, tensor, sums.tokens, residual(sums, np.eye(d)) / scale, residual(sums, t) / scale)


def fold(rest: str, tensor: torch.Tensor, fit: Fit, site: Site) -> torch.Tensor:
    """The compensated value of the layer tensor `rest` (a name inside the layer; `site.names`), computed in
    float64 and cast back to its dtype. Every executor folds with this, so all give the same bytes."""
    t = fit.tensor.to(torch.float64)
    w = tensor.to(torch.float64)
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
    from swm_ray.edits.merge import kept_layers
    from swm_ray.io.models import decoder_layers, text_config

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


# -- computing the sums on a layer stack ----------------------------------------------------------------------
@contextlib.contextmanager
def capture_output(layer: torch.nn.Module, site: Site):
    """A list that receives the output of the layer's `site.module` at every call."""
    got: list[torch.Tensor] = []
    handle = layer.get_submodule(site.module).register_forward_hook(lambda mod, inp, out: got.append(out))
    try:
        yield got
    finally:
        handle.remove()


def stack_site(stack) -> Site:
    return fold_site(stack.config.model_type, stack.templates[0].state_dict())


def checkpoint_site(path: str, config, allow_pickle: bool = False) -> Site:
    """The fold site of the model at `path` (its config and the names of its first layer's tensors)."""
    from swm_ray.io.checkpoint import Checkpoint
    from swm_ray.io.models import text_config_of

    return fold_site(text_config_of(config).model_type, Checkpoint(path, allow_pickle).layer_keys(0))


class FitPass:
    """The fit of a plan's windows in ONE bottom-up pass over the fit rows (O(L) layer runs for any number of
    windows).

    The original model (`h_o`) and the compressed one (`h_c`: windows merged with `merge`, fits folded) run side
    by side, layer-major. At each target window the pass stops and returns the window's sums (`advance`); the
    caller solves the fit and hands it to the next `advance`, which folds it into that window's layer and goes on
    up, so every window's input is the output of the fitted model below it (`source` compressed). With `source`
    original a window's input is the original's (local fits, independent of each other). `fits` are known fits
    folded where their windows are passed; `targets` default to every window of the plan."""

    def __init__(self, stack, input_ids: np.ndarray, batches: Sequence[tuple[int, int]],
                 windows: Sequence[Sequence[int]], merge: str, attention: str, *, source: str = "compressed",
                 skip_first: int = 1, fits: Mapping[Group, Fit] | None = None,
                 targets: Sequence[Sequence[int]] | None = None):
        from swm_ray.compute.planrun import PlanRunner

        if source not in COMPENSATION_INPUTS:
            raise UserError(f"merge.compensate_input {source!r}: choose compressed or original")
        if input_ids.shape[1] <= skip_first:
            raise UserError(f"merge.skip_first {skip_first} leaves no position of the {input_ids.shape[1]}-token "
                            f"rows to fit the compensation on")
        self.stack, self.source, self.skip_first = stack, source, skip_first
        self.runner = PlanRunner(stack, windows, merge, attention)
        self.site = stack_site(stack)
        self.fits = {tuple(int(v) for v in w): f for w, f in (fits or {}).items()}
        wanted = self.runner.windows if targets is None else targets
        self.targets = {tuple(int(v) for v in t) for t in wanted}
        self.top = max((h for _, h in self.targets), default=-1)
        self.pros = [stack.prologue(torch.tensor(np.asarray(input_ids[a:b])).to(stack.device)) for a, b in batches]
        self.h_o = [p.hidden for p in self.pros]  # the original model
        self.h_c = list(self.h_o) if source == "compressed" else None  # the compressed one
        self.next = 0  # index of the next source of the edited stack
        self.pending: tuple | None = None  # (window, its input, its plain output) awaiting its fit
        self.done: list[Group] = []  # target windows whose sums were returned, in order

    def fork(self, windows: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]) -> FitPass:
        """A pass of another plan that agrees with this one below where this one stands (its edited stack has the
        same layers there): it starts from this pass's hidden states instead of the embeddings. Known fits below
        are kept; `targets` are the other plan's windows to fit."""
        from swm_ray.compute.planrun import PlanRunner

        if self.pending is not None:
            raise RuntimeError("a pass awaiting a fit cannot be forked")
        runner = PlanRunner(self.stack, windows, self.runner.merge, self.runner.attention)
        if runner.sources[: self.next] != self.runner.sources[: self.next]:
            raise ValueError("the forked plan differs from this pass below where it stands")
        new = copy.copy(self)
        new.runner = runner
        new.fits = {w: f for w, f in self.fits.items() if w in set(runner.windows)}
        new.targets = {tuple(int(v) for v in t) for t in targets}
        new.top = max((h for _, h in new.targets), default=-1)
        new.h_o, new.h_c = list(self.h_o), None if self.h_c is None else list(self.h_c)
        new.done = []
        return new

    @torch.inference_mode()
    def advance(self, fit: Fit | None = None, stop: int | None = None) -> tuple[Group, CompSums] | None:
        """Fold `fit` into the window returned last (None: that window stays plain, or takes its known fit), then
        run up to and through the next target window and return (window, its sums); None when none is left, or
        when the next layer of the edited stack starts at or above original layer `stop` (the pass then stands
        just below it, see `fork`)."""
        s = self.stack
        if self.pending is not None:
            window, x_in, plain = self.pending
            self.pending = None
            fit = fit if fit is not None else self.fits.get(window)
            if fit is not None:
                self.fits[window] = fit
            if self.h_c is not None:
                if fit is None:
                    self.h_c = plain
                else:
                    anchor = self.runner.anchor(*window)
                    with self.runner.layer(*window, fit=fit) as layer:
                        self.h_c = [s.run(layer, x, p.kwargs[anchor]) for x, p in zip(x_in, self.pros)]
        while self.next < len(self.runner.sources):
            low, high, anchor = self.runner.sources[self.next]
            if (stop is None and low > self.top) or (stop is not None and low >= stop):
                break
            self.next += 1
            x_o = self.h_o
            for i in range(low, high + 1):
                with s.layer(i) as layer:
                    self.h_o = [s.run(layer, x, p.kwargs[i]) for x, p in zip(self.h_o, self.pros)]
                    if low == high and self.h_c is not None:  # a kept layer: the same in both models
                        self.h_c = [s.run(layer, x, p.kwargs[i]) for x, p in zip(self.h_c, self.pros)]
            if low == high:
                continue
            window = (low, high)
            if window not in self.targets:
                if self.h_c is not None:
                    with self.runner.layer(low, high, fit=self.fits.get(window)) as layer:
                        self.h_c = [s.run(layer, x, p.kwargs[anchor]) for x, p in zip(self.h_c, self.pros)]
                continue
            x_in = self.h_c if self.h_c is not None else x_o
            sums = CompSums.zeros(int(s.config.hidden_size))
            plain = []
            with s.group(low, high, self.runner.merge, self.runner.attention) as layer, \
                    capture_output(layer, self.site) as got:
                for x, y, p in zip(x_in, self.h_o, self.pros):
                    got.clear()
                    h = s.run(layer, x, p.kwargs[anchor])
                    accumulate(sums, x, got[-1], h, y, self.skip_first)
                    plain.append(h)
            self.pending = (window, x_in, plain)
            self.done.append(window)
            return window, sums
        return None


def compensation_sums(stack, input_ids: np.ndarray, batches: Sequence[tuple[int, int]],
                      windows: Sequence[Sequence[int]], merge: str, attention: str, fits: Mapping[Group, Fit],
                      targets: Sequence[Sequence[int]], *, source: str = "compressed",
                      skip_first: int = 1) -> list[CompSums]:
    """Per target window: its sums over the given minibatches (row ranges of `input_ids`), with the plan's
    `windows` applied and the known `fits` folded where the pass meets them (one `FitPass`, no fit solved)."""
    fp = FitPass(stack, input_ids, batches, windows, merge, attention, source=source, skip_first=skip_first,
                 fits=fits, targets=targets)
    out: dict[Group, CompSums] = {}
    while (got := fp.advance()) is not None:
        out[got[0]] = got[1]
    return [out[tuple(int(v) for v in t)] for t in targets]


# -- fitting a plan ------------------------------------------------------------------------------------------
Stepper = Callable[[Fit | None], "tuple[Group, CompSums] | None"]


def fit_windows(stepper: Stepper, method: str, site: Site, *, ridge: float = 0.0,
                prior: str = "identity") -> dict[Group, Fit]:
    """Fit every window of a `FitPass` (or of a pass spread over actors: `stepper(fit)` folds `fit` into the
    window it returned last and returns the next window's reduced sums, None at the end), bottom-up."""
    fits: dict[Group, Fit] = {}
    fit = None
    while (got := stepper(fit)) is not None:
        window, sums = got
        fit = fits[window] = make_fit(window, sums, method, site, ridge, prior)
    return fits


@dataclass
class Compensation:
    """A plan's fitted compensation: the settings, the fits, and how long the fit took."""

    method: str
    fits: dict[Group, Fit]
    ridge: float = 0.0
    source: str = "compressed"
    skip_first: int = 1
    site: str = "mlp"
    seconds: float = 0.0
    prior: str = "identity"

    @property
    def note(self) -> str:
        """A warning when a full matrix was fitted from few tokens (it then overfits the calibration rows)."""
        small = [f for f in self.fits.values() if f.kind == "matrix" and f.tokens < FEW_TOKENS * f.tensor.shape[0]]
        if not small or self.ridge > 0:
            return ""
        f = small[0]
        return (f"lstsq fitted {f.tensor.shape[0] ** 2:,} numbers per window from {f.tokens:,} calibration tokens "
                f"(fewer than {FEW_TOKENS} per dimension): it overfits them; raise merge.fit_samples or set "
                "merge.ridge")

    def record(self, tensors_file: str | None = None) -> dict:
        """The plan's `compensation` entry (JSON)."""
        return {"method": self.method, "ridge": self.ridge, "ridge_prior": self.prior, "input": self.source,
                "skip_first": self.skip_first,
                "site": self.site, "seconds": round(self.seconds, 2), "tensors_file": tensors_file,
                "note": self.note or None, "windows": [f.record() for _, f in sorted(self.fits.items())]}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: f.tensor.contiguous() for f in self.fits.values()}

    def attach(self, plan) -> None:
        """Put this compensation into a `plan.Plan` (its JSON record and its tensors)."""
        plan.compensation = self.record()
        plan.tensors = self.tensors()


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


def fit_plan(cfg, method: str, site: Site, stepper: Stepper) -> Compensation:
    """Fit `method` for a plan's windows with the settings of `cfg.merge` (ridge, prior; the pass behind `stepper`
    has the input and skip_first)."""
    m = cfg.merge
    t0 = time.perf_counter()
    fits = fit_windows(stepper, method, site, ridge=m.ridge, prior=m.ridge_prior)
    return Compensation(method, fits, m.ridge, m.compensate_input, m.skip_first, site.module,
                        time.perf_counter() - t0, m.ridge_prior)
