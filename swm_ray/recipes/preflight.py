"""Targets checked before anything loads: whether the layers, ratio and width a run asks for can be reached on
its model, from config.json and the safetensors headers alone (no weights, no tokenizer, no actors).

`check_targets(cfg)` is the one check of `compress` (the Ray recipe and `pipeline.compress_here`) and of the
width recipe; `check_grid_targets(cfg)` runs it for every model × target of a grid before Tune starts. A
target refused here would otherwise be refused (or silently missed) only after calibration, the actor pool
and the depth search. What is checked:

- `--layers` against the depth and `--ratio` through `selection.target_layers`;
- the most layers the method can remove with its rules and the protected layers (`depth_reach`): SWM's
  windows never hold a protected layer (the authors' top-down loop merges within layers 1..L-2 only), SLEB
  and ShortGPT never remove layer 0 or a protected layer, ReplaceMe removes one block of consecutive layers
  above layer 0, LaCo's windows of `laco_layers` start `laco_interval` apart (an upper bound: it may miss by
  a layer where the top windows are cut, never refuses a reachable target), Shortened-LLM keeps blocks 0-3
  and the last two (`planners.check_method_count`);
- `--method auto`: refused only when no candidate can reach the target (the others are reported later);
- width (`--method flap|taylor --ratio`, `select.then_width` after the depth plan): what whole KV groups and
  MLP channels of the layers left can give (`width_targets.check_width_target`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from swm_ray.config import WIDTH_METHODS
from swm_ray.errors import UserError


@dataclass(frozen=True)
class ModelFacts:
    """What the checks read of a model: its config and its checkpoint's headers."""

    path: str
    config: Any  # the transformers config of config.json
    n_layers: int
    params: int  # all parameters (tied embeddings counted once)
    per_layer: int  # parameters of decoder layer 0
    layer_names: tuple[str, ...]  # tensor names inside one decoder layer


def model_facts(cfg) -> ModelFacts:
    """Resolve `cfg.model` (as a run does) and read its config.json and safetensors headers."""
    from swm_ray.edits.architectures import check_supported_config
    from swm_ray.io.anatomy import text_config_of
    from swm_ray.io.checkpoint import Checkpoint
    from swm_ray.io.models import load_config, resolve_model_path

    m = cfg.model
    path = resolve_model_path(m.source, m.revision, allow_pickle=m.allow_pickle, trust_remote_code=m.trust_remote_code)
    config = load_config(path, m.trust_remote_code)
    if getattr(config, "is_encoder_decoder", False):
        raise UserError(f"model {path}: {config.model_type} is an encoder-decoder; swm-ray needs a decoder-only LM")
    check_supported_config(config)
    ckpt = Checkpoint(path, m.allow_pickle)
    tcfg = text_config_of(config)
    tied = bool(getattr(tcfg, "tie_word_embeddings", False))
    n_layers = int(getattr(tcfg, "num_hidden_layers", 0) or ckpt.num_layers)
    return ModelFacts(path, config, n_layers, ckpt.param_count(tied), ckpt.layer_params(0),
                      tuple(ckpt.layer_keys(0)))


def _merge_reach(low: int, high: int, protected: set[int]) -> int:
    """Layers removed at most by merging runs of consecutive layers within low..high that hold no protected layer
    (a run of k layers becomes one)."""
    total = run = 0
    for i in range(low, high + 1):
        if i in protected:
            total, run = total + max(run - 1, 0), 0
        else:
            run += 1
    return total + max(run - 1, 0)


def _kept(layers: set[int]) -> str:
    return f" and protected layers {sorted(layers)}" if layers else ""


def _across(layers: set[int]) -> str:
    return f", never across protected layers {sorted(layers)}" if layers else ""


def depth_reach(select, n_layers: int) -> tuple[int, str]:
    """(the most layers `select.method` can remove from `n_layers`, the rule that limits it) for the depth
    planners; shortened-ppl is `planners.check_method_count`'s."""
    from swm_ray.methods.selection import protected_set

    s, L = select, n_layers
    every = {i for i in protected_set(s, L) if 0 <= i < L}  # protected_layers, the last layer with protect_last
    own = {i for i in s.protected_layers if 0 <= i < L}
    if s.method == "swm":
        if s.search == "top-down" and s.paper_loop and s.criterion != "cka":
            return (_merge_reach(1, L - 2, own),
                    f"the authors' top-down loop (select.paper_loop) merges within layers 1..{L - 2} only"
                    f"{_across(own)}")
        if s.search == "top-down":
            top = L - 2 if s.protect_last else L - 1
            return _merge_reach(0, top, own), f"top-down merges within layers 0..{top}{_across(own)}"
        return _merge_reach(0, L - 1, every), f"no window holds one of the protected layers {sorted(every)}"
    if s.method == "sleb":
        return _merge_reach(0, L - 1, own), f"layer 0{_kept(own)} stay"
    if s.method == "shortgpt":
        return L - 1 - len(every - {0}), f"layer 0{_kept(every - {0})} stay"
    if s.method == "replaceme":
        best = run = 0
        for i in range(1, L):
            run = 0 if i in every else run + 1
            best = max(best, run)
        return best, f"one block of consecutive layers; layer 0{_kept(every)} stay"
    if s.method == "laco":
        c, step = s.laco_layers, s.laco_interval
        windows = (L - 1 - c) // step + 1 if L - 1 >= c else 0
        most = min(windows * (c - 1), L - 1 - len(every - {0}))
        return most, (f"{windows} window(s) of select.laco_layers={c} layers at most, their bases "
                      f"select.laco_interval={step} apart; layer 0{_kept(every - {0})} stay")
    return n_layers - 2, ""


def _check_depth(cfg, facts: ModelFacts, n_remove: int | None) -> None:
    """The target of `cfg.select.method` (a depth planner) within what it can remove."""
    from swm_ray.methods.planners import check_method_count

    s, L = cfg.select, facts.n_layers
    check_method_count(cfg, L, n_remove)
    if s.method == "shortened-ppl":
        return
    most, rule = depth_reach(s, L)
    need = 1 if n_remove is None else n_remove
    if need <= most:
        return
    if n_remove is None:
        raise UserError(f"--method {s.method} can remove no layer of the {L} ({rule}): protect fewer layers "
                        f"(select.protected_layers, select.protect_last)")
    asked = f"--layers {s.layers}" if s.layers is not None else f"--ratio {s.ratio} (= {n_remove} layers)"
    raise UserError(f"--method {s.method} can remove at most {most} of the {L} layers ({rule}), not {asked}: "
                    f"ask for fewer layers or protect fewer")


def _with_method(cfg, spec: str):
    """`cfg` with an auto candidate's method (its merge method does not change what it can reach)."""
    from swm_ray.methods.candidates import parse_candidate

    return cfg.model_copy(update={"select": cfg.select.model_copy(update={"method": parse_candidate(spec)[0]})})


def check_settings(cfg) -> None:
    """What a compress run refuses from its settings alone, before any file is read (compress, the in-process
    pipeline, and every zoo entry when the zoo file is read): width settings, a missing target, a threshold out
    of range for the criterion, a target the method cannot take."""
    from swm_ray.methods.planners import check_method_target
    from swm_ray.methods.selection import check_threshold
    from swm_ray.methods.width_targets import check_width_settings

    s = cfg.select
    if s.method in WIDTH_METHODS or s.then_width is not None:
        check_width_settings(cfg, s.method if s.method in WIDTH_METHODS else s.width_method)
    if s.method in WIDTH_METHODS:
        return
    if s.threshold is None and s.ratio is None and s.layers is None:
        raise UserError("give a target: --threshold T, --ratio R or --layers N (select.threshold, ratio or layers)")
    if s.threshold is not None and s.method == "swm" and not s.compensate_aware:
        check_threshold(s.criterion, s.threshold)
    check_method_target(cfg)


def check_targets(cfg, facts: ModelFacts | None = None) -> int | None:
    """Refuse, with one line, a target the run of `cfg` cannot reach on its model, before anything loads.

    Reads `facts` (default: `model_facts(cfg)`) only. Returns the layers the depth plan removes (None for a
    threshold or a width-only run). A depth run without a target passes (its recipe asks for one)."""
    from swm_ray.methods.selection import target_layers

    s = cfg.select
    if s.method in WIDTH_METHODS:
        from swm_ray.methods.width_targets import check_width_settings, check_width_target

        check_width_settings(cfg, s.method)
        facts = facts or model_facts(cfg)
        check_width_target(cfg, facts.config, facts.layer_names, s.method, s.ratio, facts.n_layers, facts.params,
                           "--ratio")
        return None
    if s.threshold is None and s.ratio is None and s.layers is None:
        return None
    facts = facts or model_facts(cfg)
    L = facts.n_layers
    beyond = [i for i in s.protected_layers if i >= L]
    if beyond:
        raise UserError(f"select.protected_layers {beyond}: the model has {L} decoder layers (0-{L - 1})")
    n_remove = target_layers(cfg, facts.params, facts.per_layer, L)
    if s.method == "auto":
        errors = []
        for spec in s.auto_candidates:
            try:
                _check_depth(_with_method(cfg, spec), facts, n_remove)
            except UserError as e:
                errors.append(f"{spec}: {e}")
        if len(errors) == len(s.auto_candidates):
            raise UserError(f"--method auto: no candidate of select.auto_candidates can reach the target; the first "
                            f"said: {errors[0]}")
    else:
        _check_depth(cfg, facts, n_remove)
    if s.then_width is not None:
        from swm_ray.methods.width_targets import check_width_settings

        check_width_settings(cfg, s.width_method)
        _check_then_width(cfg, facts, n_remove, s.then_width)
    return n_remove


def _check_then_width(cfg, facts: ModelFacts, n_remove: int | None, fraction: float) -> None:
    """`fraction` more of the parameters removed by `select.width_method` from the layers the depth plan leaves."""
    from swm_ray.methods.width_targets import check_width_target

    L = facts.n_layers
    removed = 1 if n_remove is None else n_remove  # a threshold run merges at least one window
    depth = f" left after removing {removed} of {L}" if n_remove is not None else \
        f" left after the threshold's windows (at most {L - 1})"
    check_width_target(cfg, facts.config, facts.layer_names, cfg.select.width_method, fraction, L - removed,
                       facts.params, "--then-width", depth)


def _grid_select(cfg, spec: dict, kind: str, target: float):
    """A grid trial's config at one target (as `trial.run_trial` builds it), without then_width."""
    upd: dict[str, Any] = {"threshold": None, "ratio": None, "layers": None, "then_width": None,
                           "method": spec["method"]}
    upd[{"layers": "layers", "ratios": "ratio", "thresholds": "threshold"}[kind]] = target
    if spec["method"] == "swm":
        upd.update(criterion=spec["criterion"], search=spec["search"])
    merge = cfg.merge.model_copy(update={"method": spec.get("merge") or cfg.merge.method})
    return cfg.model_copy(update={"select": cfg.select.model_copy(update=upd), "merge": merge})


def check_grid_targets(cfg) -> None:
    """`check_targets` for every model × target of a grid, before Tune starts: a target no trial of the grid can
    reach on a model, or a `grid.then_width` fraction no depth row can reach, is refused; a trial that cannot
    reach a target another can still gives its skipped row."""
    from swm_ray.recipes.specs import trial_specs

    g = cfg.grid
    kind = g.target_kind()
    if kind is None:
        return
    by_model: dict[str, list[dict]] = {}
    for sp in trial_specs(cfg):
        if sp["method"] != "original":
            by_model.setdefault(sp["model"], []).append(sp)
    for model, specs in by_model.items():
        mcfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"source": model})})
        facts = model_facts(mcfg)
        depth_rows = []  # (trial config, layers removed) of every depth trial that reaches its target
        for target in g.targets():
            errors = []
            for sp in specs:
                tcfg = _grid_select(mcfg, sp, kind, target)
                try:
                    n_remove = check_targets(tcfg, facts)
                except UserError as e:
                    errors.append(str(e))
                    continue
                if sp["method"] not in WIDTH_METHODS:
                    depth_rows.append((tcfg, n_remove))
            if len(errors) == len(specs):
                raise UserError(f"grid --{kind} {target} on {model}: no trial of the grid can reach it; the first "
                                f"said: {errors[0]}")
        for fraction in g.then_width:
            errors = []
            for tcfg, n_remove in depth_rows:
                try:
                    _check_then_width(tcfg, facts, n_remove, fraction)
                    break
                except UserError as e:
                    errors.append(str(e))
            else:
                if errors:
                    raise UserError(f"grid --then-width {fraction} on {model}: no depth row of the grid can reach "
                                    f"it; the first said: {errors[0]}")
