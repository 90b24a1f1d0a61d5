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
"""

from __future__ import annotations

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
                          skip_first: int) -> list:
        """`compensation.CompSums` of each target window over all calibration rows, added in row order."""


@dataclass
class PlannedWindows:
    """A planner's answer: the selection, the merge method its windows are applied with, its evaluator."""

    selection: Selection
    merge: str
    evaluator: MemoEvaluator | None
    criterion: str
    search: str


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


def check_method_target(cfg) -> None:
    """One-line errors for a target a method cannot take (checked before any model loads)."""
    s = cfg.select
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
    """`Scoring` in this process, on a layer stack (`stack.py`) and one calibration set."""

    def __init__(self, stack, calib, attention: str = "global", matrix: np.ndarray | None = None,
                 wrap: Callable[[Evaluator], MemoEvaluator] = MemoEvaluator, kernel: str = "linear",
                 skip_first_tokens: int = 1):
        self.stack = stack
        self.calib = calib
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
                          skip_first: int) -> list:
        from swm_ray.compensation import compensation_sums

        return compensation_sums(self.stack, self.calib.input_ids, self.calib.batches, windows, merge,
                                 self.attention, fits, targets, source=source, skip_first=skip_first)

    def cka_matrix(self) -> np.ndarray:
        if self.matrix is None:
            from swm_ray.capture import compute_hsic_sums
            from swm_ray.similarity import cka_from_sums

            sums, _, _ = compute_hsic_sums(self.stack, self.calib.input_ids, self.calib.batches, **self.stats)
            self.matrix = cka_from_sums(sums)
        return self.matrix
