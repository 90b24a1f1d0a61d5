"""`swm-ray grid`: compress with every combination of criterion × search × merge method (and the baseline
pruners), to several targets, on one or more models, as Ray Tune trials; one results table and plots."""

from __future__ import annotations

import typer

from swm_ray.commands.common import (
    AllowPickleOpt,
    ConfigOpt,
    DataOpt,
    GpusPerActorOpt,
    MaxMemoryOpt,
    OverwriteOpt,
    SetOpt,
    StreamOpt,
    TrustRemoteCodeOpt,
    echo,
    make_config,
    one_target,
    refuse_empty_tasks,
    scale_flags,
    user_errors,
)
from swm_ray.errors import UserError

HELP = "\n\n".join([
    "Run a grid of compressions as Ray Tune trials and compare them (perplexity, zero-shot) in one table.",
    "A trial is one model with one method: a combination criterion / search / merge, a baseline pruner "
    "(shortgpt: drop the layers of lowest Block Influence; sleb: remove one block at a time, the one whose "
    "removal keeps the calibration loss lowest; flap, taylor: prune attention heads and MLP channels, with "
    "--ratios), or the original model. Each trial takes its model to every target in turn and evaluates each "
    "result. Lists are comma-separated, e.g. --criteria output,kl,cka --searches best-first,top-down --layers 2,4,6.",
    "--then-width 0.1,0.15 adds to every depth result one row per fraction: its merged model with width pruned "
    "(select.width_method, flap by default) until that further fraction of the original's parameters is gone. "
    "With --set eval.latency=true every row also gets tokens/s, latency and time to first token.",
    "Writes OUT/results.parquet, results.csv, results.md, plots/ppl_<model>.png (and zero-shot plots when "
    "tasks are evaluated) and the configs. Tune's experiment folder stays in the swm-ray cache, where every row "
    "is also appended as it arrives, so an interrupted grid keeps what it measured and --resume finishes it "
    "(--set grid.tune_storage=s3://... keeps the experiment there instead, for trials on several nodes, without "
    "--resume).",
])


def _split(value: str | None, cast=str, what: str = "") -> list | None:
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    if [i.lower() for i in items] in ([], ["none"]):
        return []
    try:
        return [cast(i) for i in items]
    except ValueError:
        raise UserError(f"--{what} {value!r}: expected a comma-separated list of numbers, e.g. 2,4,6") from None


@user_errors
def grid_command(
    models: list[str] = typer.Argument(None, help="models (default builtin:smollm2-135m): builtin:NAME, local "
                                       "HF folders, hub ids or s3://"),
    data: str = DataOpt,
    criteria: str = typer.Option(None, "--criteria", help="comma list of output, kl, nll, cka (default "
                                "output), or none"),
    searches: str = typer.Option(None, "--searches", help="comma list of best-first, top-down (default best-first)"),
    merges: str = typer.Option(None, "--merges", help="comma list of reference, consistent, paper, mean, keep-first, "
                                "keep-last"),
    layers: str = typer.Option(None, "--layers", help="layer counts to remove, e.g. 2,4,6"),
    ratios: str = typer.Option(None, "--ratios", help="fractions of all parameters to remove, e.g. 0.1,0.2"),
    thresholds: str = typer.Option(None, "--thresholds", help="thresholds, e.g. 0.7,0.8 (valid for every criterion)"),
    baselines: str = typer.Option(None, "--baselines", help="baseline pruners: shortgpt (default), sleb, laco, "
                                 "shortened-ppl, replaceme, auto (the plan of lowest held-out loss among "
                                 "select.auto_candidates), and the width pruners flap and taylor (heads and MLP "
                                 "channels, to each of --ratios only), a comma list, or none"),
    then_width: str = typer.Option(None, "--then-width", help="width after depth: fractions of the original's "
                                   "parameters, e.g. 0.1,0.15; every depth row also gets one row per fraction, its "
                                   "merged model's width pruned by select.width_method (flap by default) by that "
                                   "much more (uncompensated plans only)"),
    compensate: str = typer.Option(None, "--compensate", help="compensations each plan is evaluated with, a comma "
                                   "list of none, lstsq, scale (default: each method's own)"),
    heal: str = typer.Option(None, "--heal", help="healing each compressed model is also evaluated with, a comma "
                             "list of none, local, lora (one row each, trained in the trial with the heal "
                             "section's settings; default: none)"),
    tasks: str = typer.Option(None, "--tasks", help="zero-shot tasks per result (default: the paper's 7; none: "
                              "perplexity only)"),
    limit: int = typer.Option(None, "--limit", help="items per zero-shot task (quick runs)"),
    concurrency: int = typer.Option(None, "--concurrency", help="trials at once (default: as resources allow)"),
    cpus_per_trial: float = typer.Option(None, "--cpus-per-trial", help="CPUs (and torch threads) per trial"),
    gpus_per_trial: float = typer.Option(None, "--gpus-per-trial", help="GPUs per trial (default 1 if any)"),
    resume: str = typer.Option(None, "--resume", help="finish an interrupted grid: its 'Tune experiment:' folder "
                               "(its own settings are used; only --out and --overwrite apply)"),
    out: str = typer.Option(None, "--out", "-o", help="output folder, local or s3:// (default ./swm-ray-grid)"),
    overwrite: bool = OverwriteOpt,
    allow_pickle: bool = AllowPickleOpt,
    trust_remote_code: bool = TrustRemoteCodeOpt,
    stream_layers: bool = StreamOpt,
    max_memory: str = MaxMemoryOpt,
    gpus_per_actor: int = GpusPerActorOpt,
    config: str = ConfigOpt,
    set_: list[str] = SetOpt,
) -> None:
    refuse_empty_tasks(tasks)
    flags = {
        "grid.models": models or None, "data.source": data, "grid.criteria": _split(criteria),
        "grid.searches": _split(searches), "grid.merges": _split(merges),
        "grid.layers": _split(layers, int, "layers"), "grid.ratios": _split(ratios, float, "ratios"),
        "grid.thresholds": _split(thresholds, float, "thresholds"), "grid.baselines": _split(baselines),
        "grid.then_width": _split(then_width, float, "then-width"),
        "grid.compensate": None if compensate is None else [v.strip() for v in compensate.split(",") if v.strip()],
        "grid.heal": None if heal is None else [v.strip() for v in heal.split(",") if v.strip()],
        "eval.tasks": _split(tasks), "eval.limit": limit, "grid.concurrency": concurrency,
        "grid.cpus_per_trial": cpus_per_trial, "grid.gpus_per_trial": gpus_per_trial, "out": out,
        "overwrite": overwrite, "model.allow_pickle": allow_pickle, "model.trust_remote_code": trust_remote_code,
        **scale_flags(stream_layers, max_memory, gpus_per_actor),
    }
    flags = one_target(flags, ("grid.layers", "grid.ratios", "grid.thresholds"), cleared=[])
    cfg, raw = make_config(config, flags, set_)
    from swm_ray.jobs.grid import run_grid
    from swm_ray.recipes.results import markdown_table

    res = run_grid(cfg, raw, resume=resume)
    echo("")
    echo(markdown_table(res["rows_table"]))
    echo(f"{res['trials']} trials, {res['rows']} rows, {res['errors']} failed trial(s), {res['seconds']:.0f} s")
    plans = [f for f in res["files"] if f.startswith("plans/")]
    shown = [f for f in res["files"] if not f.startswith("plans/")] + ([f"plans/ ({len(plans)} plans: swm-ray apply "
                                                                        f"one to re-run its row)"] if plans else [])
    echo(f"wrote {res['out']}: " + ", ".join(shown))
    if res["errors"]:
        raise typer.Exit(1)


grid_command.__doc__ = HELP
