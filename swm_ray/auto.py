"""`--method auto`: run several planners to the same target and keep the plan with the lowest loss on
calibration rows that no planner saw.

A default chosen on one model family loses to a plain baseline on another (BENCHMARKS.md: on a Gemma-style
model with post-norms the best-first `reference` windows score 343 where `keep-first` scores 99.9). `auto`
makes the default depend on a measurement on the user's own model and text instead of on the architecture
the defaults were tuned on:

1. The calibration set is drawn with `select.auto_validation` extra rows (`data.calibration_sets`); the
   planners see only the first `data.samples` rows, the compensation fits those and the further rows of
   `merge.fit_samples`; the validation rows are held out from both.
2. Every candidate (`select.auto_candidates`: a method, for `swm` optionally `/MERGE`) plans to the target;
   every plan is then fitted with every compensation of `select.auto_compensate` (on the planning rows).
3. Each (plan, compensation) is run on the validation rows: its next-token NLL per token, summed per row in
   float64 and added with `math.fsum` (independent of how rows were split over actors).
4. The lowest validation NLL wins; ties go to the earlier candidate. `plan.json` records every candidate's
   validation loss and time (`extra.auto`).

`plan_nll` is the only model computation here; it runs on a layer stack (in memory or streaming), so an actor
computes it on its minibatches exactly as the driver would in one process.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from swm_ray.errors import UserError
from swm_ray.selection import Group


# -- the validation loss of a plan ---------------------------------------------------------------------------
@torch.inference_mode()
def plan_nll(stack, input_ids: np.ndarray, batches: Sequence[tuple[int, int]], windows: Sequence[Sequence[int]],
             merge: str, attention: str, fits: Mapping | None = None) -> list[tuple[np.ndarray, int]]:
    """Per minibatch: (per-row next-token NLL sums in nats, float64; predicted tokens) of the model that the
    plan (`windows` merged with `merge`, `fits` folded) makes of `stack`. Layer-major: a streaming stack
    reads each layer once per call."""
    from swm_ray.compensation import _fitted_layer, stack_site
    from swm_ray.merge import new_layer_sources

    fits = {tuple(int(v) for v in w): f for w, f in (fits or {}).items()}
    site = stack_site(stack) if fits else None
    chunks = [torch.tensor(np.asarray(input_ids[a:b])) for a, b in batches]
    pros = [stack.prologue(c.to(stack.device)) for c in chunks]
    hidden = [p.hidden for p in pros]
    for low, high, anchor in new_layer_sources(stack.num_layers, windows, stack.layer_types, attention):
        if low == high:
            with stack.layer(low) as layer:
                hidden = [stack.run(layer, h, p.kwargs[low]) for h, p in zip(hidden, pros)]
            continue
        with _fitted_layer(stack, low, high, merge, attention, fits.get((low, high)), site) as layer:
            hidden = [stack.run(layer, h, p.kwargs[anchor]) for h, p in zip(hidden, pros)]
    out = []
    for h, ids in zip(hidden, chunks):
        logp = F.log_softmax(stack.logits(stack.final(h)).float(), dim=-1)
        ids = ids.to(logp.device)
        nll = -logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)  # (b, T-1)
        out.append((nll.double().sum(1).cpu().numpy(), int(nll.numel())))
    return out


def mean_nll(parts: Sequence[tuple[np.ndarray, int]]) -> float:
    """Mean NLL per token from per-minibatch (per-row sums, tokens), minibatches in row order; `math.fsum` adds
    exactly, so the value does not depend on how minibatches were spread over actors."""
    total = math.fsum(float(v) for sums, _ in parts for v in sums)
    return total / max(sum(c for _, c in parts), 1)


# -- candidates ----------------------------------------------------------------------------------------------
def parse_candidate(spec: str) -> tuple[str, str | None]:
    """`METHOD` or `swm/MERGE` -> (method, merge or None)."""
    from swm_ray.config import AUTO_METHODS, MERGE_METHODS

    method, _, merge = spec.partition("/")
    if method not in AUTO_METHODS:
        raise UserError(f"auto candidate {spec!r}: {method!r} is not a method auto can run; choose among "
                        f"{', '.join(AUTO_METHODS)} (swm may name a merge: swm/keep-first)")
    if merge and (method != "swm" or merge not in MERGE_METHODS):
        raise UserError(f"auto candidate {spec!r}: only swm takes a merge method (swm/{'|'.join(MERGE_METHODS)})")
    return method, merge or None


def candidate_config(cfg, spec: str):
    """The run config of one candidate: `cfg` with its method (and merge) set; compensation left to auto."""
    method, merge = parse_candidate(spec)
    select = cfg.select.model_copy(update={"method": method})
    merge_cfg = cfg.merge.model_copy(update={"method": merge or cfg.merge.method, "compensate": "none"})
    return cfg.model_copy(update={"select": select, "merge": merge_cfg})


def compensation_config(cfg, spec: str):
    """(compensation method, run config) of an `auto_compensate` entry: `lstsq:RIDGE` sets merge.ridge."""
    method, colon, ridge = spec.partition(":")
    if not colon:
        return method, cfg
    return method, cfg.model_copy(update={"merge": cfg.merge.model_copy(update={"ridge": float(ridge)})})


@dataclass
class Outcome:
    """One (plan, compensation) candidate and what it measured."""

    name: str
    method: str
    compensate: str
    windows: list[Group] = field(default_factory=list)
    merge: str = ""
    val_nll: float | None = None
    seconds: float = 0.0
    error: str | None = None
    planned: object = None  # planners.PlannedWindows
    compensation: object = None  # compensation.Compensation

    def record(self) -> dict:
        return {"candidate": self.name, "method": self.method, "compensate": self.compensate, "merge": self.merge,
                "windows": [list(w) for w in self.windows],
                "validation_nll": None if self.val_nll is None else round(self.val_nll, 6),
                "validation_ppl": None if self.val_nll is None else round(math.exp(self.val_nll), 4),
                "seconds": round(self.seconds, 2), "error": self.error}


@dataclass
class AutoResult:
    chosen: Outcome
    outcomes: list[Outcome]
    original_nll: float
    seconds: float
    validation_rows: int
    validation_tokens: int

    def record(self) -> dict:
        """plan.json's `extra.auto`: every candidate's validation loss, what was chosen, what auto cost."""
        return {"chosen": self.chosen.name, "original_validation_nll": round(self.original_nll, 6),
                "original_validation_ppl": round(math.exp(self.original_nll), 4),
                "validation_rows": self.validation_rows, "validation_tokens": self.validation_tokens,
                "seconds": round(self.seconds, 2), "candidates": [o.record() for o in self.outcomes]}


PlanLoss = Callable[[Sequence[Sequence[int]], str, Mapping | None], float]


class LocalValidation:
    """`PlanLoss` in this process: `plan_nll` on a layer stack over the validation rows."""

    def __init__(self, stack, calib, attention: str = "global"):
        self.stack, self.calib, self.attention = stack, calib, attention
        self.rows = int(calib.input_ids.shape[0])
        self.tokens = 0

    def __call__(self, windows, merge: str, fits: Mapping | None = None) -> float:
        parts = plan_nll(self.stack, self.calib.input_ids, self.calib.batches, windows, merge, self.attention, fits)
        self.tokens = sum(c for _, c in parts)
        return mean_nll(parts)


def effective_spec(spec: str, layer_names: Collection[str]) -> str:
    """The candidate a spec computes on layers with these tensor names: `swm/consistent` is `swm` (the
    reference merge) where no norm follows a weight (Llama, Mistral, Qwen2), so it is not searched twice."""
    from swm_ray.merge import follows_weight

    method, merge = parse_candidate(spec)
    if method == "swm" and merge in (None, "reference", "consistent") and layer_names and \
            not any(follows_weight(n, layer_names) for n in layer_names):
        return "swm"
    return spec if merge != "reference" else "swm"


def run_auto(cfg, scoring, n_layers: int, n_remove: int, site_for: Callable[[], object], plan_loss: PlanLoss,
             report: Callable[[str], None] | None = None, layer_names: Collection[str] = ()) -> AutoResult:
    """Every candidate of `cfg.select.auto_candidates` planned to `n_remove` layers on `scoring` (the planning
    rows), fitted with every compensation of `cfg.select.auto_compensate`, scored by `plan_loss` (mean NLL on
    the validation rows). A candidate that fails (a target it cannot reach, a fold it refuses) is recorded
    with its error and left out; when every one fails, the first error is raised. `layer_names` (one decoder
    layer's tensor names) let a candidate that equals an earlier one on this architecture be skipped."""
    from swm_ray.planners import compensate_plan, plan_windows

    say = report or (lambda _msg: None)
    site_for = functools.cache(site_for)  # one fold site for every candidate's fit
    t_all = time.perf_counter()
    original = plan_loss([], "reference", None)
    say(f"original model: validation NLL {original:.4f} (ppl {math.exp(original):.2f})")
    outcomes: list[Outcome] = []
    done: dict[str, str] = {}  # effective spec -> the spec that ran it
    for spec in cfg.select.auto_candidates:
        ccfg = candidate_config(cfg, spec)
        same = effective_spec(spec, layer_names)
        if same in done:
            say(f"{spec}: the same computation as {done[same]} on this architecture, not run again")
            continue
        done[same] = spec
        t0 = time.perf_counter()
        try:
            planned = plan_windows(ccfg, scoring, n_layers, n_remove)
        except UserError as e:
            outcomes.append(Outcome(spec, ccfg.select.method, "none", error=str(e),
                                    seconds=time.perf_counter() - t0))
            say(f"{spec}: {e}")
            continue
        t_plan = time.perf_counter() - t0
        windows = [tuple(w) for w in planned.selection.windows]
        for comp_spec in cfg.select.auto_compensate:
            name = spec if comp_spec == "none" else f"{spec}+{comp_spec}"
            comp_method, ridge_cfg = compensation_config(ccfg, comp_spec)
            o = Outcome(name, ccfg.select.method, comp_spec, windows, planned.merge, planned=planned)
            t1 = time.perf_counter()
            try:
                if not windows:
                    raise UserError("no window to merge at this target")
                comp = None
                if comp_method != "none":
                    comp = compensate_plan(ridge_cfg, scoring, windows, planned.merge, site_for(), comp_method)
                o.compensation = comp
                o.val_nll = plan_loss(windows, planned.merge, comp.fits if comp is not None else None)
            except UserError as e:
                o.error = str(e)
            o.seconds = (t_plan if comp_spec == cfg.select.auto_compensate[0] else 0.0) + time.perf_counter() - t1
            outcomes.append(o)
            say(f"{name}: windows {', '.join(f'{a}-{b}' for a, b in windows) or '-'}: "
                + (f"validation NLL {o.val_nll:.4f} (ppl {math.exp(o.val_nll):.2f})" if o.error is None
                   else f"skipped ({o.error})"))
    scored = [o for o in outcomes if o.error is None]
    if not scored:
        raise UserError(f"--method auto: no candidate reached the target; the first said: {outcomes[0].error}")
    chosen = min(scored, key=lambda o: o.val_nll)  # min keeps the first of equal values
    val_tokens = getattr(plan_loss, "tokens", 0)
    val_rows = getattr(plan_loss, "rows", 0)
    return AutoResult(chosen, outcomes, original, time.perf_counter() - t_all, val_rows, val_tokens)
