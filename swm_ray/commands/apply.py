"""`swm-ray apply`: run a written plan (`plan.json`) on a model and write the compressed folder."""

from __future__ import annotations

import typer

from swm_ray.commands.common import (
    AllowPickleOpt,
    ConfigOpt,
    OverwriteOpt,
    SetOpt,
    TrustRemoteCodeOpt,
    echo,
    make_config,
    user_errors,
)
from swm_ray.errors import UserError

# what apply reads from the config: the merge, windows, attention rule and fits come from the plan itself
APPLY_KEYS = ("out", "overwrite", "model.revision", "model.allow_pickle", "model.trust_remote_code")


def _dotted(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_dotted(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_unused_settings(cfg) -> None:
    """A --set or --config value apply would not use is refused, not recorded as if it had been applied."""
    from swm_ray.config import build_config

    given, default = _dotted(cfg.model_dump()), _dotted(build_config().model_dump())
    unused = sorted(k for k, v in given.items() if k not in APPLY_KEYS and v != default.get(k))
    if unused:
        raise UserError(f"apply does not use {', '.join(unused)}: a plan is replayed as written (its merge, "
                        f"windows, attention rule and fits); change those with compress and apply the new plan")


@user_errors
def apply_command(
    plan: str = typer.Argument(..., help="a plan.json (local or s3://), e.g. one a compress, grid or zoo run wrote"),
    model: str = typer.Argument(None, help="the model to apply it to (default: the plan's own source and "
                                "revision)"),
    revision: str = typer.Option(None, "--revision", help="hub revision of MODEL (default: the plan's)"),
    force: bool = typer.Option(None, "--force", help="apply even when the model's weights or depth differ from "
                               "those the plan was made from"),
    out: str = typer.Option(None, "--out", "-o", help="output model folder, local or s3:// "
                            "(default ./swm-ray-applied)"),
    overwrite: bool = OverwriteOpt,
    allow_pickle: bool = AllowPickleOpt,
    trust_remote_code: bool = TrustRemoteCodeOpt,
    config: str = ConfigOpt,
    set_: list[str] = SetOpt,
) -> None:
    """Apply a written plan to a model (the merge and writer of compress, no selection).

    The plan's own source and revision give the same tensors and config as the run that wrote it, byte for
    byte; a model whose weights differ from the plan's checksum is refused unless --force."""
    cfg, raw = make_config(config, {
        "model.revision": revision, "out": out, "overwrite": overwrite,
        "model.allow_pickle": allow_pickle, "model.trust_remote_code": trust_remote_code,
    }, set_)
    check_unused_settings(cfg)
    from swm_ray.jobs.apply import run_apply

    res = run_apply(cfg, plan, model=model, force=bool(force), raw_yaml=raw)
    p = res["plan"]
    echo(f"applied {plan} ({p['method']}, merge {p['merge']}, windows "
         f"{', '.join(f'{a}-{b}' for a, b in p['windows'])}) to {res['source']}"
         + ("" if res["checked"] else " (weights not checked)"))
    echo(f"layers: {p['num_layers_before']} -> {p['num_layers_after']}   wrote {res['out']} ({res['seconds']:.0f} s)")
