"""The sums of a compensation fit on a layer stack: per window the float64 MᵀM, MᵀB and token counts
(`CompSums`, additive over rows), gathered by ONE bottom-up pass over the fit rows (`FitPass`) that runs the
original and the compressed model side by side (`methods/compensation.py` describes the fit)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from swm_ray.config import COMPENSATION_INPUTS
from swm_ray.edits.fold import Fit, Site, stack_site
from swm_ray.edits.windows import Group
from swm_ray.errors import UserError


# -- the additive sums ---------------------------------------------------------------------------------------
@dataclass
class CompSums:
    """Sums over calibration tokens for one window (float64; see the module docstring)."""

    mtm: np.ndarray  # (d, d) Σ mᵀm
    mtb: np.ndarray  # (d, d) Σ mᵀb
    bb: float = 0.0  # Σ ‖b_t‖²
    gap: float = 0.0  # Σ ‖y_t − x_t‖²: the window's whole update of the residual stream (the error scale)
    tokens: int = 0

    @classmethod
    def zeros(cls, d: int) -> CompSums:
        return cls(np.zeros((d, d)), np.zeros((d, d)))

    def add_(self, other: CompSums) -> CompSums:
        self.mtm += other.mtm
        self.mtb += other.mtb
        self.bb += other.bb
        self.gap += other.gap
        self.tokens += other.tokens
        return self


def add_sums(parts: Sequence[CompSums]) -> CompSums:
    """The sum of shards' sums, added in the order given (the driver passes them in row order)."""
    total = CompSums.zeros(parts[0].mtm.shape[0])
    for p in parts:
        total.add_(p)
    return total


def accumulate(sums: CompSums, x: torch.Tensor, m: torch.Tensor, h: torch.Tensor, y: torch.Tensor,
               skip_first: int) -> None:
    """Add one batch: x (window input), m (MLP output), h (layer output), y (target), each (b, T, d)."""
    d = m.shape[-1]
    x, m, h, y = (t[:, skip_first:, :].reshape(-1, d).to(device=y.device, dtype=torch.float64)  # one device
                  for t in (x, m, h, y))
    b = y - h + m
    sums.mtm += (m.T @ m).cpu().numpy()
    sums.mtb += (m.T @ b).cpu().numpy()
    sums.bb += float((b * b).sum())
    sums.gap += float(((y - x) ** 2).sum())
    sums.tokens += int(m.shape[0])


# -- computing the sums on a layer stack ----------------------------------------------------------------------
@contextlib.contextmanager
def capture_output(layer: torch.nn.Module, site: Site):
    """A list that receives the output of the layer's `site.module` at every call."""
    got: list[torch.Tensor] = []
    handle = layer.get_submodule(site.module).register_forward_hook(lambda mod, inp, out: got.append(out))
    try:
        yield got
    finally:
        handle.remove()


class FitPass:
    """The fit of a plan's windows in ONE bottom-up pass over the fit rows (O(L) layer runs for any number of
    windows).

    The original model (`h_o`) and the compressed one (`h_c`: windows merged with `merge`, fits folded) run side
    by side, layer-major. At each target window the pass stops and returns the window's sums (`advance`); the
    caller solves the fit and hands it to the next `advance`, which folds it into that window's layer and goes on
    up, so every window's input is the output of the fitted model below it (`source` compressed). With `source`
    original a window's input is the original's (local fits, independent of each other). `fits` are known fits
    folded where their windows are passed; `targets` default to every window of the plan."""

    def __init__(self, stack, input_ids: np.ndarray, batches: Sequence[tuple[int, int]],
                 windows: Sequence[Sequence[int]], merge: str, attention: str, *, source: str = "compressed",
                 skip_first: int = 1, fits: Mapping[Group, Fit] | None = None,
                 targets: Sequence[Sequence[int]] | None = None):
        from swm_ray.compute.planrun import PlanRunner

        if source not in COMPENSATION_INPUTS:
            raise UserError(f"merge.compensate_input {source!r}: choose compressed or original")
        if input_ids.shape[1] <= skip_first:
            raise UserError(f"merge.skip_first {skip_first} leaves no position of the {input_ids.shape[1]}-token "
                            f"rows to fit the compensation on")
        self.stack, self.source, self.skip_first = stack, source, skip_first
        self.runner = PlanRunner(stack, windows, merge, attention)
        self.site = stack_site(stack)
        self.fits = {tuple(int(v) for v in w): f for w, f in (fits or {}).items()}
        wanted = self.runner.windows if targets is None else targets
        self.targets = {tuple(int(v) for v in t) for t in wanted}
        self.top = max((h for _, h in self.targets), default=-1)
        self.pros = [stack.prologue(torch.tensor(np.asarray(input_ids[a:b])).to(stack.device)) for a, b in batches]
        self.h_o = [p.hidden for p in self.pros]  # the original model
        self.track = OriginalTrack(stack, self.h_o)  # its layer outputs, shared with the forks of this pass
        self.h_c = list(self.h_o) if source == "compressed" else None  # the compressed one
        self.next = 0  # index of the next source of the edited stack
        self.pending: tuple | None = None  # (window, its input, its plain output) awaiting its fit
        self.done: list[Group] = []  # target windows whose sums were returned, in order

    def fork(self, windows: Sequence[Sequence[int]], targets: Sequence[Sequence[int]],
             merge: str | None = None) -> FitPass:
        """A pass of another plan that agrees with this one below where this one stands (its edited stack has the
        same layers there): it starts from this pass's hidden states instead of the embeddings. Known fits below
        are kept; `targets` are the other plan's windows to fit; `merge` its merge method (default this pass's:
        below where this one stands the two have no window, or the same ones)."""
        from swm_ray.compute.planrun import PlanRunner

        if self.pending is not None:
            raise RuntimeError("a pass awaiting a fit cannot be forked")
        merge = merge or self.runner.merge
        if merge != self.runner.merge and any(lo != hi for lo, hi, _ in self.runner.sources[: self.next]):
            raise ValueError("a fork with another merge method must start below the first window")
        runner = PlanRunner(self.stack, windows, merge, self.runner.attention)
        if runner.sources[: self.next] != self.runner.sources[: self.next]:
            raise ValueError("the forked plan differs from this pass below where it stands")
        self.track.on = True
        new = copy.copy(self)
        new.runner = runner
        new.fits = {w: f for w, f in self.fits.items() if w in set(runner.windows)}
        new.targets = {tuple(int(v) for v in t) for t in targets}
        new.top = max((h for _, h in new.targets), default=-1)
        new.h_o, new.h_c = list(self.h_o), None if self.h_c is None else list(self.h_c)
        new.done = []
        return new

    def close(self) -> None:
        """Drop the original's layer outputs this pass and its forks keep (call when none of them advances again;
        a pass that does advances correctly, running those layers again)."""
        self.track.clear()

    @torch.inference_mode()
    def advance(self, fit: Fit | None = None, stop: int | None = None) -> tuple[Group, CompSums] | None:
        """Fold `fit` into the window returned last (None: that window stays plain, or takes its known fit), then
        run up to and through the next target window and return (window, its sums); None when none is left, or
        when the next layer of the edited stack starts at or above original layer `stop` (the pass then stands
        just below it, see `fork`)."""
        s = self.stack
        if self.pending is not None:
            window, x_in, plain = self.pending
            self.pending = None
            fit = fit if fit is not None else self.fits.get(window)
            if fit is not None:
                self.fits[window] = fit
            if self.h_c is not None:
                if fit is None:
                    self.h_c = plain
                else:
                    anchor = self.runner.anchor(*window)
                    with self.runner.layer(*window, fit=fit) as layer:
                        self.h_c = [s.run(layer, x, p.kwargs[anchor]) for x, p in zip(x_in, self.pros)]
        while self.next < len(self.runner.sources):
            low, high, anchor = self.runner.sources[self.next]
            if (stop is None and low > self.top) or (stop is not None and low >= stop):
                break
            self.next += 1
            x_o = self.h_o
            for i in range(low, high + 1):
                # a kept layer is the same in both models; below the first window their inputs are the same too
                same = self.h_c is not None and all(a is b for a, b in zip(self.h_c, self.h_o))
                both = low == high and self.h_c is not None and not same
                out = self.track.get(i)
                if out is None or both:
                    with s.layer(i) as layer:
                        if out is None:
                            out = self.track.put(i, [s.run(layer, x, p.kwargs[i]) for x, p in zip(self.h_o, self.pros)])
                        if both:
                            self.h_c = [s.run(layer, x, p.kwargs[i]) for x, p in zip(self.h_c, self.pros)]
                self.h_o = out
                if low == high and same:
                    self.h_c = list(out)
            if low == high:
                continue
            window = (low, high)
            if window not in self.targets:
                if self.h_c is not None:
                    with self.runner.layer(low, high, fit=self.fits.get(window)) as layer:
                        self.h_c = [s.run(layer, x, p.kwargs[anchor]) for x, p in zip(self.h_c, self.pros)]
                continue
            x_in = self.h_c if self.h_c is not None else x_o
            sums = CompSums.zeros(int(s.config.hidden_size))
            plain = []
            with s.group(low, high, self.runner.merge, self.runner.attention) as layer, \
                    capture_output(layer, self.site) as got:
                for x, y, p in zip(x_in, self.h_o, self.pros):
                    got.clear()
                    h = s.run(layer, x, p.kwargs[anchor])
                    accumulate(sums, x, got[-1], h, y, self.skip_first)
                    plain.append(h)
            self.pending = (window, x_in, plain)
            self.done.append(window)
            return window, sums
        return None


class OriginalTrack:
    """The original model's output of every layer on a pass's fit rows, kept once the pass is forked: the
    original above a fork's first window is the same for the pass and every fork, so each layer of it runs once
    whatever the number of forks. Kept while the total stays within `limit` bytes (default: a quarter of what the
    stack's budget leaves beside its weights); a layer past it runs again where asked."""

    def __init__(self, stack, first: Sequence[torch.Tensor], limit: int | None = None):
        self.outputs: dict[int, list[torch.Tensor]] = {}
        self.bytes = 0
        self.per = sum(t.numel() * t.element_size() for t in first)  # one layer's output: the shape of its input
        if limit is None:
            budget = getattr(stack, "budget", None)
            fp = getattr(stack, "footprint", None)
            if budget is None or fp is None:
                limit = TRACK_LIMIT
            else:
                held = fp.weights if getattr(stack, "max_streams", None) is None else fp.streaming_floor
                limit = max(0, int(budget) - int(held)) // 4
        self.limit = max(0, int(limit))
        self.on = False  # a pass keeps nothing until it is first forked

    def get(self, i: int) -> list[torch.Tensor] | None:
        return self.outputs.get(i)

    def put(self, i: int, out: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.on and i not in self.outputs and self.bytes + self.per <= self.limit:
            self.outputs[i] = out
            self.bytes += self.per
        return out

    def clear(self) -> None:
        self.outputs.clear()
        self.bytes = 0


TRACK_LIMIT = 2 << 30  # bytes of the original's layer outputs a fit pass keeps where the stack has no budget


def compensation_sums(stack, input_ids: np.ndarray, batches: Sequence[tuple[int, int]],
                      windows: Sequence[Sequence[int]], merge: str, attention: str, fits: Mapping[Group, Fit],
                      targets: Sequence[Sequence[int]], *, source: str = "compressed",
                      skip_first: int = 1) -> list[CompSums]:
    """Per target window: its sums over the given minibatches (row ranges of `input_ids`), with the plan's
    `windows` applied and the known `fits` folded where the pass meets them (one `FitPass`, no fit solved)."""
    fp = FitPass(stack, input_ids, batches, windows, merge, attention, source=source, skip_first=skip_first,
                 fits=fits, targets=targets)
    out: dict[Group, CompSums] = {}
    while (got := fp.advance()) is not None:
        out[got[0]] = got[1]
    return [out[tuple(int(v) for v in t)] for t in targets]
