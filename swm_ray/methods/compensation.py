"""Compensation: a linear correction fitted on calibration rows and folded into the compressed model's weights,
so the output is still a plain model of the same architecture (ReplaceMe, arXiv 2505.02819; Prune&Comp,
arXiv 2507.18212).

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

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from swm_ray.compute.fitpass import CompSums
from swm_ray.edits.fold import Fit, Site
from swm_ray.edits.windows import Group
from swm_ray.errors import UserError

RIDGE_PRIORS = ("identity", "zero")  # what the ridge pulls T towards (`solve`)
FEW_TOKENS = 10  # a full d×d fit from fewer tokens per dimension overfits (SmolLM2, 1,270 tokens: BENCHMARKS.md)


def fit_kind(method: str, site: Site) -> str:
    """matrix | diagonal | scalar: the shape of T a method fits at a site."""
    if method == "scale":
        return "scalar"
    if method == "lstsq":
        return "diagonal" if site.diagonal_only else "matrix"
    raise ValueError(f"no fit for compensation {method!r}")


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


def make_fit(window: Group, sums: CompSums, method: str, site: Site, ridge: float = 0.0,
             prior: str = "identity") -> Fit:
    kind = fit_kind(method, site)
    tensor = torch.from_numpy(solve(sums, kind, ridge, prior)).to(torch.float32)
    d = sums.mtm.shape[0]
    t = as_matrix(kind, tensor.double().numpy(), d)  # the error of what is stored and folded
    scale = sums.gap if sums.gap > 0 else 1.0
    return Fit(tuple(window), kind, tensor, sums.tokens, residual(sums, np.eye(d)) / scale, residual(sums, t) / scale)


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


def fit_plan(cfg, method: str, site: Site, stepper: Stepper) -> Compensation:
    """Fit `method` for a plan's windows with the settings of `cfg.merge` (ridge, prior; the pass behind `stepper`
    has the input and skip_first)."""
    m = cfg.merge
    t0 = time.perf_counter()
    fits = fit_windows(stepper, method, site, ridge=m.ridge, prior=m.ridge_prior)
    return Compensation(method, fits, m.ridge, m.compensate_input, m.skip_first, site.module,
                        time.perf_counter() - t0, m.ridge_prior)
