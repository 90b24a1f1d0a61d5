"""`swm-ray zoo`: compress a list of models (a zoo file) into one folder each, with a manifest."""

from __future__ import annotations

import typer

from swm_ray.commands.common import echo, resolve_config_file, user_errors


@user_errors
def zoo_command(
    zoo: str = typer.Argument(..., help="the zoo file (YAML: defaults + models), local or s3://, or the name of a "
                              "shipped one (zoo-smollm2)"),
    out: str = typer.Option(None, "--out", "-o", help="the prefix every model's folder and the manifest go under, "
                            "local or s3:// (default ./swm-ray-zoo)"),
    retry_failed: bool = typer.Option(None, "--retry-failed", help="rerun only the models whose manifest row is "
                                      "an error"),
    concurrency: int = typer.Option(None, "--concurrency", help="models at once (default: the zoo file's, else "
                                    "as the cluster's resources allow)"),
    cpus_per_model: float = typer.Option(None, "--cpus-per-model", help="CPUs (and torch threads) of each model's "
                                         "task (default 1)"),
    address: str = typer.Option(None, "--address", help="a Ray cluster to join (default: RAY_ADDRESS, else an "
                                "embedded local Ray)"),
) -> None:
    """Compress every model of a zoo file, one folder each, with a manifest.

    Each model runs as a Ray task with the resources its size asks for, through the same planners, writer and
    evaluation as compress. Writes PREFIX/NAME per model and PREFIX/manifest.parquet (.csv, .md, .json),
    updated as each model finishes; a failing model is an error row and the others go on. A rerun skips the
    models whose output is complete and whose settings are unchanged."""
    from swm_ray.jobs.zoo import markdown_manifest, run_zoo

    res = run_zoo(resolve_config_file(zoo, "zoo"), out or "swm-ray-zoo", retry_failed=bool(retry_failed),
                  concurrency=concurrency, cpus_per_model=1.0 if cpus_per_model is None else cpus_per_model,
                  address=address)
    echo("")
    echo(markdown_manifest(res["rows"]))
    again = f" ({len(res['reevaluated'])} only evaluated again)" if res.get("reevaluated") else ""
    echo(f"{res['ran']} model(s) run{again}, {res['kept']} kept from earlier runs, {res['errors']} error(s); wrote "
         f"{out or 'swm-ray-zoo'}/manifest.parquet (.csv, .md, .json)")
    if res["errors"]:
        raise typer.Exit(1)
