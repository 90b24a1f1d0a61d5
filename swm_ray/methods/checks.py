"""Shared candidate checks: one memo for every planner of a run, one forward for every signal asked of it.

A *check* is a candidate model (merge method, current layer groups, the candidate window merged) run on the
calibration rows; it yields every signal the run's planners registered for that merge method (`output`,
`kl`, `nll`, see `scoring.py`). `CheckMemo` keeps each check's signals by (merge, groups, candidate), so a
candidate model is run once however many planners ask for it (SLEB and `swm/keep-first` ask for the same
keep-first models) and threshold searches replay their loops without recomputing.

Planners see an `Evaluator` per (criterion, merge): `SharedEvaluator` answers from the memo and sends what is
missing to the memo's `run`, which calls the backend (`backend.check(requests)`: in this process, or fanned
out to actors) once per batch. Under `auto`'s race a `scheduler` collects the requests of every planner of a
round and runs them as one batch (`auto.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from swm_ray.edits.windows import Group

Key = tuple[str, tuple[Group, ...], Group]  # (merge, groups, candidate)


@dataclass(frozen=True)
class CheckRequest:
    """Candidates to check on top of `groups` with merge method `merge`, and the signals wanted."""

    merge: str
    groups: tuple[Group, ...]
    candidates: tuple[Group, ...]
    signals: tuple[str, ...]


class CheckMemo:
    """Every check of a run, by (merge, groups, candidate) -> {signal: value}.

    `backend.check(requests)` returns per request per candidate {signal: value}. `signals` registers, per merge
    method, the signals every check of it computes (the union of the criteria of the planners using it).
    `on_new(entries)` is told after every batch (a resumable run saves them); `computed` counts the checks
    this run made (loaded ones are not counted)."""

    def __init__(self, backend, on_new: Callable[[list], None] | None = None):
        self.backend = backend
        self.cache: dict[Key, dict[str, float]] = {}
        self.signals: dict[str, set[str]] = {}
        self.computed = 0
        self.on_new = on_new

    def register(self, merge: str, signal: str) -> None:
        self.signals.setdefault(merge, set()).add(signal)

    def value(self, merge: str, groups, candidate, signal: str) -> float | None:
        got = self.cache.get((merge, _groups(groups), tuple(candidate)))
        return None if got is None else got.get(signal)

    def missing(self, merge: str, groups, candidates, signal: str) -> list[Group]:
        return [tuple(c) for c in candidates if self.value(merge, groups, c, signal) is None]

    def request(self, merge: str, groups, candidates, signals=None) -> CheckRequest:
        """A request for `signals` (default: every signal registered for `merge`); requests of one batch for the
        same current model are merged, so a check asked by several planners runs once with all their signals."""
        wanted = signals if signals is not None else sorted(self.signals.get(merge, {"output"}))
        return CheckRequest(merge, _groups(groups), tuple(tuple(c) for c in candidates), tuple(wanted))

    def run(self, requests: Sequence[CheckRequest]) -> None:
        """Compute the requests (merged per (merge, groups): one pass per current model), store every signal."""
        merged: dict[tuple[str, tuple], dict[Group, None]] = {}
        signals: dict[tuple[str, tuple], set[str]] = {}
        for r in requests:
            if not r.candidates:
                continue
            key = (r.merge, r.groups)
            merged.setdefault(key, {}).update(dict.fromkeys(r.candidates))
            signals.setdefault(key, set()).update(r.signals)
        batch = [CheckRequest(m, g, tuple(sorted(c)), tuple(sorted(signals[(m, g)])))
                 for (m, g), c in sorted(merged.items())]
        if not batch:
            return
        for req, values in zip(batch, self.backend.check(batch)):
            for cand, got in zip(req.candidates, values):
                self.cache.setdefault((req.merge, req.groups, cand), {}).update(got)
            self.computed += len(req.candidates)
        if self.on_new is not None:
            self.on_new(self.entries())

    def entries(self) -> list:
        """The memo as JSON-able data: [merge, [groups], [low, high], {signal: value}] per check."""
        return [[m, [list(g) for g in gs], list(c), dict(v)] for (m, gs, c), v in self.cache.items()]

    def load(self, entries: list) -> None:
        for merge, groups, cand, values in entries:
            self.cache[(merge, _groups(groups), tuple(cand))] = {k: float(v) for k, v in values.items()}


def _groups(groups) -> tuple[Group, ...]:
    return tuple((int(a), int(b)) for a, b in groups)


class SharedEvaluator:
    """A selection `Evaluator` of one criterion and merge method over a shared `CheckMemo`.

    `scheduler(requests)`, when given, runs missing checks (under the race it waits for the round); otherwise
    they run at once. `misses` counts the checks this evaluator asked for that were not in the memo yet."""

    def __init__(self, memo: CheckMemo, criterion: str, merge: str,
                 scheduler: Callable[[list[CheckRequest]], None] | None = None):
        self.memo, self.criterion, self.merge = memo, criterion, merge
        self.higher_is_better = criterion == "output"
        self.scheduler = scheduler
        self.misses = 0
        memo.register(merge, criterion)

    def score(self, groups, candidates):
        todo = self.memo.missing(self.merge, groups, candidates, self.criterion)
        self.misses += len(todo)
        req = [self.memo.request(self.merge, groups, todo, (self.criterion,))]
        if self.scheduler is not None:  # every question is a step of the race, answered from the memo or not
            self.scheduler(req)
        elif todo:
            self.memo.run(req)
        return [self.memo.value(self.merge, groups, c, self.criterion) for c in candidates]

    def commit(self, groups, window) -> None:
        pass  # a check names its state by its groups

    def entries(self) -> list:
        return self.memo.entries()
