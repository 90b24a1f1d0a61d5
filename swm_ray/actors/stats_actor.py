"""The model-holding actor: one model on its own device(s), in memory or streamed one layer at a time, and the
calibration rows it is handed. Every method delegates to the Ray-free library and returns small data."""

from __future__ import annotations

import numpy as np
import ray

from swm_ray.config import ModelConfig
from swm_ray.errors import UserError


@ray.remote
class ModelActor:
    """Opens its model (`stack.open_stack`: in memory or streaming, as its budget allows) on its own device."""

    def __init__(self, model_cfg: dict, threads: int, rows: int, seq_len: int, gpus: int = 1, share: int = 1):
        from swm_ray.models import resolve_model_path, set_threads
        from swm_ray.stack import StackSpec, open_stack

        set_threads(threads)
        cfg = ModelConfig(**model_cfg)
        self.scorer = None
        self.scorer_key = None
        self.error: UserError | None = None  # raised by `info`: a failing __init__ would hide it from the driver
        try:
            path = resolve_model_path(cfg.source, cfg.revision, allow_pickle=cfg.allow_pickle,
                                      trust_remote_code=cfg.trust_remote_code)  # one download per node
            spec = StackSpec(path, device=cfg.device, dtype=cfg.dtype, stream=cfg.stream, max_memory=cfg.max_memory,
                             allow_pickle=cfg.allow_pickle, trust_remote_code=cfg.trust_remote_code, gpus=gpus,
                             share=share)
            self.stack = open_stack(spec, rows, seq_len)
        except UserError as e:
            self.error = e

    def info(self) -> dict:
        """Depth, how the model runs (memory | stream), the budget and where this actor lives."""
        if self.error is not None:
            raise self.error
        import os

        ctx = ray.get_runtime_context()
        return {"num_layers": self.stack.num_layers, "mode": "stream" if self.stack.streaming else "memory",
                "budget": self.stack.budget, "node_id": ctx.get_node_id(), "device": str(self.stack.device),
                "pid": os.getpid()}

    def hsic_sums(self, input_ids: np.ndarray, batches: list, kernel: str, skip: int) -> list[np.ndarray]:
        """HSIC sums of each given minibatch, in order (one layer-major pass over all of them)."""
        from swm_ray.capture import minibatch_hsic

        return minibatch_hsic(self.stack, input_ids, [tuple(b) for b in batches], kernel=kernel,
                              skip_first_tokens=skip)

    def block_influence(self, input_ids: np.ndarray, batches: list) -> np.ndarray:
        """(B, L) Block Influence sums of each given minibatch (ShortGPT's signal)."""
        from swm_ray.baselines import block_influence_sums

        return block_influence_sums(self.stack, input_ids, [tuple(b) for b in batches])

    def angular_distances(self, input_ids: np.ndarray, batches: list) -> np.ndarray:
        """(B, L+1, L+1) sums of last-token angular distances of each given minibatch (ReplaceMe's signal)."""
        from swm_ray.baselines import angular_distance_sums

        return angular_distance_sums(self.stack, input_ids, [tuple(b) for b in batches])

    def width_stats(self, input_ids: np.ndarray, batches: list, request: dict) -> list[dict]:
        """FLAP's per-minibatch sums of the o_proj/down_proj inputs (`width.width_stats_sums`), on the stack with
        the request's depth windows merged."""
        from swm_ray.width import width_stats_sums

        return width_stats_sums(self.stack, input_ids, [tuple(b) for b in batches], request["windows"],
                                request["merge"], request["attention"])

    def compensation_sums(self, input_ids: np.ndarray, batches: list, request: dict) -> list:
        """`compensation.CompSums` of each target window over the given minibatches (added in their order), with
        the plan's windows and the fits below applied; the request carries everything (a retried call on a
        restarted actor gives the same)."""
        from swm_ray.compensation import compensation_sums

        r = request
        return compensation_sums(self.stack, input_ids, [tuple(b) for b in batches], r["windows"], r["merge"],
                                 r["attention"], r["fits"], r["targets"], source=r["source"],
                                 skip_first=r["skip_first"])

    def plan_nll(self, input_ids: np.ndarray, batches: list, request: dict) -> list:
        """(per-row NLL sums, tokens) of each given minibatch under the plan of `request` (windows, merge,
        attention, fits): `auto`'s validation loss."""
        from swm_ray.auto import plan_nll

        r = request
        return plan_nll(self.stack, input_ids, [tuple(b) for b in batches], r["windows"], r["merge"], r["attention"],
                        r["fits"])

    def prepare(self, job: dict) -> int:
        """Build the candidate scorer of `job` now (its reference pass), so the first step is not slower."""
        return self._scorer(job, []).rows

    def score(self, job: dict, commits: list, candidates: list) -> list:
        """(per-row sums, count) per candidate window over this actor's rows, on top of the original with
        `commits` applied. Every call carries the whole state it needs: an actor restarted after a crash
        rebuilds the scorer and replays the commits before it answers, so a retried call gives the same."""
        return self._scorer(job, commits).score([tuple(c) for c in candidates])

    def _scorer(self, job: dict, commits: list):
        """The scorer of `job` = {ids, rows: [a, b), criterion, method, attention, key}, at `commits`."""
        from swm_ray.scoring import ShardScorer

        if self.scorer is None or self.scorer_key != job["key"]:
            a, b = job["rows"]
            ids = job["ids"]
            ids = ray.get(ids) if isinstance(ids, ray.ObjectRef) else ids  # a ref inside a dict is not resolved
            self.scorer = None  # free the old one first
            self.scorer = ShardScorer(self.stack, ids[a:b], job["criterion"], job["method"],
                                      attention=job["attention"])
            self.scorer_key = job["key"]
        self.scorer.bring_to([tuple(w) for w in commits])
        return self.scorer
