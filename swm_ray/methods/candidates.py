"""The candidates of `--method auto`: a candidate spec (`METHOD` or `swm/MERGE`), the config it runs
with, what it computes on a given architecture, and candidates deduplicated by that."""

from __future__ import annotations

from collections.abc import Collection

from swm_ray.errors import UserError


# -- candidates ----------------------------------------------------------------------------------------------
def parse_candidate(spec: str) -> tuple[str, str | None]:
    """`METHOD` or `swm/MERGE` -> (method, merge or None)."""
    from swm_ray.config import AUTO_METHODS, MERGE_METHODS

    method, _, merge = spec.partition("/")
    if method not in AUTO_METHODS:
        raise UserError(f"auto candidate {spec!r}: {method!r} is not a method auto can run; choose among "
                        f"{', '.join(AUTO_METHODS)} (swm may name a merge: swm/keep-first)")
    if merge and (method != "swm" or merge not in MERGE_METHODS):
        raise UserError(f"auto candidate {spec!r}: only swm takes a merge method (swm/{'|'.join(MERGE_METHODS)})")
    return method, merge or None


def candidate_config(cfg, spec: str):
    """The run config of one candidate: `cfg` with its method (and merge) set; compensation left to auto."""
    method, merge = parse_candidate(spec)
    select = cfg.select.model_copy(update={"method": method})
    merge_cfg = cfg.merge.model_copy(update={"method": merge or cfg.merge.method, "compensate": "none"})
    return cfg.model_copy(update={"select": select, "merge": merge_cfg})


def compensation_config(cfg, spec: str):
    """(compensation method, run config) of an `auto_compensate` entry: `lstsq:RIDGE` sets merge.ridge."""
    method, colon, ridge = spec.partition(":")
    if not colon:
        return method, cfg
    return method, cfg.model_copy(update={"merge": cfg.merge.model_copy(update={"ridge": float(ridge)})})


def effective_spec(spec: str, merge_method: str, layer_names: Collection[str]) -> str:
    """What a candidate computes on layers with these tensor names: `swm` runs `merge.method` (`merge_method`),
    and `swm/consistent` is `swm/reference` where no norm follows a weight (Llama, Mistral, Qwen2); the
    baselines fix their own merge."""
    from swm_ray.edits.merge import follows_weight

    method, merge = parse_candidate(spec)
    if method != "swm":
        return method
    merge = merge or merge_method
    if merge == "consistent" and layer_names and not any(follows_weight(n, layer_names) for n in layer_names):
        merge = "reference"
    return f"swm/{merge}"


def deduplicated(specs, merge_method: str, layer_names: Collection[str]) -> tuple[list[str], dict[str, str]]:
    """(the candidates to run, sorted by name; {skipped spec: the spec that computes the same}). Of candidates
    that compute the same, the first by name runs, whatever the order they were listed in."""
    by_effect: dict[str, list[str]] = {}
    for spec in specs:
        by_effect.setdefault(effective_spec(spec, merge_method, layer_names), []).append(spec)
    run, same = [], {}
    for group in by_effect.values():
        first, *rest = sorted(group)
        run.append(first)
        same.update({s: first for s in rest})
    return sorted(run), same
