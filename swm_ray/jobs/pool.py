"""A pool of model-holding actors and the fan-out/gather pattern every job uses."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np

from swm_ray.config import RunConfig
from swm_ray.data import Calibration
from swm_ray.jobs.runtime import actor_count, actor_options, init_ray, threads_per_actor


def gather(refs: Sequence, description: str, total: int | None = None) -> list:
    """Wait for all refs with a progress bar; results come back in the order of `refs`."""
    import ray
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    pending = list(refs)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=False, console=_stderr_console()) as bar:
        task = bar.add_task(description, total=total or len(refs))
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            bar.advance(task, len(done))
    return ray.get(list(refs))


def _stderr_console():
    from rich.console import Console

    return Console(file=sys.stderr)


class ActorPool:
    """K actors, each with a model replica; work is addressed by minibatch index."""

    def __init__(self, cfg: RunConfig):
        import ray

        from swm_ray.actors.stats_actor import ModelActor

        init_ray(cfg.ray)
        self.k = actor_count(cfg.ray)
        opts = actor_options(cfg.ray)
        threads = threads_per_actor(cfg.ray, self.k)
        model_cfg = cfg.model.model_dump()
        self.actors = [ModelActor.options(**opts).remote(model_cfg, threads) for _ in range(self.k)]
        self.num_layers = ray.get([a.num_layers.remote() for a in self.actors])[0]

    def owner(self, calib: Calibration, batch_index: int):
        """The actor that owns a minibatch: contiguous ranges, fixed by (minibatches, actors)."""
        for k in range(self.k):
            if batch_index in calib.shard(k, self.k):
                return self.actors[k]
        raise IndexError(batch_index)

    def hsic_sums(self, calib: Calibration, kernel: str, skip: int) -> tuple[np.ndarray, int, int]:
        """Fan the minibatches out, gather once, add the per-minibatch sums in minibatch order."""
        import ray

        ids_ref = ray.put(calib.input_ids)
        refs = [
            self.owner(calib, b).hsic_sums.remote(ids_ref, calib.batches[b], kernel, skip)
            for b in range(len(calib.batches))
        ]
        results = gather(refs, f"statistics ({self.k} actor{'s' if self.k > 1 else ''})")
        total = np.zeros_like(results[0][0])
        count = tokens = 0
        for sums, c, t in results:  # fixed order: the result does not depend on the number of actors
            total += sums
            count += c
            tokens += t
        return total, count, tokens

    def init_scorers(self, calib: Calibration, criterion: str, method: str) -> None:
        """Each actor prepares candidate checks over the minibatches it owns (its data shard)."""
        import ray

        from swm_ray.errors import UserError

        if self.k > len(calib.batches):
            raise UserError(f"--actors {self.k} is more than the {len(calib.batches)} calibration minibatches: "
                            f"use fewer actors or more --samples")
        ids_ref = ray.put(calib.input_ids)
        ray.get([a.init_scorer.remote(ids_ref, [calib.batches[b] for b in calib.shard(k, self.k)], criterion, method)
                 for k, a in enumerate(self.actors)])

    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)


class RayEvaluator:
    """A selection `Evaluator` whose candidate checks fan out to the pool; shards are added in actor order."""

    def __init__(self, pool: ActorPool, criterion: str):
        self.pool = pool
        self.higher_is_better = criterion == "output"

    def score(self, groups, candidates):
        """One call per (candidate, actor), all submitted at once: the bar advances as checks finish."""
        import ray

        from swm_ray.scoring import reduce_scores

        refs = [a.score.remote([c]) for c in candidates for a in self.pool.actors]
        if len(candidates) > 1:
            flat = gather(refs, f"checking {len(candidates)} candidate merges")
        else:
            flat = ray.get(refs)
        k = len(self.pool.actors)
        parts = [[flat[i * k + j][0] for i in range(len(candidates))] for j in range(k)]  # per actor, in order
        return reduce_scores(parts)

    def commit(self, groups, window):
        import ray

        ray.get([a.commit.remote(window) for a in self.pool.actors])

    def reset(self):
        import ray

        ray.get([a.reset.remote() for a in self.pool.actors])
