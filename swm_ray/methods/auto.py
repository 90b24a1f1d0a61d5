"""`--method auto`: the candidate planners race each other on one reference pass and shared checks, and the
plan with the lowest loss on held-out calibration rows wins.

A default chosen on one model family loses to a plain baseline on another, so `auto` measures on the user's
own model and text. At the cost of one search, not of a queue of them:

1. One reference pass (`refpass.py`) feeds every candidate: Block Influence (ShortGPT), angular distances
   (ReplaceMe), the reference outputs and per-layer inputs the candidate checks start from, and the
   original's loss on the held-out rows (`select.auto_validation` rows drawn beyond `data.samples`; no
   planner or fit sees them).
2. The candidates (`select.auto_candidates`) run interleaved, in rounds: each round every live planner takes
   one step up to its next question, and the round's questions are checked together, each candidate model
   once (`checks.CheckMemo`; SLEB and `swm/keep-first` ask for the same keep-first models).
3. After every step of a best-first search its partial plan (k layers removed) is scored on the held-out
   rows; a candidate stops when that plan is already behind the best plan that removes at least k layers by
   more than `select.auto_stop_margin` (3.5) standard errors of the paired per-row difference (removing
   further layers has not lowered the held-out loss on any path measured: BENCHMARKS.md). That is no bound on
   where either search ends: at 2 standard errors a search stopped this way was measured to finish ahead, and
   3.5 keeps the unstopped choice on every run replayed (`extra.auto.trajectory`, benchmarks/stop_rules.py;
   `select.auto_stop_rule` picks other rivals, a large margin runs every search to the end). The planners
   that rank layers once (ShortGPT, ReplaceMe) enter at every level with their plan of that size, which costs
   no check.
4. A candidate that does not remove exactly the requested number of layers is reported and left out. Every
   finished plan is fitted with each compensation of `select.auto_compensate` (and a `PLANNER+COMP`
   candidate's plan with its COMP: `replaceme+lstsq` is ReplaceMe as published) and scored; the lowest mean
   loss wins. When others are within `select.auto_margin` standard errors of it (a close call), the close ones are
   scored on up to `select.auto_validation_max` further held-out rows before deciding.
5. If the loss still cannot tell them apart, a task-style signal decides between those (`tasksignal.py`):
   multiple-choice items from the held-out slice of PIQA, HellaSwag and WinoGrande that no reported accuracy
   reads (`select.auto_task_items`). The lowest loss stands unless another is ahead of it on the items by more
   than `select.auto_margin` standard errors, paired: on the items' text loss, then on accuracy
   (`select.auto_close_signal: resolved`; `accuracy`, the rule before, and `text` are options; `_close_pick`).
6. The fit gate. A fitted plan (a `PLANNER+COMP` candidate, or a fit of `select.auto_compensate`) is fitted on
   calibration text and judged on held-out rows of that same text, which favour a map that does not carry to
   other text. So before a fitted plan is chosen it is checked on the task-style items as text: per item, the
   loss of the correct continuation per byte, paired with the plan without a fit of lowest held-out loss. When
   it is behind that plan by more than `select.auto_margin` standard errors it is set aside and the choice is
   made again without it. (The rule was fixed before its signal was measured on any plan.) A verdict within
   `select.auto_gate_band` standard errors of that margin is read again on `select.auto_gate_items` items (the
   first ones and further ones of the same slices) and decided on all of them.

Order does not matter: candidates are deduplicated by what they compute (their effective merge method on
this architecture) and run, compared and tie-broken by name. `plan.json` records under `extra.auto` every
candidate's loss, its standard error against the chosen plan, where a stopped one stopped, and what decided.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import numpy as np

from swm_ray.compute.validation import RowLosses, paired
from swm_ray.edits.windows import Group
from swm_ray.errors import UserError
from swm_ray.methods.candidates import candidate_config, compensation_config, planners_and_fits


def _rank(loss: float) -> float:
    """A loss as a sort key: a non-finite one (a plan that overflows in the compute dtype) ranks last."""
    return loss if math.isfinite(loss) else math.inf


# -- outcomes ------------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    """One (plan, compensation) candidate and what it measured."""

    name: str
    method: str
    compensate: str
    windows: list[Group] = field(default_factory=list)
    merge: str = ""
    losses: RowLosses | None = None  # per held-out row (further rows appended after a close call)
    error: str | None = None
    stopped: dict | None = None  # where the race stopped it: level, its loss, the best's, the difference
    checks: int = 0  # candidate checks it asked for that were not yet in the memo
    checks_shared: int = 0  # of these, checks another planner asked for in the same round (they ran once)
    planned: object = None  # planners.PlannedWindows
    compensation: object = None  # compensation.Compensation
    versus: dict | None = None  # paired difference to the chosen plan
    missed_by: int | None = None  # |layers removed − layers asked| of a plan of the wrong size
    task_values: object = None  # per task-style item, whether it chose right (where asked: a close call, the gate)
    text_values: object = None  # per item, the loss of the correct continuation per byte (same forward)
    more: RowLosses | None = None  # the close call's further held-out rows, once scored
    gate: dict | None = None  # a fitted plan's check on the task items' text (`_fit_gate`)
    further_text: object = None  # per further item of the fit gate, the same text loss, once scored

    def _items(self) -> dict | None:
        """Per task item, as scored (the first items, then the fit gate's further ones where it read them): whether
        the correct choice won, and the correct continuation's loss per byte; so a rule over them can be replayed
        from `plan.json`."""
        if self.task_values is None:
            return None
        text = [round(float(v), 5) for v in self.text_values]
        further = None if self.further_text is None else [round(float(v), 5) for v in self.further_text]
        return {"correct": [int(v) for v in self.task_values], "text_loss": text, "further_text_loss": further}

    @property
    def task(self) -> dict | None:
        """The task-style signal's means (accuracy, text loss), where the items were scored."""
        if self.task_values is None:
            return None
        return {"accuracy": round(float(np.mean(self.task_values)), 6),
                "text_loss": round(float(np.mean(self.text_values)), 6), "items": len(self.task_values)}

    @property
    def val_nll(self) -> float | None:
        return None if self.losses is None else self.losses.mean

    def record(self) -> dict:
        v = self.val_nll
        return {"candidate": self.name, "method": self.method, "compensate": self.compensate, "merge": self.merge,
                "windows": [list(w) for w in self.windows],
                "validation_nll": None if v is None else round(v, 6),
                "validation_ppl": None if v is None else round(math.exp(v), 4),
                "validation_rows": None if self.losses is None else len(self.losses.values),
                "row_nll": None if self.losses is None else [round(float(v), 6) for v in self.losses.values],
                "versus_chosen": self.versus, "task_signal": self.task, "task_items": self._items(),
                "fit_gate": self.gate, "checks": self.checks,
                "checks_shared": self.checks_shared, "stopped": self.stopped, "error": self.error}


@dataclass
class AutoResult:
    chosen: Outcome
    outcomes: list[Outcome]
    original: RowLosses
    seconds: float
    validation_rows: int
    validation_tokens: int
    decided: str
    same: dict[str, str] = field(default_factory=dict)
    rounds: int = 0
    passes: dict = field(default_factory=dict)
    phases: dict = field(default_factory=dict)  # forward-pass equivalents by what they were spent on
    phase_seconds: dict = field(default_factory=dict)  # and the seconds each took
    trajectory: dict = field(default_factory=dict)  # per candidate: its partial plan's rows at every level reached

    @property
    def original_nll(self) -> float:
        return self.original.mean

    @property
    def chosen_on_original_rows(self) -> float:
        """The chosen plan's mean loss on the rows the original was scored on (the race's rows; a close call
        appends further rows to its contenders only, so their `val_nll` is on more rows than the original's)."""
        return RowLosses(self.chosen.losses.values[: len(self.original.values)]).mean

    def record(self) -> dict:
        """plan.json's `extra.auto`: every candidate's validation loss, what was chosen and why, what auto cost."""
        return {"chosen": self.chosen.name, "decided_by": self.decided,
                "original_validation_nll": round(self.original_nll, 6),
                "original_validation_ppl": round(math.exp(self.original_nll), 4),
                "chosen_validation_nll_on_original_rows": round(self.chosen_on_original_rows, 6),
                "validation_rows": self.validation_rows, "validation_tokens": self.validation_tokens,
                "seconds": round(self.seconds, 2), "rounds": self.rounds, "same_as": self.same,
                "passes": {**self.passes, "by_phase": self.phases, "seconds_by_phase": self.phase_seconds},
                "candidates": [o.record() for o in self.outcomes], "trajectory": self.trajectory}


# -- the race ------------------------------------------------------------------------------------------------
class Stopped(BaseException):
    """Raised inside a planner the race stops (a BaseException: planners never catch it)."""


class _Runner:
    """One candidate planner in its own thread; it runs only while the race lets it (one at a time), so the race
    is deterministic: every planner step happens in the same order on every run."""

    def __init__(self, spec: str, ccfg, target: Callable[[], object], monotone: bool, registry: dict):
        self.spec, self.cfg, self.target, self.monotone = spec, ccfg, target, monotone
        self.registry = registry
        self.go, self.yielded = threading.Event(), threading.Event()
        self.requests: list | None = None
        self.result = None
        self.error: BaseException | None = None
        self.started = self.done = self.stop = False
        self.stopped: dict | None = None
        self.level = 0
        self.asked = 0  # candidate checks it asked for that were not in the memo when asked (and that ran)
        self.shared = 0  # of these, the ones another planner asked for in the same round (run once for both)
        self.thread = threading.Thread(target=self._main, daemon=True, name=f"auto:{spec}")

    def _main(self) -> None:
        self.go.wait()
        self.go.clear()
        try:
            if self.stop:
                raise Stopped
            self.result = self.target()
        except Stopped:
            pass
        except BaseException as e:  # handed to the race, which decides
            self.error = e
        self.done = True
        self.yielded.set()

    def ask(self, requests) -> None:
        """Called from the planner's thread: post the questions, wait for the answers (or to be stopped)."""
        self.requests = requests
        self.asked += sum(len(q.candidates) for q in requests)
        self.yielded.set()
        self.go.wait()
        self.go.clear()
        if self.stop:
            raise Stopped

    def step(self) -> None:
        """Called by the race: let the planner run until its next question or its end."""
        self.requests = None
        if not self.started:
            self.started = True
            self.thread.start()
            self.registry[self.thread.ident] = self
        self.go.set()
        self.yielded.wait()
        self.yielded.clear()


def run_auto(cfg, scoring, n_layers: int, n_remove: int, report: Callable[[str], None] | None = None,
             layer_names: Collection[str] = (), tasks=None, tasks_note: str | None = None) -> AutoResult:
    """Race `cfg.select.auto_candidates` to `n_remove` layers on `scoring` (a `session.Scoring` with held-out
    validation rows), fit the finished plans with every `cfg.select.auto_compensate`, and choose (module
    docstring); `tasks` (`tasksignal.TaskRows`) decide between candidates the held-out loss cannot tell apart
    (`tasks_note`: why there are none). A candidate that fails (a target it cannot reach, a fold it refuses) is
    recorded with its error and left out; when every one fails, a one-line error names the one that came
    closest."""
    from swm_ray.methods.planners import method_needs, plan_windows
    from swm_ray.methods.session import scheduled

    say = report or (lambda _msg: None)
    s = cfg.select
    z = s.auto_margin
    z_stop = s.auto_stop_margin if s.auto_stop_margin is not None else z
    t_all = time.perf_counter()
    at_start = scoring.counters()  # a grid trial races every target on one scoring: count this race's own
    spent = _Spent(scoring)
    scoring.prepare(method_needs(cfg))
    original = scoring.original_validation()
    spent.charge("reference pass and the original's rows")
    say(f"original model: validation NLL {original.mean:.4f} (ppl {math.exp(original.mean):.2f}) on "
        f"{len(original.values)} held-out rows")
    specs, fits, same = planners_and_fits(s.auto_candidates, cfg.merge.method, layer_names, s.auto_compensate)
    for spec, first in sorted(same.items()):
        say(f"{spec}: the same computation as {first} on this architecture, not run again")
    if s.then_width is not None:  # a width pass after a fitted map is not supported (width_targets.py)
        for spec, comps in fits.items():
            for c in comps:
                if c != "none":
                    say(f"{spec}+{c}: left out (select.then_width follows the depth plan; it takes no fitted map)")
        fits = {k: ["none"] for k, v in fits.items() if "none" in v}  # a planner listed only fitted: no contender
        if not fits:  # refused before any model loads (`check_method_target`); here for direct callers
            from swm_ray.methods.planners import THEN_WIDTH_FITTED_ONLY

            raise UserError(THEN_WIDTH_FITTED_ONLY)
        specs = [spec for spec in specs if spec in fits]
    val_memo: dict = {}

    def validate(plans) -> list[RowLosses]:
        keys = [(tuple(sorted(tuple(w) for w in windows)), merge) for windows, merge in plans]
        todo = list(dict.fromkeys(k for k in keys if k not in val_memo))
        if todo:
            for k, losses in zip(todo, scoring.validate([(list(w), m, None) for w, m in todo])):
                val_memo[k] = losses
        return [val_memo[k] for k in keys]

    current: dict[int, _Runner] = {}  # thread id -> its runner
    runners = []
    for spec in specs:
        ccfg = candidate_config(cfg, spec)
        monotone = ccfg.select.method == "sleb" or (ccfg.select.method == "swm" and ccfg.select.search == "best-first"
                                                      and ccfg.select.criterion != "cka")
        runners.append(_Runner(spec, ccfg, lambda c=ccfg: plan_windows(c, scoring, n_layers, n_remove), monotone,
                               current))

    def schedule(requests) -> None:
        runner = current.get(threading.get_ident())
        if runner is None:
            scoring.memo.run(requests)
        else:
            runner.ask(requests)

    # planners that rank layers once (ShortGPT, ReplaceMe) give a plan for any size at no cost: their plans at
    # the level a search reaches are rivals of its partial plan there
    ladder = [r for r in runners if r.cfg.select.method in LADDER_METHODS]
    laddered: set[int] = set()
    finals: dict[str, tuple[RowLosses, int]] = {}  # finished plans: losses, layers removed (the race's bound)
    partial: dict[str, tuple[int, RowLosses]] = {}  # best-first searches: level, losses of the partial plan
    trajectory: dict[str, list[dict]] = {}  # what the race saw, round by round (replayed by benchmarks/stop_rules.py)

    def seen(name: str, level: int, lo: RowLosses, checks: int | None, finished: bool = False) -> None:
        trajectory.setdefault(name, []).append(
            {"round": rounds, "level": level, "finished": finished, "checks": checks,
             "rows": [round(float(v), 6) for v in lo.values]})
    rounds = 0
    with scheduled(scoring, schedule):
        live = list(runners)
        while live:
            rounds += 1
            for r in live:
                r.step()
            spent.charge("searches: candidate checks")
            # the round's plans scored together: finished ones, and partial ones of searches at a new level
            ended = [r for r in runners if r.done and r.result is not None and r.spec not in finals]
            live = [r for r in live if not r.done]
            rising = [r for r in live if r.monotone and r.requests and n_layers - len(r.requests[0].groups) > r.level]
            plans = [([tuple(w) for w in r.result.selection.windows], r.result.merge) for r in ended]
            plans += [([g for g in r.requests[0].groups if g[1] > g[0]], r.requests[0].merge) for r in rising]
            rungs = _rungs(ladder, {n_layers - len(r.requests[0].groups) for r in rising} - set(laddered), scoring,
                           n_layers)
            laddered.update({n_layers - len(r.requests[0].groups) for r in rising})
            plans += [(windows, merge) for _, _, windows, merge in rungs]
            losses = validate(plans)
            spent.charge("race: held-out rows")
            for r, (windows, _), lo in zip(ended, plans, losses):
                finals[r.spec] = (lo, sum(h - low for low, h in windows))
                seen(r.spec, finals[r.spec][1], lo, r.asked, finished=True)
            for r, lo in zip(rising, losses[len(ended):]):
                r.level = n_layers - len(r.requests[0].groups)
                partial[r.spec] = (r.level, lo)
                seen(r.spec, r.level, lo, r.asked - sum(len(q.candidates) for q in r.requests))  # checks so far
            for (name, level, _, _), lo in zip(rungs, losses[len(ended) + len(rising):]):
                partial[name] = (level, lo)
                seen(name, level, lo, None)
            for r in [r for r in live if r.spec in partial]:
                _maybe_stop(r, partial, finals, z_stop, s.auto_stop_rule, n_remove, say)
            requests = [q for r in live if not r.stop for q in (r.requests or [])]
            _count_shared([r for r in live if not r.stop])
            if requests:
                scoring.memo.run(requests)
            for r in [r for r in live if r.stop]:
                r.asked -= sum(len(q.candidates) for q in (r.requests or []))  # its last questions never ran
                r.step()  # it raises Stopped inside its planner and ends
            spent.charge("searches: candidate checks")
            live = [r for r in live if not r.done]
    outcomes = _finish(cfg, scoring, runners, n_remove, validate, say, fits)
    spent.charge("finished plans: fits and held-out rows")
    chosen, decided = _choose(outcomes, scoring, z, s.auto_validation_max, say, tasks, tasks_note, spent,
                              s.auto_gate_band, s.auto_close_signal)
    counters = _since(scoring.counters(), at_start)
    return AutoResult(chosen, outcomes, original, time.perf_counter() - t_all, len(original.values),
                      scoring.validation_tokens(), decided, same, rounds, counters, spent.record(counters),
                      phase_seconds=spent.seconds(), trajectory=trajectory)


def _count_shared(runners: list[_Runner]) -> None:
    """Count, per runner, its questions of this round that another runner asked too: the memo runs such a check
    once, so it is in both runners' `asked` (the sum of the candidates' checks exceeds the run's by these)."""
    keys = {id(r): {(q.merge, q.groups, c) for q in (r.requests or []) for c in q.candidates} for r in runners}
    for r in runners:
        others = set().union(*(k for i, k in keys.items() if i != id(r)))
        r.shared += len(keys[id(r)] & others)


def _since(now: dict, before: dict) -> dict:
    """Run counters (`session.run_counters`, plus `checks`) of what ran between two readings."""
    out = dict(now)
    for k in ("reference_passes", "layer_reads", "layer_tokens", "checks"):
        if isinstance(now.get(k), int) and isinstance(before.get(k), int):
            out[k] = max(0, now[k] - before[k])  # an actor restarted by Ray counts again from 0
    per = now["forward_passes"] / now["layer_tokens"] if now.get("layer_tokens") else 0.0
    out["forward_passes"] = round(out["layer_tokens"] * per, 2)
    return out


class _Spent:
    """Tokens run through decoder layers, by what the race spent them on (`passes.by_phase` of `extra.auto`)."""

    def __init__(self, scoring):
        self.scoring = scoring
        self.tokens: dict[str, int] = {}
        self.secs: dict[str, float] = {}
        self.last = scoring.counters()["layer_tokens"]
        self.clock = time.perf_counter()

    def charge(self, phase: str) -> None:
        now = self.scoring.counters()["layer_tokens"]  # an actor restarted by Ray counts again from 0: never < 0
        self.tokens[phase] = self.tokens.get(phase, 0) + max(0, now - self.last)
        self.last = now
        t = time.perf_counter()
        self.secs[phase] = self.secs.get(phase, 0.0) + t - self.clock
        self.clock = t

    def seconds(self) -> dict:
        """Each phase's wall-clock seconds (`passes.seconds_by_phase`)."""
        return {k: round(v, 2) for k, v in self.secs.items()}

    def record(self, counters: dict) -> dict:
        """Each phase as forward passes over the planning rows (the unit of `passes.forward_passes`)."""
        per = counters["forward_passes"] / counters["layer_tokens"] if counters["layer_tokens"] else 0.0
        return {k: round(v * per, 2) for k, v in self.tokens.items() if v}


LADDER_METHODS = ("shortgpt", "replaceme")  # one ranking, a plan for every size


def _rungs(ladder: list[_Runner], levels: set[int], scoring, n_layers: int) -> list[tuple]:
    """(name, level, windows, merge) of every ranking planner's plan at each of `levels`."""
    from swm_ray.methods.planners import plan_windows

    out = []
    for level in sorted(levels):
        for r in ladder:
            try:
                planned = plan_windows(r.cfg, scoring, n_layers, level)
            except UserError:
                continue
            out.append((f"{r.spec}@{level}", level, [tuple(w) for w in planned.selection.windows], planned.merge))
    return out


STOP_RULES = ("partial", "finals", "half", "same", "merge")


def stop_rivals(rule: str, name: str, level: int, n_remove: int, partial: dict, finals: dict) -> list:
    """(name, losses) of the plans a search's partial plan at `level` is measured against under `rule`
    (`select.auto_stop_rule`): finished plans that remove at least `level` layers, and the latest partial plans
    (`partial`: name -> (level, losses)) of the other searches and rankings: at a level >= `level` (partial), at
    exactly `level` (same), once the search has done half of its `n_remove` steps (half), those of the same
    search with another merge method (merge: `swm` and `swm/keep-first`), or none (finals)."""
    rivals = [(n, lo) for n, (lo, removed) in finals.items() if removed >= level and n != name]
    if rule == "finals" or (rule == "half" and 2 * level < n_remove):
        return rivals
    if rule == "merge":
        return rivals + [(n, lo) for n, (lv, lo) in partial.items() if n != name and lv >= level and "@" not in n
                         and n.split("/")[0] == name.split("/")[0]]
    return rivals + [(n, lo) for n, (lv, lo) in partial.items() if n != name
                     and (lv == level if rule == "same" else lv >= level)]


def stop_decision(rule: str, name: str, level: int, losses: RowLosses, n_remove: int, partial: dict, finals: dict,
                  z: float) -> dict | None:
    """Where a search stops, or None: its partial plan (`level` layers removed, `losses`) behind the best of its
    rivals (`stop_rivals`) by more than `z` standard errors of the paired per-row difference."""
    rivals = [(n, lo) for n, lo in stop_rivals(rule, name, level, n_remove, partial, finals)
              if math.isfinite(lo.mean)]  # a rival whose rows overflowed bounds nothing
    if not rivals:
        return None
    best_name, best = min(rivals, key=lambda t: (t[1].mean, t[0]))
    d = paired(losses, best)
    if not (d.diff > 0 and d.resolved(z)):
        return None
    return {"level": level, "validation_nll": round(losses.mean, 6), "behind": best_name, **d.record()}


def _maybe_stop(r: _Runner, partial: dict, finals: dict, z: float, rule: str, n_remove: int, say) -> None:
    """Stop `r` where `stop_decision` says so."""
    level, losses = partial[r.spec]
    stopped = stop_decision(rule, r.spec, level, losses, n_remove, partial, finals, z)
    if stopped is not None:
        r.stop, r.stopped = True, stopped
        say(f"{r.spec}: stopped with {level} layer(s) removed, {stopped['diff']:.4f} ± {stopped['se']:.4f} nats "
            f"behind {stopped['behind']}")


def _finish(cfg, scoring, runners, n_remove: int, validate, say, fits: dict[str, list[str]]) -> list[Outcome]:
    """Every candidate's outcome: its plan at the target size, fitted with each of its compensations (`fits`:
    planner -> compensations, `candidates.planners_and_fits`), scored. The fits are made first, all of them on one
    climb up the original model (`_fit_plans`); two planners that found the same plan share its fit."""
    outcomes: list[Outcome] = []
    jobs: dict = {}  # fit key -> (first name, run config, compensation method, windows, merge)
    keys: dict[int, tuple] = {}  # id(outcome) -> its fit key (fitted outcomes only)
    for r in runners:
        method = r.cfg.select.method
        if r.error is not None:
            if not isinstance(r.error, UserError):
                raise r.error
            outcomes.append(Outcome(r.spec, method, "none", error=str(r.error)))
            say(f"{r.spec}: {r.error}")
            continue
        if r.result is None:  # stopped by the race
            outcomes.append(Outcome(r.spec, method, "none", stopped=r.stopped, checks=r.asked,
                                    checks_shared=r.shared))
            continue
        planned = r.result
        windows = [tuple(w) for w in planned.selection.windows]
        removed = sum(h - lo for lo, h in windows)
        checks = r.asked  # its own (an evaluator is shared by the planners of one criterion and merge)
        planned.evaluator = None  # the outcome keeps the windows, not the checks' states
        for comp_spec in fits[r.spec]:
            name = r.spec if comp_spec == "none" else f"{r.spec}+{comp_spec}"
            o = Outcome(name, method, comp_spec, windows, planned.merge, planned=planned, checks=checks,
                        checks_shared=r.shared)
            outcomes.append(o)
            if removed != n_remove:
                o.missed_by = abs(removed - n_remove)
                o.error = (f"removed {removed} layer(s), not the {n_remove} asked"
                           + (f" ({planned.selection.note})" if planned.selection.note else ""))
                say(f"{name}: left out: {o.error}")
                break
            comp_method, ridge_cfg = compensation_config(r.cfg, comp_spec)
            if comp_method != "none":
                keys[id(o)] = _fit_key(windows, planned.merge, comp_spec, ridge_cfg)
                jobs.setdefault(keys[id(o)], (name, ridge_cfg, comp_method, windows, planned.merge))
    made = _fit_plans(scoring, jobs)
    first: dict[tuple, Outcome] = {}  # fit key -> the outcome scored for it
    for o in outcomes:
        if o.error is not None or o.planned is None:  # left out, failed or stopped by the race
            continue
        key = keys.get(id(o))
        try:
            if key is None:
                (o.losses,) = validate([(o.windows, o.merge)])
            elif key in first:
                twin = first[key]
                o.compensation, o.losses, o.error = twin.compensation, twin.losses, twin.error
                say(f"{o.name}: the same plan and fit as {twin.name}, not fitted again")
            else:
                first[key] = o
                if isinstance(made[key], UserError):
                    raise made[key]
                o.compensation = made[key]
                (o.losses,) = scoring.validate([(o.windows, o.merge, o.compensation.fits)])
        except UserError as e:
            o.error = str(e)
        if o.error is None and not math.isfinite(o.val_nll):
            o.error = ("its held-out loss is not finite (a numerical overflow in the compute dtype; "
                       "--set model.dtype=float32 avoids it)")
        say(f"{o.name}: windows {', '.join(f'{a}-{b}' for a, b in o.windows) or '-'}: "
            + (f"validation NLL {o.val_nll:.4f} (ppl {math.exp(o.val_nll):.2f})" if o.error is None
               else f"skipped ({o.error})"))
    return outcomes


def _fit_key(windows, merge: str, comp_spec: str, cfg) -> tuple:
    """What a fit depends on: the plan's windows and merge, the compensation, the fit settings (`merge.*` but its
    method, which the plan's merge already says)."""
    return tuple(sorted(tuple(w) for w in windows)), merge, comp_spec, cfg.merge.model_dump_json(exclude={"method"})


def _fit_plans(scoring, jobs: dict) -> dict:
    """Every job's fit (`_finish`: key -> (name, config, method, windows, merge)), or the `UserError` it raised.
    Below its lowest window a plan is the original model, so one pass of the original climbs the fit rows once,
    from the lowest plan's bottom to the highest's, and each plan's fit forks from it where its first window
    starts (`FitPass.fork`) instead of running those layers again from the embeddings; above it, the original's
    layer outputs are kept by the climb for every fork (`fitpass.OriginalTrack`). Equal to a pass per plan."""
    from swm_ray.methods.compensation import fit_plan

    made: dict = {}
    groups: dict = {}
    for key, job in jobs.items():  # plans that share the fit's input and skipped positions share the climb
        m = job[1].merge
        groups.setdefault((m.compensate_input, m.skip_first), []).append(key)
    site = scoring.site_for() if jobs else None
    for (source, skip_first), keys in sorted(groups.items()):
        keys.sort(key=lambda k: (min(lo for lo, _ in jobs[k][3]), jobs[k][0]))
        climb, forks = None, []
        try:
            for key in keys:
                name, cfg, method, windows, merge = jobs[key]
                try:
                    if climb is None:
                        climb = scoring.fit_pass([], merge, source=source, skip_first=skip_first, targets=[])
                    climb.advance(stop=min(lo for lo, _ in windows))
                    forks.append(climb.fork(windows, windows, merge=merge))
                    made[key] = fit_plan(cfg, method, site, forks[-1].advance)
                except UserError as e:
                    made[key] = e
        finally:  # the climb keeps the original's layer outputs for its forks (`fitpass.OriginalTrack`)
            for fp in [climb, *forks] if climb is not None else forks:
                fp.close()
    return made


def _choose(outcomes: list[Outcome], scoring, z: float, max_rows: int, say, tasks=None,
            tasks_note: str | None = None, spent: _Spent | None = None, band: float = 0.0,
            close_signal: str = "resolved") -> tuple[Outcome, str]:
    """The outcome of lowest mean validation loss (ties by name). A close call (others within `z` standard errors
    of it) is scored on further held-out rows; if still close, the task-style signal decides between the close
    ones (the most accurate on the task-style items). A fitted plan so chosen must pass the fit gate
    (`_fit_gate`); one that fails is set aside and the choice is made again without it."""
    scored = [o for o in outcomes if o.losses is not None and o.error is None]
    if not scored:
        missed = [o for o in outcomes if o.missed_by is not None]
        closest = min(missed, key=lambda o: (o.missed_by, o.name)) if missed else None
        first = next((o for o in outcomes if o.error), None)
        hint = f"; closest: {closest.name}: {closest.error}" if closest else (f"; {first.name}: {first.error}"
                                                                               if first else "")
        raise UserError(f"--method auto: no candidate reached the target{hint}")
    rows = min(len(o.losses.values) for o in scored)  # the race's rows (a close call appends more)
    everyone, aside = list(scored), []
    while True:
        for o in scored:
            o.losses = RowLosses(o.losses.values[:rows])
        best, decided, _ = _decide(scored, scoring, z, max_rows, say, tasks, tasks_note, spent, close_signal)
        if best.compensate == "none":
            break
        plain = [o for o in scored if o.compensate == "none"]
        if tasks is None or not plain:
            decided += ("; fit gate: no plan without a fit to check it against" if tasks is not None else
                        f"; fit gate not run (task-style signal {tasks_note or 'off'})")
            break
        rival = min(plain, key=lambda o: (_rank(float(np.mean(o.losses.values[:rows]))), o.name))
        d = _fit_gate(best, rival, scoring, tasks, z, say, band, spent)
        if not best.gate["passed"]:
            twins = sorted(o.name for o in scored if o is not best and _same_model(o, best))
            aside.append(f"{best.name}{''.join(f' (and {t}, the same model)' for t in twins)} set aside: on the "
                         f"task items' text it is {d.diff:+.4f} ± {d.se:.4f} nats per byte behind {rival.name}")
            scored = [o for o in scored if o is not best and not _same_model(o, best)]
            continue
        decided += (f"; fit gate passed: on the task items' text {d.diff:+.4f} ± {d.se:.4f} nats per byte against "
                    f"{rival.name}")
        break
    for o in everyone:
        if o is not best:
            n = min(len(o.losses.values), len(best.losses.values))
            o.versus = paired(RowLosses(o.losses.values[:n]), RowLosses(best.losses.values[:n])).record()
    return best, "; ".join([*aside, decided])


def _decide(scored: list[Outcome], scoring, z: float, max_rows: int, say, tasks, tasks_note, spent,
            close_signal: str = "resolved"):
    """Lowest loss, then the close call's further rows, then the task-style items (`_choose`). Returns the choice,
    why, and the contenders the items decided between (none where the held-out loss decided)."""
    pick = lambda pool: min(pool, key=lambda o: (_rank(o.losses.mean), o.name))  # noqa: E731
    best = pick(scored)
    twins = sorted(o.name for o in scored if o is not best and _same_model(o, best))
    still = _one_per_model([o for o in scored if o is not best and o.name not in twins
                            and not paired(o.losses, best.losses).resolved(z)])
    decided = f"lowest mean validation loss on {len(best.losses.values)} rows" + (
        f" ({', '.join(twins)}: the same model)" if twins else "")
    extra_rows = getattr(scoring.backend, "extra_rows", 0)
    if still and extra_rows and max_rows > len(best.losses.values):
        contenders = [best, *still]
        need = [o for o in contenders if o.more is None]
        if need:
            more = scoring.validate([(o.windows, o.merge, o.compensation.fits if o.compensation else None)
                                     for o in need], extra=True)
            for o, m in zip(need, more):
                o.more = m
            if spent is not None:
                spent.charge("close call: further held-out rows")
        _twins_take(contenders, scored, ("more",))
        for o in scored:
            if o.more is not None and any(o is c or _same_model(o, c) for c in contenders):
                o.losses = o.losses.extended(o.more)
        best = pick(contenders)
        still = _one_per_model([o for o in contenders if o is not best and not _same_model(o, best)
                                and not paired(o.losses, best.losses).resolved(z)])
        decided = f"close call ({len(contenders)} within {z:g} standard errors): lowest loss on " \
                  f"{len(best.losses.values)} rows"
        say(f"close call between {', '.join(o.name for o in contenders)}: {len(contenders[0].more.values)} more "
            f"held-out rows")
    asked: list[Outcome] = []
    if still and tasks is not None:
        asked = [best, *still]
        best, decided = _by_task_signal(best, still, scoring, tasks, z, decided, say, close_signal)
        _twins_take(asked, scored, ("task_values", "text_values"))
        if spent is not None:
            spent.charge("close call: task-style items")
    elif still:
        decided += f"; within {z:g} standard errors of " + ", ".join(o.name for o in still) + (
            f" (task-style signal {tasks_note})" if tasks_note else "")
    return best, decided, asked


def _same_model(a: Outcome, b: Outcome) -> bool:
    """Two candidates that planned the same model (the same windows, merge and compensation): one loss, one
    accuracy, nothing to decide between them."""
    return (sorted(tuple(w) for w in a.windows), a.merge, a.compensate) == \
        (sorted(tuple(w) for w in b.windows), b.merge, b.compensate)


def _twins_take(source: list[Outcome], pool: list[Outcome], fields: tuple[str, ...]) -> None:
    """The twins (`_same_model`) in `pool` of an outcome of `source` take its values of `fields` where they have
    none: one model is scored once, and its record under every planner's name covers the same rows and items."""
    for o in pool:
        twin = next((s for s in source if s is not o and _same_model(o, s)), None)
        if twin is not None:
            for f in fields:
                if getattr(o, f) is None:
                    setattr(o, f, getattr(twin, f))


def _one_per_model(outcomes: list[Outcome]) -> list[Outcome]:
    """`outcomes` less the twins (`_same_model`) of one listed before them by name: the same model is scored on
    further rows and task items once."""
    kept: list[Outcome] = []
    for o in sorted(outcomes, key=lambda o: o.name):
        if not any(_same_model(o, k) for k in kept):
            kept.append(o)
    return kept


def _by_task_signal(best: Outcome, close: list[Outcome], scoring, tasks, z: float, decided: str, say,
                    signal: str = "resolved"):
    """The held-out loss cannot tell `best` from the `close` ones: the task-style items decide between them
    (`_close_pick`)."""
    contenders = [best, *close]
    _task_signals(contenders, scoring, tasks)
    say("task-style items (accuracy, text loss): " + ", ".join(
        f"{o.name} {o.task['accuracy']:.3f}, {o.task['text_loss']:.4f}" for o in contenders))
    head = f"{decided}; {len(contenders)} still within {z:g} standard errors: the task-style items ({tasks.n_items})"
    return _close_pick(best, close, z, signal, head)


def _close_pick(best: Outcome, close: list[Outcome], z: float, signal: str, head: str = "the task-style items"):
    """Which of `best` (lowest held-out loss) and the `close` ones the task-style items' per-item values
    (`task_values`: chose right or not; `text_values`: the correct continuation's loss per byte) pick, by `signal`:
    - "accuracy": the most accurate (a tie of accuracy goes to the lower held-out loss);
    - "text": the lowest loss on the items' text, unless another is more accurate by more than `z` standard errors
      (paired), in which case the most accurate of those;
    - "resolved": `best` stands unless another is ahead of it by more than `z` standard errors (paired over the
      items): first on the text loss (of those ahead, the lowest text loss), else on accuracy (the most accurate).
    Pure: `benchmarks/close_replay.py` replays a run's close call from its `plan.json` through it."""
    contenders = [best, *close]
    acc = lambda o: float(np.mean(o.task_values))  # noqa: E731
    txt = lambda o: float(np.mean(o.text_values))  # noqa: E731
    if signal == "accuracy":
        top = min(contenders, key=lambda o: (-acc(o), o.losses.mean, o.name))
        d = paired(RowLosses(top.task_values), RowLosses(best.task_values))
        if top is best:
            return best, f"{head} agree with the lowest loss"
        return top, f"{head} chose {top.name} (accuracy +{d.diff:.3f} ± {d.se:.3f} over {best.name})"
    if signal == "resolved":
        text = {o.name: paired(RowLosses(best.text_values), RowLosses(o.text_values)) for o in close}
        ahead = [o for o in close if text[o.name].diff > 0 and text[o.name].resolved(z)]
        if ahead:
            top = min(ahead, key=lambda o: (txt(o), o.losses.mean, o.name))
            d = text[top.name]
            return top, (f"{head}: {top.name} is ahead of {best.name}, of lowest held-out loss, on their text by "
                         f"{d.diff:.4f} ± {d.se:.4f} nats per byte")
        right = {o.name: paired(RowLosses(o.task_values), RowLosses(best.task_values)) for o in close}
        ahead = [o for o in close if right[o.name].diff > 0 and right[o.name].resolved(z)]
        if ahead:
            top = min(ahead, key=lambda o: (-acc(o), txt(o), o.losses.mean, o.name))
            d = right[top.name]
            return top, (f"{head}: {top.name} is more accurate than {best.name}, of lowest held-out loss, by "
                         f"{d.diff:+.3f} ± {d.se:.3f}")
        return best, (f"{head} resolve no other ahead of the lowest held-out loss (by {z:g} standard errors, "
                      f"text loss then accuracy)")
    text = min(contenders, key=lambda o: (txt(o), o.losses.mean, o.name))
    gaps = {o.name: paired(RowLosses(o.task_values), RowLosses(text.task_values)) for o in contenders if o is not text}
    ahead = [o for o in contenders if o is not text and gaps[o.name].diff > 0
             and gaps[o.name].resolved(z)]
    if ahead:
        top = min(ahead, key=lambda o: (-acc(o), txt(o), o.name))
        d = gaps[top.name]
        return top, (f"{head}: {top.name} is more accurate than {text.name}, of lowest text loss, by "
                     f"{d.diff:+.3f} ± {d.se:.3f}")
    if text is best:
        return best, f"{head}: the lowest loss on their text agrees with the lowest held-out loss"
    d = paired(RowLosses(text.text_values), RowLosses(best.text_values))
    return text, (f"{head}: {text.name} has the lowest loss on their text ({d.diff:+.4f} ± {d.se:.4f} against "
                  f"{best.name})")


class _Recorded:
    """What `_decide` asks a scoring for, answered from a run's record only: the close call's further rows and the
    task items were scored in the run, so they are on the outcomes already; asking for more is an error."""

    def __init__(self, extra_rows: int):
        self.backend = type("Recorded", (), {"extra_rows": extra_rows})()

    def validate(self, plans, extra=False):
        raise ValueError("the record has no further held-out rows for a close contender")

    def task_signals(self, rows, plans):
        raise ValueError("the record has no per-item task values for every close contender (runs before e0cd59a)")


def replay_close_call(auto: dict, signal: str, z: float) -> dict:
    """A finished run's close call decided again from its record (`plan.json`'s `extra.auto`) by `signal`: the
    run's own `_decide` on the recorded row losses (the race's rows, a close call's further rows as `more`) and
    per-item task values (`task_items`). Plans the run's fit gate set aside are left out, as the run left them out.
    Returns the choice before the fit gate (`chosen`; its gate was read only if the run chose it), the contenders
    the items decided between (empty when the held-out loss decided) and why."""
    records = [c for c in auto["candidates"] if c.get("row_nll") and not c.get("error")]
    rows = min(len(c["row_nll"]) for c in records)  # the race's rows; a close call appended more
    every = []
    for c in records:
        values = np.asarray(c["row_nll"], dtype=float)
        o = Outcome(c["candidate"], c["method"], c["compensate"], [tuple(w) for w in c["windows"]], c["merge"],
                    losses=RowLosses(values[:rows]), more=RowLosses(values[rows:]) if len(values) > rows else None)
        if c.get("task_items"):
            o.task_values = np.asarray(c["task_items"]["correct"], dtype=float)
            o.text_values = np.asarray(c["task_items"]["text_loss"], dtype=float)
        every.append((o, (c.get("fit_gate") or {}).get("passed") is False))
    aside = [o for o, failed in every if failed]
    scored = [o for o, _ in every if not any(_same_model(o, a) for a in aside)]
    most = max(len(c["row_nll"]) for c in records)
    n_items = max((len(o.task_values) for o, _ in every if o.task_values is not None), default=0)
    tasks = type("Items", (), {"n_items": n_items})()
    chosen, why, asked = _decide(scored, _Recorded(most - rows), z, most, lambda m: None, tasks, None, None,
                                 signal)
    return {"chosen": chosen.name, "contenders": [o.name for o in asked], "why": why}


def _task_signals(outcomes: list[Outcome], scoring, tasks, further: bool = False) -> None:
    """The task-style items' accuracy and text loss of every outcome that has none yet (one forward each); with
    `further`, the text loss on the fit gate's further items (`tasks` is then `TaskRows.further`)."""
    need = [o for o in outcomes if (o.further_text if further else o.task_values) is None]
    if need:
        got = scoring.task_signals(tasks, [(o.windows, o.merge, o.compensation.fits if o.compensation else None)
                                           for o in need])
        for o, (acc, text) in zip(need, got):
            if further:
                o.further_text = text
                continue
            o.task_values, o.text_values = acc, text


def _fit_gate(fitted: Outcome, rival: Outcome, scoring, tasks, z: float, say, band: float = 0.0,
              spent: _Spent | None = None):
    """A fitted plan's map was fitted on calibration text and is judged on held-out rows of the same text, which
    cannot tell a map that carries to other text from one that does not. So before a fitted plan is chosen it is
    checked on other text: per task-style item, the loss of the correct continuation per byte, paired with the
    plan without a fit of lowest held-out loss (`rival`). It fails when it is behind by more than `z` standard
    errors. When that verdict lies within `band` standard errors of `z` and `tasks` has further items
    (`tasksignal.TaskRows.further`), both are scored on those too and the verdict is the one on all the items.
    Returns the paired difference (fitted − rival) the verdict was read from."""
    _task_signals([fitted, rival], scoring, tasks)
    d = paired(RowLosses(fitted.text_values), RowLosses(rival.text_values))
    if spent is not None:
        spent.charge("fit gate: task-style items")
    first = {"text_loss_diff": round(d.diff, 6), "se": round(d.se, 6), "items": d.rows,
             "passed": not d.diff > z * d.se}
    near = band > 0 and d.se > 0 and abs(d.diff / d.se - z) < band and tasks.further is not None
    if near:
        _task_signals([fitted, rival], scoring, tasks.further, further=True)
        if spent is not None:
            spent.charge("fit gate: further items near its margin")
        say(f"fit gate: {fitted.name} against {rival.name}: {d.diff:+.4f} ± {d.se:.4f} nats per byte on "
            f"{d.rows} items is within {band:g} standard errors of the margin; {tasks.further.n_items} more items")
        d = paired(RowLosses(np.concatenate([fitted.text_values, fitted.further_text])),
                   RowLosses(np.concatenate([rival.text_values, rival.further_text])))
    fitted.gate = {"versus": rival.name, "text_loss_diff": round(d.diff, 6), "se": round(d.se, 6), "items": d.rows,
                   "passed": not d.diff > z * d.se, **({"first_items": first} if near else {})}
    say(f"fit gate: {fitted.name} against {rival.name} on the task items' text: {d.diff:+.4f} ± {d.se:.4f} nats per "
        f"byte on {d.rows} items ({'passed' if fitted.gate['passed'] else 'set aside'})")
    return d

