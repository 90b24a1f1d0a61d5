"""The plan runner: run "this plan (windows, merge method, folded fits) on this layer stack", layer by layer.

Every walk over an edited stack goes through this one class, in memory or streaming (a streaming stack builds
each new layer from the checkpoint when it is reached): the validation loss of a plan (`validation.py`), the
compensation fit pass (`fitpass.FitPass`), FLAP's statistics of a plan (`width_stats.py`), the
compensation-aware checks and the plain candidate checks (`scoring.ShardScorer`, through `run_variants`: many
plans that differ from this one by one more merged window, in one layer-major walk). The edited stack's layers
are `windows.new_layer_sources`: a kept original layer, or a window merged with `merge` (with its fit folded
in).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, MutableMapping, Sequence

import torch

from swm_ray.edits.merge import follows_weight, is_norm_param
from swm_ray.edits.windows import Group

COMPOSABLE = ("reference", "consistent", "keep-first", "keep-last")  # merged windows built from their groups' states
Variant = tuple[object, Group, int, int]  # (key, window, lo, hi): the window spans positions lo..hi of the plan


class PlanRunner:
    """The edited stack of a plan over a `LayerStack`. `fits`: window -> `fold.Fit` folded into it; `built`: merged
    layers already built (in memory), shared with whoever keeps them, filled by `prebuild`."""

    def __init__(self, stack, windows: Sequence[Sequence[int]], merge: str, attention: str = "global",
                 fits: Mapping | None = None, built: MutableMapping | None = None):
        from swm_ray.edits.windows import new_layer_sources

        self.stack, self.merge, self.attention = stack, merge, attention
        self.windows = sorted((int(a), int(b)) for a, b in windows)
        self.fits = {(int(w[0]), int(w[1])): f for w, f in (fits or {}).items()}
        self.sources = new_layer_sources(stack.num_layers, self.windows, stack.layer_types, attention, merge)
        self.built = built if built is not None else {}
        self._site = None

    @property
    def site(self):
        if self._site is None:
            from swm_ray.edits.fold import stack_site

            self._site = stack_site(self.stack)
        return self._site

    def prebuild(self) -> None:
        """Build the plan's merged layers without fits once (in memory; a streaming stack builds them per walk)."""
        if self.stack.streaming:
            return
        for w in self.windows:
            if w not in self.built and w not in self.fits:
                self.built[w] = self.stack.build(self.anchor(*w), self.stack.state(w[0], w[1], self.merge), w[0])

    @contextlib.contextmanager
    def layer(self, low: int, high: int, fit=None, state=None) -> Iterator[torch.nn.Module]:
        """The edited stack's layer made from original layers low..high, with `fit` (default: the plan's fit of
        that window) folded in; `state`: the group's merged state when already read."""
        fit = self.fits.get((low, high)) if fit is None else fit
        if fit is None and (low, high) in self.built:
            yield self.built[(low, high)]
            return
        if fit is None and state is None:
            with self.stack.group(low, high, self.merge, self.attention) as layer:
                yield layer
            return
        state = self.stack.state(low, high, self.merge) if state is None else state
        if fit is not None:
            from swm_ray.edits.fold import fold_state

            state = fold_state(state, fit, self.site)
        layer = self.stack.build(self.anchor(low, high), state, low)
        try:
            yield layer
        finally:
            del layer

    def layer_at(self, p: int, state=None):
        """The layer at position p of the edited stack."""
        return self.layer(*self.sources[p][:2], state=state)

    def anchor(self, low: int, high: int) -> int:
        return self.stack.anchor(low, high, self.attention, self.merge)

    def kwargs(self, p: int, pros) -> list[dict]:
        """The call arguments of position p, per batch."""
        return [q.kwargs[self.sources[p][2]] for q in pros]

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

    # -- many plans in one walk ----------------------------------------------------------------------------
    @torch.inference_mode()
    def run_variants(self, variants: Sequence[Variant], pros,
                     inputs: list[list[torch.Tensor]] | None = None) -> dict[object, list[torch.Tensor]]:
        """Final hidden states (before the final norm, per batch) of variants of this plan, each with positions
        lo..hi merged into one layer (lo == hi: the plan itself), in one walk up the stack: every variant's stream
        starts at its window and passes through each layer above it while that layer is at hand, so a streaming
        stack reads each layer once per walk whatever the number of variants. `inputs`: the hidden states
        entering every position (+ the final) when kept (the walk then starts at the lowest window), else the
        walk starts from the prologues' embeddings."""
        n_pos = len(self.sources)
        finals: dict[object, list[torch.Tensor]] = {}
        merges = [t for t in variants if t[3] > t[2]]
        noops = [t for t in variants if t[3] == t[2]]  # "merging" one layer with nothing: the plan itself
        if noops and inputs is not None:
            for key, *_ in noops:
                finals[key] = inputs[-1]
            noops = []
        start = min((t[2] for t in merges), default=n_pos if not noops else 0)
        if noops or inputs is None:
            start = 0
        cur = inputs[start] if inputs is not None else [p.hidden for p in pros]
        streams: dict[object, list[torch.Tensor]] = {}
        waiting = {t[0]: t for t in merges}  # not started yet
        held: dict[int, list[torch.Tensor]] = {}  # the plan's hidden state at positions some variant starts from
        norms: dict[int, dict[str, torch.Tensor]] = {}
        tops = {t[0]: t[3] for t in merges}
        for p in range(start, n_pos):
            if not waiting and not streams and not noops:
                break
            if any(t[2] == p for t in waiting.values()):
                held[p] = cur
            state = self._read(p)
            kw = self.kwargs(p, pros)
            with self.layer_at(p, state) as layer:
                for key in [k for k in streams if tops[k] < p]:
                    streams[key] = [self.stack.run(layer, x, kw[b]) for b, x in enumerate(streams[key])]
                if self.merge in ("reference", "consistent") and state is not None:
                    norms[p] = {n: t for n, t in state.items() if is_norm_param(n)}
                for key, window, lo, _hi in [t for t in list(waiting.values()) if self._starts_at(t) == p]:
                    with self._variant_layer(window, lo, state, norms) as merged:
                        wkw = [q.kwargs[self.anchor(*window)] for q in pros]
                        streams[key] = [self.stack.run(merged, x, wkw[b]) for b, x in enumerate(held[lo])]
                    del waiting[key]
                if waiting or noops:  # the plan's own state above p: kept, or run here
                    cur = inputs[p + 1] if inputs is not None else [self.stack.run(layer, x, kw[b])
                                                                     for b, x in enumerate(cur)]
            for q in [q for q in held if not any(t[2] == q for t in waiting.values())]:
                del held[q]
        for key, *_ in noops:
            finals[key] = cur
        finals.update(streams)
        return finals

    def _read(self, p: int):
        """The merged state of position p when streaming (read once per walk), else None."""
        lo, hi, _ = self.sources[p]
        if not self.stack.streaming or self.fits.get((lo, hi)) is not None:
            return None
        return self.stack.state(lo, hi, self.merge)

    def _starts_at(self, t: Variant) -> int:
        """Where a variant's merged layer is built: at its top position when it is composed from the groups' own
        states (the top group's state is at hand there), else at its bottom."""
        return t[3] if self.stack.streaming and self.merge in ("reference", "consistent", "keep-last") else t[2]

    @contextlib.contextmanager
    def _variant_layer(self, window: Group, lo: int, state, norms):
        """The merged layer of a variant's window, composed from the groups' states where that is exact."""
        if state is None or self.merge not in COMPOSABLE:
            merged = self.stack.state(window[0], window[1], self.merge)
        elif self.merge in ("reference", "consistent"):  # norms of the bottom group, the rest of the top group
            consistent = self.merge == "consistent"  # (norms that follow a weight: of the top group too)
            merged = {n: norms[lo][n] if is_norm_param(n) and not (consistent and follows_weight(n, state)) else t
                      for n, t in state.items()}
        else:  # keep-first at its bottom, keep-last at its top: the group's state as it is
            merged = state
        layer = self.stack.build(self.anchor(*window), merged, window[0])
        try:
            yield layer
        finally:
            del layer


def windows_of(groups: Sequence[Group]) -> list[Group]:
    """The merged windows of a group list."""
    return [(int(a), int(b)) for a, b in groups if b > a]
