"""What every command shares: config assembly from flags, and mapping user mistakes to one-line errors."""

from __future__ import annotations

import functools
import importlib.resources
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from swm_ray.config import RunConfig, build_config, load_yaml_text, parse_set
from swm_ray.errors import UserError, find_user_error

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config file (sections model:, data:, select:, ...)")
SetOpt = typer.Option(None, "--set", help="override any config path, e.g. --set data.samples=32 (repeatable)")
ModelArg = typer.Argument(None, help="builtin:smollm2-135m (default), a local HF folder, a hub id or s3://")
OverwriteOpt = typer.Option(None, "--overwrite", help="replace an earlier swm-ray output at --out")
AllowPickleOpt = typer.Option(None, "--allow-pickle", help="allow loading pickle (.bin) weights")
TrustRemoteCodeOpt = typer.Option(None, "--trust-remote-code", help="run the model repository's own code")
StreamOpt = typer.Option(None, "--stream-layers/--no-stream-layers",
                         help="run one decoder layer at a time, read lazily from the safetensors files (default: "
                         "only when the model does not fit the memory budget)")
MaxMemoryOpt = typer.Option(None, "--max-memory", help="memory budget of one actor, e.g. 2GB or 512MiB (default: "
                            "the free memory of its GPU(s), or its share of host RAM)")
DataOpt = typer.Option(None, "--data", help="calibration text (default builtin:lambada)")
SamplesOpt = typer.Option(None, "--samples", help="calibration sequences (default 10, as the paper)")
SeqLenOpt = typer.Option(None, "--seq-len", help="tokens per sequence (default 128)")
ResumeOpt = typer.Option(None, "--resume", help="continue an interrupted run of this command and output from the "
                         "state it left beside --out")
GpusPerActorOpt = typer.Option(None, "--gpus-per-actor", help="GPUs per actor where the cluster has GPUs; the "
                               "model is placed across them with accelerate's device map (default 1)")


def scale_flags(stream: bool | None, max_memory: str | None, gpus_per_actor: int | None) -> dict[str, Any]:
    """The config paths of the options every model-running command shares (None = not given)."""
    return {"model.stream": None if stream is None else ("always" if stream else "never"),
            "model.max_memory": max_memory, "ray.gpus_per_actor": gpus_per_actor}


EXPLICIT_NONE = object()
"""A flag value meaning "set this config path to null" (e.g. `--ppl-data none`); a plain None means not given."""


def shipped_configs() -> dict[str, Path]:
    """The configs installed with the package (swm_ray/configs/NAME.yaml), by NAME."""
    folder = importlib.resources.files("swm_ray") / "configs"
    if not folder.is_dir():
        return {}
    return {Path(f.name).stem: Path(str(f)) for f in sorted(folder.iterdir(), key=lambda f: f.name)
            if f.name.endswith(".yaml")}


def resolve_config_file(name: str, kind: str = "config") -> str:
    """`--config` value -> a readable path: a file path (local or s3://) as given, or a bare NAME (no folder, no
    .yaml suffix) that is not a local file -> the shipped config NAME (`best`, `paper`, ...); so is
    `configs/NAME.yaml` when no such file exists here (the shipped configs' place in a source checkout)."""
    is_path = "://" in name or "/" in name or os.sep in name or name.endswith((".yaml", ".yml"))
    shipped = shipped_configs()
    legacy = Path(name)  # configs/NAME.yaml: where the shipped configs lived in a source checkout
    if is_path and "://" not in name and not legacy.exists() and legacy.parent.name == "configs" \
            and legacy.stem in shipped:
        return str(shipped[legacy.stem])
    if is_path or Path(name).expanduser().is_file():
        return name
    zoo = kind == "zoo"
    if name in shipped and name.startswith("zoo-") != zoo:
        raise UserError(f"{name} is a shipped zoo file: run `swm-ray zoo {name}`" if not zoo else
                        f"{name} is a shipped config, not a zoo file: give it as --config {name}")
    if name in shipped:
        return str(shipped[name])
    names = [n for n in shipped if n.startswith("zoo-") == zoo]
    raise UserError(f"{kind} {name}: no such file and no shipped {kind} {'file ' if zoo else ''}of that name; "
                    f"shipped {'zoo files' if zoo else 'configs'}: {', '.join(names) or 'none'} (or give the path "
                    f"of a YAML file)")


def one_target(flags: dict[str, Any], paths: tuple[str, ...], cleared: Any = EXPLICIT_NONE) -> dict[str, Any]:
    """A target given by flag (e.g. --ratio) replaces the config file's target of another kind (e.g. its
    `layers`): the other target paths not given by flag are cleared at flag level (--set still applies)."""
    if any(flags.get(p) is not None for p in paths):
        return {**flags, **{p: cleared for p in paths if flags.get(p) is None}}
    return flags


def make_config(config_file: str | None, flags: dict[str, Any], sets: list[str] | None) -> tuple[RunConfig, str]:
    """Build the resolved config (defaults < --config < flags < --set); returns (config, raw YAML of --config or '').

    A flag is a dotted config path; None means "not given" (the config's value stands), EXPLICIT_NONE sets null.
    """
    raw, data = ("", {})
    if config_file:
        raw, data = load_yaml_text(resolve_config_file(config_file))
    flags = dict(flags)
    for dotted in [k for k, v in flags.items() if v is EXPLICIT_NONE]:
        del flags[dotted]
        data = _with_value(data, dotted, None)  # at flag level: above the YAML file, below --set
    return build_config(data, flags, parse_set(sets)), raw


def _with_value(tree: dict, dotted: str, value: Any) -> dict:
    """A copy of `tree` with `dotted` set to `value` (sections created as needed)."""
    head, _, rest = dotted.partition(".")
    out = dict(tree)
    if not rest:
        out[head] = value
        return out
    section = out.get(head)
    out[head] = _with_value(section if isinstance(section, dict) else {}, rest, value)
    return out


def user_errors(fn: Callable) -> Callable:
    """Run a command body; a UserError (or a bad-input error from deep inside) becomes one line on stderr."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        try:
            return fn(*args, **kwargs)
        except UserError as e:  # Ray's RayTaskError of a UserError is one too, but prints the remote traceback
            cause = find_user_error(e) or e
            typer.echo(f"error: {cause}", err=True)
            raise typer.Exit(cause.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: outputs appear only when complete, so nothing half-written was left (analyze "
                       "and compress continue with --resume; finished zoo models and grid rows are kept)", err=True)
            raise typer.Exit(130) from None
        except Exception as e:  # a Ray task may wrap our UserError
            cause = _find_user_error(e)
            if cause is None:
                raise
            typer.echo(f"error: {cause}", err=True)
            raise typer.Exit(cause.exit_code) from None

    return wrapper


def _find_user_error(e: BaseException) -> UserError | None:
    return find_user_error(e)


def echo(msg: str) -> None:
    typer.echo(msg, err=False)
    sys.stdout.flush()


def refuse_empty_tasks(tasks: str | None) -> None:
    """`--tasks ""` (an unset shell variable, most often) is not taken to mean no tasks: `none` says that."""
    if tasks is not None and not tasks.replace(",", "").strip():
        raise UserError(f"--tasks {tasks!r} names no task: give a comma list such as piqa,boolq, or none for no "
                        f"zero-shot tasks")
