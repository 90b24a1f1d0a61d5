"""`swm-ray heal`: recovery training of a compressed model folder (LoRA with Ray Train, or a layer-local refit)."""

from __future__ import annotations

import typer

from swm_ray.commands.common import (
    AllowPickleOpt,
    ConfigOpt,
    MaxMemoryOpt,
    OverwriteOpt,
    SetOpt,
    StreamOpt,
    TrustRemoteCodeOpt,
    echo,
    make_config,
    scale_flags,
    user_errors,
)
from swm_ray.errors import UserError

HELP = "\n\n".join([
    "Heal a compressed model folder by a short recovery training and write it as a new model folder (same "
    "layout and card as compress, plus heal.json).",
    "--mode lora (default): LoRA adapters on q, k, v, o, gate, up, down with the paper's recipe (r 8, alpha 16, "
    "dropout 0.05, lr 1e-4, effective batch 64, 2 epochs, cutoff 256, 100 warm-up steps), trained by --workers "
    "Ray Train workers (one GPU each where the cluster has GPUs), checkpointed beside --out (or under "
    "--checkpoints, local or s3://, in a folder of its own that it removes when done), then merged into the "
    "weights. --data: instruction records "
    "(instruction/input/output; the prompt is masked from the loss) or plain text, .parquet/.jsonl/.json/.txt, "
    "local or s3://, or builtin: text. A stopped run continues with --resume.",
    "--mode local: each merged layer of the folder's plan.json is refit alone, bottom-up, to the original "
    "model's output over its window (Adam on the MSE of hidden states; --steps per layer); the original model "
    "(named by plan.json) is streamed one layer at a time when it does not fit.",
])

ModelArg = typer.Argument(None, help="the compressed model folder (written by compress or apply), local or s3://")


@user_errors
def heal_command(
    model: str = ModelArg,
    data: str = typer.Option(None, "--data", help="training text or instruction records (default: data.source, "
                             "builtin:lambada)"),
    mode: str = typer.Option(None, "--mode", help="lora (default) | local"),
    out: str = typer.Option(None, "--out", "-o", help="output model folder, local or s3:// (default ./swm-ray-healed)"),
    workers: int = typer.Option(None, "--workers", help="lora: Ray Train workers (default: one per GPU, else 1)"),
    steps: int = typer.Option(None, "--steps", help="optimizer steps: lora in total (default: from --epochs), local "
                              "per merged layer (default 400)"),
    epochs: float = typer.Option(None, "--epochs", help="lora: passes over the data (default 2)"),
    lr: float = typer.Option(None, "--lr", help="learning rate (default: lora 1e-4, local 3e-4)"),
    batch_size: int = typer.Option(None, "--batch-size", help="lora: effective batch over all workers (default 64)"),
    keep_adapter: bool = typer.Option(None, "--keep-adapter", help="lora: also save the adapter alone (OUT/adapter)"),
    checkpoints: str = typer.Option(None, "--checkpoints", help="lora: folder for checkpoints, local or s3://, "
                                    "empty or used only by heal runs (each keeps its own heal-<hash>/ there and "
                                    "removes only that; default: beside --out)"),
    source: str = typer.Option(None, "--source", help="local: the original model (default: plan.json's source)"),
    do_eval: bool = typer.Option(None, "--eval", help="evaluate the healed model (perplexity + zero-shot) into its "
                                 "card"),
    overwrite: bool = OverwriteOpt,
    resume: bool = typer.Option(None, "--resume", help="lora: continue an interrupted heal of this --out from its "
                                "last checkpoint"),
    allow_pickle: bool = AllowPickleOpt,
    trust_remote_code: bool = TrustRemoteCodeOpt,
    stream_layers: bool = StreamOpt,
    max_memory: str = MaxMemoryOpt,
    config: str = ConfigOpt,
    set_: list[str] = SetOpt,
) -> None:
    flags = {
        "model.source": model, "heal.data": data, "heal.mode": mode, "out": out, "heal.workers": workers,
        "heal.steps": steps, "heal.epochs": epochs, "heal.lr": lr, "heal.batch_size": batch_size,
        "heal.keep_adapter": keep_adapter, "heal.checkpoints": checkpoints, "heal.source": source,
        "eval.enabled": do_eval, "overwrite": overwrite, "resume": resume, "model.allow_pickle": allow_pickle,
        "model.trust_remote_code": trust_remote_code, **scale_flags(stream_layers, max_memory, None),
    }
    cfg, raw = make_config(config, flags, set_)
    if "source" not in cfg.model.model_fields_set:  # not the argument, the config file or --set
        raise UserError("heal: no model folder given: name the compressed folder to heal, e.g. swm-ray heal "
                        "./swm-ray-out (or model.source in --config)")
    refuse_other_mode_flags(cfg.heal.mode, {
        "local": {"--workers": workers, "--epochs": epochs, "--batch-size": batch_size, "--keep-adapter": keep_adapter,
                  "--checkpoints": checkpoints, "--resume": resume},
        "lora": {"--source": source}})
    from swm_ray.jobs.heal import run_heal

    res = run_heal(cfg, raw)
    echo("")
    echo(heal_summary(res["record"]))
    print_metrics(res.get("metrics"))
    echo(f"wrote {res['out']} ({res['seconds']:.0f} s)")


def refuse_other_mode_flags(mode: str, others: dict[str, dict]) -> None:
    """A flag of the other --mode is refused, not silently dropped (`others[mode]`: the flags this mode does not
    read -> their values, None when not given)."""
    for flag, value in others[mode].items():
        if value not in (None, False):
            raise UserError(f"{flag} is a setting of --mode {'lora' if mode == 'local' else 'local'}; this heal runs "
                            f"--mode {mode}: drop {flag}")


def heal_summary(record) -> str:
    """A few lines on what a heal run did (for heal and compress --heal)."""
    if record.mode == "local":
        return "\n".join(f"layers {f['window'][0]}-{f['window'][1]}: relative error {f['error_before']:.4f} -> "
                         f"{f['error_after']:.4f}" for f in record.fits)
    line = f"lora: {record.steps} steps on {record.examples} examples, {record.workers} worker(s)"
    if record.loss_first is not None:
        line += f", loss {record.loss_first:.4f} -> {record.loss_last:.4f}"
    if record.tokens_per_s:
        line += f", {record.tokens_per_s:,.0f} tokens/s"
    if record.resumed_from_step:
        line += f" (resumed at step {record.resumed_from_step})"
    return line


def print_metrics(m: dict | None) -> None:
    if not m:
        return
    if m.get("ppl"):
        echo(f"perplexity: {m['ppl']['ppl']:.2f} ({m['ppl']['tokens']} tokens)")
    if m.get("mean") is not None:
        echo("zero-shot: " + ", ".join(f"{t} {r['value']:.3f}" for t, r in m["tasks"].items())
             + f"; mean {m['mean']:.3f}")


heal_command.__doc__ = HELP
