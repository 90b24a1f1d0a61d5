"""`swm-ray grid`: Ray Tune runs every (model, method) trial of a grid; the driver writes the results table.

The driver prepares each model once (calibration set; the CKA matrix on the actor pool, from the statistics
cache when it was computed before) and hands both to the trials through the object store, so no trial
recomputes statistics. Rows arrive through a Tune callback as trials report them.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path

from swm_ray.config import RunConfig, dump_yaml
from swm_ray.errors import UserError
from swm_ray.io.artifacts import write_configs, write_json
from swm_ray.io.cache import cache_root
from swm_ray.io.outputs import atomic_output_dir
from swm_ray.io.probes import check_run_paths
from swm_ray.io.remote import arrow_filesystem, is_remote
from swm_ray.jobs.console import console
from swm_ray.recipes.results import ROW_KEYS, finalize_rows, write_results
from swm_ray.recipes.specs import check_grid, method_label, model_label, trial_specs


def _trial(config: dict, context: dict, cfg_json: dict, threads: int) -> None:
    """One Tune trial (runs in a Ray worker)."""
    import torch
    import transformers
    from ray import tune

    from swm_ray.io.models import resolve_model_path
    from swm_ray.recipes.trial import run_trial

    torch.set_num_threads(threads)
    transformers.utils.logging.disable_progress_bar()  # one line per row on the driver is enough
    cfg = RunConfig.model_validate(cfg_json)
    spec = config["spec"]
    ctx = context[spec["model"]]
    m = cfg.model
    path = resolve_model_path(spec["model"], m.revision, allow_pickle=m.allow_pickle,
                              trust_remote_code=m.trust_remote_code)  # on this node (cache or download)
    # a trial without GPUs sees none (Ray hides them), so "auto" means the trial's own resources
    run_trial(spec, cfg, path, ctx["calib"], ctx["matrix"], report=lambda row: tune.report(dict(row)),
              device=cfg.model.device)



def _for_model(cfg: RunConfig, source: str) -> RunConfig:
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"source": source})})


def _prepare(cfg: RunConfig, models: list[str]) -> dict:
    """Check every model and sample its calibration set before anything starts (no Ray needed)."""
    from swm_ray.io.data import calibration_for

    context = {}
    for m in models:
        _, calib, n_layers = calibration_for(_for_model(cfg, m))
        context[m] = {"calib": calib, "matrix": None, "num_layers": n_layers}
    return context


def _identities(context: dict) -> dict:
    """{model: what its rows were computed from}: the calibration rows' digest, and for a model given as a local
    folder its files' identity (`local_weights_identity`). A resume compares them with the experiment's."""
    import hashlib

    import numpy as np

    from swm_ray.io.checkpoint import local_weights_identity

    return {m: {"calibration": hashlib.sha256(np.ascontiguousarray(ctx["calib"].input_ids).tobytes()).hexdigest()[:16],
                "weights": local_weights_identity(m)} for m, ctx in context.items()}


def _check_unchanged(exp: Path, saved: dict | None, now: dict) -> None:
    """A resumed grid keeps its finished trials' rows, so a model with rows must be the same model on the same
    calibration rows for the trials that run again (a model whose trials all failed may have been mended)."""
    rows = exp / "rows.jsonl"
    kept = {str(r.get("model")) for r in _rows_from_file(rows)} if rows.is_file() else set()
    for m, was in (saved or {}).items():
        if m not in kept:
            continue
        is_ = now.get(m, {})
        if was.get("weights") is not None and was["weights"] != is_.get("weights"):
            raise UserError(f"--resume {exp}: the model folder {m} was rewritten since the grid started, so its "
                            f"finished rows describe other weights; start a new grid")
        if was.get("calibration") != is_.get("calibration"):
            raise UserError(f"--resume {exp}: the calibration rows of {model_label(m)} differ from the grid's (the "
                            f"data source or the model's tokenizer changed); start a new grid")


def _collector(rows_file: Path | None):
    """A Tune callback that keeps every reported row, prints it, and appends it to `rows_file` at once (so an
    interrupted grid keeps what it measured). Built here: Tune pickles callbacks, so it holds no stream."""
    from ray import tune

    class Collect(tune.Callback):
        def __init__(self):
            self.rows: list[dict] = []

        def on_trial_result(self, iteration, trials, trial, result, **info):
            row = {k: v for k, v in result.items() if k in ROW_KEYS or k.startswith(("task_", "split_"))}
            self.rows.append(row)
            if rows_file is not None:  # one write of a whole line; a line cut by a killed driver is ended first
                line = json.dumps(row, default=str) + "\n"
                with open(rows_file, "ab") as f:
                    if f.tell() and _last_byte(rows_file) != b"\n":
                        line = "\n" + line
                    f.write(line.encode())
            ppl = f"PPL {row['ppl']:.2f}" if row.get("ppl") is not None else row.get("status", "")
            console().print(f"  {model_label(str(row.get('model')))} · {method_label(row)} · "
                             f"{row.get('target_kind')} {row.get('target')}: {row.get('layers_before')} → "
                             f"{row.get('layers_after')} layers, {ppl}")

    return Collect()


def _absolute(source: str | None) -> str | None:
    """Tune runs trials in their own folders: local paths that exist become absolute."""
    if not source or is_remote(source) or ":" in source.split("/")[0]:
        return source
    p = Path(source).expanduser()
    return str(p.resolve()) if p.exists() else source


def absolute_paths(cfg: RunConfig) -> RunConfig:
    """Every local path a trial opens, made absolute (trials run in their own folders)."""
    g, h = cfg.grid, cfg.heal
    return cfg.model_copy(update={
        "grid": g.model_copy(update={"models": tuple(_absolute(m) for m in (g.models or (cfg.model.source,)))}),
        "eval": cfg.eval.model_copy(update={"ppl_data": _absolute(cfg.eval.ppl_data)}),
        "data": cfg.data.model_copy(update={"source": _absolute(cfg.data.source)}),
        "heal": h.model_copy(update={"data": _absolute(h.data), "source": _absolute(h.source)}),
    })


def _saved_grid(resume: str) -> tuple[Path, RunConfig, str, dict | None]:
    """(experiment folder, its config, its raw YAML, its models' identities) of an earlier grid to resume."""
    from ray import tune

    exp = Path(resume).expanduser().resolve()
    if is_remote(resume) or not (exp / "grid.json").is_file() or not tune.Tuner.can_restore(str(exp)):
        raise UserError(f"--resume {resume}: not a local swm-ray grid experiment (give the folder printed as "
                        f"'Tune experiment:' by the grid to resume)")
    saved = json.loads((exp / "grid.json").read_text())
    return exp, RunConfig.model_validate(saved["config"]), saved.get("raw", ""), saved.get("identities")


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


def _rows_from_file(path: Path) -> list[dict]:
    """Rows as streamed; a trial restarted after an interruption reports its targets again: keep the last. A
    line cut short by a killed driver is skipped: its trial did not finish, and a resume runs it again."""
    keyed: dict = {}
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            keyed[tuple(str(r.get(k)) for k in ("model", "method", "criterion", "search", "merge", "compensate",
                                                 "heal", "then_width", "target"))] = r
    return list(keyed.values())


def run_grid(cfg: RunConfig, raw_yaml: str = "", resume: str | None = None) -> dict:
    """Run the grid (or finish the earlier one at `resume`: its unfinished and failed trials run again);
    write results.parquet/.csv/.md, plots and configs to `cfg.out`. Returns the summary."""
    import ray
    from ray import tune

    from swm_ray.jobs.runtime import init_ray, joined_cluster

    exp = identities = None
    if resume:
        exp, saved, raw_yaml, identities = _saved_grid(resume)
        cfg = saved.model_copy(update={"out": cfg.out, "overwrite": cfg.overwrite})
    check_grid(cfg)
    g = cfg.grid
    cfg = absolute_paths(cfg)
    g = cfg.grid
    out = cfg.out or "swm-ray-grid"
    check_run_paths(out, cfg.overwrite, [*(cfg.grid.models or [cfg.model.source]), cfg.data.source])
    from swm_ray.recipes.preflight import check_grid_targets

    check_grid_targets(cfg)
    t0 = time.perf_counter()
    con = console()
    models = list(g.models)
    specs = trial_specs(cfg)
    context = _prepare(cfg, models)
    if exp:
        _check_unchanged(exp, identities, _identities(context))
    con.print(f"[bold]grid[/]: {len(specs)} trials ({len(models)} model(s)), targets {g.target_kind()} "
              f"{list(g.targets())}")
    init_ray(cfg.ray)
    from swm_ray.jobs.analyze import similarity_matrix

    for m, ctx in context.items():
        calib = ctx["calib"]
        if "cka" in g.criteria:
            ctx["matrix"], info = similarity_matrix(_for_model(cfg, m), calib)
            how = "from the statistics cache" if info.get("cached") else "computed"
            con.print(f"  {model_label(m)}: CKA matrix {how}")
        con.print(f"  {model_label(m)}: {ctx['num_layers']} decoder layers, {calib.input_ids.shape[0]}×"
                  f"{calib.input_ids.shape[1]} calibration tokens")
    gpus = g.gpus_per_trial
    have = ray.cluster_resources()
    if gpus is None:
        gpus = 1 if have.get("GPU", 0) >= 1 else 0
    for what, want, flag in (("CPU", g.cpus_per_trial, "--cpus-per-trial"), ("GPU", gpus, "--gpus-per-trial")):
        if want > have.get(what, 0) and not joined_cluster(cfg.ray):  # a cluster may grow; this machine will not
            raise UserError(f"{flag} {want:g}: this machine's Ray has {have.get(what, 0):g} {what}(s), so no trial "
                            f"could start; ask for at most that many")
    threads = max(1, int(g.cpus_per_trial))
    trainable = tune.with_resources(
        tune.with_parameters(_trial, context=context, cfg_json=cfg.model_dump(mode="json"), threads=threads),
        {"cpu": g.cpus_per_trial, "gpu": gpus},
    )
    # unique: two grids started in the same second never share an experiment (its rows, its grid.json)
    name = exp.name if exp else f"grid-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    if exp:
        fs, spath, where = None, str(exp.parent), str(exp)
        rows_file = exp / "rows.jsonl"
    elif g.tune_storage:
        fs, spath = arrow_filesystem(g.tune_storage)
        where, rows_file = f"{g.tune_storage.rstrip('/')}/{name}", None
    else:  # on this machine, outside the output folder: it survives an interrupted or failed grid
        fs, spath = None, str(cache_root() / "grids")
        where = str(Path(spath, name))
        Path(where).mkdir(parents=True, exist_ok=False)
        rows_file = Path(where, "rows.jsonl")
        Path(where, "grid.json").write_text(json.dumps({"config": cfg.model_dump(mode="json"), "raw": raw_yaml,
                                                        "identities": _identities(context)}))
    con.print(f"  Tune experiment: {where}" + (f" (rows also go to {rows_file} as they arrive)" if rows_file else ""))
    collect = _collector(rows_file)
    run_cfg = tune.RunConfig(name=name, storage_path=spath, storage_filesystem=fs, verbose=0, callbacks=[collect],
                             failure_config=tune.FailureConfig(max_failures=0))
    with atomic_output_dir(out, cfg.overwrite) as folder:
        if exp:  # finished trials keep their rows; unfinished and failed ones start again
            tuner = tune.Tuner.restore(str(exp), trainable=trainable, restart_errored=True)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space={"spec": tune.grid_search(specs)},
                tune_config=tune.TuneConfig(max_concurrent_trials=g.concurrency, reuse_actors=False),
                run_config=run_cfg,
            )
        results = tuner.fit()
        unfinished = len(results) - results.num_terminated - results.num_errors
        if unfinished:  # Tune ends its run on Ctrl-C and returns: what it left unfinished is no table yet
            resumable = f"; finish it with `swm-ray grid --resume {where}`" if rows_file is not None else ""
            raise UserError(f"interrupted: {unfinished} of {len(results)} trials did not finish, so no table was "
                            f"written{resumable}", exit_code=130)
        errors = []
        for i in range(len(results)):
            res = results[i]
            if res.error is not None:
                spec = res.config["spec"]
                msg = str(res.error).strip().splitlines()[-1][:300] if str(res.error).strip() else repr(res.error)
                errors.append({**spec, "status": f"error: {msg}"})
                con.print(f"[red]trial failed[/]: {spec['model']} · {method_label(spec)}: {msg}")
        rows = _rows_from_file(rows_file) if rows_file is not None and rows_file.exists() else collect.rows
        table = finalize_rows(rows + errors)
        files = write_results(folder, table)
        write_configs(folder, raw_yaml, dump_yaml(cfg))
        summary = {"trials": len(specs), "rows": len(table), "errors": len(errors), "files": files,
                   "tune_experiment": where, "seconds": round(time.perf_counter() - t0, 2)}
        write_json(folder / "summary.json", summary)
    return {**summary, "out": out, "rows_table": table}

