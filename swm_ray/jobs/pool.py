"""A pool of model-holding actors and the fan-out/gather pattern every job uses.

Work is split by calibration rows: the statistics pass by its fixed minibatches (contiguous ranges per
actor; an actor may own none), candidate scoring by rows (contiguous ranges, so any number of actors up to
the number of rows works). The actor count is checked against the data before any actor starts, and the
actors are placed by one placement group (SPREAD over the nodes, one bundle of CPUs and GPUs per actor),
whose placement is awaited with a timeout.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable, Sequence

import numpy as np

from swm_ray.config import RunConfig
from swm_ray.data import Calibration
from swm_ray.errors import RunError, UserError
from swm_ray.jobs.console import console
from swm_ray.jobs.runtime import actor_count, actor_options, init_ray, threads_per_actor


def gather(refs: Sequence, description: str, *, pool: ActorPool | None = None, owners: Sequence[int] = (),
           on_result: Callable[[int, object], None] | None = None, transient: bool = False) -> list:
    """Wait for all refs with a progress bar (`transient`: gone when done, for the many small calls of one
    larger step that has its own bar); results come back in the order of `refs`.

    `on_result(i, value)` sees each result as it arrives (run state is saved there). With a `pool` and the
    actor index owning each ref (`owners`), no progress for `ray.call_timeout_s` counts as stuck: the actors
    still holding pending calls are killed and restarted by Ray, which retries their calls."""
    import ray
    from rich.progress import Progress

    pending = {ref: i for i, ref in enumerate(refs)}
    results: list = [None] * len(refs)
    timeout = pool.cfg.ray.call_timeout_s if pool is not None and owners else None
    last = time.monotonic()
    with Progress(*_columns(), transient=transient, console=console()) as bar:
        task = bar.add_task(description, total=len(refs))
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=min(timeout or 5.0, 5.0))
            for ref in done:
                i = pending.pop(ref)
                results[i] = _get(ref, pool, owners[i] if owners else None)
                if on_result is not None:
                    on_result(i, results[i])
                bar.advance(task, 1)
                last = time.monotonic()
            if not done and timeout is not None and time.monotonic() - last > timeout:
                pool.restart({owners[i] for i in pending.values()}, f"no progress for {timeout:.0f} s")
                last = time.monotonic()
    return results


def _columns() -> tuple:
    """The columns of every progress bar: description, bar, done/total, elapsed."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    return TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()


@contextlib.contextmanager
def progress_bar(description: str, total: int):
    """A progress bar for work the driver steps through itself; yields the function that advances it."""
    from rich.progress import Progress

    with Progress(*_columns(), transient=False, console=console()) as bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task, 1)


def _get(ref, pool: ActorPool | None, owner: int | None):
    """ray.get of one result; an actor that died beyond its restarts becomes a one-line RunError."""
    import ray
    from ray.exceptions import RayActorError

    try:
        return ray.get(ref)
    except RayActorError as e:
        where = f"actor {owner}" if owner is not None else "an actor"
        limit = pool.cfg.ray.max_restarts if pool is not None else 0
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise RunError(f"{where} died and could not be restarted (ray.max_restarts {limit}; a node lost for good "
                       f"with no room elsewhere ends the run): {first}. Run the same command with --resume to "
                       f"continue from what was finished") from None



def row_shards(rows: int, k: int) -> list[tuple[int, int]]:
    """Contiguous row ranges [a, b) of k shards covering 0..rows (sizes differ by at most one)."""
    return [(j * rows // k, (j + 1) * rows // k) for j in range(k)]


def check_actor_count(k: int, rows: int) -> None:
    if k > rows:
        raise UserError(f"--actors {k} is more than the {rows} calibration rows (each actor scores at least one "
                        f"row): use at most {rows} actors or more --samples")


class ActorPool:
    """K actors, each with the model (in memory or streamed) and a share of the calibration rows."""

    def __init__(self, cfg: RunConfig, rows: int, seq_len: int, fit_rows: int = 0):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from swm_ray.actors.stats_actor import ModelActor

        init_ray(cfg.ray)
        self.cfg = cfg
        self.k = actor_count(cfg.ray, rows)
        check_actor_count(self.k, rows)  # before anything is placed or loaded
        bundle = actor_options(cfg.ray, self.k)
        self.pg = self._place(bundle, cfg.ray.placement_timeout_s)
        nodes = self._bundle_nodes()
        threads = threads_per_actor(cfg.ray, self.k)
        model_cfg = cfg.model.model_dump()
        shard_rows = -(-max(rows, fit_rows) // self.k)  # a compensation fit's rows are split the same way
        self.actors = []
        self.restarts = 0
        try:  # an actor that cannot load (a budget below one layer, unreadable weights) frees the group
            for j in range(self.k):
                strategy = PlacementGroupSchedulingStrategy(placement_group=self.pg,
                                                            placement_group_bundle_index=j)
                share = nodes.count(nodes[j]) if nodes else self.k
                self.actors.append(ModelActor.options(
                    scheduling_strategy=strategy, max_restarts=cfg.ray.max_restarts, max_task_retries=-1,
                    **bundle,
                ).remote(model_cfg, threads, shard_rows, seq_len, int(bundle.get("num_gpus", 1)), share))
            self.infos = gather([a.info.remote() for a in self.actors], f"loading the model ({self.k} actor"
                                f"{'s' if self.k > 1 else ''})", pool=self, owners=range(self.k))
        except BaseException:
            self.shutdown()
            raise
        self.num_layers = self.infos[0]["num_layers"]
        self.streaming = any(i["mode"] == "stream" for i in self.infos)

    def restart(self, actors: set[int], why: str) -> None:
        """Kill stuck actors; Ray restarts them (they reload and rebuild their state) and retries their calls."""
        import ray

        self.restarts += len(actors)
        if self.restarts > self.cfg.ray.max_restarts * self.k:
            raise RunError(f"actors {sorted(actors)} stuck again ({why}) after {self.restarts - len(actors)} "
                           f"restarts; run the same command with --resume to continue from what was finished")
        console().print(f"[yellow]restarting stuck actor(s) {sorted(actors)}[/]: {why}")
        for j in actors:
            ray.kill(self.actors[j], no_restart=False)

    def _place(self, bundle: dict, timeout_s: float):
        """A SPREAD placement group of k bundles, ready within `timeout_s`, else a one-line error."""
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group

        res = {"CPU": bundle["num_cpus"], **({"GPU": bundle["num_gpus"]} if "num_gpus" in bundle else {})}
        pg = placement_group([res] * self.k, strategy="SPREAD")
        ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
        if not ready:
            remove_placement_group(pg)
            have = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU", "memory")}
            free = {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU", "memory")}
            raise RunError(f"the cluster could not place {self.k} actors of {res} within {timeout_s:.0f} s: it has "
                           f"{_resources_text(have)} ({_resources_text(free)} free); use fewer --actors or "
                           f"--gpus-per-actor, add nodes, or raise --set ray.placement_timeout_s")
        return pg

    def _bundle_nodes(self) -> list[str]:
        from ray.util.placement_group import placement_group_table

        table = placement_group_table(self.pg)
        mapping = table.get("bundles_to_node_id") or {}
        return [mapping.get(j, "") for j in range(self.k)]

    def owner(self, calib: Calibration, batch_index: int) -> int:
        """The actor that owns a minibatch: contiguous ranges, fixed by (minibatches, actors)."""
        for j in range(self.k):
            if batch_index in calib.shard(j, self.k):
                return j
        raise IndexError(batch_index)

    def per_minibatch(self, calib: Calibration, method: str, args: tuple, what: str,
                      done: dict[int, object] | None = None,
                      on_batch: Callable[[int, object], None] | None = None,
                      transient: bool = False) -> dict[int, object]:
        """Run actor `method(ids, batches, *args)` over every minibatch not in `done`, each by the actor that owns
        it; returns {minibatch: result}. In memory every minibatch is its own call (the bar advances per
        minibatch); a streaming actor gets all its minibatches in one call, so each layer is read once.
        `on_batch(b, result)` sees each result as it arrives (a resumable run saves it there)."""
        import ray

        results: dict[int, object] = dict(done or {})
        ids_ref = ray.put(calib.input_ids)
        calls: list[tuple[int, list[int]]] = []  # (actor, minibatch indices)
        for j in range(self.k):
            mine = [b for b in calib.shard(j, self.k) if b not in results]
            if self.infos[j]["mode"] == "stream":
                calls += [(j, mine)] if mine else []
            else:
                calls += [(j, [b]) for b in mine]
        refs = [getattr(self.actors[j], method).remote(ids_ref, [calib.batches[b] for b in bs], *args)
                for j, bs in calls]

        def arrived(i: int, values) -> None:
            for b, v in zip(calls[i][1], values):
                results[b] = v
                if on_batch is not None:
                    on_batch(b, v)

        gather(refs, f"{what} ({self.k} actor{'s' if self.k > 1 else ''})", pool=self,
               owners=[j for j, _ in calls], on_result=arrived, transient=transient)
        return results

    def hsic_sums(self, calib: Calibration, kernel: str, skip: int, done: dict[int, np.ndarray] | None = None,
                  on_batch: Callable[[int, np.ndarray], None] | None = None) -> tuple[np.ndarray, int, int]:
        """HSIC sums of the calibration set: per-minibatch sums added in minibatch order, so the result does
        not depend on the number of actors. `done`/`on_batch`: see `per_minibatch`."""
        per_batch = self.per_minibatch(calib, "hsic_sums", (kernel, skip), "statistics", done, on_batch)
        total = np.zeros((self.num_layers + 1, self.num_layers + 1))
        for b in range(len(calib.batches)):  # fixed order
            total += per_batch[b]
        tokens = sum((b - a) * calib.input_ids.shape[1] for a, b in calib.batches)
        return total, len(calib.batches), tokens

    def block_influence(self, calib: Calibration) -> np.ndarray:
        """(L,) Block Influence over the calibration set, minibatches added in order (as in one process)."""
        from swm_ray.baselines import influence_from_sums

        per_batch = self.per_minibatch(calib, "block_influence", (), "Block Influence")
        tokens = sum((b - a) * calib.input_ids.shape[1] for a, b in calib.batches)
        return influence_from_sums([per_batch[b] for b in range(len(calib.batches))], tokens)

    def angular_distances(self, calib: Calibration) -> np.ndarray:
        """(L+1, L+1) mean last-token angular distances, minibatches added in order (as in one process)."""
        from swm_ray.baselines import angular_from_sums

        per_batch = self.per_minibatch(calib, "angular_distances", (), "angular distances")
        return angular_from_sums([per_batch[b] for b in range(len(calib.batches))], int(calib.input_ids.shape[0]))

    def width_stats(self, calib: Calibration, request: dict) -> dict:
        """FLAP's sums over the calibration set (`width.width_stats_sums`), minibatches added in order."""
        from swm_ray.width import add_width_sums

        per_batch = self.per_minibatch(calib, "width_stats", (request,), "width statistics")
        return add_width_sums([per_batch[b] for b in range(len(calib.batches))])

    def compensation_sums(self, calib: Calibration, request: dict, transient: bool = False) -> list:
        """Per target window of `request`, the compensation sums over every calibration row: each actor sums its
        own minibatches (one call, so a streaming actor reads each layer once), the driver adds the actors'
        sums in actor order, i.e. row order."""
        import ray

        from swm_ray.compensation import add_sums

        ids_ref = ray.put(calib.input_ids)
        req_ref = ray.put(request)
        calls = [(j, [calib.batches[b] for b in calib.shard(j, self.k)]) for j in range(self.k)]
        calls = [(j, bs) for j, bs in calls if bs]
        refs = [self.actors[j].compensation_sums.remote(ids_ref, bs, req_ref) for j, bs in calls]
        what = f"compensation sums of {len(request['targets'])} window(s)"
        parts = gather(refs, f"{what} ({self.k} actor{'s' if self.k > 1 else ''})", pool=self,
                       owners=[j for j, _ in calls], transient=transient)
        return [add_sums([p[t] for p in parts]) for t in range(len(request["targets"]))]

    def scoring_jobs(self, calib: Calibration, criterion: str, method: str, attention: str = "global") -> list:
        """What each actor's candidate checks need (its rows, the criterion...), sent with every call so that a
        restarted actor can rebuild its scorer; the actors build them now."""
        import ray

        ids_ref = ray.put(calib.input_ids)
        key = hashlib.sha256(calib.input_ids.tobytes()).hexdigest()[:16] + f"|{criterion}|{method}|{attention}"
        shards = row_shards(int(calib.input_ids.shape[0]), self.k)
        jobs = [{"ids": ids_ref, "rows": shards[j], "criterion": criterion, "method": method,
                 "attention": attention, "key": f"{key}|{shards[j]}"} for j in range(self.k)]
        gather([a.prepare.remote(jobs[j]) for j, a in enumerate(self.actors)], "reference outputs",
               pool=self, owners=range(self.k))
        return jobs

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for a in self.actors:
            ray.kill(a)
        remove_placement_group(self.pg)


def _resources_text(res: dict) -> str:
    return "{" + ", ".join(f"{k}: {v / 2**30:.1f} GiB" if k == "memory" else f"{k}: {v:g}"
                           for k, v in sorted(res.items())) + "}"


class RayEvaluator:
    """A selection `Evaluator` whose candidate checks fan out to the pool; shards are added in row order.

    The evaluator keeps the committed windows itself and sends them with every call (with each actor's job),
    so a call retried on a restarted actor rebuilds the same state: nothing is lost when an actor dies."""

    def __init__(self, pool: ActorPool, criterion: str, jobs: list[dict]):
        self.pool = pool
        self.jobs = jobs
        self.higher_is_better = criterion == "output"
        self.commits: list[tuple[int, int]] = []

    def score(self, groups, candidates):
        """In memory one call per (candidate, actor), all submitted at once, so the bar advances as checks
        finish; streaming one call per actor with every candidate (each layer is built once per step)."""
        from swm_ray.scoring import reduce_scores

        actors, k = self.pool.actors, self.pool.k
        what = f"checking {len(candidates)} candidate merge{'s' if len(candidates) > 1 else ''}"
        if self.pool.streaming:
            refs = [a.score.remote(self.jobs[j], self.commits, list(candidates)) for j, a in enumerate(actors)]
            return reduce_scores(gather(refs, what, pool=self.pool, owners=range(k)))
        refs = [actors[j].score.remote(self.jobs[j], self.commits, [c]) for c in candidates for j in range(k)]
        flat = gather(refs, what, pool=self.pool, owners=[j for _ in candidates for j in range(k)])
        parts = [[flat[i * k + j][0] for i in range(len(candidates))] for j in range(k)]  # per actor, in order
        return reduce_scores(parts)

    def commit(self, groups, window):
        self.commits.append(tuple(window))

    def reset(self):
        self.commits = []
