"""The model-holding actor: one model on its own device(s), in memory or streamed one layer at a time, and the
calibration rows it is handed. Every method delegates to the Ray-free library and returns small data."""

from __future__ import annotations

import functools

import numpy as np
import ray

from swm_ray.config import ModelConfig
from swm_ray.errors import UserError, plain_user_error


def _one_line(method):
    """A user mistake found in the actor (its model failed to open for one, kept by `__init__`) reaches the
    driver as a plain UserError, which `jobs.pool` unwraps from Ray's RayTaskError into one line."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if self.error is not None:
            raise self.error
        try:
            return method(self, *args, **kwargs)
        except UserError as e:
            raise plain_user_error(e) from None

    return wrapper


def _resolved(op: tuple) -> tuple:
    """A fit step with its object refs (fits put once into the object store) resolved."""
    return tuple(ray.get(x) if isinstance(x, ray.ObjectRef) else x for x in op)


@ray.remote
class ModelActor:
    """Opens its model (`stack.open_stack`: in memory or streaming, as its budget allows) on its own device."""

    def __init__(self, model_cfg: dict, threads: int, rows: int, seq_len: int, gpus: int = 1, share: int = 1):
        from swm_ray.compute.stack import StackSpec, open_stack
        from swm_ray.io.models import resolve_model_path, set_threads

        set_threads(threads)
        cfg = ModelConfig(**model_cfg)
        self.session = None
        self.session_key = None
        self.error: UserError | None = None  # raised by every call: Ray keeps only the text of an __init__ error
        try:
            path = resolve_model_path(cfg.source, cfg.revision, allow_pickle=cfg.allow_pickle,
                                      trust_remote_code=cfg.trust_remote_code)  # one download per node
            spec = StackSpec(path, device=cfg.device, dtype=cfg.dtype, stream=cfg.stream, max_memory=cfg.max_memory,
                             allow_pickle=cfg.allow_pickle, trust_remote_code=cfg.trust_remote_code, gpus=gpus,
                             share=share)
            self.stack = open_stack(spec, rows, seq_len)
        except UserError as e:
            self.error = plain_user_error(e)

    @_one_line
    def info(self) -> dict:
        """Depth, how the model runs (memory | stream), its dtype, the budget and where this actor lives."""
        import os

        ctx = ray.get_runtime_context()
        return {"num_layers": self.stack.num_layers, "mode": "stream" if self.stack.streaming else "memory",
                "budget": self.stack.budget, "dtype": str(self.stack.dtype).removeprefix("torch."),
                "node_id": ctx.get_node_id(), "device": str(self.stack.device), "pid": os.getpid()}

    @_one_line
    def hsic_sums(self, input_ids: np.ndarray, batches: list, kernel: str, skip: int) -> list[np.ndarray]:
        """HSIC sums of each given minibatch, in order (one layer-major pass over all of them)."""
        from swm_ray.compute.capture import minibatch_hsic

        return minibatch_hsic(self.stack, input_ids, [tuple(b) for b in batches], kernel=kernel,
                              skip_first_tokens=skip)

    @_one_line
    def width_stats(self, input_ids: np.ndarray, batches: list, request: dict) -> list[dict]:
        """FLAP's per-minibatch sums of the o_proj/down_proj inputs (`width_stats.width_stats_sums`), on the stack with
        the request's depth windows merged."""
        from swm_ray.compute.width_stats import width_stats_sums

        return width_stats_sums(self.stack, input_ids, [tuple(b) for b in batches], request["windows"],
                                request["merge"], request["attention"])

    @_one_line
    def plan_nll(self, input_ids: np.ndarray, batches: list, requests: list) -> list:
        """Per given minibatch: per plan of `requests` (windows, merge, attention, fits), (per-row NLL sums,
        tokens) (`auto`'s further held-out rows of a close call)."""
        from swm_ray.compute.validation import plan_nll

        per_plan = [plan_nll(self.stack, input_ids, [tuple(b) for b in batches], r["windows"], r["merge"],
                             r["attention"], r["fits"]) for r in requests]
        return [[p[i] for p in per_plan] for i in range(len(batches))]

    @_one_line
    def task_logliks(self, rows: list, spans: list, plans: list, attention: str, part=None) -> list:
        """Per plan (windows, merge, fits): the log-likelihood of every given token row's span (`auto`'s
        task-style items); with `part` (j, k) only the rows of that part of the batches, the others 0."""
        from swm_ray.compute.validation import plans_logliks

        return plans_logliks(self.stack, rows, spans, plans, attention, part=None if part is None else tuple(part))

    # -- the session of a run: reference pass, checks, validation, fits (`session.ShardSession`) ----------------
    @_one_line
    def prepare(self, job: dict):
        """Run the reference pass of `job` over this actor's rows; returns its `refpass.RefStats`."""
        return self._session(job).ref.stats

    @_one_line
    def check(self, job: dict, requests: list) -> list:
        """Per request, per candidate: {signal: (per-row sums, count)} over this actor's rows. Every call
        carries the job, so an actor restarted after a crash rebuilds its session before it answers and a
        retried call gives the same."""
        return self._session(job).check(requests)

    @_one_line
    def validate(self, job: dict, plans: list) -> list:
        """Per plan (windows, merge, fits): (per-row NLL sums, tokens) per held-out minibatch of this actor."""
        return self._session(job).validate([tuple(p) for p in plans])

    @_one_line
    def plan_loss(self, job: dict, plan: tuple) -> list:
        """(per-row NLL sums, tokens) of this actor's planning rows under the plan (windows, merge, fits)."""
        return self._session(job).plan_loss(*plan)

    @_one_line
    def fit_step(self, job: dict, pass_id: str, step: int, op: tuple):
        """One step of a compensation fit pass over this actor's fit rows (`ShardSession.fit_step`)."""
        return self._session(job).fit_step(pass_id, step, _resolved(op))

    @_one_line
    def fit_replay(self, job: dict, recipes: list) -> None:
        self._session(job).fit_replay([(pid, [_resolved(op) for op in ops]) for pid, ops in recipes])

    def release(self) -> None:
        """Drop the session (its cached hidden states); the model stays loaded for what follows."""
        from swm_ray.compute.memory import return_freed

        self.session = self.session_key = None
        return_freed()

    def counters(self) -> dict:
        """Layers read from the checkpoint (streaming) and rows run through decoder layers, so far."""
        return {"layer_reads": self.stack.layer_loads, "layer_tokens": self.stack.token_runs}

    @_one_line
    def fit_close(self, job: dict, pass_ids: list) -> None:
        """Drop fit passes of `job`'s session; a session not held (restarted, or another job's) has none to drop,
        and is not built for it."""
        if self.session is not None and self.session_key == job["key"]:
            self.session.fit_close(pass_ids)

    def _session(self, job: dict):
        """The session of `job` (built, with its reference pass, on first use or after a restart)."""
        from swm_ray.compute.refpass import Needs
        from swm_ray.methods.session import ShardSession

        if self.session is None or self.session_key != job["key"]:
            self.session = None  # free the old one first
            get = lambda v: ray.get(v) if isinstance(v, ray.ObjectRef) else v  # noqa: E731 - refs in a dict
            a, b = job["rows"]
            val = get(job.get("val_ids"))
            fit = get(job.get("fit_ids"))
            self.session = ShardSession(
                self.stack, job["attention"], get(job["ids"])[a:b], Needs(**job["needs"]),
                hsic_batches={int(k): tuple(v) for k, v in job.get("hsic", {}).items()},
                val_ids=val, val_batches=[tuple(x) for x in job.get("val_batches", [])],
                fit_ids=fit, fit_batches=[tuple(x) for x in job.get("fit_batches", [])])
            self.session_key = job["key"]
        return self.session
