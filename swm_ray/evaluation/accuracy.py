"""Accuracy with standard errors, and paired differences between two models scored on the same items.

Inputs are per-item correctness vectors, `{doc_id: 0|1}` per task (`zeroshot(..., per_item=True)`).

- A task's accuracy is the mean of its 0/1 vector; its standard error is that of a sample mean,
  `sd(x) / sqrt(n)` with the n-1 sample variance (for 0/1 items: `sqrt(p (1 - p) / (n - 1))`), the same
  estimate lm-eval reports as `acc_stderr`.
- A difference between two models on one task is paired item by item: the mean of `d_i = a_i - b_i` over the
  same documents, with the standard error of that mean, `sd(d) / sqrt(n)`. Both models see the same items, so
  item difficulty cancels: this is much smaller than the unpaired `sqrt(SE_a² + SE_b²)` when the models agree
  on most items.
- A mean over k tasks (the 6-task mean) treats the tasks as independent samples:
  `SE = sqrt(sum SE_i²) / k`, for an accuracy mean and for a mean of paired differences alike.

Pure Python (no numpy, no torch); vectors are small (hundreds of items per task).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

Items = Mapping[int, int]  # doc_id -> 1 if correct else 0


def mean_se(values: Sequence[float]) -> tuple[float, float | None]:
    """(mean, standard error of the mean); the SE is None below two values."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mu = sum(values) / n
    if n < 2:
        return mu, None
    var = sum((v - mu) ** 2 for v in values) / (n - 1)
    return mu, math.sqrt(var / n)


def task_accuracy(items: Items) -> dict:
    """`{"acc", "se", "n"}` of one task's 0/1 vector."""
    acc, se = mean_se([float(v) for v in items.values()])
    return {"acc": acc, "se": se, "n": len(items)}


def paired_difference(items: Items, base: Items) -> dict:
    """`{"diff", "se", "n"}`: mean of `items[d] - base[d]` over the documents both were scored on, and the
    standard error of that mean. ValueError when the two were scored on different documents (their
    accuracies would not be comparable)."""
    if set(items) != set(base):
        only_a, only_b = len(set(items) - set(base)), len(set(base) - set(items))
        raise ValueError(f"not the same items: {only_a} only in one vector, {only_b} only in the other "
                         f"(score both models with the same --limit)")
    diff, se = mean_se([float(items[d]) - float(base[d]) for d in sorted(items)])
    return {"diff": diff, "se": se, "n": len(items)}


def mean_of_tasks(values: Iterable[float], ses: Iterable[float | None]) -> tuple[float, float | None]:
    """(plain mean of k per-task values, its SE `sqrt(sum SE_i²) / k` for independent tasks; None if any SE is)."""
    values, ses = list(values), list(ses)
    if not values or len(values) != len(ses):
        raise ValueError("need one SE per value")
    k = len(values)
    se = None if any(s is None for s in ses) else math.sqrt(sum(s * s for s in ses)) / k
    return sum(values) / k, se


def summarize(items: Mapping[str, Items], base: Mapping[str, Items] | None = None,
              tasks: Sequence[str] | None = None) -> dict:
    """Accuracy ± SE per task and of their mean, and (with `base`) the paired difference to `base` per task
    and of the mean.

    Returns `{"tasks": {task: {acc, se, n, diff?, diff_se?}}, "mean", "mean_se", "diff"?, "diff_se"?}` over
    `tasks` (default: all of `items`, in order). Fractions, not percent.
    """
    names = list(tasks if tasks is not None else items)
    missing = [t for t in names if t not in items or (base is not None and t not in base)]
    if missing:
        raise ValueError(f"no per-item results for task(s) {', '.join(missing)}")
    rows = {}
    for task in names:
        rows[task] = task_accuracy(items[task])
        if base is not None:
            d = paired_difference(items[task], base[task])
            rows[task].update(diff=d["diff"], diff_se=d["se"])
    out: dict = {"tasks": rows}
    out["mean"], out["mean_se"] = mean_of_tasks([r["acc"] for r in rows.values()], [r["se"] for r in rows.values()])
    if base is not None:
        out["diff"], out["diff_se"] = mean_of_tasks([r["diff"] for r in rows.values()],
                                                    [r["diff_se"] for r in rows.values()])
    return out


# --- a compact JSON form of a per-item vector ----------------------------------------------------------------


def encode_items(items: Items) -> dict:
    """`{"doc_ids": "0-499,1003", "correct": "0110..."}`: doc ids as sorted ranges, one digit per item."""
    ids = sorted(items)
    spans: list[str] = []
    start = prev = None
    for d in ids:
        if start is None:
            start = prev = d
        elif d == prev + 1:
            prev = d
        else:
            spans.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = prev = d
    if start is not None:
        spans.append(f"{start}" if start == prev else f"{start}-{prev}")
    return {"doc_ids": ",".join(spans), "correct": "".join("1" if items[d] else "0" for d in ids)}


def decode_items(packed: Mapping[str, str]) -> dict[int, int]:
    """The inverse of `encode_items`."""
    ids: list[int] = []
    for span in filter(None, packed["doc_ids"].split(",")):
        lo, _, hi = span.partition("-")
        ids.extend(range(int(lo), int(hi or lo) + 1))
    bits = packed["correct"]
    if len(bits) != len(ids) or set(bits) - {"0", "1"}:
        raise ValueError(f"malformed per-item vector: {len(ids)} doc ids, {len(bits)} results")
    return {d: int(b) for d, b in zip(ids, bits, strict=True)}
