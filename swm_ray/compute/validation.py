"""The validation loss of a plan: its next-token NLL on held-out calibration rows, per row, and the statistics
that compare two plans on the same rows.

`plan_nll` runs the plan's edited stack (`planrun.PlanRunner`) on a set of rows, layer-major (a streaming
stack reads each layer once per call). Given the original's hidden state entering every layer of these rows
(the reference pass keeps them in memory, `refpass.Reference.val_inputs`), it starts at the plan's lowest
window: the layers below are the original's. Per-row NLL sums are float64 and added with `math.fsum`, so a
loss does not depend on how rows were spread over actors.

`paired` compares two plans row by row: the mean difference of their per-row losses and its standard error,
what `auto` decides with (a difference within a few standard errors is not resolved by the rows).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from swm_ray.compute.planrun import PlanRunner
from swm_ray.compute.refpass import row_nll

RowNll = tuple[np.ndarray, int]  # per-row NLL sums of one minibatch, predicted tokens


@torch.inference_mode()
def plan_nll(stack, input_ids: np.ndarray, batches: Sequence[tuple[int, int]], windows: Sequence[Sequence[int]],
             merge: str, attention: str, fits: Mapping | None = None, *, pros=None,
             inputs: list[list[torch.Tensor]] | None = None) -> list[RowNll]:
    """Per minibatch: (per-row next-token NLL sums in nats, float64; predicted tokens) of the model that the
    plan (`windows` merged with `merge`, `fits` folded) makes of `stack`. `pros` (the minibatches' prologues)
    and `inputs` (the original's hidden state entering each original layer, per minibatch) save the layers
    below the plan's lowest window."""
    chunks = [torch.tensor(np.asarray(input_ids[a:b])) for a, b in batches]
    if pros is None:
        pros = [stack.prologue(c.to(stack.device)) for c in chunks]
    runner = PlanRunner(stack, windows, merge, attention, fits)
    start = runner.first_change() if inputs is not None else 0
    hidden = inputs[start] if inputs is not None else [p.hidden for p in pros]
    hidden = runner.run(hidden, pros, start=start)
    return [row_nll(stack, stack.final(h), ids) for h, ids in zip(hidden, chunks)]


def plan_logliks(stack, rows: Sequence[Sequence[int]], spans: Sequence[tuple[int, int]],
                 windows: Sequence[Sequence[int]], merge: str, attention: str, fits: Mapping | None = None,
                 batch_rows: int = 32) -> np.ndarray:
    """Per token row: the log-likelihood (nats, float64) of its tokens in `spans[i]` = [a, b) given the tokens
    before them, under the plan (`plans_logliks` of one plan)."""
    return plans_logliks(stack, rows, spans, [(windows, merge, fits)], attention, batch_rows)[0]


@torch.inference_mode()
def plans_logliks(stack, rows: Sequence[Sequence[int]], spans: Sequence[tuple[int, int]],
                  plans: Sequence[tuple[Sequence[Sequence[int]], str, Mapping | None]], attention: str,
                  batch_rows: int = 32) -> list[np.ndarray]:
    """`plan_logliks` of several plans (windows, merge, fits) in one walk per batch: the original layers below a
    plan's lowest window are the plan's own, so they run once for every plan, and each plan goes on from its
    lowest window (the same tensors as a walk of its own: the values are identical). Rows of different lengths
    are batched by length and padded on the right: in a causal model a row's real positions never see the
    padding after them."""
    runners = [PlanRunner(stack, w, m, attention, f) for w, m, f in plans]
    original = PlanRunner(stack, [], "reference", attention)
    by_start = sorted(range(len(runners)), key=lambda k: (runners[k].first_change(), k))
    order = sorted(range(len(rows)), key=lambda i: (len(rows[i]), i))
    out = [np.zeros(len(rows)) for _ in runners]
    for start in range(0, len(order), batch_rows):
        idx = order[start : start + batch_rows]
        width = max(len(rows[i]) for i in idx)
        ids = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, : len(rows[i])] = torch.tensor(list(rows[i]))
        pro = stack.prologue(ids.to(stack.device))
        shared, at = [pro.hidden], 0
        for k in by_start:
            low = runners[k].first_change()
            shared = original.run(shared, [pro], start=at, stop=low)
            at = low
            (hidden,) = runners[k].run(shared, [pro], start=low)
            logp = torch.log_softmax(stack.logits(stack.final(hidden)).float(), dim=-1)
            for r, i in enumerate(idx):
                a, b = spans[i]
                tgt = ids[r, a:b].to(logp.device)
                out[k][i] = float(logp[r, a - 1 : b - 1].gather(-1, tgt[:, None]).double().sum())
    return out


def mean_nll(parts: Sequence[RowNll]) -> float:
    """Mean NLL per token from per-minibatch (per-row sums, tokens), minibatches in row order; `math.fsum` adds
    exactly, so the value does not depend on how minibatches were spread over actors."""
    total = math.fsum(float(v) for sums, _ in parts for v in sums)
    return total / max(sum(c for _, c in parts), 1)


@dataclass(frozen=True)
class RowLosses:
    """Per-row mean NLL of one plan on a set of validation rows (every row has the same number of tokens)."""

    values: np.ndarray  # (rows,) float64, nats per predicted token

    @classmethod
    def from_parts(cls, parts: Sequence[RowNll]) -> RowLosses:
        rows = np.concatenate([s for s, _ in parts]) if parts else np.zeros(0)
        tokens = sum(c for _, c in parts)
        per_row = tokens / max(len(rows), 1)
        return cls(rows / max(per_row, 1))

    @property
    def mean(self) -> float:
        return math.fsum(float(v) for v in self.values) / max(len(self.values), 1)

    def extended(self, more: RowLosses) -> RowLosses:
        return RowLosses(np.concatenate([self.values, more.values]))


@dataclass(frozen=True)
class Paired:
    """The difference a − b of two plans' mean losses on the same rows, with its standard error."""

    diff: float
    se: float
    rows: int

    def resolved(self, z: float) -> bool:
        """True when the difference is larger than `z` standard errors (and not zero)."""
        return abs(self.diff) > z * self.se and self.diff != 0

    def record(self) -> dict:
        return {"diff": round(self.diff, 6), "se": round(self.se, 6), "rows": self.rows}


def paired(a: RowLosses, b: RowLosses) -> Paired:
    """Mean and standard error of the per-row differences a − b (rows paired)."""
    d = np.asarray(a.values, dtype=np.float64) - np.asarray(b.values, dtype=np.float64)
    n = len(d)
    if n == 0:
        return Paired(0.0, math.inf, 0)
    mean = math.fsum(float(x) for x in d) / n
    se = float(np.std(d, ddof=1) / math.sqrt(n)) if n > 1 else math.inf
    return Paired(mean, se, n)
