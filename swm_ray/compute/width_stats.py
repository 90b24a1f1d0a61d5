"""FLAP's statistics on a layer stack: per minibatch float64 sums and sums of squares of every input feature of
o_proj and down_proj (additive over minibatches), in this process or in actors."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from swm_ray.compute.planrun import PlanRunner
from swm_ray.edits.width import ATTN, MLP


# -- FLAP --------------------------------------------------------------------------------------------------------
@torch.inference_mode()
def width_stats_sums(stack, input_ids: np.ndarray, batches: Sequence[tuple[int, int]],
                     windows: Sequence[Sequence[int]] = (), merge: str = "reference",
                     attention: str = "global") -> list[dict[str, np.ndarray]]:
    """Per minibatch: float64 sums and sums of squares over its tokens of every input feature of o_proj
    (`attn_sum`, `attn_sq`: (L', heads·head_dim)) and of down_proj (`mlp_sum`, `mlp_sq`: (L', intermediate)),
    and the token count (`tokens`), on the stack with `windows` merged (L' layers). Layer-major, like
    `baselines.block_influence_sums`: every layer is built once. Additive: `add_width_sums` adds minibatches."""
    runner = PlanRunner(stack, windows, merge, attention)
    sources = runner.sources
    pros = [stack.prologue(torch.tensor(np.asarray(input_ids[a:b]))) for a, b in batches]
    hidden = [p.hidden for p in pros]
    out: list[dict[str, Any]] = [{"tokens": int(p.hidden.shape[0] * p.hidden.shape[1])} for p in pros]
    current = [0]

    def recorder(key: str, pos: int):
        def hook(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double().cpu()
            rec = out[current[0]]
            if f"{key}_sum" not in rec:
                rec[f"{key}_sum"] = np.zeros((len(sources), x.shape[1]))
                rec[f"{key}_sq"] = np.zeros((len(sources), x.shape[1]))
            rec[f"{key}_sum"][pos] += x.sum(0).numpy()
            rec[f"{key}_sq"][pos] += (x * x).sum(0).numpy()
        return hook

    for pos, (low, high, anchor) in enumerate(sources):
        with runner.layer(low, high) as layer:
            handles = [getattr(layer, ATTN).o_proj.register_forward_pre_hook(recorder("attn", pos)),
                       getattr(layer, MLP).down_proj.register_forward_pre_hook(recorder("mlp", pos))]
            try:
                for k, p in enumerate(pros):
                    current[0] = k
                    hidden[k] = stack.run(layer, hidden[k], p.kwargs[anchor])
            finally:
                for h in handles:
                    h.remove()
    return out


def add_width_sums(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Minibatch sums added in the order given (minibatch order: the result does not depend on the actors)."""
    total: dict[str, Any] = {}
    for part in parts:
        for k, v in part.items():
            total[k] = total[k] + v if k in total else (np.array(v, dtype=np.float64) if k != "tokens" else int(v))
    return total


def local_stats(stack, calib) -> Callable[[dict], Mapping[str, Any]]:
    """FLAP's sums computed in this process on a layer stack (in memory or streaming)."""
    def stats(request: dict) -> Mapping[str, Any]:
        return add_width_sums(width_stats_sums(stack, calib.input_ids, calib.batches, request["windows"],
                                               request["merge"], request["attention"]))
    return stats


def stack_stats(cfg, path: str, calib, device: str | None = None) -> Callable[[dict], Mapping[str, Any]]:
    """FLAP's sums in this process on a layer stack opened for the pass (in memory or streaming, as it fits)."""
    def stats(request: dict) -> Mapping[str, Any]:
        from swm_ray.compute.stack import StackSpec, open_stack

        m = cfg.model
        stack = open_stack(StackSpec(path, device=device or m.device, dtype=m.dtype, stream=m.stream,
                                     max_memory=m.max_memory, allow_pickle=m.allow_pickle,
                                     trust_remote_code=m.trust_remote_code),
                           rows=int(calib.input_ids.shape[0]), seq_len=int(calib.input_ids.shape[1]))
        return local_stats(stack, calib)(request)
    return stats
