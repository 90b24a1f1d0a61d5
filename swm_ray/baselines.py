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

from swm_ray.stack import LayerStack


@torch.inference_mode()
def block_influence(stack: LayerStack, input_ids: np.ndarray, batches: Sequence[tuple[int, int]]) -> np.ndarray:
    """(L,) mean per-token 1 − cos(layer input, layer output) over the given minibatches (layer-major)."""
    pros = [stack.prologue(torch.tensor(input_ids[a:b])) for a, b in batches]
    hidden = [p.hidden for p in pros]
    sums = np.zeros(stack.num_layers)
    for i in range(stack.num_layers):
        with stack.layer(i) as layer:
            for k, p in enumerate(pros):
                out = stack.run(layer, hidden[k], p.kwargs[i])
                cos = F.cosine_similarity(hidden[k].float(), out.float(), dim=-1)
                sums[i] += float((1 - cos).double().sum())
                hidden[k] = out
    count = sum((b - a) * input_ids.shape[1] for a, b in batches)
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
