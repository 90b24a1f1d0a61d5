"""The mergekit recipe of a plan: its kept layers as `passthrough` slices, written beside the model (the
recipe reproduces drop-only plans; merged windows are noted)."""

from __future__ import annotations

import json
from pathlib import Path

from swm_ray.edits.merge import DROP_ONLY_METHODS
from swm_ray.plan.plan import Plan
from swm_ray.plan.sources import SOURCE_PLACEHOLDER, builtin_origin, source_kind


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
        hub, package, filename = builtin_origin(source)
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
