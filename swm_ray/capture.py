"""Forward passes that capture per-layer statistics without keeping hidden states.

Hooks on the decoder layers turn each representation into its b×b Gram matrix as soon as it exists; only
(L+1)·b² numbers per minibatch survive the forward pass, and only the (L+1)² HSIC sums leave this module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from swm_ray.models import decoder_layers, inner_model
from swm_ray.similarity import HsicAccumulator, features, gram


def _first_tensor(x):
    return x[0] if isinstance(x, (tuple, list)) else x


@torch.inference_mode()
def minibatch_grams(
    model, input_ids: torch.Tensor, *, kernel: str = "linear", skip_first_tokens: int = 0
) -> torch.Tensor:
    """(b, T) token ids -> (L+1, b, b) float64 Gram matrices: [embedding output, layer 1 output, ...].

    Index 0 is the hidden state entering the first decoder layer; index i is what `layers[i-1]` returns
    (before the model's final norm). The LM head is not run.
    """
    layers = decoder_layers(model)
    grams: list[torch.Tensor | None] = [None] * (len(layers) + 1)

    def keep(i: int, h: torch.Tensor) -> None:
        grams[i] = gram(features(h, skip_first_tokens), kernel)

    def pre_hook(_module, args, kwargs):
        keep(0, args[0] if args else kwargs["hidden_states"])

    def make_hook(i: int) -> Callable:
        def hook(_module, _args, output):
            keep(i + 1, _first_tensor(output))

        return hook

    handles = [layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True)]
    handles += [layer.register_forward_hook(make_hook(i)) for i, layer in enumerate(layers)]
    try:
        inner_model(model)(input_ids=input_ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return torch.stack(grams)


def device_of(model) -> torch.device:
    return next(model.parameters()).device


def compute_hsic_sums(
    model,
    input_ids: np.ndarray,
    batches: Sequence[tuple[int, int]],
    *,
    kernel: str = "linear",
    skip_first_tokens: int = 0,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, int, int]:
    """HSIC sums over the given minibatches (row ranges of `input_ids`). Returns (S, minibatches, tokens)."""
    n = len(decoder_layers(model)) + 1
    acc = HsicAccumulator(n)
    dev = device_of(model)
    tokens = 0
    for start, stop in batches:
        ids = torch.tensor(input_ids[start:stop], device=dev)  # copy: Ray hands out read-only arrays
        acc.add_grams(minibatch_grams(model, ids, kernel=kernel, skip_first_tokens=skip_first_tokens))
        tokens += int(ids.numel())
        if on_batch is not None:
            on_batch(stop - start)
    return acc.sums, acc.count, tokens
