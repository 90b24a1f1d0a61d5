"""Baseline pruners expressed as plans (so they run through the same merge/writer path).

ShortGPT: Block Influence BI_l = 1 − mean over tokens of cos(input of layer l, output of layer l); drop the
n layers with the lowest BI. A run of dropped layers [i..j] becomes the window [i−1, j] with `keep-first`
(the kept layer i−1 stands for it), so the plan is a drop-only plan like any other.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from swm_ray.models import decoder_layers, inner_model


@torch.inference_mode()
def block_influence(model, input_ids: np.ndarray, batches: Sequence[tuple[int, int]]) -> np.ndarray:
    """(L,) mean per-token 1 − cos(layer input, layer output) over the given minibatches."""
    layers = decoder_layers(model)
    sums = np.zeros(len(layers))
    count = 0
    inputs: dict[int, torch.Tensor] = {}

    def pre(i):
        def hook(_m, args, kwargs):
            inputs[i] = args[0] if args else kwargs["hidden_states"]

        return hook

    def post(i):
        def hook(_m, _a, out):
            h = out[0] if isinstance(out, (tuple, list)) else out
            cos = F.cosine_similarity(inputs.pop(i).float(), h.float(), dim=-1)
            sums[i] += float((1 - cos).double().sum())

        return hook

    handles = [layer.register_forward_pre_hook(pre(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles += [layer.register_forward_hook(post(i)) for i, layer in enumerate(layers)]
    dev = next(model.parameters()).device
    try:
        for a, b in batches:
            ids = torch.tensor(input_ids[a:b], device=dev)
            inner_model(model)(input_ids=ids, use_cache=False)
            count += ids.numel()
    finally:
        for h in handles:
            h.remove()
    return sums / max(count, 1)


def drop_windows(dropped: Sequence[int]) -> list[tuple[int, int]]:
    """Dropped layer indices -> keep-first windows [i−1, j] per run [i..j], top window first."""
    dropped = sorted(set(dropped))
    if 0 in dropped:
        raise ValueError("layer 0 cannot be dropped by a keep-first plan")
    runs: list[list[int]] = []
    for i in dropped:
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return sorted(((r[0] - 1, r[-1]) for r in runs), reverse=True)


def shortgpt_windows(bi: np.ndarray, n: int, protected: Sequence[int] = ()) -> list[tuple[int, int]]:
    """Windows that drop the n lowest-BI layers (never layer 0 or a protected one)."""
    order = [int(i) for i in np.argsort(bi, kind="stable") if i != 0 and i not in set(protected)]
    return drop_windows(order[:n])
