"""Writing a compressed model as a Hugging Face folder that loads with plain `from_pretrained`.

The folder holds sharded safetensors (+ `model.safetensors.index.json` when sharded), `config.json`,
`generation_config.json`, the tokenizer files, a `README.md` model card, the run's `config.yaml` (as given)
and `config.resolved.yaml`, `plan.json`, `metrics.json` when metrics are given, and, for plans that only
delete layers, a mergekit passthrough recipe `mergekit_config.yml`. It is written atomically: a failure
(including the reload check) leaves nothing at the output path.

The card is meant to be published: it prints no local path (a local source by its folder name, the output
folder and local paths of the configuration as `<local path>`); the recipe names a source mergekit can open.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from swm_ray.edits.architectures import per_layer_config_keys
from swm_ray.edits.merge import DROP_ONLY_METHODS, METHOD_DESCRIPTIONS
from swm_ray.errors import UserError
from swm_ray.io import fs as storage
from swm_ray.io.artifacts import fmt_cell
from swm_ray.io.models import BUILTIN_HUB_IDS, BUILTIN_MODELS, decoder_layers, text_config, text_config_of
from swm_ray.plan.plan import Plan

PROBE_TEXT = "The quick brown fox jumps over the lazy dog."


def check_consistent(model) -> None:
    """Raise RuntimeError unless layers, `num_hidden_layers` and every per-layer config list agree."""
    cfg = text_config(model)
    n = len(decoder_layers(model))
    if cfg.num_hidden_layers != n:
        raise RuntimeError(f"config.num_hidden_layers={cfg.num_hidden_layers} but the model has {n} layers")
    for key in per_layer_config_keys(cfg):
        if len(getattr(cfg, key)) != n:
            raise RuntimeError(f"config.{key} has {len(getattr(cfg, key))} entries for {n} layers")
    for pos, layer in enumerate(decoder_layers(model)):
        idx = getattr(getattr(layer, "self_attn", None), "layer_idx", pos)
        if idx != pos:
            raise RuntimeError(f"layer at position {pos} has self_attn.layer_idx={idx}")


def _ranges(indices: list[int]) -> list[tuple[int, int]]:
    """Consecutive runs of sorted indices as half-open [start, end) ranges."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][1]:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return [(a, b) for a, b in runs]


def mergekit_kept_layers(plan: Plan) -> list[int]:
    """Original indices mergekit must copy: the kept layers, with each window's top for keep-last."""
    if plan.merge not in DROP_ONLY_METHODS or plan.compensated or plan.width:
        raise ValueError(f"merge {plan.merge!r} changes weights: no mergekit passthrough recipe exists")
    removed = set(plan.removed_layers)
    if plan.merge == "keep-last":
        for low, high in plan.windows:
            removed.add(low)
            removed.discard(high)
    return [i for i in range(plan.num_layers_before) if i not in removed]


# -- what the card and the recipe may print: sources without local paths --------------------------------------
SOURCE_PLACEHOLDER = "PATH/TO/SOURCE_MODEL"
LOCAL_PLACEHOLDER = "<local path>"
# an absolute local path in free text (/a/b, ~/a); not part of a URL (s3://b/k), a hub id (org/name) or a ratio (1/2)
_LOCAL_PATH_RE = re.compile(r"(?<![\w:/.~-])(?:~|/[\w.-]+)(?:/[^\s`'\"|<>()\[\],;]*)+")


def source_kind(source: str) -> str:
    """How a model or data source is reached: `builtin`, `remote` (s3://, a URL), `local` (a path here), `hub`
    (an id like org/name) or `unknown` (empty); the rules of `models.resolve_model_path`, without the network."""
    if not source:
        return "unknown"
    if source.startswith("builtin:"):
        return "builtin"
    if storage.is_remote(source) or "://" in source:
        return "remote"
    if source.startswith((".", "/", "~")) or source.count("/") > 1 or Path(source).expanduser().exists():
        return "local"
    return "hub"


def _builtin_origin(source: str) -> tuple[str | None, str, str]:
    """(hub id of the original, package, file) of a `builtin:` source."""
    name = source.split(":", 1)[1]
    spec = BUILTIN_MODELS.get(name)
    return BUILTIN_HUB_IDS.get(name), spec.packages if spec else "a package", spec.gguf if spec else "a GGUF file"


def public_source(source: str, revision: str | None = None) -> str:
    """A model or data source as the model card prints it: a local path only by its last component."""
    kind = source_kind(source)
    if kind == "local":
        return f"a local folder or file (`{Path(source.rstrip('/')).name}`)"
    if kind == "unknown":
        return "an unrecorded source"
    text = f"`{source}`" + (f" at revision `{revision}`" if revision else "")
    if kind == "builtin":
        hub, package, filename = _builtin_origin(source)
        if hub:
            text += f" (`{hub}`, from the GGUF file {filename} packaged in {package}, dequantized)"
    return text


def scrub_local_paths(text: str) -> str:
    """`text` with every absolute local path (/a/b, ~/a) replaced by a placeholder."""
    return _LOCAL_PATH_RE.sub(LOCAL_PLACEHOLDER, text)


def public_config(resolved_yaml: str) -> str:
    """The resolved YAML as the card shows it: the output folder and every local path (absolute, or relative and
    present here) replaced by a placeholder; `config.resolved.yaml` beside the card keeps them."""
    lines = []
    for line in resolved_yaml.splitlines():
        m = re.match(r"^(?P<head>\s*(?:-\s+)?(?:(?P<key>[\w.-]+):\s+)?)(?P<value>[^\s#].*?)\s*$", line)
        value = None
        if m:
            try:
                value = yaml.safe_load(m["value"])
            except yaml.YAMLError:
                pass
        if isinstance(value, str) and value:
            output = m["key"] == "out" and not line[:1].isspace() and not storage.is_remote(value)
            if output or (source_kind(value) == "local" and ("/" in value or Path(value).expanduser().exists())):
                line = m["head"] + LOCAL_PLACEHOLDER
        lines.append(line)
    return scrub_local_paths("\n".join(lines))


# -- mergekit ------------------------------------------------------------------------------------------------
def _recipe_source(plan: Plan) -> tuple[str, list[str]]:
    """(what the recipe's `model:` names, YAML comments saying what that is): a source mergekit can open."""
    source, kind = plan.source_model, source_kind(plan.source_model)
    if kind == "hub":
        rev = f"@{plan.source_revision}" if plan.source_revision else ""
        return source + rev, [f"# model: the Hugging Face hub id swm-ray read{' (@ its revision)' if rev else ''}."]
    if kind == "local":
        model = str(Path(source).expanduser().resolve())
        notes = ["# model: the local folder swm-ray read, on the machine that ran it; where you run mergekit, put",
                 "# this model's hub id or its local path there instead."]
        if "+" in model or "@" in model:
            notes.append("# mergekit reads '+' as a LoRA and '@' as a revision: give it a path without them.")
        return model, notes
    if kind == "builtin":
        hub, package, filename = _builtin_origin(source)
        notes = [f"# swm-ray's source was {source}, which mergekit cannot open: the GGUF file {filename}",
                 f"# packaged in {package}, dequantized and converted once into a folder of swm-ray's cache",
                 f"# (models/{source.split(':', 1)[1]} under the cache root; "
                 "see swm_ray.io.models.resolve_model_path)."]
        if hub:
            return hub, notes + ["# model: the hub id of the original model. Its weights differ slightly from",
                                 "# the quantized copy: for the exact weights swm-ray used, put that folder's path."]
        return SOURCE_PLACEHOLDER, notes + ["# model: put the local path of that converted folder here."]
    if kind == "remote":
        return SOURCE_PLACEHOLDER, [f"# swm-ray's source was {source}, which mergekit cannot open:",
                                    "# model: copy that folder to local disk and put its path here."]
    return SOURCE_PLACEHOLDER, ["# model: the plan does not name its source; put its hub id or local path here."]


def render_mergekit_config(plan: Plan, dtype: str = "bfloat16") -> str | None:
    """A mergekit passthrough YAML reproducing a drop-only plan (None for plans that change weights).

    `layer_range` is half-open, [start, end), as mergekit expects. A compensated plan changes weights: None.
    `model:` names a source mergekit can open (a hub id or a local folder), with a comment saying which.
    """
    if plan.merge not in DROP_ONLY_METHODS or plan.compensated or plan.width:
        return None
    model, notes = _recipe_source(plan)
    lines = [
        f"# mergekit passthrough recipe equivalent to this swm-ray plan (merge: {plan.merge}).",
        "# layer_range is half-open: [start, end). Note: mergekit does not slice per-layer config lists",
        "# (layer_types, max_window_layers); the config.json written next to this file does.",
        *notes,
        "slices:",
    ]
    for start, end in _ranges(mergekit_kept_layers(plan)):
        lines += ["  - sources:", f"      - model: {json.dumps(model)}", f"        layer_range: [{start}, {end}]"]
    lines += ["merge_method: passthrough", f"dtype: {dtype}"]
    return "\n".join(lines) + "\n"


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
    "replaceme": "ReplaceMe: the block of consecutive layers whose input and output are closest in angle at the "
    "last token",
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
            result = fmt_cell(c.get("validation_ppl"), 2) if c.get("error") is None else f"not scored: {c['error']}"
            rows.append(f"| {name} | {c.get('merge') or '-'} | {c.get('compensate') or '-'} | {windows} | "
                        f"{result.replace('|', '/')} |")
        parts.append("\n".join(rows) + "\n")
    return parts


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


def _probe_ids(tokenizer, vocab_size: int) -> torch.Tensor:
    """A few token ids, shape [1, T], from the tokenizer when there is one."""
    if tokenizer is not None:
        ids = tokenizer(PROBE_TEXT, return_tensors="pt").input_ids[:, :16]
        if ids.numel() > 0:
            return ids
    return (torch.arange(1, 9) % max(vocab_size, 1)).unsqueeze(0)


def verify_tokenizer(path: str | Path, tokenizer) -> None:
    """Raise RuntimeError unless `AutoTokenizer` reloads the saved tokenizer and it encodes like `tokenizer`.

    transformers 5 may pick a model-type-specific tokenizer class on reload (e.g. `Qwen2Tokenizer` for a
    qwen2 folder, rebuilt from vocab and merges): this catches a folder whose tokenizer would silently change.
    """
    try:
        reloaded = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # any failure to reload means a broken output folder
        raise RuntimeError(f"the tokenizer saved to {path} does not reload: {str(e).splitlines()[0][:200]}") from e
    want = tokenizer(PROBE_TEXT).input_ids
    got = reloaded(PROBE_TEXT).input_ids
    if got != want:
        raise RuntimeError(
            f"the tokenizer saved to {path} reloads as {type(reloaded).__name__} and encodes differently "
            f"({got[:8]} vs {want[:8]})"
        )


def check_config_lists(config) -> None:
    """RuntimeError unless every per-layer list of a (text) config has `num_hidden_layers` entries."""
    cfg = text_config_of(config)
    for key in per_layer_config_keys(cfg):
        if len(getattr(cfg, key)) != cfg.num_hidden_layers:
            raise RuntimeError(f"config.{key} has {len(getattr(cfg, key))} entries for {cfg.num_hidden_layers} layers")


def check_tensors(ckpt, config) -> None:
    """RuntimeError unless the tensors (names, shapes) are exactly what the config's architecture needs.

    Checked from the headers against a skeleton on the meta device: no weights are loaded."""
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    want = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    head = skeleton.get_output_embeddings()
    tied = head is not None and head.weight is skeleton.get_input_embeddings().weight
    have = {k: info.shape for k, info in ckpt.infos.items()}
    missing = [k for k in want if k not in have and not (tied and k.endswith("lm_head.weight"))]
    extra = [k for k in have if k not in want]
    wrong = [k for k in want if k in have and have[k] != want[k]]
    if missing or extra or wrong:
        raise RuntimeError(f"the saved tensors do not match the config: missing {missing[:3]}, unexpected "
                           f"{extra[:3]}, wrong shape {wrong[:3]}")


@torch.no_grad()
def streamed_logits(ckpt, config, ids: torch.Tensor) -> torch.Tensor:
    """Logits of `ids` computed one decoder layer at a time from `ckpt` (a Checkpoint or PlanView)."""
    from swm_ray.compute.stack import StreamingStack

    dtype = next(iter(ckpt.infos.values())).torch_dtype
    stack = StreamingStack(ckpt, config, torch.device("cpu"), dtype if dtype.is_floating_point else torch.float32)
    pro = stack.prologue(ids)
    h = pro.hidden
    for i in range(stack.num_layers):
        with stack.layer(i) as layer:
            h = stack.run(layer, h, pro.kwargs[i])
    return stack.logits(stack.final(h))


def verify_folder(path: str | Path, tokenizer=None) -> torch.Tensor:
    """Check a written folder without loading a second copy of the model: the tokenizer reloads and encodes
    like `tokenizer`, the config's per-layer lists fit its depth, the tensors' headers match the config's
    architecture, and a few tokens run through it one layer at a time to finite logits (returned, [1, T, V])."""
    from swm_ray.io.checkpoint import Checkpoint
    from swm_ray.io.models import load_config

    if tokenizer is not None:
        verify_tokenizer(path, tokenizer)
    config = load_config(str(path))
    check_config_lists(config)
    ckpt = Checkpoint(path)
    check_tensors(ckpt, config)
    logits = streamed_logits(ckpt, config, _probe_ids(tokenizer, text_config_of(config).vocab_size))
    if not torch.isfinite(logits).all():
        raise RuntimeError(f"the saved model at {path} produces non-finite logits after reloading")
    return logits


def _write_text_files(
    folder: Path, plan: Plan, raw_yaml: str, resolved_yaml: str, metrics: dict | None, card: str, dtype: str
) -> None:
    (folder / "README.md").write_text(card)
    (folder / "config.yaml").write_text(raw_yaml)
    (folder / "config.resolved.yaml").write_text(resolved_yaml)
    plan.save(folder / "plan.json")
    if metrics is not None:
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    recipe = render_mergekit_config(plan, dtype)
    if recipe is not None:
        (folder / "mergekit_config.yml").write_text(recipe)


def _save_weights(model, tokenizer, folder: Path, max_shard_size: str | int) -> None:
    model.save_pretrained(str(folder), max_shard_size=max_shard_size)
    if not (folder / "generation_config.json").exists():
        GenerationConfig.from_model_config(model.config).save_pretrained(str(folder))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))


def save_model_folder(
    model,
    tokenizer,
    out: str,
    *,
    plan: Plan,
    raw_yaml: str,
    resolved_yaml: str,
    metrics: dict | None = None,
    overwrite: bool = False,
    max_shard_size: str | int = "2GB",
    verify: bool = True,
) -> str:
    """Write an IN-MEMORY model as a folder at `out` (local or s3://) atomically; returns `out`.

    For models edited in memory (tests, healing); `write_model_folder` writes a plan applied to a checkpoint
    without ever holding the model. Before the folder is published it is checked by `verify_folder`. Raises
    UserError if `out` exists and is not ours (or is ours and `overwrite` is off); nothing is written then.
    """
    check_consistent(model)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    card = render_model_card(plan, metrics=metrics, resolved_yaml=resolved_yaml, name=Path(str(out)).name)
    with storage.atomic_output_dir(out, overwrite=overwrite) as staging:
        _save_weights(model, tokenizer, staging, max_shard_size)
        _write_text_files(staging, plan, raw_yaml, resolved_yaml, metrics, card, dtype)
        if verify:
            verify_folder(staging, tokenizer)
    return out if storage.is_remote(out) else str(Path(out).resolve())


# -- the streaming writer: a plan applied to a checkpoint, tensor by tensor --------------------------------
class ChecksumMismatch(UserError):
    """The source's weights differ from those a plan was made from."""


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "chat_template.jinja",
                   "chat_template.json", "generation_config.json")


def shard_bytes(size: str | int) -> int:
    from swm_ray.compute.memory import parse_size

    return parse_size(size) if isinstance(size, str) else int(size)


def output_order(view) -> list[str]:
    """Embeddings first, then the decoder layers by position, then the rest (final norm, LM head)."""
    others = view.other_keys()
    first = [k for k in others if "embed" in k]
    layers = [k for i in range(view.num_layers) for k in view.layer_keys(i).values()]
    return first + layers + [k for k in others if k not in first]


def write_shards(view, sink, max_shard_size: str | int, hasher=None) -> list[str]:
    """Stream every tensor of `view` into safetensors shards through `sink`; returns the file names."""
    from swm_ray.io.checkpoint import INDEX_FILE, PlannedTensor, SafetensorsWriter, plan_shards, shard_names

    planned = [PlannedTensor(n, view.infos[n].dtype, view.infos[n].shape) for n in output_order(view)]
    shards = plan_shards(planned, shard_bytes(max_shard_size))
    names = shard_names(len(shards))
    source = getattr(view, "source", view)  # the checkpoint whose bytes a copied tensor comes from
    for name, tensors in zip(names, shards):
        with sink.open(name) as fh:
            w = SafetensorsWriter(fh, tensors)
            for t in tensors:
                key = view.source_of(t.name) if hasattr(view, "source_of") else t.name
                if key is not None and not source.pickled and w.copy_range(t.name, source.infos[key]):
                    if hasher is not None:
                        hasher.add_range(key)  # hashed on a thread while the kernel copies the next ones
                    continue
                w.write(t.name, view.read(t.name, hasher=hasher))
            w.close()
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in planned)},
                 "weight_map": {t.name: n for n, ts in zip(names, shards) for t in ts}}
        sink.write_text(INDEX_FILE, json.dumps(index, indent=2) + "\n")
    return names + ([INDEX_FILE] if len(shards) > 1 else [])


def _small_files(source: Path, view, scratch: Path) -> None:
    """config.json of the edited model, and the source's tokenizer and generation files, into `scratch`."""
    import shutil

    view.config.save_pretrained(str(scratch))
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, scratch / name)
    if not (scratch / "generation_config.json").exists():
        GenerationConfig.from_model_config(view.config).save_pretrained(str(scratch))


def write_model_folder(
    source_path: str,
    plan: Plan,
    out: str,
    *,
    raw_yaml: str,
    resolved_yaml: str,
    metrics: dict | None = None,
    overwrite: bool = False,
    max_shard_size: str | int = "2GB",
    verify: bool = True,
    attention: str = "global",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    expect_checksum: str | None = None,
) -> dict:
    """Apply `plan` to the checkpoint at `source_path` and write the model folder at `out`, never holding the
    model: kept layers are copied tensor by tensor under their new names, merged windows computed from their
    own layers, shards streamed into the output as they fill (to S3 as multipart uploads). Peak memory is one
    window's tensor plus small buffers. `plan` gets the source weights' checksum (`source_checksum`) and
    `params_after`; with `expect_checksum` a different checksum aborts before anything is published. Checked
    before publishing: locally by `verify_folder` on the written files; on S3 from the same computation
    (headers against the architecture, a streamed forward). Returns
    {"out", "files", "checksum", "params_after"}.
    """
    import tempfile

    from swm_ray.edits.architectures import check_supported_config
    from swm_ray.io.checkpoint import Checkpoint, WeightHasher
    from swm_ray.io.models import load_config, load_tokenizer
    from swm_ray.plan.executor import PlanView

    source = Path(source_path)
    config = load_config(source_path, trust_remote_code)
    check_supported_config(config)
    ckpt = Checkpoint(source_path, allow_pickle)
    view = PlanView(ckpt, config, plan.windows, plan.merge, attention, plan_fits(plan), width=plan.width,
                    width_tensors=plan.tensors)
    check_config_lists(view.config)
    tcfg = text_config_of(view.config)
    plan.params_after = view.param_count(bool(getattr(tcfg, "tie_word_embeddings", False)))
    hasher = WeightHasher(ckpt)
    dtype = next(iter(view.infos.values())).torch_dtype
    with tempfile.TemporaryDirectory(prefix="swm-ray-files-") as tmp, \
            storage.open_output(out, overwrite=overwrite) as sink:
        scratch = Path(tmp)
        _small_files(source, view, scratch)
        files = write_shards(view, sink, max_shard_size, hasher)
        checksum = hasher.hexdigest()
        if expect_checksum is not None and checksum != expect_checksum:
            raise ChecksumMismatch(f"the weights at {source_path} are not those the plan was made from (checksum "
                                   f"{checksum[:19]}… vs the plan's {expect_checksum[:19]}…): apply it to its "
                                   f"own source and revision, or pass --force")
        plan.source_checksum = checksum
        card = render_model_card(plan, metrics=metrics, resolved_yaml=resolved_yaml, name=Path(str(out)).name)
        _write_text_files(scratch, plan, raw_yaml, resolved_yaml, metrics, card, str(dtype).removeprefix("torch."))
        sink.put_dir(scratch)
        if verify:
            tok = load_tokenizer(source_path, trust_remote_code)
            local = getattr(sink, "local_dir", None)
            if local is not None:
                verify_folder(local, tok)
            else:  # on S3: the small files as uploaded, the tensors as computed
                verify_tokenizer(scratch, tok)
                check_tensors(view, view.config)
                logits = streamed_logits(view, view.config, _probe_ids(tok, tcfg.vocab_size))
                if not torch.isfinite(logits).all():
                    raise RuntimeError(f"the model written to {out} produces non-finite logits")
    final = out if storage.is_remote(out) else str(Path(out).resolve())
    return {"out": final, "files": files, "checksum": plan.source_checksum, "params_after": plan.params_after}


def plan_fits(plan: Plan) -> dict:
    """The compensation fits a plan carries ({} for none)."""
    from swm_ray.methods.compensation import fits_from_record

    return fits_from_record(plan.compensation, plan.tensors) if plan.compensated else {}


def update_metrics(out: str, plan: Plan, metrics: dict, resolved_yaml: str | None = None) -> None:
    """Put `metrics` into a written folder: `metrics.json`, and the model card rendered again with them.
    Each file is replaced whole (a temporary name renamed locally; one PUT on S3)."""
    card = render_model_card(plan, metrics=metrics, resolved_yaml=resolved_yaml, name=Path(str(out)).name)
    files = {"metrics.json": json.dumps(metrics, indent=2, default=str) + "\n", "README.md": card}
    for name, text in files.items():
        storage.replace_file(f"{out.rstrip('/')}/{name}", text.encode())
