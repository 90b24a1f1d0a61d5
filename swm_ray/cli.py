"""`swm-ray` command line (the top floor). Commands live in swm_ray/commands/*; each imports torch/ray lazily."""

from __future__ import annotations

import typer

from swm_ray import __version__
from swm_ray.commands.analyze import analyze_command
from swm_ray.commands.apply import apply_command
from swm_ray.commands.compress import compress_command
from swm_ray.commands.evaluate import eval_command
from swm_ray.commands.grid import grid_command
from swm_ray.commands.heal import heal_command
from swm_ray.commands.show_config import config_command
from swm_ray.commands.submit import submit_command
from swm_ray.commands.zoo import zoo_command

app = typer.Typer(
    name="swm-ray",
    help="Depth compression of LLMs by Sliding-Window Merging, on Ray.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals can hold credentials
    add_completion=False,
)

app.command("analyze")(analyze_command)
app.command("compress")(compress_command)
app.command("apply")(apply_command)
app.command("heal")(heal_command)
app.command("eval")(eval_command)
app.command("grid")(grid_command)
app.command("zoo")(zoo_command)
app.command("config")(config_command)
app.command(
    "submit", context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
)(submit_command)


@app.command("version")
def version() -> None:
    """Print the swm-ray version."""
    typer.echo(__version__)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
