"""`swm-ray submit`: the same commands, on a Ray cluster (Ray Jobs API)."""

from __future__ import annotations

import os

import typer

from swm_ray.commands.common import echo, user_errors


@user_errors
def submit_command(
    ctx: typer.Context,
    address: str = typer.Option(None, "--address", help="Ray dashboard address, e.g. http://head:8265 "
                                "(default: $RAY_ADDRESS)"),
    working_dir: str = typer.Option(None, "--working-dir", help="local folder shipped to the cluster with the job"),
    pip: list[str] = typer.Option(None, "--pip", help="extra pip requirement for the job's environment (repeatable)"),
    env: list[str] = typer.Option(None, "--env", help="KEY=VALUE environment variable for the job (repeatable); "
                                  "values show in Ray's dashboard and job list: pass credentials through the "
                                  "cluster's own environment or secrets instead (cluster/README.md)"),
    no_wait: bool = typer.Option(False, "--no-wait", help="return after submitting instead of following the logs"),
    status: str = typer.Option(None, "--status", help="print the status of job ID and exit"),
    stop: str = typer.Option(None, "--stop", help="stop job ID and exit"),
) -> None:
    """Run an swm-ray command on a Ray cluster: swm-ray submit --address URL -- compress MODEL --layers 6 --out
    s3://BUCKET/m (a job's output must be on S3 or at an absolute path: Ray runs it in a temporary folder)"""
    from swm_ray.errors import UserError
    from swm_ray.jobs.submit import job_status, run_submit, secret_keys, stop_job

    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise UserError("submit: no cluster address; pass --address http://HEAD:8265 or set RAY_ADDRESS")
    if status:
        echo(job_status(address, status))
        return
    if stop:
        echo("stopped" if stop_job(address, stop) else "not running")
        return
    env_vars = {}
    for item in env or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--env {item!r}: expected KEY=VALUE")
        env_vars[key] = value
    for key in secret_keys(env_vars):  # the name only, never the value
        typer.echo(f"warning: --env {key} looks like a credential: its value will be visible in Ray's dashboard "
                   f"and job list; give it to the cluster's own environment or a secret instead (cluster/README.md)",
                   err=True)
    res = run_submit(address, list(ctx.args), commands=cli_commands(ctx), working_dir=working_dir, pip=pip,
                     env=env_vars, wait=not no_wait)
    echo(f"job {res['job_id']}: {res['status']}")
    if res["status"] in ("FAILED", "STOPPED"):
        raise typer.Exit(1)


def cli_commands(ctx: typer.Context) -> list[str]:
    """Every command registered on the swm-ray CLI except `submit` itself: what a job may run."""
    root = ctx.find_root()
    return [name for name in root.command.list_commands(root) if name != ctx.info_name]
