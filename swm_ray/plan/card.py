"""The model card (`README.md`) of a written folder: what was removed or merged and how, the sizes, the width
entry and the metrics table."""

from __future__ import annotations

import math
from typing import Any

from swm_ray.edits.merge import DROP_ONLY_METHODS, METHOD_DESCRIPTIONS
from swm_ray.io.artifacts import fmt_cell
from swm_ray.plan.plan import Plan
from swm_ray.plan.sources import public_config, public_source, scrub_local_paths, source_kind

# -- metrics -------------------------------------------------------------------------------------------------
RESULT_KEYS = {"model", "raw", "mode", "task_source", "splits", "limit", "tasks", "mean", "ppl", "params", "latency"}


def _pct(value: Any) -> str:
    return "" if not isinstance(value, (int, float)) or value != value else f"{100 * value:.2f}"


def _ppl_rows(ppl: Any) -> list[list[str]]:
    if isinstance(ppl, (int, float)):
        return [["perplexity", fmt_cell(float(ppl), 2), "", ""]]
    if not isinstance(ppl, dict) or ppl.get("ppl") is None:
        return []
    on = [public_source(str(ppl["data"])) if ppl.get("data") else ""]
    if ppl.get("tokens") is not None:
        on.append(f"{ppl['tokens']:,} tokens")
    if ppl.get("chunks") is not None and ppl.get("chunk") is not None:
        on.append(f"{ppl['chunks']:,} chunks of {ppl['chunk']}")
    if ppl.get("bos"):
        on.append(f"BOS: {ppl['bos']}")
    return [["perplexity", fmt_cell(float(ppl["ppl"]), 2), "", ", ".join(x for x in on if x)]]


def _task_rows(metrics: dict) -> list[list[str]]:
    from swm_ray.evaluation.report import TASK_LABELS

    tasks = metrics.get("tasks") if isinstance(metrics.get("tasks"), dict) else {}
    splits = metrics.get("splits") if isinstance(metrics.get("splits"), dict) else {}
    rows = []
    for task, row in tasks.items():
        if not isinstance(row, dict):
            continue
        source = row.get("source") or metrics.get("task_source") or metrics.get("mode")
        split = row.get("split") or splits.get(task)
        on = [f"{split} split" if split else "", f"{source} tasks" if source else "",
              f"{row['n']:,} items" if isinstance(row.get("n"), int) else ""]
        label = f"{TASK_LABELS.get(task, task)} ({row.get('metric') or 'accuracy'}, %)"
        stderr = _pct(row.get("stderr"))
        rows.append([label, _pct(row.get("value")), f"± {stderr}" if stderr else "", ", ".join(x for x in on if x)])
    if rows and isinstance(metrics.get("mean"), (int, float)):
        rows.append(["mean accuracy (%)", _pct(metrics["mean"]), "", f"plain mean over {len(rows)} tasks"])
    return rows


def _latency_rows(lat: Any) -> list[list[str]]:
    if not isinstance(lat, dict) or lat.get("latency_s") is None:
        return []
    on = f"{lat.get('new_tokens')} new tokens, batch {lat.get('batch_size')}, {lat.get('runs')} runs"
    std = lat.get("latency_s_std")
    rows = [["latency (s)", f"{lat['latency_s']:.3f}", f"± {std:.3f}" if std else "", on]]
    if lat.get("tokens_per_s") is not None:
        rows.append(["throughput (tokens/s)", f"{lat['tokens_per_s']:.1f}", "", on])
    return rows


def _flat_rows(name: str, value: Any) -> list[list[str]]:
    """Rows for a value of no known shape: nested dicts flattened into `a / b` names, lists joined, local
    paths left out."""
    if isinstance(value, dict):
        return [r for k, v in value.items() for r in _flat_rows(f"{name} / {k}", v)]
    if isinstance(value, (list, tuple)):
        if not value or any(isinstance(v, (dict, list, tuple)) for v in value):
            return []
        value = ", ".join(fmt_cell(v, 4) for v in value)
    if value is None or (isinstance(value, str) and source_kind(value) == "local"):
        return []
    return [[name, fmt_cell(value, 4), "", ""]]


def render_metrics_table(metrics: dict[str, Any]) -> str:
    """Markdown table of an evaluation result (`evaluation.evaluate_source`, `jobs.eval.run_eval`): perplexity
    with its text and token count, each task with its split, task source, item count and standard error, the
    mean, parameters and latency; other keys as plain rows. No local path and no raw dict is printed."""
    if not metrics:
        return ""
    rows = _ppl_rows(metrics.get("ppl")) + _task_rows(metrics)
    if isinstance(metrics.get("params"), int):
        rows.append(["parameters", f"{metrics['params']:,}", "", ""])
    rows += _latency_rows(metrics.get("latency"))
    for key, value in metrics.items():
        if key not in RESULT_KEYS:
            rows += _flat_rows(str(key), value)
    if not rows:
        return ""
    lines = ["| metric | value | ± stderr | measured on |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return scrub_local_paths("\n".join(lines))


# -- the model card ------------------------------------------------------------------------------------------
PLAN_METHODS = {  # select.method -> how it chose its windows
    "swm": "sliding-window merging: windows of consecutive layers whose outputs stay similar, each merged into one",
    "shortgpt": "ShortGPT: the layers of lowest Block Influence (1 − cosine of a layer's input and output)",
    "sleb": "SLEB: blocks removed one at a time, each time the one whose removal raises the calibration loss least",
    "laco": "LaCo layer collapse: windows merged with the paper's formula while the output cosine stays high",
    "shortened-ppl": "Shortened-LLM: layers ranked once by the calibration perplexity without each",
    "replaceme": "ReplaceMe: the block of consecutive layers whose input and output are closest in angle (at the "
    "last token, or over every position with select.replaceme_tokens: all)",
    "auto": "every candidate planned to the same target, and the plan with the lowest next-token loss on "
    "held-out calibration rows was kept",
    "flap": "FLAP: attention head groups and MLP channels of lowest fluctuation, bias-compensated",
    "taylor": "first-order Taylor importance (LLM-Pruner style) of attention head groups and MLP channels",
}


def _windows(plan: Plan) -> list[list[int]]:
    return [w for w in plan.windows if w[1] > w[0]]


def _depth_text(plan: Plan) -> str:
    """What the plan did to the depth: dropped layers (keep-first / keep-last) or merged windows."""
    windows, n = _windows(plan), len(plan.removed_layers)
    runs = f"{len(windows)} window{'s' if len(windows) != 1 else ''} of consecutive decoder layers"
    if plan.merge in DROP_ONLY_METHODS:
        kept = "bottom" if plan.merge == "keep-first" else "top"
        text = (f"by dropping {n} of its {plan.num_layers_before} decoder layers ({runs}, of which only the "
                f"{kept} layer of each was kept, unchanged; no layers were merged)")
    else:
        text = (f"by merging {runs} into one layer each ({n} of its {plan.num_layers_before} decoder layers fewer; "
                f"merge `{plan.merge}`)")
    if plan.compensated:
        text += f", with a fitted `{plan.compensation['method']}` compensation folded in"
    return text


def _produced_text(plan: Plan) -> str:
    source = public_source(plan.source_model, plan.source_revision)
    if not plan.windows and plan.width:
        return f"Produced by **swm-ray** from {source} by pruning attention heads and MLP channels (width).\n"
    width = ", then by pruning attention heads and MLP channels (width)" if plan.width else ""
    return f"Produced by **swm-ray** from {source} {_depth_text(plan)}{width}.\n"


def _auto_text(plan: Plan) -> list[str]:
    """What `auto` compared and chose (`plan.extra["auto"]`): the chosen candidate and every candidate's loss."""
    rec = plan.extra.get("auto") if isinstance(plan.extra, dict) else None
    if not isinstance(rec, dict) or not rec.get("chosen"):
        return [f"Method: **`auto`**: {PLAN_METHODS['auto']} (the record of its candidates is missing).\n"]
    cands = [c for c in rec.get("candidates") or [] if isinstance(c, dict)]
    chosen = next((c for c in cands if c.get("candidate") == rec["chosen"]), {})
    what = PLAN_METHODS.get(chosen.get("method") or str(rec["chosen"]).split("/")[0].split("+")[0], "")
    parts = [f"Method: **`auto`**: {PLAN_METHODS['auto']}. Chosen: **`{rec['chosen']}`**"
             + (f" ({what})" if what else "") + ".\n"]
    if cands:
        base = rec.get("original_validation_ppl")
        rows = [f"Candidates (validation perplexity on {rec.get('validation_rows', '?')} held-out rows, "
                f"{rec.get('validation_tokens', '?')} tokens; the original model: {fmt_cell(base, 2) or '?'}):\n",
                "| candidate | merge | compensation | windows | validation perplexity |", "|---|---|---|---|---|"]
        for c in cands:
            name = str(c.get("candidate"))
            name = f"**{name}** (chosen)" if name == rec["chosen"] else name
            windows = ", ".join(f"[{w[0]}, {w[1]}]" for w in c.get("windows") or []) or "-"
            result = (fmt_cell(_race_rows_ppl(c, rec.get("validation_rows")), 2) if c.get("error") is None
                      else f"not scored: {c['error']}")
            rows.append(f"| {name} | {c.get('merge') or '-'} | {c.get('compensate') or '-'} | {windows} | "
                        f"{result.replace('|', '/')} |")
        parts.append("\n".join(rows) + "\n")
    return parts


def _race_rows_ppl(cand: dict, rows) -> float | None:
    """A candidate's validation perplexity on the race's rows, the rows the original and every candidate were
    scored on (a close call's contenders carry further rows in `row_nll`; their `validation_ppl` is on all of
    them)."""
    per_row = cand.get("row_nll")
    if isinstance(rows, int) and isinstance(per_row, list) and len(per_row) > rows > 0:
        return math.exp(math.fsum(per_row[:rows]) / rows)
    return cand.get("validation_ppl")


def _method_text(plan: Plan) -> list[str]:
    if plan.method == "auto":
        return _auto_text(plan)
    what = PLAN_METHODS.get(plan.method)
    return [f"Method: **`{plan.method}`**" + (f": {what}" if what else "") + ".\n"]


def _windows_table(plan: Plan) -> str:
    rows = ["| window (original layers, inclusive) | layers | became | score |", "|---|---|---|---|"]
    for i, (low, high) in enumerate(plan.windows):
        score = fmt_cell(plan.similarities[i], 4) if i < len(plan.similarities) else ""
        if plan.merge == "keep-first":
            became = f"layer {low} kept, {high - low} dropped"
        elif plan.merge == "keep-last":
            became = f"layer {high} kept at position {low}, {high - low} dropped"
        else:
            became = f"one merged layer ({plan.merge})"
        rows.append(f"| [{low}, {high}] | {high - low + 1} | {became} | {score} |")
    return "\n".join(rows)


def _width_text(width: dict) -> str:
    """The model card's paragraph on a width plan: what every layer keeps, and the bias compensation."""
    w = width
    bias = [k for k, v in (w.get("bias") or {}).items() if v]
    groups, channels = len((w.get("kv_groups") or [[]])[0]), len((w.get("channels") or [[]])[0])
    before = lambda key: f" of {w[key]}" if key in w else ""  # noqa: E731 - a hand-written plan may omit them
    return (f"Width pruning: **`{w.get('method')}`**: every decoder layer keeps {groups}{before('kv_heads_before')} "
            f"key/value head groups (each with all its query heads) and {channels}{before('intermediate_before')} "
            f"MLP channels (the same in every layer, so the architecture's own config describes it); the indices "
            f"kept per layer are in `plan.json` (`width`, positions after the merged windows). Bias compensation: "
            f"{', '.join(bias) + ' (the mean contribution of the removed inputs, FLAP)' if bias else 'none'}.\n")


def _size_table(plan: Plan) -> str:
    params = (plan.params_before, plan.params_after)
    rows = ["| | before | after |", "|---|---|---|"]
    rows.append(f"| decoder layers | {plan.num_layers_before} | {plan.num_layers_after} |")
    if all(p is not None for p in params):
        rows.append(f"| parameters | {params[0]:,} | {params[1]:,} |")
    return "\n".join(rows)


def render_model_card(
    plan: Plan, *, metrics: dict[str, Any] | None = None, resolved_yaml: str | None = None, name: str | None = None
) -> str:
    """README.md text: source, what the plan did and which method chose it, size before/after, the windows,
    metrics, how to load, the configuration. It prints no local path (sources by their last component, the
    output folder and local paths in the configuration as a placeholder): the card is meant to be published."""
    title = name or ("Depth-compressed model" if not plan.width else "Width-pruned model")
    criterion = ", ".join(f"{k}: `{v}`" for k, v in
                          (("criterion", plan.criterion), ("search", plan.search), ("threshold", plan.threshold))
                          if v not in (None, ""))
    tags = "- layer-dropping\n" if plan.merge in DROP_ONLY_METHODS else "- layer-merging\n"
    parts = [
        f"---\nlibrary_name: transformers\ntags:\n- swm-ray\n{tags}- depth-pruning\n---\n",
        f"# {title}\n",
        _produced_text(plan),
        _size_table(plan) + "\n",
        "## Plan\n",
        *_method_text(plan),
        f"Merge method: **`{plan.merge}`**: {METHOD_DESCRIPTIONS.get(plan.merge, plan.merge)}.\n",
    ]
    if criterion:
        parts.append(f"Selection: {criterion}.\n")
    if plan.compensated:
        c = plan.compensation
        parts.append(f"Compensation: **`{c['method']}`**, a linear map fitted on calibration data (input: "
                     f"{c.get('input')}) and folded into each window's MLP output ({c.get('site')}); the fitted "
                     "matrices are in `plan.tensors` (safetensors format) beside `plan.json`.\n")
    if plan.width:
        parts.append(_width_text(plan.width))
    parts.append("Windows are 0-based indices of the original decoder layers, top window first.\n")
    parts.append(_windows_table(plan) + "\n")
    parts.append(f"Original layers removed: {plan.removed_layers or 'none'}.\n")
    table = render_metrics_table(metrics or {})
    if table:
        parts += ["## Metrics\n", table + "\n"]
    parts += [
        "## How to load\n",
        "Plain transformers, no swm-ray needed:\n",
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        'path = "PATH/TO/THIS/FOLDER"  # or the hub id it was uploaded to\n'
        "tokenizer = AutoTokenizer.from_pretrained(path)\n"
        'model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")\n'
        'inputs = tokenizer("The capital of France is", return_tensors="pt")\n'
        "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=20)[0]))\n```\n",
        "The exact run configuration is in `config.resolved.yaml` (and the plan in `plan.json`).\n",
    ]
    if resolved_yaml:
        parts += ["## Configuration\n", "Local paths are shown as `<local path>`; `config.resolved.yaml` has them.\n",
                  "```yaml\n" + public_config(resolved_yaml).rstrip("\n") + "\n```\n"]
    return scrub_local_paths("\n".join(parts))
