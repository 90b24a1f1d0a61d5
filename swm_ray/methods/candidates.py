"""The candidates of `--method auto`: a candidate spec (`METHOD`, `swm/MERGE`, either with `+COMPENSATION`),
the config it runs with, what it computes on a given architecture, and candidates deduplicated by that.

`METHOD+COMP` (`replaceme+lstsq`, `sleb+lstsq:1`) is the plan of `METHOD` fitted with that compensation: the
planner runs once for the plain and the fitted candidate, and the fit is one more finished plan to choose from
(the race itself measures plain plans)."""

from __future__ import annotations

from collections.abc import Collection

from swm_ray.errors import UserError


# -- candidates ----------------------------------------------------------------------------------------------
def split_fit(spec: str) -> tuple[str, str | None]:
    """`PLANNER+COMP` -> (`PLANNER`, `COMP`); a spec without `+` -> (spec, None)."""
    from swm_ray.config import is_fit

    planner, plus, comp = spec.partition("+")
    if not plus:
        return spec, None
    if not is_fit(comp):
        raise UserError(f"auto candidate {spec!r}: after '+' comes a compensation: lstsq, lstsq:RIDGE (RIDGE >= 0) "
                        f"or scale")
    return planner, comp


def parse_candidate(spec: str) -> tuple[str, str | None]:
    """`METHOD`, `swm/MERGE`, either with `+COMP` -> (method, merge or None)."""
    from swm_ray.config import AUTO_METHODS, MERGE_METHODS

    method, _, merge = split_fit(spec)[0].partition("/")
    if method not in AUTO_METHODS:
        raise UserError(f"auto candidate {spec!r}: {method!r} is not a method auto can run; choose among "
                        f"{', '.join(AUTO_METHODS)} (swm may name a merge: swm/keep-first)")
    if merge and (method != "swm" or merge not in MERGE_METHODS):
        raise UserError(f"auto candidate {spec!r}: only swm takes a merge method (swm/{'|'.join(MERGE_METHODS)})")
    return method, merge or None


def candidate_config(cfg, spec: str):
    """The run config of one candidate: `cfg` with its method (and merge) set, ReplaceMe's angles read where
    `select.auto_replaceme_tokens` says; compensation left to auto."""
    method, merge = parse_candidate(spec)
    select = cfg.select.model_copy(update={"method": method, "replaceme_tokens": cfg.select.auto_replaceme_tokens})
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
    baselines fix their own merge; a fit (`+COMP`) is kept."""
    from swm_ray.edits.merge import follows_weight

    method, merge = parse_candidate(spec)
    comp = split_fit(spec)[1]
    fit = f"+{comp}" if comp else ""
    if method != "swm":
        return method + fit
    merge = merge or merge_method
    if merge == "consistent" and layer_names and not any(follows_weight(n, layer_names) for n in layer_names):
        merge = "reference"
    return f"swm/{merge}{fit}"


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


def planners_and_fits(specs, merge_method: str, layer_names: Collection[str], compensations=("none",)) \
        -> tuple[list[str], dict[str, list[str]], dict[str, str]]:
    """(the planners to run, sorted by name; {planner: the compensations its finished plan is scored with, "none"
    first, then by name}; {skipped spec: the spec that computes the same}). A plain candidate is scored with
    every entry of `compensations` (`select.auto_compensate`); `PLANNER+COMP` adds COMP to the list of the
    planner that computes PLANNER (which runs even when it is not listed plain; its plain plan is then no
    contender)."""
    run, same = deduplicated(specs, merge_method, layer_names)
    plain = {effective_spec(s, merge_method, layer_names): s for s in run if split_fit(s)[1] is None}
    fits: dict[str, list[str]] = {}
    for spec in run:
        base, comp = split_fit(spec)
        key = plain.get(effective_spec(base, merge_method, layer_names), base)
        listed = fits.setdefault(key, [])
        listed += [c for c in ([comp] if comp else compensations) if c not in listed]
    fits = {k: sorted(v, key=lambda c: (c != "none", c)) for k, v in sorted(fits.items())}
    return list(fits), fits, same
