"""The evaluation actor: a thin Ray shell around `swm_ray.evaluation` (one per GPU, else per CPU slot)."""

from __future__ import annotations

import ray


@ray.remote
class EvalActor:
    """Loads models on its own device and evaluates them; every method delegates to the Ray-free library."""

    def __init__(self, threads: int, offline: bool):
        from swm_ray.io.models import set_threads

        if offline:
            from swm_ray.evaluation.zeroshot import set_offline_env

            set_offline_env()
        set_threads(threads)

    def evaluate(self, source: str, model_cfg: dict, options: dict) -> dict:
        """Zero-shot tasks and perplexity of one model (see `evaluate_source`)."""
        from swm_ray.evaluation.suite import evaluate_source

        return evaluate_source(source, model_cfg, options)

    def latency(self, sources: list[str], model_cfg: dict, options: dict,
                revisions: dict | None = None) -> dict[str, dict]:
        """Latency of several models, one after another on this actor's device."""
        from swm_ray.evaluation.suite import latency_of_sources

        return latency_of_sources(sources, model_cfg, options, revisions)
