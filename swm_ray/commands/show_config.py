"""`swm-ray config`: the resolved config tree as YAML, each key with its help (no torch/ray import)."""

from __future__ import annotations

import typer
import yaml
from pydantic import BaseModel

from swm_ray.commands.common import SetOpt, echo, make_config, shipped_configs, user_errors
from swm_ray.config import RunConfig


def _scalar(value) -> str:
    """One YAML value on one line (flow style for lists)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6, allow_unicode=True)
    return text.removesuffix("\n...\n").strip()


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().split("\n\n")[0].replace("\n", " ")


def render(cfg: RunConfig, show_defaults: bool = False) -> str:
    """YAML of `cfg` with every key, its description as a comment, and its default where it differs (every
    default with `show_defaults`). The text loads back into the same config."""
    lines: list[str] = []
    _section(cfg, RunConfig().model_dump(mode="json"), cfg.model_dump(mode="json"), 0, show_defaults, lines)
    return "\n".join(lines)


def _section(model: BaseModel, defaults: dict, values: dict, indent: int, show_defaults: bool,
             lines: list[str]) -> None:
    pad = " " * indent
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            doc = _first_line(type(value).__doc__)
            lines.append(f"{pad}{name}:" + (f"  # {doc}" if doc else ""))
            _section(value, defaults.get(name, {}), values[name], indent + 2, show_defaults, lines)
            continue
        notes = [field.description] if field.description else []
        default = defaults.get(name)
        if show_defaults or values[name] != default:
            notes.append(f"(default: {_scalar(default)})")
        comment = "  # " + " ".join(notes) if notes else ""
        lines.append(f"{pad}{name}: {_scalar(values[name])}{comment}")


@user_errors
def config_command(
    file: str = typer.Argument(None, help="a YAML config: a path (local or s3://) or the name of a shipped one "
                               "(best, paper, ...); default: none, the built-in defaults"),
    show_defaults: bool = typer.Option(None, "--show-defaults", help="note every key's default value (otherwise "
                                       "only where the resolved value differs)"),
    set_: list[str] = SetOpt,
) -> None:
    """Print the resolved config (defaults < FILE < --set) as YAML, every key with its help as a comment.

    Every command's --config and --set take these keys; each command's flags are shortcuts for some of them.
    """
    cfg, _ = make_config(file, {}, set_)
    echo(render(cfg, bool(show_defaults)))
    shipped = list(shipped_configs())
    names = ", ".join(n for n in shipped if not n.startswith("zoo-"))
    if names:
        echo(f"# shipped configs (--config NAME): {names}")
    zoos = ", ".join(n for n in shipped if n.startswith("zoo-"))
    if zoos:
        echo(f"# shipped zoo files (swm-ray zoo NAME): {zoos}")

