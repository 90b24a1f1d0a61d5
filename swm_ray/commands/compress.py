"""`swm-ray compress`: select windows of similar layers, merge each into one layer, write a model folder."""

from __future__ import annotations

import typer

from swm_ray.commands.common import (
    AllowPickleOpt,
    ConfigOpt,
    DataOpt,
    GpusPerActorOpt,
    MaxMemoryOpt,
    ModelArg,
    OverwriteOpt,
    ResumeOpt,
    SamplesOpt,
    SeqLenOpt,
    SetOpt,
    StreamOpt,
    TrustRemoteCodeOpt,
    echo,
    make_config,
    one_target,
    scale_flags,
    user_errors,
)
from swm_ray.config import parse_set
from swm_ray.errors import UserError

HELP = "\n\n".join([
    "Merge runs of consecutive similar decoder layers into one layer each and write an HF model folder.",
    "The default method, auto, does not trust settings tuned on one model family: it runs sliding-window "
    "merging (best-first under the output criterion, with the reference, consistent and keep-first merges) and "
    "the ShortGPT, SLEB and ReplaceMe pruners to the target (each plan also with the least-squares map of "
    "select.auto_compensate), and keeps the plan of lowest loss on calibration rows that none of them saw, a "
    "fitted plan only if it also holds on other text (plan.json lists them all). "
    "--method swm runs sliding-window merging alone (criterion output, search best-first, merge reference); "
    "--paper selects the authors' exact procedure (criterion output, search "
    "top-down, their loop semantics) for reproduction; its top-down search commits the most expensive window "
    "first (6 layers: perplexity x653 the original's vs x1.96 for best-first; BENCHMARKS.md).",
    "Merge methods: reference = what produced the paper's published numbers (attention/MLP weights of the "
    "window's top layer, norms of its bottom layer); paper = the formula as printed, θ_low + Σ(θ_k − θ_low); "
    "mean = average of the window; consistent = as reference, but the norms that scale a weight's output "
    "(Gemma's post-norms, q/k norms) come with that weight from the top layer; keep-first / keep-last = keep "
    "one layer, drop the rest (pure pruning).",
])


PAPER = {"select.method": "swm", "select.criterion": "output", "select.search": "top-down",
         "select.paper_loop": True, "merge.attention": "bottom"}
_FLAG_NAMES = {"select.method": "--method", "select.criterion": "--criterion", "select.search": "--search"}


def paper_settings(flags: dict, sets: list[str] | None) -> dict:
    """What --paper sets; UserError when an explicit --criterion/--search (or --set of those keys or of
    select.paper_loop) asks for something else. Values equal to what --paper implies are accepted."""
    given = [(f"{_FLAG_NAMES[k]} {v}", k, v) for k, v in flags.items() if k in _FLAG_NAMES and v is not None]
    for item in sets or []:
        given += [(f"--set {item}", k, v) for k, v in parse_set([item]).items() if k in PAPER]
    clash = [label for label, k, v in given if v != PAPER[k]]
    if clash:
        raise UserError(f"--paper means method swm, criterion output, search top-down, the authors' loop and "
                        f"their attention rule; it cannot be "
                        f"combined with {', '.join(clash)}: drop --paper or those values")
    return dict(PAPER)


def refuse_ignored_flags(cfg, given: dict, heal_data: str | None = None) -> None:
    """A flag the chosen method would not use is refused, not silently dropped (`given`: flag -> value, None
    when not given)."""
    method = cfg.select.method
    if method not in ("swm", "auto"):
        for flag, value in given.items():
            if value is not None:
                raise UserError(f"{flag} is a setting of --method swm (and of auto's swm candidates); --method "
                                f"{method} scores and merges its own way: drop {flag}")
    if heal_data is not None and not cfg.heal.after_compress:
        raise UserError("--heal-data is the training text of --heal: give --heal local|lora, or drop --heal-data")


@user_errors
def compress_command(
    model: str = ModelArg,
    data: str = DataOpt,
    method: str = typer.Option(None, "--method", help="auto (default: run swm with three merges, shortgpt, "
                               "sleb and replaceme to the target and keep the plan of lowest loss on held-out "
                               "calibration rows) | swm (sliding-window merging alone, with --criterion, --search, "
                               "--merge) | shortgpt | sleb | laco | shortened-ppl | replaceme (baseline "
                               "pruners, through the same writer and evaluation) | flap | taylor (width: "
                               "heads and MLP channels pruned to --ratio, the same count in every layer)"),
    criterion: str = typer.Option(None, "--criterion", help="output (default) | cka | kl | nll (the "
                                   "candidate's own calibration NLL, SLEB's signal)"),
    search: str = typer.Option(None, "--search", help="best-first (default) | top-down (the paper's loop)"),
    threshold: float = typer.Option(None, "--threshold", help="accept while cosine/CKA > T, or KL/NLL <= T"),
    ratio: float = typer.Option(None, "--ratio", help="fraction of all parameters to remove (the paper's ratio)"),
    layers: int = typer.Option(None, "--layers", help="number of decoder layers to remove"),
    merge: str = typer.Option(None, "--merge", help="reference (default) | consistent | paper | mean | keep-first | "
                              "keep-last"),
    compensate: str = typer.Option(None, "--compensate", help="none | lstsq (a least-squares map fitted per window "
                                   "on calibration, folded into its MLP output) | scale (one least-squares factor); "
                                   "default: the method's own (lstsq for replaceme, else none)"),
    compensate_aware: bool = typer.Option(None, "--compensate-aware", help="swm: score every candidate after its "
                                          "own --compensate fit (calibration NLL of the compensated model); one "
                                          "fit and one NLL pass per candidate check"),
    then_width: float = typer.Option(None, "--then-width", help="after the depth plan, prune width (FLAP by "
                                     "default, --set select.width_method=taylor) of the merged model until this "
                                     "further fraction of the original parameters is removed"),
    paper: bool = typer.Option(None, "--paper", help="the authors' exact procedure: output + top-down + their loop "
                               "(refused together with another --criterion or --search)"),
    actors: int = typer.Option(None, "--actors", help="Ray actors holding model replicas and data shards"),
    samples: int = SamplesOpt,
    seq_len: int = SeqLenOpt,
    do_eval: bool = typer.Option(None, "--eval", help="evaluate the result (perplexity + zero-shot) into the card"),
    heal: str = typer.Option(None, "--heal", help="lora | local: heal the compressed model (swm-ray heal) before "
                             "--eval; the healed model is written to --out"),
    heal_data: str = typer.Option(None, "--heal-data", help="training text of --heal (default: --data)"),
    out: str = typer.Option(None, "--out", "-o",
                            help="output model folder, local or s3:// (default ./swm-ray-compressed)"),
    overwrite: bool = OverwriteOpt,
    resume: bool = ResumeOpt,
    allow_pickle: bool = AllowPickleOpt,
    trust_remote_code: bool = TrustRemoteCodeOpt,
    stream_layers: bool = StreamOpt,
    max_memory: str = MaxMemoryOpt,
    gpus_per_actor: int = GpusPerActorOpt,
    config: str = ConfigOpt,
    set_: list[str] = SetOpt,
) -> None:
    flags = {
        "model.source": model, "data.source": data, "select.method": method, "select.criterion": criterion,
        "select.search": search,
        "select.threshold": threshold, "select.ratio": ratio, "select.layers": layers, "merge.method": merge,
        "merge.compensate": compensate, "select.compensate_aware": compensate_aware, "select.then_width": then_width,
        "heal.after_compress": heal, "heal.data": heal_data,
        "ray.actors": actors, "data.samples": samples, "data.seq_len": seq_len, "eval.enabled": do_eval,
        "out": out, "overwrite": overwrite, "resume": resume, "model.allow_pickle": allow_pickle,
        "model.trust_remote_code": trust_remote_code, **scale_flags(stream_layers, max_memory, gpus_per_actor),
    }
    flags = one_target(flags, ("select.threshold", "select.ratio", "select.layers"))
    if paper:
        flags.update(paper_settings(flags, set_))
    cfg, raw = make_config(config, flags, set_)
    refuse_ignored_flags(cfg, {"--criterion": criterion, "--search": search, "--merge": merge},
                         heal_data=heal_data)
    if cfg.heal.after_compress:
        from swm_ray.jobs.heal import run_compress_and_heal as run_compress
    else:
        from swm_ray.jobs.compress import run_compress

    res = run_compress(cfg, raw)
    p = res["plan"]
    echo("")
    echo(f"windows (original layers, inclusive): {', '.join(f'{a}-{b}' for a, b in p['windows'])}")
    echo(f"layers: {p['num_layers_before']} -> {p['num_layers_after']}   parameters: {p['params_before']:,} -> "
         f"{p['params_after']:,} ({1 - p['params_after'] / p['params_before']:.1%} removed)")
    if p.get("width"):
        w = p["width"]
        echo(f"width ({w['method']}): KV groups {w['kv_heads_before']} -> {w['kv_heads_after']} (heads "
             f"{w['heads_before']} -> {w['heads_after']}), MLP channels {w['intermediate_before']} -> "
             f"{w['intermediate_after']} per layer; bias compensation: "
             f"{', '.join(k for k, v in w['bias'].items() if v) or 'none'}")
    if p.get("threshold") is not None:
        echo(f"threshold: {p['threshold']:.4f}   criterion: {p['criterion']}   search: {p['search']}   "
             f"merge: {p['merge']}")
    if p.get("compensation"):
        c = p["compensation"]
        echo(f"compensation: {c['method']} (input {c['input']}), missed share of each window's update: "
             + ", ".join(f"{w['window'][0]}-{w['window'][1]} {w['error_before']:.3f} -> {w['error_after']:.3f}"
                         for w in c["windows"]))
    if res.get("note"):
        echo(f"note: {res['note']}")
    if res.get("heal"):
        from swm_ray.commands.heal import heal_summary

        echo(f"healed ({res['heal'].mode}): {heal_summary(res['heal'])}")
    if res.get("metrics"):
        m = res["metrics"]
        if m.get("ppl"):
            echo(f"perplexity: {m['ppl']['ppl']:.2f} ({m['ppl']['tokens']} tokens)")
        if m.get("mean") is not None:
            echo("zero-shot: " + ", ".join(f"{t} {r['value']:.3f}" for t, r in m["tasks"].items())
                 + f"; mean {m['mean']:.3f}")
    echo(f"wrote {res['out']} ({res['seconds']:.0f} s)")


compress_command.__doc__ = HELP
