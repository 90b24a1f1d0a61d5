"""`swm-ray compress`: calibration -> window selection (criterion × search) -> merge -> model folder."""

from __future__ import annotations

import sys
import time

from swm_ray import storage
from swm_ray.config import RunConfig, dump_yaml
from swm_ray.errors import UserError
from swm_ray.jobs.analyze import prepare_calibration, similarity_matrix
from swm_ray.selection import MemoEvaluator, check_threshold, select_windows, target_layers

CRITERION_LABEL = {"output": "output cosine", "cka": "CKA", "kl": "KL", "nll": "NLL"}


def _console():
    from rich.console import Console

    return Console(file=sys.stderr, highlight=False)


def _reporter(criterion: str):
    con = _console()
    marks = {"pass": "[green]pass[/]", "fail": "[red]fail[/]", "commit": "[bold cyan]merge[/]",
             "drop": "[yellow]drop (paper loop)[/]", "stop": "[yellow]stop[/]"}

    def on_event(event: str, window: tuple[int, int], score: float | None) -> None:
        val = "" if score is None else f"{CRITERION_LABEL[criterion]} {score:.4f}"
        con.print(f"  layers {window[0]:>3}–{window[1]:<3} {marks.get(event, event):<28} {val}")

    return on_event


def _evaluator(cfg: RunConfig, calib):
    """(evaluator, pool or None) for the chosen criterion."""
    from swm_ray.selection import CkaEvaluator

    if cfg.select.criterion == "cka":
        matrix, _ = similarity_matrix(cfg, calib)
        return CkaEvaluator(matrix), None
    from swm_ray.jobs.pool import ActorPool, RayEvaluator

    pool = ActorPool(cfg)
    pool.init_scorers(calib, cfg.select.criterion, cfg.merge.method)
    return RayEvaluator(pool, cfg.select.criterion), pool


def run_compress(cfg: RunConfig, raw_yaml: str = "") -> dict:
    """Select windows, merge, write the model folder; returns the summary."""
    from swm_ray.merge import apply_windows
    from swm_ray.models import count_parameters, load_model
    from swm_ray.plan import Plan
    from swm_ray.writer import save_model_folder

    s = cfg.select
    out = cfg.out or "swm-ray-compressed"
    if s.threshold is None and s.ratio is None and s.layers is None:
        raise UserError("give a target: --threshold T, --ratio R or --layers N")
    if s.threshold is not None:
        check_threshold(s.criterion, s.threshold)
    storage.check_output_path(out, cfg.overwrite)
    t0 = time.perf_counter()
    path, calib, n_layers = prepare_calibration(cfg)
    m = cfg.model
    # the driver merges on the CPU and keeps the checkpoint's dtype (a bf16 model is saved as bf16)
    model, tok = load_model(path, device="cpu", dtype="checkpoint" if m.dtype == "auto" else m.dtype,
                            allow_pickle=m.allow_pickle, trust_remote_code=m.trust_remote_code)
    from swm_ray.architectures import check_supported

    check_supported(model)
    n_remove = target_layers(cfg, model, n_layers)
    params_before = count_parameters(model)
    inner, pool = _evaluator(cfg, calib)
    ev = MemoEvaluator(inner)
    con = _console()
    con.print(f"[bold]selecting windows[/]: criterion {s.criterion}, search {s.search}, "
              f"target {f'{n_remove} layers' if n_remove is not None else f'T={s.threshold}'}")
    t_search = time.perf_counter()
    try:
        sel = select_windows(cfg, ev, n_layers, n_remove, _reporter(s.criterion))
    finally:
        if pool is not None:
            pool.shutdown()
    t_select = time.perf_counter() - t_search  # the search alone (scorers ready, matrix loaded)
    if not sel.windows:
        raise UserError(f"no window passed (criterion {s.criterion}, threshold {sel.threshold}): "
                        f"nothing to merge; loosen --threshold or give --layers")
    apply_windows(model, sel.windows, cfg.merge.method)
    plan = Plan(
        windows=[list(w) for w in sel.windows], num_layers_before=n_layers, merge=cfg.merge.method,
        source_model=m.source, criterion=s.criterion, search=s.search, threshold=sel.threshold,
        similarities=sel.scores, params_before=params_before, params_after=count_parameters(model),
        extra={"candidate_evaluations": ev.misses, "selection_seconds": round(t_select, 2),
               "paper_loop": s.paper_loop if s.search == "top-down" else None, "note": sel.note,
               "calibration": {"source": cfg.data.source, "samples": int(calib.input_ids.shape[0]),
                               "seq_len": int(calib.input_ids.shape[1]), "bos_prepended": calib.bos_prepended}},
    )
    metrics = None
    if cfg.eval.enabled:
        from swm_ray.evaluation import evaluate_model

        metrics = evaluate_model(model, tok, cfg.eval)
    final = save_model_folder(model, tok, out, plan=plan, raw_yaml=raw_yaml, resolved_yaml=dump_yaml(cfg),
                              metrics=metrics, overwrite=cfg.overwrite)
    return {"out": final, "plan": plan.to_dict(), "note": sel.note, "metrics": metrics,
            "seconds": round(time.perf_counter() - t0, 2)}
