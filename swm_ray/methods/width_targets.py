"""Width targets: the KV groups and channels every layer keeps for a fraction of all parameters removed
(`width_counts`), what width can reach, and the checks of width settings and targets."""

from __future__ import annotations

from collections.abc import Sequence

from swm_ray.edits.width import ATTN, DOWN_BIAS, MLP, O_BIAS, Geometry, bias_flags
from swm_ray.errors import UserError

WIDTH_METHODS = ("flap", "taylor")


# -- the target --------------------------------------------------------------------------------------------------
def group_params(geo: Geometry, qkv_bias: bool = False) -> int:
    """Parameters of one KV group in one layer: q, k, v rows and o columns (+ q/k/v bias entries)."""
    return geo.hidden * geo.head_dim * (2 * geo.group + 2) + (geo.head_dim * (geo.group + 2) if qkv_bias else 0)


def channel_params(geo: Geometry, mlp_bias: bool = False) -> int:
    """Parameters of one MLP channel in one layer: gate row, up row, down column (+ gate/up bias entries)."""
    return 3 * geo.hidden + (2 if mlp_bias else 0)


def width_counts(geo: Geometry, num_layers: int, remove_params: float, qkv_bias: bool = False,
                 mlp_bias: bool = False, what: str = "--ratio") -> tuple[int, int]:
    """(KV groups kept, channels kept) per layer that remove about `remove_params` parameters (see the module
    docstring for the rule)."""
    per_group, per_channel = group_params(geo, qkv_bias), channel_params(geo, mlp_bias)
    prunable = num_layers * (geo.kv_heads * per_group + geo.intermediate * per_channel)
    p = remove_params / prunable
    g_rm = min(max(round(p * geo.kv_heads), 0), geo.kv_heads - 1)
    while True:
        c_rm = round((remove_params - num_layers * g_rm * per_group) / (num_layers * per_channel))
        if c_rm >= 0 or g_rm == 0:
            break
        g_rm -= 1  # whole groups overshoot the target: one fewer group, channels make up the rest
    c_rm = max(c_rm, 0)
    if c_rm > geo.intermediate - 1:
        raise UserError(f"{what}: removing {remove_params:,.0f} parameters by width leaves no MLP channel "
                        f"({geo.kv_heads - g_rm} of {geo.kv_heads} KV groups kept); ask for a smaller ratio")
    return geo.kv_heads - g_rm, geo.intermediate - c_rm


def width_reach(geo: Geometry, num_layers: int, qkv_bias: bool = False, mlp_bias: bool = False) -> int:
    """The most parameters width pruning can remove from `num_layers` layers: all but one KV group and one MLP
    channel of every layer (`width_counts` refuses a target beyond this, and may refuse one just below it
    where whole KV groups round away from the target)."""
    return num_layers * ((geo.kv_heads - 1) * group_params(geo, qkv_bias)
                         + (geo.intermediate - 1) * channel_params(geo, mlp_bias))


# -- the stage: a plan gets its width entry ------------------------------------------------------------------------
def check_width_settings(cfg, method: str) -> None:
    """One-line errors for width settings that cannot work together (checked before any model loads)."""
    s = cfg.select
    if method == "taylor" and s.width_bias:
        raise UserError("select.width_bias=true: bias compensation is FLAP's, taylor has none; use flap or drop "
                        "width_bias")
    if s.method in WIDTH_METHODS:
        if s.ratio is None:
            raise UserError(f"--method {s.method} prunes width to a parameter ratio: give --ratio R (not --layers "
                            f"or --threshold)")
        if s.then_width is not None:
            raise UserError(f"--method {s.method} already prunes width: select.then_width combines width with a "
                            f"depth method (swm, shortgpt, ...)")
    if s.then_width is not None and cfg.merge.compensate not in (None, "none"):  # auto leaves its fits out
        raise UserError("select.then_width after a compensated depth plan is not supported: set merge.compensate "
                        "to none, or drop then_width")


def check_width_target(cfg, config, layer_names: Sequence[str], method: str, fraction: float, num_layers: int,
                       params_before: int, what: str, depth: str = "") -> tuple[int, int]:
    """Before any model loads, from the source's config and one decoder layer's tensor names: the (KV groups,
    channels) per layer that `plan_width` will keep to remove `fraction` of `params_before` from `num_layers`
    layers (`depth`: how those remain after the depth plan, for the message), or a one-line error naming the
    largest fraction width can remove there."""
    from swm_ray.io.anatomy import text_config_of

    tcfg = text_config_of(config)
    geo = Geometry.of(tcfg)
    bias = decide_bias(cfg.select.width_bias, method, tcfg.model_type, layer_names)
    qkv = f"{ATTN}.q_proj.bias" in layer_names or bias["attention"]
    mlp = f"{MLP}.gate_proj.bias" in layer_names or bias["mlp"]
    try:
        return width_counts(geo, num_layers, fraction * params_before, qkv_bias=qkv, mlp_bias=mlp, what=what)
    except UserError:
        most = width_reach(geo, num_layers, qkv, mlp) / params_before
        raise UserError(f"{what} {fraction}: width pruning of the {num_layers} decoder layers{depth} can remove at "
                        f"most {most:.3f} of the parameters (each keeps one KV group and one MLP channel); ask for "
                        f"less") from None


def decide_bias(setting: bool | None, method: str, model_type: str, names: Sequence[str]) -> dict[str, bool]:
    """Which of attention / MLP get FLAP's bias compensation: `setting` null = where the architecture can hold
    the bias (a bias already there, or a config flag that adds it), true = both or a one-line error."""
    if method != "flap" or setting is False:
        return {"attention": False, "mlp": False}
    attn_flag, mlp_flag = bias_flags(model_type)
    can = {"attention": attn_flag is not None or O_BIAS in names, "mlp": mlp_flag is not None or DOWN_BIAS in names}
    if setting and not all(can.values()):
        where = " and ".join(f"{'o_proj' if k == 'attention' else 'down_proj'}" for k, v in can.items() if not v)
        raise UserError(f"select.width_bias=true: model type {model_type!r} has no bias on {where} and no config flag "
                        f"that adds one, so the compensation cannot be stored; leave width_bias unset (compensate "
                        f"where possible) or set it to false")
    return can
