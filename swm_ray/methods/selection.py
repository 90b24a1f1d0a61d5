"""Window selection: the paper's top-down loop (exact), best-first search, and threshold search for targets.

The model is seen as a list of *groups*: consecutive ranges of original decoder layers, each of which is
one layer of the current model (a single layer, or a merged window). Searches talk to an `Evaluator` that
scores candidate merges of consecutive groups (positions lo..hi of the current list) and is told when a
merge is committed. Evaluators: the CKA matrix (static), or the model itself (output cosine / KL, computed
by scorers on data shards; see `scoring.py`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from swm_ray.edits.windows import Group
from swm_ray.errors import UserError


class Evaluator(Protocol):
    higher_is_better: bool

    def score(self, groups: Sequence[Group], candidates: Sequence[Group]) -> list[float]:
        """Scores of merging each candidate (an original-layer range made of whole groups) into one layer,
        on top of the current `groups`."""

    def commit(self, groups: Sequence[Group], window: Group) -> None:
        """The window (whole groups) becomes one layer."""


def passes(score: float, threshold: float, higher_is_better: bool) -> bool:
    """The paper's test is strict (`sim > T`); KL accepts `KL <= T`."""
    return score > threshold if higher_is_better else score <= threshold


@dataclass
class Selection:
    """What a search decided: windows (original ranges, top first) and the score that accepted each."""

    windows: list[Group]
    scores: list[float]
    trace: list[tuple] = field(default_factory=list)  # (event, window, score) in order
    evaluations: int = 0
    threshold: float | None = None
    note: str = ""

    @property
    def removed(self) -> int:
        return sum(h - l for l, h in self.windows)


class MemoEvaluator:
    """Caches scores by (current groups, candidate): threshold searches re-run loops without recomputing.

    `entries()` / `load()` turn the cache into plain data and back (`--resume` keeps it beside the output);
    `on_new(entries)` is told about every batch of scores computed. `misses` counts the candidate checks this
    evaluator itself ran (loaded scores are not counted)."""

    def __init__(self, inner: Evaluator, on_new: Callable[[list], None] | None = None):
        self.inner = inner
        self.higher_is_better = inner.higher_is_better
        self.cache: dict = {}
        self.misses = 0
        self.on_new = on_new
        self._committed: tuple[Group, ...] | None = None

    def score(self, groups, candidates):
        key = tuple(tuple(g) for g in groups)
        todo = [tuple(c) for c in candidates if (key, tuple(c)) not in self.cache]
        if todo:
            self._sync(groups)
            fresh = list(zip(todo, self.inner.score(groups, todo)))
            for c, s in fresh:
                self.cache[(key, c)] = s
            self.misses += len(todo)
            if self.on_new is not None:
                self.on_new(self.entries())
        return [self.cache[(key, tuple(c))] for c in candidates]

    def entries(self) -> list:
        """The cache as JSON-able data: [[groups], [low, high], score] per entry, in insertion order."""
        return [[[list(g) for g in k], list(c), s] for (k, c), s in self.cache.items()]

    def load(self, entries: list) -> None:
        for groups, cand, score in entries:
            self.cache[(tuple(tuple(g) for g in groups), tuple(cand))] = float(score)

    def commit(self, groups, window):
        pass  # the inner evaluator is brought to the right state lazily, only when it must compute

    def _sync(self, groups) -> None:
        """Make the inner evaluator's current model equal `groups` (it can only merge, so rebuild if needed)."""
        target = tuple(groups)
        if self._committed == target:
            return
        reset = getattr(self.inner, "reset", None)
        if reset is not None:
            reset()
        state = initial_groups(sum(h - l + 1 for l, h in groups))
        for g in groups:
            if g[1] > g[0]:
                self.inner.commit(state, g)
                state = collapse(state, g)
        self._committed = target


def collapse(groups: Sequence[Group], window: Group) -> list[Group]:
    lo = next(i for i, g in enumerate(groups) if g[0] == window[0])
    hi = next(i for i, g in enumerate(groups) if g[1] == window[1])
    return list(groups[:lo]) + [window] + list(groups[hi + 1 :])


def initial_groups(num_layers: int) -> list[Group]:
    return [(i, i) for i in range(num_layers)]


def top_down(
    num_layers: int,
    threshold: float,
    ev: Evaluator,
    *,
    paper_loop: bool = True,
    protect_last: bool = True,
    max_steps: int = 10_000,
    protected: Sequence[int] = (),
    on_event: Callable[[str, Group, float | None], None] | None = None,
) -> Selection:
    """The authors' loop over current-model positions (README.md, `--paper`).

    A window that would merge a `protected` original layer away fails without being evaluated.

    `paper_loop=True` reproduces it exactly: the last layer is never merged (the loop starts at L−2, whatever
    `protect_last`), layer 0 is never the base of a committed window, a window still growing when `low`
    reaches −1 is dropped, and after a commit the next test is the no-op window [low, low].
    `paper_loop=False` applies the fixes: it starts at the last layer (L−1) unless `protect_last`, skips the
    no-op re-test and commits a pending window at the end. Both stop after `max_steps` tests (a no-op
    re-test that fails would otherwise loop forever).
    """
    groups = initial_groups(num_layers)
    sel = Selection([], [], threshold=threshold)
    emit = on_event or (lambda *a: None)
    prot = set(protected)
    high = num_layers - 1 if not paper_loop and not protect_last else num_layers - 2
    low = high - 1
    last_pass: float | None = None
    steps = 0
    while low >= 0:
        steps += 1
        if steps > max_steps:
            sel.note = f"stopped by the loop guard after {max_steps} tests"
            break
        window = (groups[low][0], groups[high][1])
        if low < high and any(window[0] <= p <= window[1] for p in prot):
            sim = -math.inf if ev.higher_is_better else math.inf  # would merge a protected layer away
        else:
            sim = ev.score(groups, [window])[0] if low <= high else float("nan")
            sel.evaluations += 1
        if passes(sim, threshold, ev.higher_is_better):
            sel.trace.append(("pass", window, sim))
            emit("pass", window, sim)
            last_pass = sim
            low -= 1
        elif low + 1 != high:
            commit = (groups[low + 1][0], groups[high][1]) if low + 1 <= high else None
            if commit is None:  # the no-op re-test failed: the authors' loop would spin here
                sel.trace.append(("noop-fail", window, sim))
                sel.note = "a no-op re-test failed (the authors' loop would never end); stopped"
                break
            sel.trace.append(("commit", commit, last_pass))
            emit("commit", commit, last_pass)
            ev.commit(groups, commit)
            groups = collapse(groups, commit)
            sel.windows.append(commit)
            sel.scores.append(last_pass)
            high = low
            if not paper_loop:  # skip the no-op re-test of the model just committed
                low -= 1
        else:
            sel.trace.append(("fail", window, sim))
            emit("fail", window, sim)
            high -= 1
            low -= 1
    if low < 0 and low + 1 < high and last_pass is not None and sel.trace and sel.trace[-1][0] == "pass":
        pending = (groups[low + 1][0], groups[high][1])
        if paper_loop:
            sel.trace.append(("drop", pending, last_pass))
            emit("drop", pending, last_pass)
        else:
            sel.trace.append(("commit", pending, last_pass))
            emit("commit", pending, last_pass)
            ev.commit(groups, pending)
            sel.windows.append(pending)
            sel.scores.append(last_pass)
    return sel


def mergeable_pairs(groups: Sequence[Group], protected: set[int]) -> list[Group]:
    """Adjacent group pairs whose union contains no protected original layer."""
    out = []
    for a, b in zip(groups, groups[1:]):
        if not any(a[0] <= p <= b[1] for p in protected):
            out.append((a[0], b[1]))
    return out


def best_first(
    num_layers: int,
    ev: Evaluator,
    *,
    layers_to_remove: int | None = None,
    threshold: float | None = None,
    protected: Sequence[int] = (),
    on_event: Callable[[str, Group, float | None], None] | None = None,
) -> Selection:
    """Each step scores every merge of two adjacent current layers (either may already be a window) and
    commits the best one anywhere in the model; stops at `layers_to_remove` or when the best fails T."""
    if layers_to_remove is None and threshold is None:
        raise ValueError("best_first needs a layer count or a threshold")
    groups = initial_groups(num_layers)
    sel = Selection([], [], threshold=threshold)
    emit = on_event or (lambda *a: None)
    prot = set(protected)
    while layers_to_remove is None or sel.removed < layers_to_remove:
        cands = mergeable_pairs(groups, prot)
        if not cands:
            sel.note = "no mergeable pair left"
            break
        scores = ev.score(groups, cands)
        sel.evaluations += len(cands)
        pick = max if ev.higher_is_better else min
        best = pick(range(len(cands)), key=lambda i: (scores[i], -i))
        window, score = cands[best], scores[best]
        if threshold is not None and not passes(score, threshold, ev.higher_is_better):
            sel.trace.append(("stop", window, score))
            emit("stop", window, score)
            break
        sel.trace.append(("commit", window, score))
        emit("commit", window, score)
        ev.commit(groups, window)
        groups = collapse(groups, window)
        kept = [i for i, w in enumerate(sel.windows) if not (window[0] <= w[0] and w[1] <= window[1])]
        sel.windows = [sel.windows[i] for i in kept] + [window]  # a window may absorb earlier ones
        sel.scores = [sel.scores[i] for i in kept] + [score]
    order = sorted(range(len(sel.windows)), key=lambda i: -sel.windows[i][0])
    sel.windows = [sel.windows[i] for i in order]
    sel.scores = [sel.scores[i] for i in order]
    return sel


def search_threshold(
    run: Callable[[float], Selection],
    target: int,
    lo: float,
    hi: float,
    higher_is_better: bool,
    iters: int = 12,
) -> Selection:
    """Find T whose selection removes `target` layers (or the closest count). removed(T) is not monotone:
    scan from the strict side (few removals) towards the loose side, then bisect the first bracket."""
    grid = [hi - (hi - lo) * k / 16 for k in range(17)]
    if not higher_is_better:
        grid = [lo + (hi - lo) * k / 16 for k in range(17)]
    best: Selection | None = None

    def consider(sel: Selection) -> None:
        nonlocal best
        if best is None or abs(sel.removed - target) < abs(best.removed - target) or (
            abs(sel.removed - target) == abs(best.removed - target) and sel.removed < best.removed
        ):
            best = sel

    prev_t, prev_n = grid[0], None
    for t in grid:
        sel = run(t)
        consider(sel)
        if sel.removed == target:
            return sel
        if sel.removed > target and prev_n is not None and prev_n < target:
            a, b = prev_t, t  # removed(a) < target < removed(b)
            for _ in range(iters):
                mid = (a + b) / 2
                s = run(mid)
                consider(s)
                if s.removed == target:
                    return s
                if s.removed < target:
                    a = mid
                else:
                    b = mid
            break
        prev_t, prev_n = t, sel.removed
    assert best is not None
    if best.removed != target:
        best.note = (best.note + "; " if best.note else "") + (
            f"no threshold removes exactly {target} layers; closest: {best.removed} at T={best.threshold:.4f}")
    return best


def layers_for_ratio(ratio: float, params_total: int, params_per_layer: int, num_layers: int) -> int:
    """Layers to remove so that the fraction of all parameters removed is closest to `ratio` (the paper)."""
    n = round(ratio * params_total / params_per_layer)
    if n < 1:
        raise UserError(f"--ratio {ratio}: less than one layer ({params_per_layer / params_total:.3f} of the "
                        f"parameters); ask for a larger ratio")
    if n > num_layers - 2:
        raise UserError(f"--ratio {ratio} would remove {n} of {num_layers} layers: the largest reachable is "
                        f"{(num_layers - 2) * params_per_layer / params_total:.3f}")
    return n


def check_threshold(criterion: str, t: float) -> None:
    """Cosine and CKA: (0, 1]; KL and NLL (nats per token): > 0."""
    bounded = criterion in ("output", "cka")
    if bounded and not (0 < t <= 1) or not bounded and not (t > 0 and math.isfinite(t)):
        rng = "(0, 1]" if bounded else "> 0"
        raise UserError(f"--threshold {t}: out of range for criterion {criterion!r} (must be {rng})")


class CkaEvaluator:
    """Windows judged by the CKA matrix alone: score([low, high]) = CKA(output of low, output of high).

    Matrix index i is the output of decoder layer i-1 (index 0 = embedding output). No forward passes.
    """

    higher_is_better = True

    def __init__(self, matrix):
        self.matrix = matrix

    def score(self, groups, candidates):
        return [float(self.matrix[lo + 1, hi + 1]) for lo, hi in candidates]

    def commit(self, groups, window):
        pass


def target_layers(cfg, params_total: int, params_per_layer: int, n_layers: int) -> int | None:
    """Layers to remove asked for by `cfg.select` (a RunConfig's) layers or ratio; None for a threshold run.

    `params_total` and `params_per_layer` count the model's parameters (from a checkpoint's headers or a
    loaded model)."""
    s = cfg.select
    if s.layers is not None:
        if s.layers > n_layers - 2:
            raise UserError(f"--layers {s.layers}: the model has {n_layers} decoder layers; at most "
                            f"{n_layers - 2} can be removed")
        return s.layers
    if s.ratio is not None:
        return layers_for_ratio(s.ratio, params_total, params_per_layer, n_layers)
    return None


def protected_set(select, n_layers: int) -> list[int]:
    """Original layers never merged away: `select.protected_layers`, plus the last one when `protect_last`."""
    return sorted(set(select.protected_layers) | ({n_layers - 1} if select.protect_last else set()))


def select_windows(cfg, ev, n_layers: int, n_remove: int | None, on_event=None) -> Selection:
    """Run the search of `cfg.select` (a RunConfig's) to its target: `n_remove` layers, else its threshold."""
    s = cfg.select
    if s.search == "best-first":
        return best_first(n_layers, ev, layers_to_remove=n_remove, threshold=s.threshold,
                          protected=protected_set(s, n_layers), on_event=on_event)
    paper_loop = s.paper_loop and s.criterion != "cka"  # CKA windows commit the pending window
    # the authors' loop never reaches the last layer; with the fixes, protect_last decides
    protected = sorted(set(s.protected_layers)) if paper_loop else protected_set(s, n_layers)

    def run(t: float, report=None) -> Selection:
        return top_down(n_layers, t, ev, paper_loop=paper_loop, protect_last=s.protect_last,
                        max_steps=s.max_steps, protected=protected, on_event=report)

    if n_remove is None:
        return run(s.threshold, on_event)
    # a compensation-aware search scores the compensated model's calibration NLL, whatever select.criterion says
    criterion = "nll" if s.compensate_aware else s.criterion
    lo, hi = {"kl": (0.0, 8.0), "nll": (0.0, 16.0)}.get(criterion, (0.0, 1.0))
    sel = search_threshold(run, n_remove, lo, hi, ev.higher_is_better)
    for event, window, score in sel.trace:
        if on_event:
            on_event(event, window, score)
    return sel
