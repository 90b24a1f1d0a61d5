"""A grid's trials: the cross product of models, methods and targets a grid config spells out, their labels
and the checks of a grid before anything runs."""

from __future__ import annotations

from swm_ray.config import WIDTH_METHODS, RunConfig
from swm_ray.errors import UserError


def trial_specs(cfg: RunConfig) -> list[dict]:
    """Every (model, method) pair of the grid, originals and baselines first."""
    g = cfg.grid
    models = list(g.models) or [cfg.model.source]
    specs: list[dict] = []
    for m in models:
        specs.append({"model": m, "method": "original"})
        if g.target_kind() in ("layers", "ratios"):
            specs += [{"model": m, "method": b} for b in g.baselines]
        for c in g.criteria:
            # CKA windows depend on the matrix only, not on how a window is merged
            merges = g.merges if c != "cka" else g.merges[:1]
            for s in g.searches:
                for mm in merges:
                    specs.append({"model": m, "method": "swm", "criterion": c, "search": s, "merge": mm})
    return specs


def model_label(source: str) -> str:
    """A short name for tables and plots: builtin names and hub ids as given, paths by their last part."""
    if source.startswith("builtin:") or "://" not in source and not source.startswith(("/", ".", "~")):
        return source
    return source.rstrip("/").rsplit("/", 1)[-1] or source


def model_labels(sources) -> dict[str, str]:
    """`model_label` of each source, unique among `sources`: two whose short names are the same (/a/tiny and
    /b/tiny, s3://b/v1/model and s3://b/v2/model) are named by their whole source."""
    short = {str(s): model_label(str(s)) for s in sources}
    taken = list(short.values())
    return {s: v if taken.count(v) == 1 else s.rstrip("/") for s, v in short.items()}


def method_label(row: dict) -> str:
    """How tables and plots name a row's method: "output / best-first / reference + lstsq + width flap 15% + heal
    local", "shortgpt", "flap"."""
    label = f"{row['criterion']} / {row['search']} / {row['merge']}" if row.get("method") == "swm" else \
        str(row.get("method"))
    comp = row.get("compensate")
    label = f"{label} + {comp}" if comp not in (None, "none") else label
    if row.get("then_width") is not None:
        label = f"{label} + width {row.get('width')} {round(100 * row['then_width'], 2):g}%"
    heal = row.get("heal")
    return f"{label} + heal {heal}" if heal not in (None, "none") else label


def check_grid(cfg: RunConfig) -> None:
    """Mistakes a user can make in a grid, found before anything starts."""
    from swm_ray.methods.selection import check_threshold
    from swm_ray.methods.width_targets import check_width_settings

    g = cfg.grid
    if g.target_kind() is None:
        raise UserError("give the grid's targets: --layers 2,4,6, --ratios 0.1,0.2 or --thresholds 0.7,0.8")
    for t in g.thresholds:
        for c in g.criteria:
            check_threshold(c, t)
    if not g.criteria and not g.baselines:
        raise UserError("the grid is empty: give --criteria and/or --baselines")
    if not g.criteria and g.thresholds:
        raise UserError("baselines need layer counts or ratios (--layers / --ratios), not --thresholds")
    width = [b for b in g.baselines if b in WIDTH_METHODS]
    if width and g.target_kind() != "ratios":
        raise UserError("flap/taylor prune width to a parameter ratio: give --ratios")
    if g.then_width:
        width.append(cfg.select.width_method)
    for method in dict.fromkeys(width):
        check_width_settings(cfg.model_copy(update={"select": cfg.select.model_copy(update={
            "method": "swm", "then_width": None})}), method)  # the grid's own select.method does not apply
