"""Windows of layers: a window is an inclusive range of original decoder layers (`Group`); which original
layers the edited stack's layers come from, which layer of a window is the anchor of its attention type, and
the checks of a plan's windows. Index logic only: no tensors."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

from swm_ray.config import ATTENTION_RULES
from swm_ray.errors import UserError

Group = tuple[int, int]  # inclusive range of original decoder layers


def layer_types_of(config) -> list[str] | None:
    """The per-layer attention types of a config (`layer_types`), or None where all layers are alike."""
    types = getattr(config, "layer_types", None)
    return list(types) if isinstance(types, (list, tuple)) and len(types) == config.num_hidden_layers else None


def anchor_layer(layer_types: Sequence[str] | None, window: Sequence[int], rule: str = "global",
                 method: str | None = None) -> int:
    """The original layer whose attention type (and with it sliding window and RoPE) the window's new layer takes.

    A plan that only drops layers (`method` keep-first or keep-last) keeps the kept layer as it is, attention
    type included: the bottom layer for keep-first, the top one for keep-last, whatever the rule (ShortGPT,
    SLEB and ReplaceMe delete layers and leave the others untouched). For merged windows the rule decides:
    `global` (default): the lowest full-attention layer of the window when it has one (a window that contains
    a global layer stays global), else its bottom layer. `bottom`: always the bottom layer, as the authors'
    code does (a window from a local layer up to a global one then becomes local).
    """
    low, high = int(window[0]), int(window[1])
    if rule not in ATTENTION_RULES:
        raise UserError(f"unknown attention rule {rule!r}: choose one of {', '.join(ATTENTION_RULES)}")
    if method == "keep-last":
        return high
    if rule == "bottom" or not layer_types or method == "keep-first":
        return low
    for i in range(low, high + 1):
        if layer_types[i] == "full_attention":
            return i
    return low


def mixes_types(layer_types: Sequence[str] | None, window: Sequence[int]) -> bool:
    return bool(layer_types) and len({layer_types[i] for i in range(window[0], window[1] + 1)}) > 1


def validate_windows(windows: Iterable[Sequence[int]], num_layers: int) -> list[tuple[int, int]]:
    """Check windows (inclusive 0-based [low, high] pairs) and return them sorted bottom-first.

    Raises UserError for a malformed, out-of-range, reversed or overlapping window.
    """
    out = []
    for w in windows:
        if len(w) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in w):
            raise UserError(f"window {list(w)!r}: expected two integer layer indices [low, high]")
        low, high = int(w[0]), int(w[1])
        if low > high:
            raise UserError(f"window [{low}, {high}]: low must not exceed high")
        if low < 0 or high >= num_layers:
            raise UserError(f"window [{low}, {high}] is outside the model's layers 0..{num_layers - 1}")
        out.append((low, high))
    out.sort()
    for (a_low, a_high), (b_low, b_high) in itertools.pairwise(out):
        if b_low <= a_high:
            raise UserError(f"windows [{a_low}, {a_high}] and [{b_low}, {b_high}] overlap")
    return out


def kept_layers(num_layers: int, windows: Iterable[Sequence[int]]) -> list[int]:
    """Original index of the layer at each new position: every index outside windows, and each window's low."""
    removed = {i for low, high in validate_windows(windows, num_layers) for i in range(low + 1, high + 1)}
    return [i for i in range(num_layers) if i not in removed]


def new_layer_sources(num_layers: int, windows: Iterable[Sequence[int]], layer_types: Sequence[str] | None,
                      rule: str = "global", method: str | None = None) -> list[tuple[int, int, int]]:
    """(low, high, anchor) of every layer of the edited stack, bottom first: a kept layer is (i, i, i); a window's
    anchor follows `anchor_layer` (its merge `method` decides for drop-only plans)."""
    wins = validate_windows(windows, num_layers)
    by_low = {low: high for low, high in wins}
    return [(i, by_low.get(i, i), anchor_layer(layer_types, (i, by_low.get(i, i)), rule, method))
            for i in kept_layers(num_layers, wins)]
