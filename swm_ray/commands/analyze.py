"""`swm-ray analyze`: the layer-similarity (CKA) matrix of a model on calibration text."""

from __future__ import annotations

import typer

from swm_ray.commands.common import (
    AllowPickleOpt,
    ConfigOpt,
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
    scale_flags,
    user_errors,
)


@user_errors
def analyze_command(
    model: str = ModelArg,
    data: str = typer.Option(None, "--data", help="calibration text: builtin:lambada (default), "
                             "builtin:boolq-passages, .parquet/.jsonl/.txt, local or s3://"),
    samples: int = SamplesOpt,
    seq_len: int = SeqLenOpt,
    batch_size: int = typer.Option(None, "--batch-size", help="sequences per minibatch, >= 4 (default 5)"),
    actors: int = typer.Option(None, "--actors",
                               help="Ray actors, each with a model replica (default: one per GPU, else 1)"),
    kernel: str = typer.Option(None, "--kernel", help="linear (default) or rbf"),
    skip_first_tokens: int = typer.Option(None, "--skip-first-tokens",
                                          help="positions left out of the features (default 1: the attention sink; "
                                          "0 reproduces the paper's analysis)"),
    out: str = typer.Option(None, "--out", "-o", help="output folder, local or s3:// (default ./swm-ray-analyze)"),
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
    """Compute the CKA similarity between every pair of layer outputs (distributed over Ray actors)."""
    cfg, raw = make_config(config, {
        "model.source": model, "data.source": data, "data.samples": samples, "data.seq_len": seq_len,
        "data.batch_size": batch_size, "ray.actors": actors, "stats.kernel": kernel,
        "stats.skip_first_tokens": skip_first_tokens, "out": out, "overwrite": overwrite, "resume": resume,
        "model.allow_pickle": allow_pickle, "model.trust_remote_code": trust_remote_code,
        **scale_flags(stream_layers, max_memory, gpus_per_actor),
    }, set_)
    from swm_ray.jobs.analyze import run_analyze

    res = run_analyze(cfg, raw)
    echo(f"analysed {res['num_layers']} layers of {res['model']} on {res['tokens']} tokens "
         f"({res['actors']} actor(s), {res['seconds']:.1f} s, {res['tokens_per_s']:.0f} tokens/s)")
    echo(f"wrote {res['out']}/similarity.npy, similarity.parquet, similarity.png, stats.json")
