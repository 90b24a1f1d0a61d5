"""`swm-ray compress`: calibration -> window selection (criterion × search) -> plan -> streaming writer.

The driver never holds the model: sizes come from the safetensors headers, candidate checks run on the
actor pool, and the writer applies the plan to the checkpoint tensor by tensor.
"""

from __future__ import annotations

import sys
import time

from swm_ray import storage
from swm_ray.config import RunConfig, dump_yaml
from swm_ray.errors import UserError
from swm_ray.jobs.analyze import prepare_calibration, similarity_matrix
from swm_ray.runstate import RunState
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


def model_sizes(path: str, cfg: RunConfig) -> tuple[int, int, object]:
    """(parameters, parameters of one decoder layer, config) from the checkpoint's headers alone."""
    from swm_ray.architectures import check_supported_config
    from swm_ray.checkpoint import Checkpoint
    from swm_ray.models import load_config, text_config_of

    config = load_config(path, cfg.model.trust_remote_code)
    check_supported_config(config)
    ckpt = Checkpoint(path, cfg.model.allow_pickle)
    tied = bool(getattr(text_config_of(config), "tie_word_embeddings", False))
    return ckpt.param_count(tied), ckpt.layer_params(0), config


def run_compress(cfg: RunConfig, raw_yaml: str = "") -> dict:
    """Select windows, write the model folder; returns the summary."""
    from swm_ray.jobs.pool import ActorPool, RayEvaluator
    from swm_ray.plan import Plan
    from swm_ray.selection import CkaEvaluator
    from swm_ray.writer import write_model_folder

    s = cfg.select
    out = cfg.out or "swm-ray-compressed"
    if s.threshold is None and s.ratio is None and s.layers is None:
        raise UserError("give a target: --threshold T, --ratio R or --layers N")
    if s.threshold is not None:
        check_threshold(s.criterion, s.threshold)
    storage.check_run_paths(out, cfg.overwrite, [cfg.model.source, cfg.data.source])
    t0 = time.perf_counter()
    path, calib, n_layers = prepare_calibration(cfg)
    state = RunState.open(out, "compress", cfg, cfg.resume)
    params_before, per_layer, _ = model_sizes(path, cfg)
    n_remove = target_layers(cfg, params_before, per_layer, n_layers)
    state.start(calib.input_ids)
    con = _console()
    con.print(f"[bold]selecting windows[/]: criterion {s.criterion}, search {s.search}, "
              f"target {f'{n_remove} layers' if n_remove is not None else f'T={s.threshold}'}")
    pool = None
    memo = state.load_json("memo.json") or {"entries": []}
    try:
        if s.criterion == "cka":
            matrix, _ = similarity_matrix(cfg, calib, state=state)
            inner = CkaEvaluator(matrix)
        else:
            pool = ActorPool(cfg, *calib.input_ids.shape)
            jobs = pool.scoring_jobs(calib, s.criterion, cfg.merge.method, cfg.merge.attention)
            inner = RayEvaluator(pool, s.criterion, jobs)
        ev = MemoEvaluator(inner, on_new=lambda entries: state.save_json("memo.json", {"entries": entries}))
        ev.load(memo["entries"])  # a resumed run replays the steps it had taken from these scores
        if memo["entries"]:
            con.print(f"resuming: {len(memo['entries'])} candidate scores from the interrupted run")
        t_search = time.perf_counter()
        sel = select_windows(cfg, ev, n_layers, n_remove, _reporter(s.criterion))
        t_select = time.perf_counter() - t_search  # the search alone (scorers ready, matrix loaded)
        modes = sorted({i["mode"] for i in pool.infos}) if pool is not None else []
    finally:
        if pool is not None:
            pool.shutdown()
    if not sel.windows:
        state.clear()  # the search finished: nothing to resume
        raise UserError(f"no window passed (criterion {s.criterion}, threshold {sel.threshold}): "
                        f"nothing to merge; loosen --threshold or give --layers")
    m = cfg.model
    plan = Plan(
        windows=[list(w) for w in sel.windows], num_layers_before=n_layers, merge=cfg.merge.method,
        source_model=m.source, criterion=s.criterion, search=s.search, threshold=sel.threshold,
        similarities=sel.scores, params_before=params_before,
        extra={"candidate_evaluations": ev.misses, "resumed_scores": len(memo["entries"]),
               "selection_seconds": round(t_select, 2),
               "paper_loop": s.paper_loop if s.search == "top-down" else None, "note": sel.note,
               "source_revision": m.revision, "attention": cfg.merge.attention, "actor_modes": modes,
               "calibration": {"source": cfg.data.source, "samples": int(calib.input_ids.shape[0]),
                               "seq_len": int(calib.input_ids.shape[1]), "bos_prepended": calib.bos_prepended}},
    )
    written = write_model_folder(path, plan, out, raw_yaml=raw_yaml, resolved_yaml=dump_yaml(cfg),
                                 overwrite=cfg.overwrite, attention=cfg.merge.attention,
                                 allow_pickle=m.allow_pickle, trust_remote_code=m.trust_remote_code)
    state.clear()
    metrics = None
    if cfg.eval.enabled:
        metrics = _evaluate_output(cfg, written["out"], plan, raw_yaml)
    return {"out": written["out"], "plan": plan.to_dict(), "note": sel.note, "metrics": metrics,
            "seconds": round(time.perf_counter() - t0, 2)}


def _evaluate_output(cfg: RunConfig, out: str, plan, raw_yaml: str) -> dict:
    """Evaluate the written folder (in memory or streaming, as it fits) and put the metrics into its card."""
    from swm_ray.jobs.eval import run_eval
    from swm_ray.writer import update_metrics

    on_out = cfg.model_copy(update={"model": cfg.model.model_copy(update={"source": out, "revision": None})})
    metrics = run_eval(on_out, [out])[out]
    update_metrics(out, plan, metrics, resolved_yaml=dump_yaml(cfg))
    return metrics
