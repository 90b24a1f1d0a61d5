"""`eval.json` and the side-by-side table (baseline vs model) printed by `swm-ray eval`.

`eval.json`: `model`, `params`, `mode` and `task_source` (`offline`: swm-ray's packaged task definitions;
`hub`: lm-eval's standard tasks), `splits` ({task: split}), `limit`, `tasks.<task>.{metric, value, stderr, n,
split, source}` (values are fractions in [0, 1]), `mean` (plain mean over tasks), `ppl` and `latency` when
measured, a `baseline` block with the same fields when a baseline was evaluated, and `comparison` (deltas and
ratios). lm-eval's raw results go to a sibling file (`eval.raw.json`), named in `raw_file`, its SHA-256 in
`raw_sha256`; both are written in full before either replaces an earlier pair.

`accuracy_table` prints accuracies with standard errors and paired differences (`evaluation.accuracy`) as
markdown, for `benchmarks/bench_accuracy.py`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from swm_ray.io.remote import is_remote, s3fs_filesystem

RESULT_KEYS = ("model", "params", "mode", "task_source", "splits", "limit", "tasks", "mean", "ppl", "latency")
TASK_LABELS = {
    "boolq": "BoolQ",
    "piqa": "PIQA",
    "hellaswag": "HellaSwag",
    "winogrande": "WinoGrande",
    "arc_easy": "ARC-e",
    "arc_challenge": "ARC-c",
    "openbookqa": "OBQA",
}


def _summary(result: dict) -> dict:
    return {k: result[k] for k in RESULT_KEYS if result.get(k) is not None}


def comparison(result: dict, baseline: dict) -> dict:
    """Model vs baseline: accuracy deltas (fractions), PPL ratio, parameter ratio, latency ratios."""
    out: dict = {}
    if result.get("mean") is not None and baseline.get("mean") is not None:
        out["mean_delta"] = result["mean"] - baseline["mean"]
    deltas = {
        t: row["value"] - baseline["tasks"][t]["value"]
        for t, row in result.get("tasks", {}).items()
        if t in baseline.get("tasks", {}) and row["value"] is not None and baseline["tasks"][t]["value"] is not None
    }
    if deltas:
        out["task_deltas"] = deltas
    if result.get("ppl") and baseline.get("ppl"):
        out["ppl_ratio"] = result["ppl"]["ppl"] / baseline["ppl"]["ppl"]
    if result.get("params") and baseline.get("params"):
        out["params_ratio"] = result["params"] / baseline["params"]
    if result.get("latency") and baseline.get("latency"):
        from swm_ray.evaluation.latency import compare_latency

        out.update(compare_latency(result["latency"], baseline["latency"]))
    return out


def build_report(result: dict, baseline: dict | None = None, raw_file: str | None = None) -> dict:
    """The `eval.json` mapping (without lm-eval's raw results) for a model and an optional baseline."""
    report = _summary(result)
    if baseline is not None:
        report["baseline"] = _summary(baseline)
        report["comparison"] = comparison(result, baseline)
    if raw_file:
        report["raw_file"] = raw_file
    return report


def raw_results(result: dict, baseline: dict | None = None) -> dict:
    """lm-eval's own results for the model (and baseline), for the sibling raw file."""
    raw = {"model": result.get("raw")}
    if baseline is not None:
        raw["baseline"] = baseline.get("raw")
    return raw


def raw_path(out: str) -> str:
    """`.../eval.json` -> `.../eval.raw.json`."""
    return (out[: -len(".json")] if out.endswith(".json") else out) + ".raw.json"


def _umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str, text: str) -> None:
    """Write a file completely or not at all: a temporary sibling renamed over `path` (S3: one PUT)."""
    write_texts_atomic([(path, text)])


def write_texts_atomic(files: list[tuple[str, str]]) -> None:
    """Write several files, each completely or not at all: every temporary sibling is written in full before
    the first is renamed over its target, in the order given, so a failure while writing changes none of them
    (S3: one PUT each, in order)."""
    staged: dict[str, tuple[str, Path]] = {}  # local path -> (its temporary sibling, the target)
    try:
        for path, text in files:
            if is_remote(path):
                continue
            target = Path(path).expanduser().resolve()
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
            staged[path] = (tmp, target)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        for path, text in files:
            if path in staged:
                os.replace(*staged[path])
            else:
                s3fs_filesystem().pipe(path, text.encode("utf-8"))
    finally:
        for tmp, _ in staged.values():
            if os.path.exists(tmp):
                os.unlink(tmp)


def report_for(out: str, result: dict, baseline: dict | None = None) -> dict:
    """The report `write_report` writes at `out` (its raw file named beside it)."""
    return build_report(result, baseline, raw_file=raw_path(out).rsplit("/", 1)[-1])


def write_report(out: str, result: dict, baseline: dict | None = None, report: dict | None = None) -> dict:
    """Write `eval.json` at `out` and lm-eval's raw results beside it; returns the report written (`report`:
    the one `report_for` built already)."""
    raw_out = raw_path(out)
    raw = json.dumps(raw_results(result, baseline), indent=1, default=str)
    # the report names its raw file's digest: a raw file left by another run (a failure between the two
    # renames) does not pass for this report's
    report = {**(report or report_for(out, result, baseline)), "raw_sha256": hashlib.sha256(raw.encode()).hexdigest()}
    write_texts_atomic([(raw_out, raw), (out, json.dumps(report, indent=2, default=str) + "\n")])
    return report


# --- table ------------------------------------------------------------------------------------------------


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def _num(v: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def _task_rows(report: dict, base: dict | None) -> list[list[str]]:
    rows = []
    tasks = list(report.get("tasks", {})) or list((base or {}).get("tasks", {}))
    for t in tasks:
        row = report.get("tasks", {}).get(t, {})
        b = (base or {}).get("tasks", {}).get(t, {})
        label = f"{TASK_LABELS.get(t, t)} ({row.get('metric') or b.get('metric')}, n={row.get('n') or b.get('n')})"
        rows.append([label, _pct(b.get("value")), _pct(row.get("value")), _delta(row.get("value"), b.get("value"))])
    if tasks:
        rows.append(["mean", _pct((base or {}).get("mean")), _pct(report.get("mean")),
                     _delta(report.get("mean"), (base or {}).get("mean"))])
    return rows


def _delta(v: float | None, b: float | None) -> str:
    return "" if v is None or b is None else f"{100 * (v - b):+.2f}"


def _extra_rows(report: dict, base: dict | None) -> list[list[str]]:
    base = base or {}
    comp = report.get("comparison", {})
    rows = []
    if report.get("ppl") or base.get("ppl"):
        ppl, bppl = report.get("ppl") or {}, base.get("ppl") or {}
        label = f"PPL ({ppl.get('data') or bppl.get('data')}, {ppl.get('chunk') or bppl.get('chunk')}-tok chunks)"
        ratio = f"x{comp['ppl_ratio']:.3f}" if "ppl_ratio" in comp else ""
        rows.append([label, _num(bppl.get("ppl")), _num(report.get("ppl", {}).get("ppl")), ratio])
    if report.get("params"):
        ratio = f"x{comp['params_ratio']:.3f}" if "params_ratio" in comp else ""
        rows.append(["parameters (M)", _num(base.get("params") and base["params"] / 1e6),
                     _num(report["params"] / 1e6), ratio])
    lat, blat = report.get("latency") or {}, base.get("latency") or {}
    if lat:
        rows.append([f"latency (s, {lat['new_tokens']} tokens, bs {lat['batch_size']})",
                     _num(blat.get("latency_s"), "{:.3f}"), _num(lat["latency_s"], "{:.3f}"),
                     f"speed-up x{comp['speedup']:.3f}" if "speedup" in comp else ""])
        rows.append(["throughput (tokens/s)", _num(blat.get("tokens_per_s"), "{:.1f}"),
                     _num(lat["tokens_per_s"], "{:.1f}"), ""])
        if lat.get("ttft_s") is not None:
            rows.append(["time to first token (s)", _num(blat.get("ttft_s"), "{:.4f}"), _num(lat["ttft_s"], "{:.4f}"),
                         f"x{comp['ttft_ratio']:.3f}" if "ttft_ratio" in comp else ""])
    return rows


def format_table(report: dict) -> str:
    """Plain-text table: accuracies in percent, baseline | model | difference when a baseline is present."""
    base = report.get("baseline")
    rows = _task_rows(report, base) + _extra_rows(report, base)
    header = ["", "baseline", "model", "diff"] if base else ["", "model"]
    if not base:
        rows = [[r[0], r[2]] for r in rows]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [_line(header, widths), "  ".join("-" * w for w in widths)]
    lines += [_line(r, widths) for r in rows]
    title = f"model: {report.get('model')}" + (f"   baseline: {base.get('model')}" if base else "")
    notes = [f"tasks: {report.get('task_source') or report.get('mode') or '-'}{_splits_note(report)}, "
             f"limit: {report.get('limit') or 'all'}"]
    return "\n".join([title, *lines, *notes])


def _splits_note(report: dict) -> str:
    """` (validation split)` or ` (test: arc_easy, openbookqa; validation: boolq, piqa)`."""
    by_split: dict[str, list[str]] = {}
    for task, split in (report.get("splits") or {}).items():
        by_split.setdefault(split, []).append(task)
    if not by_split:
        return ""
    if len(by_split) == 1:
        return f" ({next(iter(by_split))} split)"
    return " (" + "; ".join(f"{s}: {', '.join(ts)}" for s, ts in sorted(by_split.items())) + ")"


def _line(cells: list[str], widths: list[int]) -> str:
    first = str(cells[0]).ljust(widths[0])
    return "  ".join([first, *(str(c).rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))])


# --- accuracy with standard errors (benchmarks/bench_accuracy.py) -------------------------------------------


def _pm(v: float | None, se: float | None, signed: bool = False) -> str:
    if v is None:
        return "-"
    text = f"{v:+.3f}" if signed else f"{v:.3f}"
    return text if se is None else f"{text} ± {se:.3f}"


def accuracy_table(rows: list[tuple[str, dict]], tasks: list[str], reference: str | None = None,
                   per_task: str = "acc") -> str:
    """Markdown table of `accuracy.summarize` results, one row per (label, summary): the mean over `tasks` ± SE,
    its paired difference to `reference` ± SE, and per task its accuracy ± SE (`per_task="acc"`) or its paired
    difference ± SE (`"diff"`); fractions. Missing values (a task not scored yet, the reference's own
    difference) show '-'."""
    mean_name = "6-task mean" if len(tasks) == 6 else f"{len(tasks)}-task mean"
    diff_name = f"Δ vs {reference} (paired)" if reference else "Δ (paired)"
    labels = [f"{TASK_LABELS.get(t, t)}" for t in tasks]
    lines = ["| model | " + " | ".join([mean_name, diff_name, *labels]) + " |",
             "|---|" + "---|" * (len(tasks) + 2)]
    for label, s in rows:
        cells = [_pm(s.get("mean"), s.get("mean_se")), _pm(s.get("diff"), s.get("diff_se"), signed=True)]
        for t in tasks:
            r = s.get("tasks", {}).get(t) or {}
            cells.append(_pm(r.get(per_task), r.get("se" if per_task == "acc" else "diff_se"), per_task == "diff"))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
