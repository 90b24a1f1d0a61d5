"""`swm-ray eval`: zero-shot accuracy (lm-eval), perplexity and latency of a model, beside its baseline."""

from __future__ import annotations

import json
import os

import typer

from swm_ray.commands.common import (
    EXPLICIT_NONE,
    AllowPickleOpt,
    ConfigOpt,
    GpusPerActorOpt,
    MaxMemoryOpt,
    SetOpt,
    StreamOpt,
    TrustRemoteCodeOpt,
    echo,
    make_config,
    refuse_empty_tasks,
    scale_flags,
    user_errors,
)
from swm_ray.errors import UserError
from swm_ray.io.remote import is_remote

DEFAULT_OUT = "eval.json"


def _flags(model, baseline, tasks, limit, batch_size, ppl_data, ppl_bos, latency, latency_runs, latency_warmup,
           new_tokens, offline, actors, device, dtype, out, allow_pickle, trust_remote_code) -> dict:
    """Flag values as dotted config paths (None = not given: the config's value stands)."""
    from swm_ray.evaluation.suite import parse_tasks

    refuse_empty_tasks(tasks)
    return {
        "model.source": model, "eval.baseline": baseline,
        "eval.tasks": parse_tasks(tasks) if tasks is not None else None,
        "eval.limit": limit, "eval.batch_size": batch_size,
        "eval.ppl_data": EXPLICIT_NONE if ppl_data is not None and ppl_data.strip().lower() == "none" else ppl_data,
        "eval.ppl_bos": ppl_bos, "eval.latency": latency, "eval.latency_runs": latency_runs,
        "eval.latency_warmup": latency_warmup, "eval.latency_new_tokens": new_tokens, "eval.offline": offline,
        "ray.actors": actors, "model.device": device, "model.dtype": dtype, "out": out,
        "model.allow_pickle": allow_pickle, "model.trust_remote_code": trust_remote_code,
    }


def report_path(out: str | None, model: str | None = None) -> str:
    """Where eval.json goes: `out` when it names a .json file, OUT/eval.json for a folder; unset, MODEL/eval.json
    when the model is a local folder (a compressed model keeps its report), else ./eval.json."""
    if not out:
        if model and not is_remote(model) and os.path.isdir(model):
            return model.rstrip("/") + "/" + DEFAULT_OUT
        return DEFAULT_OUT
    if out.endswith(".json"):
        return out
    return out.rstrip("/") + "/" + DEFAULT_OUT


def check_default_report(path: str, model: str) -> None:
    """Without --out, ./eval.json is not overwritten when it holds another model's report (checked before any
    evaluation runs, so nothing is lost and no time is spent)."""
    if not os.path.isfile(path):
        return
    try:
        with open(path) as f:
            held = json.load(f).get("model")
    except (OSError, ValueError, AttributeError):
        held = None
    if held is not None and held != model:
        raise UserError(f"{path} holds the report of {held}; give --out PATH for the report of {model}, or move "
                        f"{path} away")


def check_report_path(path: str) -> None:
    """Before any evaluation runs: a local report path can be written (a folder there, a file where a folder is
    needed or no write access would otherwise lose the whole run). An S3 path is checked by its write, after
    the table is printed."""
    from swm_ray.io.probes import check_storage

    if is_remote(path):
        return
    if os.path.isdir(path):
        raise UserError(f"--out {path} is a folder named like a .json file; give a file path such as "
                        f"{path.rstrip('/')}/{DEFAULT_OUT}")
    check_storage(path, write=True)


@user_errors
def eval_command(
    model: str = typer.Argument(None, help="model to evaluate: builtin:smollm2-135m (default), a local HF folder, "
                                "a hub id or s3://"),
    baseline: str = typer.Option(None, "--baseline", "-b", help="evaluate this model too and compare (e.g. the "
                                 "uncompressed source)"),
    tasks: str = typer.Option(None, "--tasks", help="comma list of boolq,piqa,hellaswag,winogrande,arc_easy,"
                              "arc_challenge,openbookqa (default: all seven), or none"),
    limit: int = typer.Option(None, "--limit", help="items per task (quick runs; default all, but PIQA, HellaSwag and "
                               "WinoGrande never past item 1000: the rest is auto's held-out slice)"),
    batch_size: int = typer.Option(None, "--batch-size", help="lm-eval batch size (default 16)"),
    ppl_data: str = typer.Option(None, "--ppl-data", help="perplexity text: builtin:boolq-passages (default), "
                                 "wikitext2 or ptb (hub), a .parquet/.jsonl/.txt file, or none"),
    ppl_bos: str = typer.Option(None, "--ppl-bos", help="BOS for perplexity: stream (once, the default), chunk "
                                "(every chunk) or none"),
    latency: bool = typer.Option(None, "--latency", help="also time 128-token greedy generation at batch 1"),
    latency_runs: int = typer.Option(None, "--latency-runs", help="timed runs (default 20)"),
    latency_warmup: int = typer.Option(None, "--latency-warmup", help="discarded warm-up runs (default 10)"),
    new_tokens: int = typer.Option(None, "--new-tokens", help="generated tokens per latency run (default 128)"),
    offline: bool = typer.Option(None, "--offline/--online", help="zero-shot task definitions: the packaged offline "
                                 "ones (default; validation splits) or, with --online, lm-eval's standard tasks from "
                                 "the hub (ARC and OpenBookQA report their test split)"),
    actors: int = typer.Option(None, "--actors", help="Ray actors evaluating in parallel (default: one per GPU, "
                               "else 1 = no Ray)"),
    device: str = typer.Option(None, "--device", help="auto (default), cpu, cuda, cuda:N"),
    dtype: str = typer.Option(None, "--dtype", help="auto (default), float32, bfloat16, float16"),
    out: str = typer.Option(None, "--out", "-o", help="where to write eval.json (a .json path or a folder, local "
                            "or s3://; default MODEL/eval.json for a local model folder, else ./eval.json); "
                            "lm-eval's raw results go beside it as *.raw.json"),
    allow_pickle: bool = AllowPickleOpt,
    trust_remote_code: bool = TrustRemoteCodeOpt,
    stream_layers: bool = StreamOpt,
    max_memory: str = MaxMemoryOpt,
    gpus_per_actor: int = GpusPerActorOpt,
    config: str = ConfigOpt,
    set_: list[str] = SetOpt,
) -> None:
    """Evaluate a model (and a baseline) on the paper's zero-shot tasks, perplexity and latency."""
    flags = _flags(model, baseline, tasks, limit, batch_size, ppl_data, ppl_bos, latency, latency_runs,
                   latency_warmup, new_tokens, offline, actors, device, dtype, out, allow_pickle, trust_remote_code)
    cfg, _ = make_config(config, {**flags, **scale_flags(stream_layers, max_memory, gpus_per_actor)}, set_)
    from swm_ray.evaluation.report import format_table, report_for, write_report
    from swm_ray.evaluation.suite import check_tokenizer_files
    from swm_ray.io.faults import storage_errors
    from swm_ray.jobs.eval import run_eval

    out = report_path(cfg.out, cfg.model.source)
    if out == DEFAULT_OUT:  # a model folder's own eval.json is its report, rewritten by a later eval
        check_default_report(out, cfg.model.source)
    check_report_path(out)
    sources = [cfg.model.source] + ([cfg.eval.baseline] if cfg.eval.baseline else [])
    for source in sources:
        check_tokenizer_files(source)
    results = run_eval(cfg, sources)
    main = results[cfg.model.source]
    base = results.get(cfg.eval.baseline) if cfg.eval.baseline else None
    # the table first: a write that fails after all this work still leaves the numbers on the screen
    report = report_for(out, main, base)
    echo(format_table(report))
    with storage_errors(out, "writing the report to"):
        write_report(out, main, base, report)
    echo(f"wrote {out} and {report['raw_file']}")
