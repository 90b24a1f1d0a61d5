"""`swm-ray compress --method flap|taylor` (width only) and `select.then_width` (width after a depth plan).

Recipe: calibration -> a width-only plan (no windows) -> `width.plan_width` (FLAP's statistics summed over the
actor pool, minibatches added in order; Taylor's gradients in this process, the whole model in memory) ->
the same streaming writer, model card and plan.json as depth outputs -> optional evaluation into the card.
"""

from __future__ import annotations

import time

from swm_ray.config import RunConfig, dump_yaml
from swm_ray.errors import UserError
from swm_ray.io.probes import check_run_paths
from swm_ray.jobs.console import console


def pool_stats(cfg: RunConfig, calib, pool=None):
    """FLAP's sums from the actor pool (`ActorPool.width_stats`): `pool` when the run has one (its actors already
    hold the model), else a pool started for this one pass."""

    def stats(request: dict):
        from swm_ray.jobs.pool import ActorPool

        if pool is not None:
            return pool.width_stats(calib, request)
        own = ActorPool(cfg, *calib.input_ids.shape)
        try:
            return own.width_stats(calib, request)
        finally:
            own.shutdown()

    return stats


def then_width(cfg: RunConfig, plan, path: str, calib, pool=None) -> dict:
    """`select.then_width`: prune the width of the plan's merged model by `select.width_method` (FLAP's
    statistics over the actor pool: `pool`, the depth search's, when given); the plan gets its width entry.
    Returns it."""
    from swm_ray.methods.width import plan_width
    from swm_ray.methods.width_targets import check_width_settings

    s = cfg.select
    check_width_settings(cfg, s.width_method)
    console().print(f"[bold]pruning width[/]: {s.width_method}, a further {s.then_width:.0%} of the parameters")
    return plan_width(cfg, plan, path, calib, s.then_width, s.width_method, pool_stats(cfg, calib, pool),
                      device=_device(cfg))


def _device(cfg: RunConfig) -> str:
    from swm_ray.io.models import pick_device

    return pick_device(cfg.model.device)


def run_width(cfg: RunConfig, raw_yaml: str = "") -> dict:
    """Prune width only (`select.method` flap or taylor) to `select.ratio`, write the model folder; returns the
    summary (the same keys as `run_compress`)."""
    from swm_ray.io.data import calibration_for
    from swm_ray.methods.width import plan_width, width_only_plan
    from swm_ray.methods.width_targets import check_width_settings
    from swm_ray.plan.writer import write_model_folder

    s, m = cfg.select, cfg.model
    check_width_settings(cfg, s.method)
    if cfg.resume:
        raise UserError(f"--resume: --method {s.method} keeps no partial state (one statistics pass, then the "
                        f"writer): run the command without --resume")
    out = cfg.out or "swm-ray-compressed"
    check_run_paths(out, cfg.overwrite, [m.source, cfg.data.source])
    from swm_ray.recipes.preflight import check_targets

    check_targets(cfg)
    t0 = time.perf_counter()
    path, calib, n_layers = calibration_for(cfg)
    plan = width_only_plan(cfg, path, n_layers, calib)
    console().print(f"[bold]pruning width[/]: {s.method}, {s.ratio:.0%} of the parameters")
    t_sel = time.perf_counter()
    stats = pool_stats(cfg, calib) if s.method == "flap" else None
    plan_width(cfg, plan, path, calib, s.ratio, s.method, stats, device=_device(cfg))
    plan.extra["selection_seconds"] = round(time.perf_counter() - t_sel, 2)
    written = write_model_folder(path, plan, out, raw_yaml=raw_yaml, resolved_yaml=dump_yaml(cfg),
                                 overwrite=cfg.overwrite, attention=cfg.merge.attention, allow_pickle=m.allow_pickle,
                                 trust_remote_code=m.trust_remote_code)
    metrics = evaluate_into_card(cfg, written["out"], plan) if cfg.eval.enabled else None
    return {"out": written["out"], "plan": plan.to_dict(), "note": None, "metrics": metrics,
            "seconds": round(time.perf_counter() - t0, 2)}


def evaluate_into_card(cfg: RunConfig, out: str, plan, device: str | None = None) -> dict:
    """Evaluate the written folder (library evaluation, this process) and put the metrics into its card."""
    from swm_ray.evaluation.suite import evaluate_source
    from swm_ray.plan.writer import update_metrics

    model_cfg = {**cfg.model.model_dump(), "source": out, "revision": None}
    if device:
        model_cfg["device"] = device
    metrics = evaluate_source(out, model_cfg, cfg.eval)
    update_metrics(out, plan, metrics, resolved_yaml=dump_yaml(cfg))
    return metrics
