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
from swm_ray.errors import RunError, UserError, find_user_error
from swm_ray.io.data import Calibration
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
    """ray.get of one result. A user mistake found in an actor (Ray wraps it in RayTaskError, or keeps its text
    when the actor's `__init__` raised it) is raised as the plain UserError, so the CLI prints one line; an
    actor that could not start, or died beyond its restarts, becomes a one-line RunError."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    try:
        return ray.get(ref)
    except (RayTaskError, RayActorError) as e:
        user = find_user_error(e)
        if user is not None:
            raise user.with_traceback(None) from None
        if not isinstance(e, RayActorError):
            raise
        where = f"actor {owner}" if owner is not None else "an actor"
        if e.actor_init_failed:  # the last line of the remote traceback names the exception
            lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
            raise RunError(f"{where} could not start: {lines[-1][:300] if lines else type(e).__name__}") from None
        limit = pool.cfg.ray.max_restarts if pool is not None else 0
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise RunError(f"{where} died and could not be restarted (ray.max_restarts {limit}; a node lost for good "
                       f"with no room elsewhere ends the run): {first}. Run the same command with --resume to "
                       f"continue from what was finished") from None


def _check_budget(cfg: RunConfig, rows: int, seq_len: int, fit_rows: int = 0) -> None:
    """A --max-memory below one layer of the model is one line before any actor is placed, before an embedded
    Ray even starts (`memory.check_budget`, for an actor's share of the rows)."""
    if cfg.model.max_memory is None:
        return
    from swm_ray.compute.memory import check_budget
    from swm_ray.io.models import resolve_model_path
    from swm_ray.jobs.runtime import actor_dtype

    m = cfg.model
    path = resolve_model_path(m.source, m.revision, allow_pickle=m.allow_pickle, trust_remote_code=m.trust_remote_code)
    dtype = actor_dtype(cfg)  # joins a cluster to join, so the count below is the cluster's
    check_budget(m, path, dtype, -(-max(rows, fit_rows) // actor_count(cfg.ray, rows)), seq_len)


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

        _check_budget(cfg, rows, seq_len, fit_rows)  # before Ray starts
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

    def width_stats(self, calib: Calibration, request: dict) -> dict:
        """FLAP's sums over the calibration set (`width_stats.width_stats_sums`), minibatches added in order."""
        from swm_ray.compute.width_stats import add_width_sums

        per_batch = self.per_minibatch(calib, "width_stats", (request,), "width statistics")
        return add_width_sums([per_batch[b] for b in range(len(calib.batches))])

    def counters(self) -> list[dict]:
        """Each actor's layer reads (streaming) and tokens run through decoder layers so far."""
        return gather([a.counters.remote() for a in self.actors], "counters", owners=range(self.k), pool=self,
                      transient=True)

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for a in self.actors:
            ray.kill(a)
        remove_placement_group(self.pg)


def _resources_text(res: dict) -> str:
    return "{" + ", ".join(f"{k}: {v / 2**30:.1f} GiB" if k == "memory" else f"{k}: {v:g}"
                           for k, v in sorted(res.items())) + "}"


def plan_shards(calib: Calibration, k: int) -> list[tuple[int, int]]:
    """Contiguous row ranges of the k actors: aligned to the calibration minibatches when there are at least k
    of them (so the reference pass sums every minibatch's HSIC where its rows are), else `row_shards`; the last
    shard takes the rows after the last minibatch."""
    rows = int(calib.input_ids.shape[0])
    nb = len(calib.batches)
    if nb < k or nb == 0:
        return row_shards(rows, k)
    out = []
    for j in range(k):
        mine = calib.shard(j, k)
        a = calib.batches[mine[0]][0] if mine else 0
        b = calib.batches[mine[-1]][1] if mine else 0
        out.append((a, rows if j == k - 1 else b))
    return out


def _batch_shards(calib: Calibration | None, k: int) -> list[tuple[np.ndarray | None, list]]:
    """Per actor: (its rows of `calib` by whole minibatches, those minibatches relative to them)."""
    out = []
    for j in range(k):
        mine = [] if calib is None else calib.shard(j, k)
        if not mine:
            out.append((None, []))
            continue
        a, b = calib.batches[mine[0]][0], calib.batches[mine[-1]][1]
        out.append((calib.input_ids[a:b], [(calib.batches[i][0] - a, calib.batches[i][1] - a) for i in mine]))
    return out


class RayBackend:
    """`session.Scoring`'s backend over the actor pool (started on first need): each actor holds a
    `ShardSession` of its rows (planning rows by `plan_shards`, held-out and fit rows by whole minibatches) and
    returns per-row sums, which are added here in row order, so every answer equals the in-process backend's."""

    def __init__(self, cfg: RunConfig, calib: Calibration, *, validation: Calibration | None = None,
                 extra: Calibration | None = None, fit_calib: Calibration | None = None):
        self.cfg, self.calib, self.val, self.extra = cfg, calib, validation, extra
        self.fit_calib = calib if fit_calib is None else fit_calib
        self.attention = cfg.merge.attention
        self.pool: ActorPool | None = None
        self.jobs: list[dict] = []
        self.passes = 0

    @property
    def extra_rows(self) -> int:
        return 0 if self.extra is None else int(self.extra.input_ids.shape[0])

    def _pool(self) -> ActorPool:
        if self.pool is None:
            self.pool = ActorPool(self.cfg, *self.calib.input_ids.shape,
                                  fit_rows=int(self.fit_calib.input_ids.shape[0]))
        return self.pool

    def modes(self) -> list[str]:
        return sorted({i["mode"] for i in self.pool.infos}) if self.pool is not None else []

    def shutdown(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None

    def release(self) -> None:
        """The actors drop their sessions (the search's cached hidden states) and keep their model."""
        if self.pool is not None:
            gather([a.release.remote() for a in self.pool.actors], "releasing the search's states",
                   pool=self.pool, owners=range(self.pool.k), transient=True)

    def _many(self) -> str:
        k = self.pool.k
        return f"{k} actor{'s' if k > 1 else ''}"

    def reference(self, needs) -> dict:
        """The reference pass on every actor's rows (one call each); HSIC of a minibatch split between two
        actors' rows (more actors than minibatches) is summed by a pass of its own."""
        import dataclasses

        import ray

        from swm_ray.compute.refpass import add_row_stats

        pool = self._pool()
        k, calib = pool.k, self.calib
        shards = plan_shards(calib, k)
        ids_ref = ray.put(calib.input_ids)
        vals, fits = _batch_shards(self.val, k), _batch_shards(self.fit_calib, k)
        inside = {j: {b: (ba - a, bb - a) for b, (ba, bb) in enumerate(calib.batches) if a <= ba and bb <= b_}
                  for j, (a, b_) in enumerate(shards)} if needs.hsic else {j: {} for j in range(k)}
        key = hashlib.sha256(calib.input_ids.tobytes() + repr(needs).encode()).hexdigest()[:16] + f"|{self.passes}"
        self.jobs = [{"key": f"{key}|{j}", "ids": ids_ref, "rows": shards[j], "needs": dataclasses.asdict(needs),
                      "attention": self.attention, "hsic": inside[j], "val_ids": vals[j][0],
                      "val_batches": vals[j][1], "fit_ids": fits[j][0], "fit_batches": fits[j][1]}
                     for j in range(k)]
        parts = gather([a.prepare.remote(self.jobs[j]) for j, a in enumerate(pool.actors)],
                       f"reference pass ({self._many()})", pool=pool, owners=range(k))
        self.passes += 1
        out = add_row_stats(parts, pool.num_layers)
        if needs.hsic:
            covered = {b for j in range(k) for b in inside[j]}
            if len(covered) < len(calib.batches):
                missing = {b: s for b, s in pool.per_minibatch(
                    calib, "hsic_sums", (needs.kernel, needs.skip_first_tokens), "statistics",
                    done={b: None for b in covered}).items() if b not in covered}
                total = np.zeros((pool.num_layers + 1, pool.num_layers + 1))
                found = {b: m for p in parts for b, m in (p.hsic or {}).items()} | missing
                for b in sorted(found):
                    total += found[b]
                out["hsic"] = total
        return out

    def check(self, requests) -> list[list[dict[str, float]]]:
        """In memory one call per (candidate, actor), all submitted at once, so the bar advances as checks finish;
        streaming one call per actor with every request (each layer is read once per current model)."""
        from swm_ray.compute.scoring import reduce_signals
        from swm_ray.methods.checks import CheckRequest

        pool = self.pool
        k = pool.k
        n = sum(len(r.candidates) for r in requests)
        what = f"checking {n} candidate model{'s' if n > 1 else ''}"
        if pool.streaming:
            refs = [a.check.remote(self.jobs[j], list(requests)) for j, a in enumerate(pool.actors)]
            per_actor = gather(refs, what, pool=pool, owners=range(k))
            return [reduce_signals([per_actor[j][i] for j in range(k)]) for i in range(len(requests))]
        singles = [CheckRequest(r.merge, r.groups, (c,), r.signals) for r in requests for c in r.candidates]
        refs = [pool.actors[j].check.remote(self.jobs[j], [q]) for q in singles for j in range(k)]
        flat = gather(refs, what, pool=pool, owners=[j for _ in singles for j in range(k)])
        values = [reduce_signals([flat[i * k + j][0] for j in range(k)])[0] for i in range(len(singles))]
        out, at = [], 0
        for r in requests:
            out.append(values[at : at + len(r.candidates)])
            at += len(r.candidates)
        return out

    def validate(self, plans, extra: bool = False) -> list:
        from swm_ray.compute.validation import RowLosses

        pool = self.pool
        plans = [(list(w), m, dict(f or {})) for w, m, f in plans]
        if extra:
            reqs = [{"windows": w, "merge": m, "attention": self.attention, "fits": f} for w, m, f in plans]
            per = pool.per_minibatch(self.extra, "plan_nll", (reqs,), "further held-out rows", transient=True)
            return [RowLosses.from_parts([per[b][i] for b in range(len(self.extra.batches))])
                    for i in range(len(plans))]
        owners = [j for j in range(pool.k) if self.jobs[j]["val_batches"]]
        refs = [pool.actors[j].validate.remote(self.jobs[j], plans) for j in owners]
        per_actor = gather(refs, f"validation loss of {len(plans)} plan(s)", pool=pool, owners=owners,
                           transient=True)
        return [RowLosses.from_parts([part for got in per_actor for part in got[i]]) for i in range(len(plans))]

    def task_logliks(self, rows, plans) -> list:
        """Per plan, every task row's log-likelihood. Every actor gets every row and runs its share of one
        batching of them (`plans_logliks`'s `part`): the items are packed and batched as in one process, so the
        values do not depend on the number of actors; each row is scored by one actor, the others give 0."""
        pool = self.pool
        plans = [(list(w), m, dict(f or {})) for w, m, f in plans]
        k = max(1, min(pool.k, len(rows.rows)))
        refs = [pool.actors[j].task_logliks.remote(rows.rows, rows.spans, plans, self.attention, (j, k))
                for j in range(k)]
        got = gather(refs, f"task-style items of {len(plans)} plan(s)", pool=pool, owners=range(k), transient=True)
        return [np.sum([g[i] for g in got], axis=0) for i in range(len(plans))]

    def plan_loss(self, windows, merge: str, fits=None) -> float:
        from swm_ray.compute.validation import mean_nll

        pool = self.pool
        owners = [j for j in range(pool.k) if self.jobs[j]["rows"][1] > self.jobs[j]["rows"][0]]
        plan = ([list(w) for w in windows], merge, dict(fits or {}))
        got = gather([pool.actors[j].plan_loss.remote(self.jobs[j], plan) for j in owners], "calibration loss",
                     pool=pool, owners=owners, transient=True)
        return mean_nll([part for parts in got for part in parts])

    def fit_pass(self, windows, merge: str, *, source: str, skip_first: int, fits=None, targets=None):
        spec = {"windows": [tuple(w) for w in windows], "merge": merge, "source": source, "skip_first": skip_first,
                "fits": dict(fits or {}), "targets": None if targets is None else [tuple(t) for t in targets]}
        return RemoteFitPass(self, spec)

    def counters(self) -> dict:
        streams = self.pool is not None and self.pool.streaming
        per = self.pool.counters() if self.pool is not None else []
        from swm_ray.methods.session import run_counters

        return run_counters(self.passes, sum(c["layer_reads"] for c in per) if streams else None,
                         sum(c["layer_tokens"] for c in per), self.pool.num_layers if self.pool else 0,
                         int(self.calib.input_ids.size))


class RemoteFitPass:
    """A `fitpass.FitPass` spread over the actors' fit rows: each actor runs the pass on its rows, the driver
    adds the window's sums in actor (row) order, solves, and sends the fit back with the next step. An actor that
    lost the pass (restarted, or evicted it) is sent the pass's recipe and replays it."""

    def __init__(self, backend: RayBackend, spec: dict, parent: RemoteFitPass | None = None):
        import uuid

        self.backend = backend
        self.id = uuid.uuid4().hex[:12]
        self.owners = [j for j in range(backend.pool.k) if backend.jobs[j]["fit_batches"]]
        self.chain = [] if parent is None else parent.recipe()  # the parent's recipe as it was at the fork
        self.ops: list[tuple] = []
        first = ("open", spec) if parent is None else ("fork", parent.id, len(parent.ops), spec)
        self._send(first)

    def recipe(self) -> list[tuple[str, list]]:
        return [*self.chain, (self.id, list(self.ops))]

    def _send(self, op: tuple) -> list:
        pool = self.backend.pool
        step = len(self.ops)
        self.ops.append(op)
        refs = [pool.actors[j].fit_step.remote(self.backend.jobs[j], self.id, step, op) for j in self.owners]
        got = gather(refs, "compensation fit", pool=pool, owners=self.owners, transient=True)
        lost = [j for j, g in zip(self.owners, got) if isinstance(g, str) and g == "missing"]
        if lost:  # replay the recipe on those actors, then the step again
            recipe = self.recipe()
            gather([pool.actors[j].fit_replay.remote(self.backend.jobs[j], recipe) for j in lost],
                   "replaying a compensation fit", pool=pool, owners=lost, transient=True)
            again = gather([pool.actors[j].fit_step.remote(self.backend.jobs[j], self.id, step, op) for j in lost],
                           "compensation fit", pool=pool, owners=lost, transient=True)
            got = [again[lost.index(j)] if j in lost else g for j, g in zip(self.owners, got)]
        return got

    def advance(self, fit=None, stop: int | None = None):
        import ray

        from swm_ray.compute.fitpass import add_sums

        got = self._send(("advance", None if fit is None else ray.put(fit), stop))
        if all(g is None for g in got):
            return None
        windows = {tuple(g[0]) for g in got}
        if len(windows) != 1 or any(g is None for g in got):
            raise RuntimeError(f"the actors' fit passes disagree ({sorted(windows)})")
        return got[0][0], add_sums([g[1] for g in got])

    def fork(self, windows, targets, merge: str | None = None) -> RemoteFitPass:
        spec = {"windows": [tuple(w) for w in windows], "targets": [tuple(t) for t in targets], "merge": merge}
        return RemoteFitPass(self.backend, spec, parent=self)

    def close(self) -> None:
        """Drop this pass on the actors, with what it keeps for its forks (`FitPass.close`); nothing to wait for."""
        pool = self.backend.pool
        for j in self.owners:
            pool.actors[j].fit_close.remote(self.backend.jobs[j], [self.id])
