"""`swm-ray compress`: calibration -> window selection (criterion × search) -> plan -> streaming writer.

The driver never holds the model: sizes come from the safetensors headers, candidate checks run on the
actor pool, and the writer applies the plan to the checkpoint tensor by tensor.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

from swm_ray.compute.memory import return_freed
from swm_ray.config import WIDTH_METHODS, RunConfig, dump_yaml
from swm_ray.errors import UserError
from swm_ray.io.data import calibration_sets
from swm_ray.io.probes import check_run_paths
from swm_ray.io.runstate import RunState
from swm_ray.jobs.console import console
from swm_ray.methods.selection import target_layers
from swm_ray.methods.session import Scoring

MEMO_VERSION = 2  # memo.json: checks keyed by (merge, groups, candidate), every signal of a check
CRITERION_LABEL = {"output": "output cosine", "cka": "CKA", "kl": "KL", "nll": "NLL", "block-influence": "BI"}



def _reporter(criterion: str):
    con = console()
    marks = {"pass": "[green]pass[/]", "fail": "[red]fail[/]", "commit": "[bold cyan]merge[/]",
             "drop": "[yellow]drop (paper loop)[/]", "stop": "[yellow]stop[/]"}

    def on_event(event: str, window: tuple[int, int], score: float | None) -> None:
        val = "" if score is None else f"{CRITERION_LABEL.get(criterion, criterion)} {score:.4f}"
        con.print(f"  layers {window[0]:>3}–{window[1]:<3} {marks.get(event, event):<28} {val}")

    return on_event


class RayScoring(Scoring):
    """The planners' `session.Scoring` over the actor pool (`jobs.pool.RayBackend`, started on first need). Every
    check computed is saved into the run's state as it arrives, and a resumed run starts from the saved ones."""

    def __init__(self, cfg: RunConfig, calib, state: RunState, site_for: Callable, *, fit_calib=None,
                 validation=None, extra=None):
        from swm_ray.jobs.pool import RayBackend

        saved = state.load_json("memo.json") or {}
        backend = RayBackend(cfg, calib, validation=validation, extra=extra, fit_calib=fit_calib)
        super().__init__(backend, attention=cfg.merge.attention, kernel=cfg.stats.kernel,
                         skip_first_tokens=cfg.stats.skip_first_tokens,
                         on_memo=lambda entries: state.save_json("memo.json", {"version": MEMO_VERSION,
                                                                               "checks": entries}),
                         memo=saved.get("checks") if saved.get("version") == MEMO_VERSION else None)
        self._site_for = site_for

    def site_for(self):
        return self._site_for()

    def modes(self) -> list[str]:
        return self.backend.modes()

    def shutdown(self) -> None:
        self.backend.shutdown()


def run_compress(cfg: RunConfig, raw_yaml: str = "") -> dict:
    """Plan with the method of `cfg.select.method`, write the model folder; returns the summary."""
    from swm_ray.edits.fold import checkpoint_site
    from swm_ray.methods.planners import (
        check_method_count,
        compensate_plan,
        may_compensate,
        method_compensation,
        method_needs,
        method_signals,
        plan_windows,
    )
    from swm_ray.methods.session import split_validation
    from swm_ray.plan.writer import write_model_folder

    s = cfg.select
    out = cfg.out or "swm-ray-compressed"
    if s.method in WIDTH_METHODS:  # width pruning: its own recipe, the same folder layout (jobs/width.py)
        from swm_ray.jobs.width import run_width

        return run_width(cfg, raw_yaml)
    from swm_ray.recipes.preflight import check_settings, check_targets, model_facts

    check_settings(cfg)
    criterion, _ = method_signals(cfg)
    check_run_paths(out, cfg.overwrite, [cfg.model.source, cfg.data.source])

    facts = model_facts(cfg)  # the checkpoint's headers, read once for every check and size below
    check_targets(cfg, facts)
    t0 = time.perf_counter()
    auto = s.method == "auto"
    compensate = method_compensation(cfg)
    sets = calibration_sets(cfg, s.auto_validation_max if auto else 0, fit=may_compensate(cfg))
    path, calib, n_layers = sets.path, sets.plan, sets.n_layers
    val_calib, extra_calib = split_validation(sets.validation, s.auto_validation, cfg.data.batch_size)
    from swm_ray.jobs.runtime import actor_dtype

    state = RunState.open(out, "compress", cfg, cfg.resume, dtype=actor_dtype(cfg))
    params_before, config = facts.params, facts.config
    n_remove = target_layers(cfg, params_before, facts.per_layer, n_layers)
    check_method_count(cfg, n_layers, n_remove)
    site_for = functools.cache(lambda: checkpoint_site(path, config, cfg.model.allow_pickle))  # read once
    site = site_for() if compensate != "none" and not auto else None
    aware = s.method == "swm" and s.compensate_aware
    state.start(calib.input_ids)
    con = console()
    if sets.note:
        con.print(f"[yellow]warning[/]: {sets.note}")
    what = f"criterion {s.criterion}, search {s.search}" if s.method == "swm" else f"method {s.method}"
    if aware:
        what = f"calibration NLL after each candidate's {compensate} fit (compensation-aware), search {s.search}"
    if auto:
        what += f" ({', '.join(s.auto_candidates)} × compensation {', '.join(s.auto_compensate)}, racing on " \
                f"{val_calib.input_ids.shape[0]} held-out rows)"
    con.print(f"[bold]selecting windows[/]: {what}, "
              f"target {f'{n_remove} layers' if n_remove is not None else f'T={s.threshold}'}")
    scoring = RayScoring(cfg, calib, state, site_for, fit_calib=sets.fit, validation=val_calib, extra=extra_calib)
    if scoring.resumed:
        con.print(f"resuming: {scoring.resumed} candidate checks from the interrupted run")
    try:
        scoring.prepare(method_needs(cfg))  # the one reference pass, before any search
        t_search = time.perf_counter()
        chosen = None
        if auto:
            from swm_ray.methods.auto import run_auto
            from swm_ray.methods.tasksignal import auto_task_rows

            tasks, why = auto_task_rows(cfg, path)
            chosen = run_auto(cfg, scoring, n_layers, n_remove, report=lambda msg: con.print(f"  auto: {msg}"),
                              layer_names=facts.layer_names, tasks=tasks, tasks_note=why)
            planned, comp = chosen.chosen.planned, chosen.chosen.compensation
            rows = len(chosen.original.values)
            more = (f", {chosen.chosen.val_nll:.4f} on all its {len(chosen.chosen.losses.values)} rows"
                    if len(chosen.chosen.losses.values) > rows else "")
            con.print(f"[bold]auto chose[/] {chosen.chosen.name} (validation NLL {chosen.chosen_on_original_rows:.4f}, "
                      f"original {chosen.original_nll:.4f} on the same {rows} rows{more}; {chosen.seconds:.0f} s, "
                      f"{chosen.rounds} rounds; {chosen.decided})")
        else:
            label = f"nll after {compensate}" if aware else criterion
            planned = plan_windows(cfg, scoring, n_layers, n_remove, _reporter(label))
        t_select = time.perf_counter() - t_search  # the search alone (the reference pass done)
        if not auto:
            comp = compensate_plan(cfg, scoring, planned.selection.windows, planned.merge, site, compensate)
        if comp is not None:
            _report_fits(con, comp)
        modes = scoring.modes()
        counters = scoring.counters()
        planned.evaluator = None  # the plan keeps its windows; the checks' states go with the scoring
        sel = planned.selection
        if not sel.windows:
            state.clear()  # the search finished: nothing to resume
            raise UserError(f"no window passed ({what}, threshold {sel.threshold}): nothing to merge; loosen "
                            f"--threshold or give --layers")
        _warn_mixed_windows(con, config, sel.windows, cfg.merge.attention)
        m = cfg.model
        plan = planned.plan(
            n_layers, m.source, m.revision, s.method, cfg.merge.attention, params_before,
            extra={"candidate_evaluations": counters["checks"], "resumed_scores": scoring.resumed,
                   "passes": counters, "selection_seconds": round(t_select, 2),
                   "paper_loop": s.paper_loop if s.method == "swm" and s.search == "top-down" else None,
                   "note": sel.note, "actor_modes": modes, **({"auto": chosen.record()} if chosen else {}),
                   "calibration": sets.record(fitted=comp is not None)},
        )
        if comp is not None:
            comp.attach(plan)
        if s.then_width is not None:  # width after depth, on the merged model, by the same actors
            from swm_ray.jobs.width import then_width

            scoring.backend.release()  # the actors keep the model, not the search's cached states
            then_width(cfg, plan, path, calib, pool=scoring.backend.pool)
    finally:
        scoring.shutdown()
    return_freed()  # the driver's share of the search (reduced statistics, check results) before the writer
    written = write_model_folder(path, plan, out, raw_yaml=raw_yaml, resolved_yaml=dump_yaml(cfg),
                                 overwrite=cfg.overwrite, attention=cfg.merge.attention,
                                 allow_pickle=m.allow_pickle, trust_remote_code=m.trust_remote_code)
    state.clear()
    metrics = None
    if cfg.eval.enabled:
        metrics = _evaluate_output(cfg, written["out"], plan, raw_yaml)
    return {"out": written["out"], "plan": plan.to_dict(), "note": sel.note, "metrics": metrics,
            "seconds": round(time.perf_counter() - t0, 2)}


def _report_fits(con, comp) -> None:
    con.print(f"[bold]compensation[/] {comp.method} (input {comp.source}), fitted in {comp.seconds:.1f} s:")
    for (low, high), fit in sorted(comp.fits.items()):
        con.print(f"  layers {low:>3}–{high:<3} {fit.kind:<8} missed share of the window's update "
                  f"{fit.error_before:.4f} → {fit.error_after:.4f}")
    if comp.note:
        con.print(f"[yellow]warning[/]: {comp.note}")


def _warn_mixed_windows(con, config, windows, attention: str) -> None:
    """Under the authors' attention rule, say which windows turn a global layer into a local one."""
    from swm_ray.edits.windows import anchor_layer, layer_types_of, mixes_types
    from swm_ray.io.anatomy import text_config_of

    types = layer_types_of(text_config_of(config))
    if attention != "bottom" or not types:
        return
    for w in windows:
        if mixes_types(types, w) and types[anchor_layer(types, w, "bottom")] != "full_attention":
            con.print(f"[yellow]warning[/]: window {w[0]}–{w[1]} holds a full-attention layer but becomes "
                      f"{types[w[0]]} under the authors' rule (merge.attention=bottom, set by --paper); the "
                      f"default rule (global) keeps it full attention")


def _evaluate_output(cfg: RunConfig, out: str, plan, raw_yaml: str) -> dict:
    """Evaluate the written folder (in memory or streaming, as it fits) and put the metrics into its card."""
    from swm_ray.jobs.eval import run_eval
    from swm_ray.plan.writer import update_metrics

    on_out = cfg.model_copy(update={"model": cfg.model.model_copy(update={"source": out, "revision": None})})
    metrics = run_eval(on_out, [out])[out]
    update_metrics(out, plan, metrics, resolved_yaml=dump_yaml(cfg))
    return metrics
