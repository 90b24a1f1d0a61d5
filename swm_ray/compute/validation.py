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

import functools
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


@dataclass(frozen=True)
class _Pack:
    """Rows that share their context (the tokens before their scored span), as one token row: the context once,
    then each row's span after it, every span seeing the context and itself only (`pack_inputs`)."""

    context: tuple[int, ...]
    members: tuple[int, ...]  # the rows packed, in order
    spans: tuple[tuple[int, ...], ...]  # each member's scored tokens

    @functools.cached_property
    def tokens(self) -> tuple[int, ...]:
        return self.context + tuple(t for sp in self.spans for t in sp)

    def offsets(self) -> list[int]:
        out, at = [], len(self.context)
        for sp in self.spans:
            out.append(at)
            at += len(sp)
        return out


def packs_of(rows: Sequence[Sequence[int]], spans: Sequence[tuple[int, int]], share: bool = True) -> list[_Pack]:
    """The rows grouped by their context (rows of one multiple-choice item share it; `share` False: every row a
    pack of its own); tokens after a span are not scored and are left out. Packs come in order of their first
    row."""
    groups: dict[tuple, list[int]] = {}
    for i, (a, _b) in enumerate(spans):
        ctx = tuple(int(t) for t in rows[i][:a])
        groups.setdefault(ctx if share else (i, ctx), []).append(i)
    return [_Pack(tuple(int(t) for t in rows[idx[0]][: spans[idx[0]][0]]), tuple(idx),
                  tuple(tuple(int(t) for t in rows[i][spans[i][0]:spans[i][1]]) for i in idx))
            for idx in groups.values()]


def _padded_ids(packs: Sequence[_Pack]) -> torch.Tensor:
    """The packs' tokens as one (b, T) batch, right-padded with 0."""
    ids = torch.zeros((len(packs), max(len(p.tokens) for p in packs)), dtype=torch.long)
    for r, p in enumerate(packs):
        ids[r, : len(p.tokens)] = torch.tensor(p.tokens)
    return ids


def pack_inputs(packs: Sequence[_Pack], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token ids, position ids, additive 4D mask (b, 1, T, T)) of a batch of packs, right-padded: a span's tokens
    sit at the positions that follow the context (as in a row of their own) and attend to the context and to
    their own span; padding attends causally to everything before it (never read by a real position)."""
    ids = _padded_ids(packs)
    width = ids.shape[1]
    pos = torch.zeros((len(packs), width), dtype=torch.long)
    allowed = torch.tril(torch.ones(width, width, dtype=torch.bool)).repeat(len(packs), 1, 1)
    for r, p in enumerate(packs):
        c = len(p.context)
        pos[r, :c] = torch.arange(c)
        for o, sp in zip(p.offsets(), p.spans):
            pos[r, o : o + len(sp)] = torch.arange(c, c + len(sp))
            allowed[r, o : o + len(sp), c:o] = False  # earlier spans are not this span's past
        pos[r, len(p.tokens):] = torch.arange(len(p.tokens), width)
    mask = torch.zeros((len(packs), 1, width, width), dtype=dtype)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    return ids, pos, mask


def packable(stack, width: int) -> bool:
    """Whether choices can be packed into rows of `width` tokens on this stack: every layer attends globally, or
    through a sliding window that covers the whole row, so a custom mask is all that decides what a position
    sees (other layer kinds, e.g. chunked or linear attention, and attention kernels that take no custom mask,
    such as flash attention, take the rows one by one)."""
    if getattr(stack.config, "_attn_implementation", None) not in (None, "sdpa", "eager"):
        return False
    types = stack.layer_types or ["full_attention"]
    if any(t not in ("full_attention", "sliding_attention") for t in types):
        return False
    window = getattr(stack.config, "sliding_window", None)
    if "sliding_attention" in types or window is not None:
        return window is not None and width <= int(window)
    return True


@torch.inference_mode()
def plans_logliks(stack, rows: Sequence[Sequence[int]], spans: Sequence[tuple[int, int]],
                  plans: Sequence[tuple[Sequence[Sequence[int]], str, Mapping | None]], attention: str,
                  batch_rows: int = 32, pack: bool = True, part: tuple[int, int] | None = None) -> list[np.ndarray]:
    """`plan_logliks` of several plans (windows, merge, fits) in one walk per batch: the original layers below a
    plan's lowest window are the plan's own, so they run once for every plan, and each plan goes on from its
    lowest window (the same tensors as a walk of its own).

    Rows that share a context (the choices of one item) are packed into one row (`packs_of`): the context runs
    once, each choice attends to it and to itself, at the positions it has in a row of its own, so its
    log-likelihood is the same up to float rounding. Where the stack cannot take a custom mask (`packable`),
    every row is its own pack with a plain causal mask (as with `pack` False). Packs are batched by length (at
    most `batch_rows` of them, about `batch_rows` × 128 tokens) and padded on the right. Only the positions that
    predict a scored token go through the final norm and the LM head.

    `part` (j, k): only batches j, j + k, j + 2k, ... of that batching, the other rows left at 0. The batches do
    not depend on `part`, so k callers given every row and parts 0..k-1 run exactly the batches of one caller,
    and the sum of their arrays is its result, bit for bit (`pool.RayBackend.task_logliks`)."""
    runners = [PlanRunner(stack, w, m, attention, f) for w, m, f in plans]
    original = PlanRunner(stack, [], "reference", attention)
    by_start = sorted(range(len(runners)), key=lambda k: (runners[k].first_change(), k))
    packs = packs_of(rows, spans)
    custom = pack and packable(stack, max((len(p.tokens) for p in packs), default=0))
    if not custom:
        packs = packs_of(rows, spans, share=False)
    order = sorted(range(len(packs)), key=lambda k: (len(packs[k].tokens), k))
    out = [np.zeros(len(rows)) for _ in runners]
    budget = batch_rows * 128
    batches: list[list[int]] = []
    for k in order:
        if batches and len(batches[-1]) < batch_rows and \
                (len(batches[-1]) + 1) * len(packs[k].tokens) <= budget:
            batches[-1].append(k)
        else:
            batches.append([k])
    if part is not None:
        j, k = part
        batches = batches[j::k]
    for batch in batches:
        group = [packs[k] for k in batch]
        if custom:
            ids, pos, mask = pack_inputs(group, stack.dtype)
            pro = stack.prologue(ids, pos, mask)
        else:
            pro = stack.prologue(_padded_ids(group))
        # the positions whose next-token distribution is scored, and the token each predicts
        rows_at, cols_at, targets, owners = [], [], [], []
        for r, p in enumerate(group):
            c = len(p.context)
            if c == 0:
                raise ValueError("a scored span needs at least one token before it (the row's first token)")
            for i, o, sp in zip(p.members, p.offsets(), p.spans):
                before = ([c - 1] + list(range(o, o + len(sp) - 1)))[: len(sp)]  # an empty span scores 0
                rows_at += [r] * len(sp)
                cols_at += before
                targets += list(sp)
                owners += [i] * len(sp)
        rows_t, cols_t = torch.tensor(rows_at), torch.tensor(cols_at)
        tgt = torch.tensor(targets)
        owner = np.asarray(owners)
        shared, at = [pro.hidden], 0
        for k in by_start:
            low = runners[k].first_change()
            shared = original.run(shared, [pro], start=at, stop=low)
            at = low
            (hidden,) = runners[k].run(shared, [pro], start=low)
            picked = hidden[rows_t.to(hidden.device), cols_t.to(hidden.device)]
            logp = torch.log_softmax(stack.logits(stack.final(picked)).float(), dim=-1)
            ll = logp.gather(-1, tgt.to(logp.device)[:, None])[:, 0].double().cpu().numpy()
            np.add.at(out[k], owner, ll)
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
