"""Compress one model in this process: calibration -> planner -> writer -> evaluation (no Ray).

The same planners (`planners.py`), writer and evaluation as `swm-ray compress`, with candidate checks run
here on a layer stack (in memory or streaming, as the model fits) instead of an actor pool. A zoo entry runs
this inside one Ray task that owns the resources it asked for.
"""

from __future__ import annotations

import time

from swm_ray.config import WIDTH_METHODS, RunConfig, dump_yaml
from swm_ray.errors import UserError


def compress_here(cfg: RunConfig, raw_yaml: str = "", device: str | None = None) -> dict:
    """Plan with `cfg.select.method`, write `cfg.out` (replacing an earlier output of ours when
    `cfg.overwrite`), evaluate it into its card when `cfg.eval.enabled`. Returns a summary with the plan."""
    from swm_ray.compute.memory import return_freed
    from swm_ray.compute.stack import StackSpec, open_stack
    from swm_ray.edits.fold import stack_site
    from swm_ray.io.data import calibration_sets
    from swm_ray.io.runstate import fingerprint
    from swm_ray.methods.planners import (
        check_method_count,
        compensate_plan,
        may_compensate,
        method_compensation,
        method_needs,
        plan_windows,
    )
    from swm_ray.methods.selection import target_layers
    from swm_ray.methods.session import LocalScoring, split_validation
    from swm_ray.plan.writer import write_model_folder
    from swm_ray.recipes.preflight import check_settings, check_targets, model_facts

    check_settings(cfg)
    facts = model_facts(cfg)  # the checkpoint's headers, read once for every check and size below
    check_targets(cfg, facts)  # every target against the headers before anything loads (the width pruners' too)
    s, m = cfg.select, cfg.model
    if s.method in WIDTH_METHODS:  # width pruning: the same stages, no depth planner (`width.py`)
        return width_here(cfg, raw_yaml, device)
    t0 = time.perf_counter()
    auto = s.method == "auto"
    sets = calibration_sets(cfg, s.auto_validation_max if auto else 0, fit=may_compensate(cfg))
    path, calib, n_layers = sets.path, sets.plan, sets.n_layers
    val_calib, extra_calib = split_validation(sets.validation, s.auto_validation, cfg.data.batch_size)
    params_before = facts.params
    n_remove = target_layers(cfg, params_before, facts.per_layer, n_layers)
    check_method_count(cfg, n_layers, n_remove)
    stack = open_stack(StackSpec(path, device=device or m.device, dtype=m.dtype, stream=m.stream,
                                 max_memory=m.max_memory, allow_pickle=m.allow_pickle,
                                 trust_remote_code=m.trust_remote_code),
                       rows=sets.rows, seq_len=int(calib.input_ids.shape[1]))
    scoring = LocalScoring(stack, calib, cfg.merge.attention, kernel=cfg.stats.kernel,
                           skip_first_tokens=cfg.stats.skip_first_tokens, fit_calib=sets.fit, validation=val_calib,
                           extra=extra_calib)
    scoring.prepare(method_needs(cfg))  # the one reference pass
    chosen = None
    if auto:
        from swm_ray.methods.auto import run_auto
        from swm_ray.methods.tasksignal import auto_task_rows

        tasks, why = auto_task_rows(cfg, path)
        chosen = run_auto(cfg, scoring, n_layers, n_remove, layer_names=facts.layer_names, tasks=tasks,
                          tasks_note=why)
        planned, comp = chosen.chosen.planned, chosen.chosen.compensation
    else:
        planned = plan_windows(cfg, scoring, n_layers, n_remove)
        compensate = method_compensation(cfg)
        site = stack_site(stack) if compensate != "none" else None
        comp = compensate_plan(cfg, scoring, planned.selection.windows, planned.merge, site, compensate)
    counters = scoring.counters()
    planned.evaluator = None  # the plan keeps its windows, not the checks (their cached states hold memory)
    sel = planned.selection
    del scoring  # the checks' cached states go; the stack stays for width statistics
    if not sel.windows:
        raise UserError(f"no window passed (method {s.method}, threshold {sel.threshold}): nothing to merge")
    plan = planned.plan(n_layers, m.source, m.revision, s.method, cfg.merge.attention, params_before,
                        extra={"candidate_evaluations": counters["checks"], "passes": counters,
                               "note": sel.note, "settings": fingerprint(cfg), **_weights(m.source),
                               **({"auto": chosen.record()} if chosen else {}),
                               "calibration": sets.record(fitted=comp is not None)})
    if comp is not None:
        comp.attach(plan)
    if s.then_width is not None:  # width after depth, on the merged model, in this process, on the same stack
        from swm_ray.compute.width_stats import local_stats
        from swm_ray.methods.width import plan_width

        plan_width(cfg, plan, path, calib, s.then_width, s.width_method, local_stats(stack, calib),
                   device=device or _width_device(m.device))
    del stack  # the writer streams from the checkpoint; the evaluation loads the written folder
    return_freed()
    written = write_model_folder(path, plan, cfg.out, raw_yaml=raw_yaml, resolved_yaml=dump_yaml(cfg),
                                 overwrite=cfg.overwrite, attention=cfg.merge.attention,
                                 allow_pickle=m.allow_pickle, trust_remote_code=m.trust_remote_code)
    return _finish(cfg, written["out"], plan, device, t0)


def _weights(source: str) -> dict:
    """{"source_weights": identity} of a model given as a local folder (`local_weights_identity`): a zoo rerun
    builds again an entry whose folder was rewritten in place; {} for other sources."""
    from swm_ray.io.checkpoint import local_weights_identity

    ident = local_weights_identity(source)
    return {} if ident is None else {"source_weights": ident}


def width_here(cfg: RunConfig, raw_yaml: str = "", device: str | None = None) -> dict:
    """`compress_here` for the width pruners (`select.method` flap or taylor): calibration -> width-only plan ->
    writer -> evaluation, in this process (FLAP's statistics on a layer stack, Taylor's gradients on the model
    in memory)."""
    from swm_ray.compute.width_stats import stack_stats
    from swm_ray.io.data import calibration_for
    from swm_ray.io.runstate import fingerprint
    from swm_ray.methods.width import plan_width, width_only_plan
    from swm_ray.methods.width_targets import check_width_settings
    from swm_ray.plan.writer import write_model_folder

    s, m = cfg.select, cfg.model
    check_width_settings(cfg, s.method)
    t0 = time.perf_counter()
    path, calib, n_layers = calibration_for(cfg)
    plan = width_only_plan(cfg, path, n_layers, calib)
    plan.extra.update(settings=fingerprint(cfg), **_weights(m.source))
    plan_width(cfg, plan, path, calib, s.ratio, s.method, stack_stats(cfg, path, calib, device),
               device=device or _width_device(m.device))
    written = write_model_folder(path, plan, cfg.out, raw_yaml=raw_yaml, resolved_yaml=dump_yaml(cfg),
                                 overwrite=cfg.overwrite, attention=cfg.merge.attention, allow_pickle=m.allow_pickle,
                                 trust_remote_code=m.trust_remote_code)
    return _finish(cfg, written["out"], plan, device, t0)


EVAL_RECORD = "evaluated_with"
"""The key of `metrics.json` (as `_finish` writes it) that records what its numbers were measured with."""


def eval_record(cfg: RunConfig) -> dict:
    """What decides an evaluation's numbers: the eval settings that differ from their defaults (not `enabled`
    or `baseline`) and the settings fingerprint of the model evaluated (its plan's `extra.settings`)."""
    from swm_ray.io.runstate import fingerprint

    settings = cfg.eval.model_dump(mode="json", exclude_defaults=True, exclude={"enabled", "baseline"})
    return {"eval": settings, "settings": fingerprint(cfg)}


def evaluate_here(cfg: RunConfig, raw_yaml: str = "", device: str | None = None) -> dict:
    """Evaluate again the folder already written at `cfg.out` (complete, with the model settings of `cfg`) with
    `cfg.eval`: for a zoo entry whose evaluation settings changed or whose evaluation never finished. Its config
    files get `cfg`, then `metrics.json` and the card the new numbers; the weights are not touched."""
    from swm_ray.io import fs as storage
    from swm_ray.plan.plan import Plan

    t0 = time.perf_counter()
    out = cfg.out.rstrip("/")
    plan = Plan.load(f"{out}/plan.json")
    if raw_yaml:
        storage.replace_file(f"{out}/config.yaml", raw_yaml.encode())
    storage.replace_file(f"{out}/config.resolved.yaml", dump_yaml(cfg).encode())
    return _finish(cfg, out, plan, device, t0)


def _finish(cfg: RunConfig, out: str, plan, device: str | None, t0: float) -> dict:
    """Evaluate the written folder into its card when `cfg.eval.enabled`; the summary both paths return.
    `metrics.json` is written last with `eval_record` under `EVAL_RECORD`: a folder whose evaluation was stopped
    has none (or an older one), and a zoo rerun evaluates it again."""
    import json

    from swm_ray.io import fs as storage
    from swm_ray.plan.writer import update_metrics

    metrics = None
    if cfg.eval.enabled:
        from swm_ray.evaluation.suite import evaluate_source

        model_cfg = {**cfg.model.model_dump(), "source": out, "revision": None}
        if device:
            model_cfg["device"] = device
        metrics = evaluate_source(out, model_cfg, cfg.eval)
        update_metrics(out, plan, metrics, resolved_yaml=dump_yaml(cfg))
        recorded = {**metrics, EVAL_RECORD: eval_record(cfg)}
        storage.replace_file(f"{out.rstrip('/')}/metrics.json",
                             (json.dumps(recorded, indent=2, default=str) + "\n").encode())
    return {"out": out, "plan": plan.to_dict(), "metrics": metrics, "seconds": round(time.perf_counter() - t0, 2)}


def _width_device(device: str) -> str:
    from swm_ray.io.models import pick_device

    return pick_device(device)
