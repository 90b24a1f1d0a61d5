"""Every compression method is a planner: calibration signals in, the windows of a plan out.

A planner sees the model only through a `Scoring` provider, which gives it candidate evaluators (criterion ×
merge method, memoised) and Block Influence. `LocalScoring` computes them in this process on a layer stack
(grid trials, zoo tasks, tests); the Ray recipe's provider fans them out to the actor pool (`compress`). The
same planner, settings and calibration give the same windows either way: every score is a sum over rows
added exactly (`scoring.reduce_scores`).

Methods:
- `swm`: the selected criterion (output, kl, nll, cka) with the selected search and merge (the default);
- `shortgpt`: drop the layers of lowest Block Influence (ShortGPT);
- `sleb`: remove one block at a time, each time the one whose removal keeps the calibration loss lowest
  (best-first under `nll` with keep-first pairs; layer 0 is never removed);
- `laco`: LaCo's layer collapse, C consecutive layers merged with the paper formula, top-down with interval
  I, accepted while the output cosine stays above T (`baselines.laco`);
- `shortened-ppl`: Shortened-LLM's one-shot PPL ranking of single-block removals (`baselines.shortened_ppl`);
- `replaceme`: ReplaceMe's block, the n consecutive layers whose input and output are closest in angle at the
  last token (`baselines.replaceme_windows`), removed; compensated with `lstsq` unless `merge.compensate` says
  otherwise.

Any plan can then be compensated (`compensate_plan`, `merge.compensate`): a linear map per window, fitted
from sums over the calibration rows that the same `Scoring` provider computes (`compensation.py`).
With `select.compensate_aware` the `swm` search scores every candidate after its compensation
(`CompensatedEvaluator`): the candidate plan's windows fitted bottom-up on the calibration rows, then that
compensated model's mean next-token NLL on the same rows (lower is better). Both are sums over rows on the
same provider (actors or this process), so the windows do not depend on how rows were split.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from swm_ray.config import METHODS  # noqa: F401 - the method names, re-exported for callers
from swm_ray.errors import UserError
from swm_ray.selection import (
    CkaEvaluator,
    Evaluator,
    MemoEvaluator,
    Selection,
    best_first,
    check_threshold,
    protected_set,
    search_threshold,
    select_windows,
)


class Scoring(Protocol):
    """What planners need from a model and its calibration rows."""

    def evaluator(self, criterion: str, merge: str) -> MemoEvaluator:
        """A memoised candidate evaluator (the same object for the same arguments)."""

    def block_influence(self) -> np.ndarray:
        """(L,) mean per-token 1 − cos(layer input, layer output) over the calibration rows."""

    def cka_matrix(self) -> np.ndarray:
        """The (L+1)² CKA matrix of the calibration set."""

    def angular_distances(self) -> np.ndarray:
        """(L+1)² mean angular distance between hidden states at the last token (ReplaceMe's signal)."""

    def compensation_sums(self, windows, merge: str, fits: dict, targets: list, source: str,
                          skip_first: int, quiet: bool = False) -> list:
        """`compensation.CompSums` of each target window over all the fit's calibration rows (`merge.fit_samples`),
        added in row order (`quiet`: one of many calls inside a larger step; no progress of its own)."""

    def compensated_evaluator(self, cfg, merge: str, method: str) -> MemoEvaluator:
        """A memoised `CompensatedEvaluator` over the calibration rows (the same object for the same arguments)."""


def windows_with(groups, candidate) -> list[tuple[int, int]]:
    """The windows of the plan "current `groups`, with `candidate` (whole groups) merged into one layer"."""
    low, high = int(candidate[0]), int(candidate[1])
    kept = [(int(a), int(b)) for a, b in groups if b > a and not (low <= a and b <= high)]
    return sorted([*kept, (low, high)])


class CompensatedEvaluator:
    """Compensation-aware candidate checks: a candidate's score is the calibration NLL of the model with the
    candidate plan's windows merged and compensated (`method` lstsq or scale), each window fitted bottom-up on
    the calibration rows with `cfg.merge`'s settings (as `compensate_plan` fits them), the fits folded in
    (`loss`). A window's fit depends only on the windows below it (with `merge.compensate_input` original, on
    none), so fits are kept by (windows below, window): a check fits the candidate window and the windows
    above it (their input changed), then runs one NLL pass. Kept fits whose windows below are no longer all
    in the current plan are dropped as the search moves on."""

    higher_is_better = False

    def __init__(self, cfg, scoring: Scoring, merge: str, method: str, site, loss: Callable,
                 progress: Callable | None = None):
        """`progress(n)`: a context manager yielding a function called once per candidate checked."""
        if method not in ("lstsq", "scale"):
            raise UserError(f"select.compensate_aware scores candidates after their compensation: set "
                            f"--compensate lstsq or scale (got {method})")
        self.cfg, self.scoring, self.merge, self.method, self.site, self.loss = cfg, scoring, merge, method, site, loss
        self.fit_cache: dict = {}  # (windows below, window) -> compensation.Fit
        self.fits_computed = 0
        self.progress = progress or (lambda n: contextlib.nullcontext(lambda: None))

    def plan_fits(self, windows) -> dict:
        """The fits of a plan's windows, bottom-up, each from the sums with the fits below folded in."""
        from swm_ray.compensation import make_fit

        m = self.cfg.merge
        compressed = m.compensate_input == "compressed"
        order = sorted(tuple(w) for w in windows)
        fits: dict = {}
        for w in order:
            key = (tuple(x for x in order if x[1] < w[0]) if compressed else (), w)
            fit = self.fit_cache.get(key)
            if fit is None:
                (sums,) = self.scoring.compensation_sums(order, self.merge, dict(fits) if compressed else {}, [w],
                                                         m.compensate_input, m.skip_first, quiet=True)
                fit = self.fit_cache[key] = make_fit(w, sums, self.method, self.site, m.ridge, m.ridge_prior)
                self.fits_computed += 1
            fits[w] = fit
        return fits

    def score(self, groups, candidates):
        current = {tuple(g) for g in groups if g[1] > g[0]}
        self.fit_cache = {k: f for k, f in self.fit_cache.items() if set(k[0]) <= current}
        out = []
        with self.progress(len(candidates)) as advance:
            for c in candidates:
                windows = windows_with(groups, c)
                out.append(float(self.loss(windows, self.merge, self.plan_fits(windows))))
                advance()
        return out

    def commit(self, groups, window) -> None:  # the candidates' groups say everything: no state to move
        pass


@dataclass
class PlannedWindows:
    """A planner's answer: the selection, the merge method its windows are applied with, its evaluator."""

    selection: Selection
    merge: str
    evaluator: MemoEvaluator | None
    criterion: str
    search: str

    def plan(self, n_layers: int, source: str, revision, method: str, attention: str, params_before: int,
             extra: dict | None = None, windows=None, merge: str | None = None):
        """The `Plan` that records this answer (`windows`/`merge` where a caller chose others, as auto does)."""
        from swm_ray.plan import Plan

        sel = self.selection
        return Plan(windows=[list(w) for w in (sel.windows if windows is None else windows)],
                    num_layers_before=n_layers, merge=merge or self.merge, source_model=source,
                    source_revision=revision, method=method, attention=attention, criterion=self.criterion,
                    search=self.search, threshold=sel.threshold, similarities=sel.scores,
                    params_before=params_before, extra=dict(extra or {}))


def method_signals(cfg) -> tuple[str, str]:
    """(criterion, merge method) the method of `cfg.select.method` scores and merges with."""
    method = cfg.select.method
    return {"swm": (cfg.select.criterion, cfg.merge.method), "auto": ("auto", "auto"), "sleb": ("nll", "keep-first"),
            "laco": ("output", "paper"), "shortened-ppl": ("nll", "keep-first"),
            "shortgpt": ("block-influence", "keep-first"), "replaceme": ("angular", "keep-first")}[method]


def method_compensation(cfg) -> str:
    """The compensation a run applies: `merge.compensate`, else the method's own (lstsq for replaceme)."""
    if cfg.merge.compensate is not None:
        return cfg.merge.compensate
    return "lstsq" if cfg.select.method == "replaceme" else "none"


def may_compensate(cfg) -> bool:
    """Whether a run may fit a compensation (its own method's, or one of auto's): it then draws the further
    calibration rows of `merge.fit_samples` (`data.calibration_sets`)."""
    if cfg.select.method == "auto":
        return any(spec.partition(":")[0] != "none" for spec in cfg.select.auto_compensate)
    return method_compensation(cfg) != "none"


def check_method_target(cfg) -> None:
    """One-line errors for a target a method cannot take (checked before any model loads)."""
    s = cfg.select
    if s.compensate_aware:
        if s.method != "swm":
            raise UserError(f"select.compensate_aware is a setting of --method swm's search, not of --method "
                            f"{s.method}: use --method swm or drop it")
        if method_compensation(cfg) not in ("lstsq", "scale"):
            raise UserError("select.compensate_aware scores candidates after their compensation: give --compensate "
                            "lstsq or scale")
        if s.threshold is not None:
            check_threshold("nll", s.threshold)
    if s.method == "auto" and s.threshold is not None:
        raise UserError("--method auto (the default) compares methods at one size: give --layers or --ratio, or "
                        "--method swm to merge to a threshold")
    if s.method in ("shortgpt", "shortened-ppl", "replaceme") and s.threshold is not None:
        raise UserError(f"--method {s.method} ranks layers once: give --layers or --ratio, not --threshold")
    if s.method in ("laco", "sleb") and s.threshold is not None:
        check_threshold("output" if s.method == "laco" else "nll", s.threshold)


def check_method_count(cfg, n_layers: int, n_remove: int | None) -> None:
    """Before any model loads: a layer count the method can reach on this depth."""
    s = cfg.select
    if s.method == "shortened-ppl" and n_remove is not None:
        eligible = [i for i in range(4, n_layers - 2) if i not in set(s.protected_layers)]
        if len(eligible) < n_remove:
            raise UserError(f"--method shortened-ppl never removes blocks 0-3 and the last two: {len(eligible)} of "
                            f"{n_layers} may go, {n_remove} asked; ask for fewer layers")


def plan_windows(cfg, scoring: Scoring, n_layers: int, n_remove: int | None,
                 on_event: Callable | None = None) -> PlannedWindows:
    """Run the planner of `cfg.select.method` to its target (`n_remove` layers, else the threshold)."""
    s = cfg.select
    criterion, merge = method_signals(cfg)
    if s.method == "swm":
        if s.compensate_aware:
            comp = method_compensation(cfg)
            ev = scoring.compensated_evaluator(cfg, merge, comp)
            criterion = f"nll after {comp}"
        else:
            ev = scoring.evaluator(criterion, merge) if criterion != "cka" else MemoEvaluator(
                CkaEvaluator(scoring.cka_matrix()))
        return PlannedWindows(select_windows(cfg, ev, n_layers, n_remove, on_event), merge, ev, criterion, s.search)
    if s.method == "shortgpt":
        from swm_ray.baselines import shortgpt_windows

        windows = shortgpt_windows(scoring.block_influence(), n_remove, protected=protected_set(s, n_layers))
        sel = Selection(windows=list(windows), scores=[], note="ShortGPT: the layers of lowest Block Influence")
        return PlannedWindows(sel, merge, None, criterion, "rank")
    if s.method == "replaceme":
        from swm_ray.baselines import replaceme_windows

        windows, dist = replaceme_windows(scoring.angular_distances(), n_remove,
                                          protected=protected_set(s, n_layers))
        sel = Selection(windows=list(windows), scores=[dist],
                        note="ReplaceMe: the block whose input and output are closest in angle at the last token")
        return PlannedWindows(sel, merge, None, criterion, "rank")
    ev = scoring.evaluator(criterion, merge)
    if s.method == "sleb":
        # merging positions p-1, p with keep-first drops the layer at p: greedy block removal by calibration
        # loss; the last layer may go (SLEB's own rule), layer 0 may not (a keep-first plan keeps it)
        sel = best_first(n_layers, ev, layers_to_remove=n_remove, threshold=s.threshold,
                         protected=sorted(set(s.protected_layers)), on_event=on_event)
        return PlannedWindows(sel, merge, ev, criterion, "best-first")
    if s.method == "shortened-ppl":
        from swm_ray.baselines import shortened_ppl

        sel = shortened_ppl(n_layers, ev, n_remove, protected=sorted(set(s.protected_layers)))
        return PlannedWindows(sel, merge, ev, criterion, "rank")
    return PlannedWindows(_laco(cfg, ev, n_layers, n_remove, on_event), merge, ev, criterion, "laco")


def _laco(cfg, ev, n_layers: int, n_remove: int | None, on_event) -> Selection:
    from swm_ray.baselines import laco

    s = cfg.select

    def run(t: float, report=None) -> Selection:
        return laco(n_layers, ev, merge_layers=s.laco_layers, interval=s.laco_interval, threshold=t,
                    protected=protected_set(s, n_layers), on_event=report)

    if n_remove is None:
        return run(s.threshold, on_event)
    sel = search_threshold(run, n_remove, 0.0, 1.0, ev.higher_is_better)
    for event, window, score in sel.trace:
        if on_event:
            on_event(event, window, score)
    return sel


def compensate_plan(cfg, scoring: Scoring, windows, merge: str, site, method: str | None = None):
    """The `compensation.Compensation` of a plan's windows (None when the method is none or nothing was cut),
    fitted bottom-up from sums the `scoring` provider computes, with the settings of `cfg.merge`."""
    from swm_ray.compensation import fit_plan

    method = method or method_compensation(cfg)
    if method == "none" or not windows:
        return None
    m = cfg.merge

    def sums_for(fits, targets):
        return scoring.compensation_sums(windows, merge, fits, targets, m.compensate_input, m.skip_first)

    return fit_plan(cfg, method, windows, merge, site, sums_for)


class LocalScoring:
    """`Scoring` in this process, on a layer stack (`stack.py`), the planners' calibration rows and the
    compensation fit's (`fit_calib`, default the same rows: `data.CalibrationSets`)."""

    def __init__(self, stack, calib, attention: str = "global", matrix: np.ndarray | None = None,
                 wrap: Callable[[Evaluator], MemoEvaluator] = MemoEvaluator, kernel: str = "linear",
                 skip_first_tokens: int = 1, fit_calib=None):
        self.stack = stack
        self.calib = calib
        self.fit_calib = calib if fit_calib is None else fit_calib
        self.attention = attention
        self.matrix = matrix
        self.stats = {"kernel": kernel, "skip_first_tokens": skip_first_tokens}
        self.wrap = wrap
        self._evaluators: dict[tuple[str, str], MemoEvaluator] = {}
        self._influence: np.ndarray | None = None
        self._angular: np.ndarray | None = None

    def evaluator(self, criterion: str, merge: str) -> MemoEvaluator:
        from swm_ray.scoring import LocalEvaluator, ShardScorer

        key = (criterion, merge)
        if key not in self._evaluators:
            scorer = ShardScorer(self.stack, self.calib.input_ids, criterion, merge, attention=self.attention)
            self._evaluators[key] = self.wrap(LocalEvaluator([scorer], criterion))
        return self._evaluators[key]

    def block_influence(self) -> np.ndarray:
        from swm_ray.baselines import block_influence

        if self._influence is None:
            self._influence = block_influence(self.stack, self.calib.input_ids, self.calib.batches)
        return self._influence

    def angular_distances(self) -> np.ndarray:
        from swm_ray.baselines import angular_distances

        if self._angular is None:
            self._angular = angular_distances(self.stack, self.calib.input_ids, self.calib.batches)
        return self._angular

    def compensation_sums(self, windows, merge: str, fits: dict, targets: list, source: str,
                          skip_first: int, quiet: bool = False) -> list:
        from swm_ray.compensation import compensation_sums

        return compensation_sums(self.stack, self.fit_calib.input_ids, self.fit_calib.batches, windows, merge,
                                 self.attention, fits, targets, source=source, skip_first=skip_first)

    def compensated_evaluator(self, cfg, merge: str, method: str) -> MemoEvaluator:
        from swm_ray.auto import LocalValidation
        from swm_ray.compensation import stack_site

        key = (f"nll+{method}", merge)
        if key not in self._evaluators:
            loss = LocalValidation(self.stack, self.calib, self.attention)
            self._evaluators[key] = self.wrap(CompensatedEvaluator(cfg, self, merge, method, stack_site(self.stack),
                                                                   loss))
        return self._evaluators[key]

    def cka_matrix(self) -> np.ndarray:
        if self.matrix is None:
            from swm_ray.capture import compute_hsic_sums
            from swm_ray.similarity import cka_from_sums

            sums, _, _ = compute_hsic_sums(self.stack, self.calib.input_ids, self.calib.batches, **self.stats)
            self.matrix = cka_from_sums(sums)
        return self.matrix
