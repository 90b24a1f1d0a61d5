"""A run's calibration session over one model: the planners' `Scoring` provider.

Everything a planner, `auto` or a compensation fit asks of the model goes through one `Scoring`, which sits
on a *backend*: `LocalBackend` (this process, one layer stack: grid trials, zoo tasks, tests, the GPU check)
or the actor pool's (`jobs/pool.RayBackend`). The backend does the model work, always as sums over rows that
the driver adds in row order, so the answer does not depend on the backend or the actor count:

- `reference(needs)`: the one pass over the original (`refpass.py`), before any search; it covers what every
  planner of the run declared (`Scoring.prepare`). A later need it did not cover costs a pass of its own,
  counted in `counters()`.
- `check(requests)`: candidate checks (`scoring.py`), every signal of a check from one forward.
- `validate(plans, extra)`: per-row validation losses of plans (`validation.py`), on the held-out rows, or on
  the further rows a close call draws (`extra`).
- `plan_loss(windows, merge, fits)`: the mean NLL of a plan on the planning rows (compensation-aware checks).
- `fit_pass(windows, merge, ...)`: a `fitpass.FitPass` (or its remote mirror) over the fit rows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from swm_ray.compute.refpass import Needs, Reference, add_row_stats, chunk_rows
from swm_ray.compute.scoring import ShardScorer, reduce_signals
from swm_ray.compute.validation import RowLosses, mean_nll, plan_nll
from swm_ray.methods.checks import CheckMemo, SharedEvaluator
from swm_ray.methods.selection import CkaEvaluator, MemoEvaluator

PlanSpec = tuple  # (windows, merge, fits or None)
MAX_PASSES = 6  # compensation fit passes a shard keeps (a step's main pass and its forks)


class ShardSession:
    """The model work of one shard of rows, behind both backends (an actor holds one; `LocalBackend` holds one
    over all rows): the reference pass, a `ShardScorer` per merge method, validation losses on its held-out rows,
    plan losses on its planning rows and compensation fit passes on its fit rows. Everything it returns is per
    row (or per minibatch), for the driver to add in row order."""

    def __init__(self, stack, attention: str, ids: np.ndarray, needs: Needs, *,
                 hsic_batches: dict | None = None, val_ids: np.ndarray | None = None,
                 val_batches: Sequence[tuple[int, int]] = (), fit_ids: np.ndarray | None = None,
                 fit_batches: Sequence[tuple[int, int]] = ()):
        self.stack, self.attention = stack, attention
        self.ids = ids
        self.ref = Reference(stack, ids, needs, hsic_batches=hsic_batches, val_ids=val_ids, val_batches=val_batches)
        self.val_ids, self.val_batches = val_ids, list(val_batches)
        self.fit_ids, self.fit_batches = fit_ids, list(fit_batches)
        self.scorers: dict[str, ShardScorer] = {}
        self.passes: dict[str, tuple] = {}  # fit pass id -> (FitPass, steps applied), least recently used first

    def check(self, requests) -> list[list[dict]]:
        out = []
        for r in requests:
            scorer = self.scorers.get(r.merge)
            if scorer is None:
                scorer = self.scorers[r.merge] = ShardScorer(self.ref, r.merge, attention=self.attention)
            out.append(scorer.score(r.groups, r.candidates, r.signals))
        return out

    def validate(self, plans: Sequence[PlanSpec]) -> list[list]:
        ref = self.ref
        if not self.val_batches:
            return [[] for _ in plans]
        return [plan_nll(self.stack, self.val_ids, self.val_batches, w, m, self.attention, f, pros=ref.val_pros,
                         inputs=ref.val_inputs) for w, m, f in plans]

    def plan_loss(self, windows, merge: str, fits=None) -> list:
        ref = self.ref
        if ref.rows == 0:
            return []
        batches = chunk_rows(ref.rows, max(int(c.shape[0]) for c in ref.chunks))
        return plan_nll(self.stack, self.ids, batches, windows, merge, self.attention, fits, pros=ref.pros,
                        inputs=ref.inputs)

    # -- compensation fit passes, driven step by step (a restarted actor replays a pass's recipe) ---------------
    def fit_open(self, spec: dict, parent=None):
        from swm_ray.compute.fitpass import FitPass

        if parent is not None:
            return parent.fork(spec["windows"], spec["targets"], spec.get("merge"))
        return FitPass(self.stack, self.fit_ids, self.fit_batches, spec["windows"], spec["merge"], self.attention,
                       source=spec["source"], skip_first=spec["skip_first"], fits=spec.get("fits"),
                       targets=spec.get("targets"))

    def fit_step(self, pass_id: str, step: int, op: tuple):
        """Apply step `step` of pass `pass_id`: ("open", spec) | ("fork", parent id, parent step, spec) |
        ("advance", fit, stop). Returns the advance's (window, sums) or None, or "missing" when this session does
        not hold the pass at step − 1 (the driver then sends the whole recipe to `fit_replay`)."""
        have = self.passes.get(pass_id)
        if op[0] == "open":
            self.passes[pass_id] = (self.fit_open(op[1]), 1)
            return None
        if op[0] == "fork":
            parent = self.passes.get(op[1])
            if parent is None or parent[1] != op[2]:
                return "missing"
            self.passes[pass_id] = (self.fit_open(op[3], parent[0]), 1)
            return None
        if have is None or have[1] != step:
            return "missing"
        fp, n = have
        got = fp.advance(op[1], op[2])
        self.passes.pop(pass_id)
        self.passes[pass_id] = (fp, n + 1)
        while len(self.passes) > MAX_PASSES:  # a pass dropped here is replayed from its recipe if asked again
            self.passes.pop(next(iter(self.passes)))
        return got

    def fit_replay(self, recipes: list[tuple[str, list]]) -> None:
        """Rebuild passes from their recipes (a parent's before its forks), all but their last step."""
        for pass_id, ops in recipes:
            self.passes.pop(pass_id, None)
            for step, op in enumerate(ops[:-1]):
                if self.fit_step(pass_id, step, op) == "missing":
                    raise RuntimeError(f"fit pass {pass_id}: its recipe does not replay")

    def fit_close(self, pass_ids) -> None:
        for p in pass_ids:
            got = self.passes.pop(p, None)
            if got is not None:
                got[0].close()


class LocalBackend:
    """The backend of one process: a layer stack, the planning rows `calib`, the held-out rows `validation`
    (auto), further held-out rows `extra` (close calls) and the compensation fit's rows `fit_calib`."""

    def __init__(self, stack, calib, attention: str = "global", *, validation=None, extra=None, fit_calib=None):
        self.stack, self.calib, self.attention = stack, calib, attention
        self.val, self.extra = validation, extra
        self.fit_calib = calib if fit_calib is None else fit_calib
        self.session: ShardSession | None = None
        self.passes = 0

    @property
    def extra_rows(self) -> int:
        return 0 if self.extra is None else int(self.extra.input_ids.shape[0])

    def reference(self, needs: Needs) -> dict:
        self.session = None  # free the old one first
        val = self.val
        self.session = ShardSession(self.stack, self.attention, self.calib.input_ids, needs,
                                    hsic_batches=dict(enumerate(self.calib.batches)) if needs.hsic else None,
                                    val_ids=None if val is None else val.input_ids,
                                    val_batches=() if val is None else val.batches)
        self.passes += 1
        return add_row_stats([self.session.ref.stats], self.stack.num_layers)

    def check(self, requests) -> list[list[dict[str, float]]]:
        return [reduce_signals([part]) for part in self.session.check(requests)]

    def validate(self, plans: Sequence[PlanSpec], extra: bool = False) -> list[RowLosses]:
        if extra:
            c = self.extra
            return [RowLosses.from_parts(plan_nll(self.stack, c.input_ids, c.batches, w, m, self.attention, f))
                    for w, m, f in plans]
        return [RowLosses.from_parts(parts) for parts in self.session.validate(plans)]

    def plan_loss(self, windows, merge: str, fits=None) -> float:
        return mean_nll(self.session.plan_loss(windows, merge, fits))

    def task_logliks(self, rows, plans: Sequence[PlanSpec]) -> list[np.ndarray]:
        from swm_ray.compute.validation import plans_logliks

        return plans_logliks(self.stack, rows.rows, rows.spans, plans, self.attention)

    def fit_pass(self, windows, merge: str, *, source: str, skip_first: int, fits=None, targets=None):
        from swm_ray.compute.fitpass import FitPass

        c = self.fit_calib
        return FitPass(self.stack, c.input_ids, c.batches, windows, merge, self.attention, source=source,
                       skip_first=skip_first, fits=fits, targets=targets)

    def counters(self) -> dict:
        s = self.stack
        return run_counters(self.passes, s.layer_loads if s.streaming else None, s.token_runs, s.num_layers,
                         int(self.calib.input_ids.size))


class Scoring:
    """What planners need from a model and its calibration rows (see the module docstring).

    `prepare(needs)` runs the reference pass for everything declared so far; a signal asked later that it did not
    cover runs a pass of its own. `on_memo(entries)` is told about every batch of new checks (a resumable run
    saves them); `memo` entries from an interrupted run are loaded first."""

    def __init__(self, backend, *, attention: str = "global", kernel: str = "linear", skip_first_tokens: int = 1,
                 matrix: np.ndarray | None = None, on_memo: Callable[[list], None] | None = None,
                 memo: list | None = None):
        self.backend = backend
        self.attention = attention
        self.stats_settings = {"kernel": kernel, "skip_first_tokens": skip_first_tokens}
        self.memo = CheckMemo(backend, on_new=on_memo)
        self.memo.load(memo or [])
        self.resumed = len(self.memo.cache)
        self.matrix = matrix
        self.needs = Needs(kernel=kernel, skip_first_tokens=skip_first_tokens)
        self.done: Needs | None = None
        self.signals: dict = {}
        self.scheduler = None  # auto's race sets it while it runs
        self._evaluators: dict[tuple[str, str], object] = {}

    # -- the reference pass ----------------------------------------------------------------------------------
    def declare(self, needs: Needs) -> None:
        if self.matrix is not None and needs.hsic:  # the CKA matrix was given (a grid computes it once per model)
            import dataclasses

            needs = dataclasses.replace(needs, hsic=False)
        self.needs = self.needs | needs

    def prepare(self, needs: Needs | None = None) -> None:
        """Run the reference pass now for everything declared (and `needs`), unless an earlier one covers it."""
        if needs is not None:
            self.declare(needs)
        if self.done is not None and self.done.covers(self.needs):
            return
        want = self.needs if self.done is None else self.needs | self.done
        self.signals = self.backend.reference(want)
        self.done = want

    def _need(self, **flags) -> dict:
        self.prepare(Needs(**flags, **self.stats_settings))
        return self.signals

    # -- what planners ask for -------------------------------------------------------------------------------
    def evaluator(self, criterion: str, merge: str):
        """The evaluator of (criterion, merge): shared checks through the memo (the same object for the same
        arguments); `cka` judges windows by the CKA matrix alone."""
        key = (criterion, merge)
        if key not in self._evaluators:
            if criterion == "cka":
                self._evaluators[key] = MemoEvaluator(CkaEvaluator(self.cka_matrix()))
            else:
                self._need(checks=True, final=criterion in ("output", "kl"), logp=criterion == "kl")
                self._evaluators[key] = SharedEvaluator(self.memo, criterion, merge, self._schedule)
        return self._evaluators[key]

    def _schedule(self, requests) -> None:
        (self.scheduler or self.memo.run)(requests)

    def block_influence(self) -> np.ndarray:
        return self._need(influence=True)["influence"]

    def angular_distances(self, tokens: str = "last") -> np.ndarray:
        return self._need(angular=True, angular_tokens=tokens)["angular"]

    def cka_matrix(self) -> np.ndarray:
        if self.matrix is None:
            from swm_ray.compute.similarity import cka_from_sums

            self.matrix = cka_from_sums(self._need(hsic=True)["hsic"])
        return self.matrix

    def original_validation(self) -> RowLosses:
        """The original model's per-row losses on the held-out rows (from the reference pass)."""
        got = self._need()
        return RowLosses.from_parts([(got["val_nll"], got["val_tokens"])])

    def validation_tokens(self) -> int:
        return int(self._need().get("val_tokens", 0))

    def validate(self, plans: Sequence[PlanSpec], extra: bool = False) -> list[RowLosses]:
        self._need()
        return self.backend.validate(list(plans), extra)

    def task_signals(self, rows, plans: Sequence[PlanSpec]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per plan, from one forward over the items of `rows`: (accuracy per item, `tasksignal.item_scores`;
        the correct continuation's loss per byte per item, `tasksignal.text_losses`)."""
        from swm_ray.methods.tasksignal import item_scores, text_losses

        self._need()
        return [(item_scores(rows, ll), text_losses(rows, ll)) for ll in self.backend.task_logliks(rows, list(plans))]

    def plan_loss(self, windows, merge: str, fits: Mapping | None = None) -> float:
        self._need(checks=True)
        return self.backend.plan_loss(windows, merge, fits)

    def fit_pass(self, windows, merge: str, *, source: str, skip_first: int, fits=None, targets=None):
        return self.backend.fit_pass(windows, merge, source=source, skip_first=skip_first, fits=fits,
                                     targets=targets)

    def compensated_evaluator(self, cfg, merge: str, method: str):
        """A memoised `planners.CompensatedEvaluator` (the same object for the same arguments)."""
        from swm_ray.methods.planners import CompensatedEvaluator

        key = (f"nll+{method}", merge)
        if key not in self._evaluators:
            self._need(checks=True)
            self._evaluators[key] = MemoEvaluator(CompensatedEvaluator(cfg, self, merge, method, self.site_for()))
        return self._evaluators[key]

    def site_for(self):
        raise NotImplementedError  # set per backend by the recipe (the fold site of the source)

    def checks_computed(self) -> int:
        """Candidate models run: shared checks and compensation-aware ones."""
        return self.memo.computed + sum(getattr(ev, "misses", 0) for key, ev in self._evaluators.items()
                                        if key[0].startswith("nll+"))

    def counters(self) -> dict:
        return {**self.backend.counters(), "checks": self.checks_computed()}


class LocalScoring(Scoring):
    """`Scoring` in this process, on a layer stack (`stack.py`), the planners' calibration rows, auto's held-out
    rows and the compensation fit's (`fit_calib`, default the planning rows: `data.CalibrationSets`)."""

    def __init__(self, stack, calib, attention: str = "global", matrix: np.ndarray | None = None, *,
                 kernel: str = "linear", skip_first_tokens: int = 1, fit_calib=None, validation=None, extra=None,
                 on_memo=None, memo=None):
        backend = LocalBackend(stack, calib, attention, validation=validation, extra=extra, fit_calib=fit_calib)
        super().__init__(backend, attention=attention, kernel=kernel, skip_first_tokens=skip_first_tokens,
                         matrix=matrix, on_memo=on_memo, memo=memo)
        self.stack, self.calib = stack, calib

    def site_for(self):
        from swm_ray.edits.fold import stack_site

        return stack_site(self.stack)


@contextlib.contextmanager
def scheduled(scoring: Scoring, scheduler):
    """Route the scoring's missing checks through `scheduler` (auto's race) while the block runs."""
    saved = scoring.scheduler
    scoring.scheduler = scheduler
    try:
        yield
    finally:
        scoring.scheduler = saved


def run_counters(passes: int, reads: int | None, tokens: int, n_layers: int, plan_tokens: int) -> dict:
    """What a run cost the model: reference passes, layer reads (streaming), tokens run through decoder layers, and
    those as equivalent forward passes over the planning rows."""
    return {"reference_passes": passes, "layer_reads": reads, "layer_tokens": tokens,
            "forward_passes": round(tokens / max(n_layers * plan_tokens, 1), 2)}


def split_validation(calib, rows: int, batch_size: int):
    """(the first `rows` held-out rows, the rest or None): auto scores on the first and draws on the rest only
    for a close call. Minibatches of `batch_size` rows (the last may be smaller)."""
    from swm_ray.io.data import Calibration

    def part(ids):
        n = int(ids.shape[0])
        return Calibration(ids, [(a, min(a + batch_size, n)) for a in range(0, n, batch_size)], calib.bos_prepended,
                           calib.pretokenized, calib.source)

    if calib is None:
        return None, None
    ids = calib.input_ids
    if int(ids.shape[0]) <= rows:
        return part(ids), None
    return part(ids[:rows]), part(ids[rows:])
