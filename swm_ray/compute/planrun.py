"""The plan runner: run "this plan (windows, merge method, folded fits) on this layer stack", layer by layer.

The validation loss of a plan (`validation.py`), the compensation fit pass (`fitpass.FitPass`), FLAP's
statistics of a plan (`width_stats.py`) and the compensation-aware checks all run edited stacks through this
one class, in memory or streaming (a streaming stack builds each new layer from the checkpoint when it is
reached). The edited stack's layers are
`windows.new_layer_sources`: a kept original layer, or a window merged with `merge` (with its fit folded in).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch

from swm_ray.edits.windows import Group


class PlanRunner:
    """The edited stack of a plan over a `LayerStack`. `fits`: window -> `fold.Fit` folded into it."""

    def __init__(self, stack, windows: Sequence[Sequence[int]], merge: str, attention: str = "global",
                 fits: Mapping | None = None):
        from swm_ray.edits.windows import new_layer_sources

        self.stack, self.merge, self.attention = stack, merge, attention
        self.windows = sorted((int(a), int(b)) for a, b in windows)
        self.fits = {(int(w[0]), int(w[1])): f for w, f in (fits or {}).items()}
        self.sources = new_layer_sources(stack.num_layers, self.windows, stack.layer_types, attention, merge)
        self._site = None

    @property
    def site(self):
        if self._site is None:
            from swm_ray.edits.fold import stack_site

            self._site = stack_site(self.stack)
        return self._site

    @contextlib.contextmanager
    def layer(self, low: int, high: int, fit=None) -> Iterator[torch.nn.Module]:
        """The edited stack's layer made from original layers low..high, with `fit` (default: the plan's fit of
        that window) folded in."""
        fit = self.fits.get((low, high)) if fit is None else fit
        if fit is None:
            with self.stack.group(low, high, self.merge, self.attention) as layer:
                yield layer
            return
        from swm_ray.edits.fold import fold_state

        state = fold_state(self.stack.state(low, high, self.merge), fit, self.site)
        layer = self.stack.build(self.anchor(low, high), state, low)
        try:
            yield layer
        finally:
            del layer

    def anchor(self, low: int, high: int) -> int:
        return self.stack.anchor(low, high, self.attention, self.merge)

    def first_change(self) -> int:
        """The lowest original layer the plan changes (the depth when it changes none)."""
        return min((lo for lo, _ in self.windows), default=self.stack.num_layers)

    @torch.inference_mode()
    def run(self, hidden: list[torch.Tensor], pros, start: int = 0, stop: int | None = None) -> list[torch.Tensor]:
        """Run the edited stack's layers whose original range lies in [start, stop) on `hidden` (one tensor per
        batch, whose prologues `pros` give each original layer's call arguments); `start` must be the bottom of
        a new layer."""
        stop = self.stack.num_layers if stop is None else stop
        for low, high, anchor in self.sources:
            if low < start or high >= stop:
                continue
            with self.layer(low, high) as layer:
                hidden = [self.stack.run(layer, h, p.kwargs[anchor]) for h, p in zip(hidden, pros)]
        return hidden


def windows_of(groups: Sequence[Group]) -> list[Group]:
    """The merged windows of a group list."""
    return [(int(a), int(b)) for a, b in groups if b > a]
