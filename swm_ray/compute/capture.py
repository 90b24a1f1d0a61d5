"""The statistics pass: per-layer HSIC sums of a set of minibatches, computed layer by layer.

Each representation (the embedding output, then every decoder layer's output) becomes its b×b Gram matrix
as soon as it exists; only (L+1)·b² numbers per minibatch survive, and only the (L+1)² HSIC sums of each
minibatch leave this module. The pass is layer-major: layer i runs on every minibatch of the call before
layer i+1 is touched, so a streaming producer loads each layer once per call (see `stack.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from swm_ray.compute.similarity import features, gram, hsic_matrix, stack_on_one_device
from swm_ray.compute.stack import LayerStack


@torch.inference_mode()
def minibatch_hsic(
    stack: LayerStack,
    input_ids: np.ndarray,
    batches: Sequence[tuple[int, int]],
    *,
    kernel: str = "linear",
    skip_first_tokens: int = 0,
    on_layer: Callable[[int], None] | None = None,
) -> list[np.ndarray]:
    """(L+1, L+1) float64 HSIC sums of each minibatch (row ranges of `input_ids`), in the order given.

    Index 0 is the hidden state entering the first decoder layer; index i is what layer i-1 returns (before
    the model's final norm). The LM head is not run.
    """
    pros = [stack.prologue(torch.tensor(input_ids[a:b])) for a, b in batches]  # copy: Ray arrays are read-only
    hidden = [p.hidden for p in pros]
    grams = [[gram(features(h, skip_first_tokens), kernel)] for h in hidden]
    for i in range(stack.num_layers):
        with stack.layer(i) as layer:
            for k, p in enumerate(pros):
                hidden[k] = stack.run(layer, hidden[k], p.kwargs[i])
                grams[k].append(gram(features(hidden[k], skip_first_tokens), kernel))
        if on_layer is not None:
            on_layer(i)
    return [hsic_matrix(stack_on_one_device(g)) for g in grams]


def compute_hsic_sums(stack: LayerStack, input_ids: np.ndarray, batches: Sequence[tuple[int, int]], *,
                      kernel: str = "linear", skip_first_tokens: int = 0) -> tuple[np.ndarray, int, int]:
    """HSIC sums over the given minibatches, added in their order. Returns (S, minibatches, tokens)."""
    parts = minibatch_hsic(stack, input_ids, batches, kernel=kernel, skip_first_tokens=skip_first_tokens)
    total = np.zeros((stack.num_layers + 1, stack.num_layers + 1))
    for s in parts:
        total += s
    return total, len(parts), sum((b - a) * input_ids.shape[1] for a, b in batches)
