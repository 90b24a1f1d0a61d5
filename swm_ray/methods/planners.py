"""Every compression method is a planner: calibration signals in, the windows of a plan out.

A planner sees the model only through a `session.Scoring` provider, which gives it candidate evaluators
(criterion × merge method, over one memo of shared checks) and the signals of the run's one reference pass
(Block Influence, angular distances, the CKA matrix). `session.LocalScoring` computes them in this process on a
layer stack (grid trials, zoo tasks, tests); the Ray recipe's backend fans them out to the actor pool
(`compress`). The same planner, settings and calibration give the same windows either way: every score is a
sum over rows added exactly (`scoring.reduce_scores`). `method_needs` says what a method uses, so a run
declares it before its one reference pass.

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

from collections.abc import Callable
from dataclasses import dataclass

from swm_ray.config import METHODS  # noqa: F401 - the method names, re-exported for callers
from swm_ray.errors import UserError
from swm_ray.methods.selection import (
    MemoEvaluator,
    Selection,
    best_first,
    check_threshold,
    protected_set,
    search_threshold,
    select_windows,
)


def windows_with(groups, candidate) -> list[tuple[int, int]]:
    """The windows of the plan "current `groups`, with `candidate` (whole groups) merged into one layer"."""
    low, high = int(candidate[0]), int(candidate[1])
    kept = [(int(a), int(b)) for a, b in groups if b > a and not (low <= a and b <= high)]
    return sorted([*kept, (low, high)])


class CompensatedEvaluator:
    """Compensation-aware candidate checks: a candidate's score is the calibration NLL of the model with the
    candidate plan's windows merged and compensated (`method` lstsq or scale), each window fitted bottom-up on
    the fit rows with `cfg.merge`'s settings (as `compensate_plan` fits them), the fits folded in.

    A window's fit depends only on the windows below it (with `merge.compensate_input` original, on none), so
    fits are kept by (windows below, window). One step walks the current plan's fitted model up once
    (`FitPass`); at each candidate's bottom it forks that pass, so the candidate's fit and the refits of the
    windows above it start from the fitted model below the candidate, not from the embeddings; then one NLL
    pass on the planning rows (from the reference pass's cached inputs) scores it."""

    higher_is_better = False

    def __init__(self, cfg, scoring, merge: str, method: str, site):
        if method not in ("lstsq", "scale"):
            raise UserError(f"select.compensate_aware scores candidates after their compensation: set "
                            f"--compensate lstsq or scale (got {method})")
        self.cfg, self.scoring, self.merge, self.method, self.site = cfg, scoring, merge, method, site
        self.fit_cache: dict = {}  # (windows below, window) -> compensation.Fit
        self.fits_computed = 0
        self.misses = 0

    def _key(self, windows, w):
        compressed = self.cfg.merge.compensate_input == "compressed"
        return (tuple(x for x in sorted(windows) if x[1] < w[0]) if compressed else (), w)

    def _fit(self, fp, windows, fits: dict, stop: int | None = None) -> None:
        """Advance `fp` (to its end, or to just below original layer `stop`), solving every window it stops at."""
        from swm_ray.methods.compensation import make_fit

        m = self.cfg.merge
        fit = None
        while (got := fp.advance(fit, stop)) is not None:
            w, sums = got
            fit = fits[w] = self.fit_cache[self._key(windows, w)] = make_fit(w, sums, self.method, self.site,
                                                                             m.ridge, m.ridge_prior)
            self.fits_computed += 1

    def plan_fits(self, windows) -> dict:
        """The fits of a plan's windows, bottom-up, each from the sums with the fits below folded in."""
        windows = sorted(tuple(w) for w in windows)
        fits = {w: self.fit_cache[self._key(windows, w)] for w in windows if self._key(windows, w) in self.fit_cache}
        todo = [w for w in windows if w not in fits]
        if todo:
            m = self.cfg.merge
            fp = self.scoring.fit_pass(windows, self.merge, source=m.compensate_input, skip_first=m.skip_first,
                                       fits=fits, targets=todo)
            self._fit(fp, windows, fits)
        return fits

    def score(self, groups, candidates):
        from swm_ray.compute.planrun import windows_of

        m = self.cfg.merge
        current = windows_of(groups)
        live = {self._key(current, w) for w in current}
        self.fit_cache = {k: f for k, f in self.fit_cache.items() if set(k[0]) <= set(current) or k in live}
        fits = {w: self.fit_cache[self._key(current, w)] for w in current if self._key(current, w) in self.fit_cache}
        main = self.scoring.fit_pass(current, self.merge, source=m.compensate_input, skip_first=m.skip_first,
                                     fits=fits, targets=[w for w in current if w not in fits])
        out: dict = {}
        forks = [main]
        try:
            for c in sorted((tuple(c) for c in candidates), key=lambda c: c[0]):
                self._fit(main, current, fits, stop=c[0])  # the current fitted model up to the candidate's bottom
                windows = windows_with(groups, c)
                below = {w: f for w, f in fits.items() if w[1] < c[0]}
                mine = dict(below)
                todo = [w for w in windows if w[0] >= c[0]]
                cached = {w: self.fit_cache[self._key(windows, w)] for w in todo
                          if self._key(windows, w) in self.fit_cache}
                if len(cached) == len(todo):
                    mine.update(cached)
                else:
                    forks.append(main.fork(windows, todo))
                    self._fit(forks[-1], windows, mine)
                out[c] = float(self.scoring.plan_loss(windows, self.merge, mine))
                self.misses += 1
        finally:  # the main pass keeps the original's layer outputs for its forks
            for fp in forks:
                fp.close()
        return [out[tuple(c)] for c in candidates]

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
        from swm_ray.plan.plan import Plan

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
        return any(spec.partition(":")[0] != "none" for spec in cfg.select.auto_compensate) or any(
            "+" in spec for spec in cfg.select.auto_candidates)
    return method_compensation(cfg) != "none"


THEN_WIDTH_FITTED_ONLY = ("select.then_width takes no fitted map, and every auto candidate is a fitted one: list a "
                          "plain candidate in select.auto_candidates (e.g. replaceme beside replaceme+lstsq) and "
                          "none in select.auto_compensate")


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
    if s.method == "auto" and cfg.merge.compensate is not None:
        raise UserError(f"--compensate {cfg.merge.compensate} is a setting of one method; --method auto (the "
                        f"default) fits what select.auto_compensate lists (now {', '.join(s.auto_compensate)}): "
                        f"set that, e.g. --set 'select.auto_compensate=[none,{cfg.merge.compensate}]', or give "
                        f"--method")
    if s.method == "auto" and s.then_width is not None and ("none" not in s.auto_compensate
                                                            or all("+" in c for c in s.auto_candidates)):
        raise UserError(THEN_WIDTH_FITTED_ONLY)
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


def plan_windows(cfg, scoring, n_layers: int, n_remove: int | None,
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
            ev = scoring.evaluator(criterion, merge)
        return PlannedWindows(select_windows(cfg, ev, n_layers, n_remove, on_event), merge, ev, criterion, s.search)
    if s.method == "shortgpt":
        from swm_ray.methods.baselines import shortgpt_windows

        windows = shortgpt_windows(scoring.block_influence(), n_remove, protected=protected_set(s, n_layers))
        sel = Selection(windows=list(windows), scores=[], note="ShortGPT: the layers of lowest Block Influence")
        return PlannedWindows(sel, merge, None, criterion, "rank")
    if s.method == "replaceme":
        from swm_ray.methods.baselines import replaceme_windows

        windows, dist = replaceme_windows(scoring.angular_distances(s.replaceme_tokens), n_remove,
                                          protected=protected_set(s, n_layers))
        at = "the last token" if s.replaceme_tokens == "last" else "every token but the first"
        sel = Selection(windows=list(windows), scores=[dist],
                        note=f"ReplaceMe: the block whose input and output are closest in angle at {at}")
        return PlannedWindows(sel, merge, None, criterion, "rank")
    ev = scoring.evaluator(criterion, merge)
    if s.method == "sleb":
        # merging positions p-1, p with keep-first drops the layer at p: greedy block removal by calibration
        # loss; the last layer may go (SLEB's own rule), layer 0 may not (a keep-first plan keeps it)
        sel = best_first(n_layers, ev, layers_to_remove=n_remove, threshold=s.threshold,
                         protected=sorted(set(s.protected_layers)), on_event=on_event)
        return PlannedWindows(sel, merge, ev, criterion, "best-first")
    if s.method == "shortened-ppl":
        from swm_ray.methods.baselines import shortened_ppl

        sel = shortened_ppl(n_layers, ev, n_remove, protected=sorted(set(s.protected_layers)))
        return PlannedWindows(sel, merge, ev, criterion, "rank")
    return PlannedWindows(_laco(cfg, ev, n_layers, n_remove, on_event), merge, ev, criterion, "laco")


def _laco(cfg, ev, n_layers: int, n_remove: int | None, on_event) -> Selection:
    from swm_ray.methods.baselines import laco

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


def compensate_plan(cfg, scoring, windows, merge: str, site, method: str | None = None):
    """The `compensation.Compensation` of a plan's windows (None when the method is none or nothing was cut),
    fitted bottom-up in one pass over the fit rows (`scoring.fit_pass`), with the settings of `cfg.merge`."""
    from swm_ray.methods.compensation import fit_plan

    method = method or method_compensation(cfg)
    if method == "none" or not windows:
        return None
    m = cfg.merge
    fp = scoring.fit_pass(windows, merge, source=m.compensate_input, skip_first=m.skip_first)
    return fit_plan(cfg, method, site, fp.advance)


def method_needs(cfg, method: str | None = None):
    """What the planner of `method` (default `cfg.select.method`; auto: every candidate) takes from the reference
    pass (`refpass.Needs`), so a run declares it before the one pass."""
    from swm_ray.compute.refpass import Needs

    s = cfg.select
    method = method or s.method
    stats = {"kernel": cfg.stats.kernel, "skip_first_tokens": cfg.stats.skip_first_tokens}
    if method == "auto":
        from swm_ray.methods.candidates import candidate_config

        needs = Needs(**stats)
        for spec in s.auto_candidates:  # as each candidate will ask (`candidate_config`: auto's ReplaceMe angles)
            needs = needs | method_needs(candidate_config(cfg, spec))
        return needs
    if method == "shortgpt":
        return Needs(influence=True, **stats)
    if method == "replaceme":
        return Needs(angular=True, angular_tokens=s.replaceme_tokens, **stats)
    if method == "swm" and s.compensate_aware:
        return Needs(checks=True, **stats)
    criterion = s.criterion if method == "swm" else ("output" if method == "laco" else "nll")
    if criterion == "cka":
        return Needs(hsic=True, **stats)
    return Needs(checks=True, final=criterion in ("output", "kl"), logp=criterion == "kl", **stats)
