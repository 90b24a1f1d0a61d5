"""One grid trial without Ray: a (model, method) pair taken to every target of the grid, evaluated alike
(the trials come from `specs.py`, their rows go to `results.py`). `swm_ray/jobs/grid.py` runs the trials as
Ray Tune trials; tests may call `run_trial`.

A trial is one (model, method) pair, where a method is a combination criterion × search × merge, a baseline
pruner (depth: shortgpt, sleb, ...; width: flap, taylor), or the original model. It loads the model once, keeps
one memo of candidate scores, and takes the model to every target of the grid in turn (best-first to 6 layers
passes through the states for 2 and 4, so the later targets cost little), evaluating each result. It reports
one row per target, or with `grid.heal` one per target and heal mode: the same compressed model healed in the
trial's own process (`_heal_candidate`) and evaluated alike.

Width (`methods/width.py`): a flap/taylor trial prunes heads and MLP channels of the whole model to each of
`grid.ratios` (a width-only plan); with `grid.then_width` every depth plan (swm, depth baselines, auto) also
gets one row per fraction after its un-healed row: the same plan with the merged model's width pruned by
`select.width_method` until that further fraction of the original's parameters is gone (columns `width`,
`then_width`; never healed; a compensated plan gives a skipped row). Width rows carry their plan (FLAP's
biases as `plan_tensors`), evaluate the model built in memory, and need the model in memory (a streaming one
gives skipped rows). With `eval.latency` every row also gets `tokens_per_s`, `latency_s` and `ttft_s` (time to
first token).
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from typing import Any

from swm_ray.config import WIDTH_METHODS, RunConfig
from swm_ray.errors import UserError
from swm_ray.recipes.results import LATENCY_KEYS


def _target_select(cfg: RunConfig, kind: str, target: float, **update: Any):
    """The select section at one target (and with `update`, e.g. a trial's criterion and search)."""
    upd: dict[str, Any] = {"threshold": None, "ratio": None, "layers": None, **update}
    upd[{"layers": "layers", "ratios": "ratio", "thresholds": "threshold"}[kind]] = target
    return cfg.select.model_copy(update=upd)


def _candidate_model(stack, ckpt, config, windows, merge: str, attention: str, fits=None):
    """The compressed model a row evaluates (with the compensation `fits` folded in): edited in memory, or,
    when the source streams, the plan applied to the checkpoint and run one layer at a time (nothing written)."""
    import copy

    from swm_ray.compute.stack import StreamingStack
    from swm_ray.edits.fold import compensate_model
    from swm_ray.edits.merge import apply_windows
    from swm_ray.plan.executor import PlanView

    if not stack.streaming:
        model = apply_windows(copy.deepcopy(stack.model), windows, merge, attention)  # a plain model
        compensate_model(model, windows, fits or {})
        return model
    view = PlanView(ckpt, config, windows, merge, attention, fits)
    return StreamingStack(view, view.config, stack.device, stack.dtype)


class Trial:
    """One (model, method) of a grid in this process: the source opened once (a layer stack with its tokenizer,
    config and checkpoint) and the rows it reports. `finish` evaluates a compressed candidate into a row,
    `finish_width` prunes the width of a plan first, `finish_and_heal` adds a depth plan's then_width and healed
    rows; `run` takes the method to every target of the grid."""

    def __init__(self, spec: dict, cfg: RunConfig, model_path: str, calib, matrix,
                 report: Callable[[dict], None], device: str = "cpu"):
        from swm_ray.compute.stack import StackSpec, open_stack
        from swm_ray.io.anatomy import text_config_of
        from swm_ray.io.checkpoint import Checkpoint
        from swm_ray.io.models import load_config, load_tokenizer
        from swm_ray.methods.planners import may_compensate

        # the grid's config names one model; everything this trial reads (calibration rows, fits) is its own
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"source": spec["model"]})})
        self.spec, self.cfg, self.model_path, self.matrix, self.report = spec, cfg, model_path, matrix, report
        g = self.g = cfg.grid
        self.kind = g.target_kind()
        m = self.m = cfg.model
        self.fit_calib = self.val_calib = None
        auto = self.auto = spec["method"] == "auto"
        own = cfg.model_copy(update={"select": cfg.select.model_copy(update={"method": spec["method"]})})
        fits = any(c != "none" for c in g.compensate) if g.compensate and not auto else may_compensate(own)
        if auto or (fits and spec["method"] not in WIDTH_METHODS + ("original",)):
            # auto's held-out rows and the fit's further rows: drawn beyond the grid's calibration rows
            from swm_ray.io.data import calibration_sets

            sets = calibration_sets(own, cfg.select.auto_validation_max if auto else 0, fit=fits)
            calib, self.val_calib, self.fit_calib = sets.plan, sets.validation, sets.fit
        self.calib = calib
        fit_calib = self.fit_calib
        rows = max(int(calib.input_ids.shape[0]), int(fit_calib.input_ids.shape[0]) if fit_calib is not None else 0)
        self.stack = open_stack(StackSpec(model_path, device=device, dtype=m.dtype, stream=m.stream,
                                          max_memory=m.max_memory, allow_pickle=m.allow_pickle,
                                          trust_remote_code=m.trust_remote_code),
                                rows=rows, seq_len=int(calib.input_ids.shape[1]))
        self.tok = load_tokenizer(model_path, m.trust_remote_code)
        self.config = load_config(model_path, m.trust_remote_code)
        self.ckpt = Checkpoint(model_path, m.allow_pickle)
        tied = bool(getattr(text_config_of(self.config), "tie_word_embeddings", False))
        self.n_layers = self.stack.num_layers
        self.params_before, self.per_layer = self.ckpt.param_count(tied), self.ckpt.layer_params(0)
        self.attention = cfg.merge.attention
        self.base = {k: spec.get(k) for k in ("model", "method", "criterion", "search", "merge")}
        self.base.update(target_kind=self.kind, layers_before=self.n_layers, params_before=self.params_before,
                         heal="none")
        self.heal_modes = [h for h in dict.fromkeys(g.heal) if h != "none"]
        # grid.heal is an axis: [local] alone reports healed rows only
        self.unhealed_rows = not g.heal or "none" in g.heal
        self.heal_inputs: dict[str, Any] = {}  # per heal mode its training data, prepared once per trial
        self.width_sums: dict[str, Any] = {}  # FLAP's sums per depth plan, computed once in the trial

    def finish(self, row: dict, windows, merge: str, fits=None, candidate=None) -> None:
        from swm_ray.evaluation.suite import evaluate_model

        stack, n_layers = self.stack, self.n_layers
        if candidate is None and windows:
            candidate = _candidate_model(stack, self.ckpt, self.config, windows, merge, self.attention, fits)
        elif candidate is None:
            candidate = stack if stack.streaming else stack.model
        t0 = time.perf_counter()
        metrics = evaluate_model(candidate, self.tok, self.cfg.eval)
        row["eval_seconds"] = round(time.perf_counter() - t0, 2)
        row["params_after"] = metrics["params"]
        row["layers_after"] = n_layers - sum(h - lo for lo, h in windows)
        row["removed_layers"] = n_layers - row["layers_after"]
        row["params_removed"] = 1 - row["params_after"] / self.params_before
        row.update({k: metrics["latency"].get(k) for k in LATENCY_KEYS} if metrics.get("latency") else {})
        row["ppl"] = metrics["ppl"]["ppl"] if metrics.get("ppl") else None
        row["zeroshot_mean"] = metrics.get("mean")
        row["task_source"] = metrics.get("task_source")
        for task, r in (metrics.get("tasks") or {}).items():
            row[f"task_{task}"] = r["value"]
            row[f"split_{task}"] = r.get("split")
        row.setdefault("status", "ok")
        self.report(row)

    def width_stats(self, request: dict):
        from swm_ray.compute.width_stats import local_stats

        key = json.dumps(request, sort_keys=True)
        if key not in self.width_sums:
            self.width_sums[key] = local_stats(self.stack, self.calib)(request)
        return self.width_sums[key]

    def finish_width(self, row: dict, plan, fraction: float, method: str, wcfg: RunConfig) -> None:
        """`plan` (depth windows, or none) with the width of its merged model pruned by `method` by a further
        `fraction` of the source's parameters (`width.plan_width`), built in memory and evaluated; a skipped row
        (without a plan) when that cannot be done."""
        from swm_ray.methods.width import plan_width
        from swm_ray.plan.executor import PlanView, materialize

        stack = self.stack
        skipped = {**row, "status": "skipped", "plan": None, "plan_tensors": None}
        if stack.streaming:
            self.report({**skipped, "note": "width pruning in a grid needs the model in memory (this one streams "
                         "one layer at a time): prune its width with `swm-ray compress`"})
            return
        t0 = time.perf_counter()
        try:
            plan_width(wcfg, plan, self.model_path, self.calib, fraction, method, self.width_stats, stack.device)
        except UserError as e:
            self.report({**skipped, "note": f"width {method}: {e}"})
            return
        row["selection_seconds"] = round((row.get("selection_seconds") or 0) + time.perf_counter() - t0, 2)
        row["plan"] = plan.to_json()
        row["plan_tensors"] = base64.b64encode(plan.tensors_bytes()).decode("ascii") if plan.tensors else None
        view = PlanView(self.ckpt, self.config, plan.windows, plan.merge, plan.attention, width=plan.width,
                        width_tensors=plan.tensors)
        self.finish(row, plan.windows, plan.merge,
                    candidate=materialize(view, view.config, stack.device, stack.dtype))

    def finish_and_heal(self, row: dict, windows, merge: str, fits=None) -> None:
        """The un-healed row, one row per grid.then_width fraction (its plan with width pruned, never healed),
        then one row per heal mode of the grid (the same candidate, healed in memory)."""
        from swm_ray.plan.plan import Plan

        cfg, stack = self.cfg, self.stack
        unhealed = dict(row)
        if self.unhealed_rows:
            self.finish(row, windows, merge, fits)
        for fraction in self.g.then_width:
            depth = Plan.from_dict(json.loads(unhealed["plan"]))  # with its compensation: plan_width refuses it
            self.finish_width({**unhealed, "width": cfg.select.width_method, "then_width": fraction}, depth,
                              fraction, cfg.select.width_method, cfg)
        for mode in self.heal_modes:
            hrow = {**unhealed, "heal": mode}
            if stack.streaming:
                self.report({**hrow, "status": "skipped", "note": "healing in a grid needs the model in memory "
                             "(this one streams one layer at a time): heal its compressed folder with `swm-ray heal`"})
                continue
            t0 = time.perf_counter()
            try:
                candidate = _candidate_model(stack, self.ckpt, self.config, windows, merge, self.attention, fits)
                candidate = _heal_candidate(candidate, mode, stack, windows, merge, cfg, self.tok,
                                            getattr(self.config, "model_type", None), self.heal_inputs)
            except UserError as e:
                self.report({**hrow, "status": "skipped", "note": f"heal {mode}: {e}"})
                continue
            hrow["heal_seconds"] = round(time.perf_counter() - t0, 2)
            self.finish(hrow, windows, merge, candidate=candidate)

    def run(self) -> None:
        """Every target of the grid: the original model once, a width-only plan per ratio, or the method's
        planner (one memo of candidate scores for all targets) with each compensation of the grid."""
        from swm_ray.edits.fold import stack_site
        from swm_ray.methods.planners import compensate_plan, method_compensation, method_needs, plan_windows
        from swm_ray.methods.selection import target_layers
        from swm_ray.methods.width import width_only_plan

        spec, cfg, g, m, stack = self.spec, self.cfg, self.g, self.m, self.stack
        kind, base, n_layers, attention = self.kind, self.base, self.n_layers, self.attention
        params_before, report = self.params_before, self.report
        if spec["method"] == "original":
            self.finish({**base, "target": 0, "windows": "[]"}, [], "reference")
            return
        if spec["method"] in WIDTH_METHODS:  # a width-only plan per ratio (check_grid: ratios only)
            for t in g.targets():
                wcfg = cfg.model_copy(update={"select": _target_select(cfg, kind, t, method=spec["method"]),
                                              "model": m.model_copy(update={"source": spec["model"]})})
                self.finish_width({**base, "target": t, "width": spec["method"], "windows": "[]"},
                                  width_only_plan(wcfg, self.model_path, n_layers, self.calib), t, spec["method"],
                                  wcfg)
            return
        from swm_ray.methods.session import LocalScoring, split_validation

        validation, extra = split_validation(self.val_calib, cfg.select.auto_validation, cfg.data.batch_size)
        scoring = LocalScoring(stack, self.calib, attention, self.matrix, kernel=cfg.stats.kernel,
                               skip_first_tokens=cfg.stats.skip_first_tokens, fit_calib=self.fit_calib,
                               validation=validation, extra=extra)
        select = {"method": "swm" if spec["method"] == "swm" else spec["method"]}
        if spec["method"] == "swm":
            select.update(criterion=spec["criterion"], search=spec["search"])
        scoring.prepare(method_needs(cfg.model_copy(update={"select": cfg.select.model_copy(update=select)})))
        for t in g.targets():
            row = {**base, "target": t}
            t0 = time.perf_counter()
            try:
                tcfg = cfg.model_copy(update={"select": _target_select(cfg, kind, t, **select),
                                              "merge": cfg.merge.model_copy(update={"method": spec.get("merge")
                                                                                    or cfg.merge.method})})
                n_remove = target_layers(tcfg, params_before, self.per_layer, n_layers)
                misses0 = scoring.memo.computed
                if self.auto:
                    from swm_ray.methods.auto import run_auto
                    from swm_ray.methods.tasksignal import auto_task_rows

                    tasks, why = auto_task_rows(tcfg, self.model_path)
                    chosen = run_auto(tcfg, scoring, n_layers, n_remove, layer_names=self.ckpt.layer_keys(0),
                                      tasks=tasks, tasks_note=why)
                    _auto_row(row, chosen, t0, scoring.memo.computed - misses0, n_layers, spec["model"], m.revision,
                              params_before, attention)
                    comp = chosen.chosen.compensation
                    self.finish_and_heal(row, chosen.chosen.windows, chosen.chosen.merge,
                                         comp.fits if comp is not None else None)
                    continue
                planned = plan_windows(tcfg, scoring, n_layers, n_remove)
            except UserError as e:
                report({**row, "status": "skipped", "note": str(e)})
                continue
            sel = planned.selection
            plan = planned.plan(n_layers, spec["model"], m.revision, tcfg.select.method, attention, params_before)
            row.update(merge=planned.merge, criterion=planned.criterion, search=planned.search,
                       threshold=sel.threshold, windows=json.dumps([list(w) for w in sel.windows]),
                       evaluations=scoring.memo.computed - misses0,
                       selection_seconds=round(time.perf_counter() - t0, 2), note=sel.note or None,
                       plan=plan.to_json())
            if not sel.windows:
                report({**row, "status": "nothing merged", "layers_after": n_layers, "removed_layers": 0})
                continue
            for comp_method in g.compensate or (method_compensation(tcfg),):
                crow = {**row, "compensate": comp_method}
                t1 = time.perf_counter()
                comp = compensate_plan(tcfg, scoring, sel.windows, planned.merge, stack_site(stack), comp_method) \
                    if comp_method != "none" else None
                if comp is not None:
                    crow["compensate_seconds"] = round(time.perf_counter() - t1, 2)
                    comp.attach(plan)  # the row's plan records the fit; its matrices travel as base64 safetensors
                    crow["plan"] = plan.to_json()
                    crow["plan_tensors"] = base64.b64encode(plan.tensors_bytes()).decode("ascii")
                    plan.compensation, plan.tensors = None, {}
                self.finish_and_heal(crow, sel.windows, planned.merge, comp.fits if comp is not None else None)


def run_trial(spec: dict, cfg: RunConfig, model_path: str, calib, matrix, report: Callable[[dict], None],
              device: str = "cpu") -> None:
    """Take one (model, method) to every target of the grid with the method's planner (`planners.py`, as
    `compress` does; flap/taylor: `width.plan_width`) and evaluate each plan; `report(row)` once per target (and
    per heal mode and then_width fraction). Rows carry their plan (JSON)."""
    Trial(spec, cfg, model_path, calib, matrix, report, device).run()


def _heal_candidate(model, mode: str, stack, windows, merge: str, cfg: RunConfig, tok, model_type: str | None,
                    prepared: dict):
    """Heal a grid row's compressed model (in memory) in this process: `local` refits each merged layer against
    the original model (`stack`) on the heal section's calibration rows; `lora` trains LoRA as one worker (no
    Ray Train inside a Tune trial) on `heal.data` (default data.source) and merges it. Training runs in float32;
    the model comes back in its own dtype. `prepared` keeps each mode's training data for the trial's rows."""
    from swm_ray.heal.local import local_settings
    from swm_ray.heal.lora import lora_data, lora_in_process
    from swm_ray.plan.plan import Plan

    data = cfg.heal.data or cfg.data.source
    dtype = next(model.parameters()).dtype
    model.float()
    if mode == "local":
        if "local" not in prepared:
            prepared["local"] = local_settings(cfg, tok, model_type, data)
        plan = Plan(windows=[list(w) for w in windows], num_layers_before=stack.num_layers, merge=merge)
        prepared["local"].run(model, stack, plan)
    else:
        if "lora" not in prepared:
            prepared["lora"] = lora_data(cfg, tok, model_type, data)
        examples, schedule = prepared["lora"]
        model, _ = lora_in_process(model, examples, schedule, cfg.heal, device=next(model.parameters()).device,
                                   pad_id=tok.pad_token_id)
    return model.to(dtype).eval()


def _auto_row(row: dict, res, t0: float, evaluations: int, n_layers: int, model: str, revision, params_before: int,
              attention: str) -> None:
    """Fill a grid row of `auto` from its result: the chosen plan (with its compensation) and every candidate's
    held-out loss in the plan's `extra.auto`."""
    o = res.chosen
    p = o.planned
    plan = p.plan(n_layers, model, revision, "auto", attention, params_before, extra={"auto": res.record()},
                  windows=o.windows, merge=o.merge)
    row.update(merge=o.merge, criterion=p.criterion, search=p.search, compensate=o.compensate,
               windows=json.dumps([list(w) for w in o.windows]), evaluations=evaluations,
               selection_seconds=round(time.perf_counter() - t0, 2), note=f"auto chose {o.name}")
    if o.compensation is not None:
        o.compensation.attach(plan)
        row["plan_tensors"] = base64.b64encode(plan.tensors_bytes()).decode("ascii")
    row["plan"] = plan.to_json()
