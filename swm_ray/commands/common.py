"""What every command shares: config assembly from flags, and mapping user mistakes to one-line errors."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

import typer

from swm_ray.config import RunConfig, build_config, load_yaml_text, parse_set
from swm_ray.errors import UserError

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config file (sections model:, data:, select:, ...)")
SetOpt = typer.Option(None, "--set", help="override any config path, e.g. --set data.samples=32 (repeatable)")
ModelArg = typer.Argument(None, help="builtin:smollm2-135m (default), a local HF folder, a hub id or s3://")
OverwriteOpt = typer.Option(None, "--overwrite", help="replace an earlier swm-ray output at --out")
AllowPickleOpt = typer.Option(None, "--allow-pickle", help="allow loading pickle (.bin) weights")
TrustRemoteCodeOpt = typer.Option(None, "--trust-remote-code", help="run the model repository's own code")


def make_config(config_file: str | None, flags: dict[str, Any], sets: list[str] | None) -> tuple[RunConfig, str]:
    """Build the resolved config; returns (config, raw YAML text of --config or '')."""
    raw, data = ("", {})
    if config_file:
        raw, data = load_yaml_text(config_file)
    return build_config(data, flags, parse_set(sets)), raw


def user_errors(fn: Callable) -> Callable:
    """Run a command body; a UserError (or a bad-input error from deep inside) becomes one line on stderr."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: nothing was written at the output path", err=True)
            raise typer.Exit(130) from None
        except Exception as e:  # a Ray task may wrap our UserError
            cause = _find_user_error(e)
            if cause is None:
                raise
            typer.echo(f"error: {cause}", err=True)
            raise typer.Exit(cause.exit_code) from None

    return wrapper


def _find_user_error(e: BaseException) -> UserError | None:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, UserError):
            return e
        inner = getattr(e, "cause", None)  # ray.exceptions.RayTaskError keeps the original here
        if isinstance(inner, UserError):
            return inner
        e = e.__cause__ or e.__context__
    return None


def echo(msg: str) -> None:
    typer.echo(msg, err=False)
    sys.stdout.flush()
