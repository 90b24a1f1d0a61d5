"""Thin typer commands: parse flags -> config -> one `run_*` job -> exit code. No heavy imports at top level."""
