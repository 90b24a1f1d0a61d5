"""Width pruning: which attention heads and MLP channels every decoder layer keeps, how those are chosen
(FLAP, first-order Taylor), and the slicing that turns a plan's width entry into tensors.

A plan's `width` entry (plain JSON, see `Plan.width`) lists per decoder layer of the model AFTER the plan's
depth windows are applied (position 0..L'-1, not original indices) the KV groups it keeps and the MLP
channels (intermediate units) it keeps, both sorted. A KV group is one key/value head with every query head
that reads it (query head h reads KV head h // (heads / kv_heads), as transformers' `repeat_kv` does), so
grouped-query attention stays valid whatever is kept. Slicing, per kept layer:

- q_proj rows (weight and bias) of the kept query heads, k_proj/v_proj rows of the kept KV heads, o_proj
  columns of the kept query heads; gate_proj/up_proj rows and down_proj columns of the kept channels;
- o_proj/down_proj biases are not sliced (they live in the hidden dimension); FLAP's bias compensation is
  added to them (`width.<pos>.self_attn.o_proj.bias`, `width.<pos>.mlp.down_proj.bias` in the plan's
  tensors file);
- per-head norms (Qwen3/Gemma3 `q_norm`/`k_norm`) act on head_dim and are unchanged.

Uniform only: every layer keeps the same number of KV groups and channels, because the supported
architectures' configs hold one `num_attention_heads`, `num_key_value_heads` and `intermediate_size` for all
layers; the written config keeps the architecture's own class and `head_dim` explicit, so the folder loads
with plain `AutoModelForCausalLM.from_pretrained`. A plan with per-layer sizes is refused (`WidthEdit`).

Scores (higher = more important; selection keeps the highest of each layer):

- FLAP (An et al., arXiv 2312.11983): for every input feature j of o_proj / down_proj, the sample variance
  of that input over the calibration tokens times ‖W[:, j]‖²; a head sums its head_dim columns and a KV
  group its query heads. The statistics are additive sums over calibration rows (`width_stats_sums`: per
  minibatch, float64), so actors compute them and the driver adds them in minibatch order. FLAP standardises
  each structure's scores over all layers and removes the globally lowest; with the uniform constraint the
  count per layer is fixed, and a standardisation (one affine map per structure type over all layers) does
  not change the order within a layer, so uniform selection is a ranking within each layer
  (`standardise` is kept for reporting). Bias compensation: the mean over calibration tokens of what the
  removed inputs contributed, W[:, removed] @ mean(x[removed]), is added to the projection's bias, so the
  layer's mean output on the calibration tokens is unchanged.
- Taylor (LLM-Pruner style, arXiv 2305.11627): |Σ w·∂L/∂w| over a coupled group (a KV group: its q, k, v
  rows and o columns; a channel: its gate row, up row and down column), L the mean next-token loss of the
  calibration rows. It needs gradients, so the whole model is in memory in one process (`taylor_scores`);
  no recovery training.

Target (`width_counts`): a fraction R of ALL parameters of the source model is removed by width. Attention
and MLP are pruned in the same proportion p = R·P / (prunable parameters), as nearly as whole KV groups
allow (groups removed = round(p·K)); channels make up the rest of the target exactly. A target the MLP
cannot absorb with at least one channel left is refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from swm_ray.errors import UserError

WIDTH_METHODS = ("flap", "taylor")
ATTN = "self_attn"
MLP = "mlp"
O_BIAS = f"{ATTN}.o_proj.bias"
DOWN_BIAS = f"{MLP}.down_proj.bias"
# The config flag that gives a supported architecture's layers biases on o_proj (with q/k/v) and on down_proj
# (with gate/up), read from the transformers 5 modeling code; None: that architecture cannot hold the bias.
BIAS_FLAGS: dict[str, tuple[str | None, str | None]] = {
    "llama": ("attention_bias", "mlp_bias"),
    "mistral": (None, None),
    "qwen2": (None, None),  # q/k/v biases always, o_proj never
    "qwen3": ("attention_bias", None),
    "gemma2": ("attention_bias", None),
    "gemma3": ("attention_bias", None),
    "gemma3_text": ("attention_bias", None),
}


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Widths of one decoder layer: query heads, KV heads, head_dim, MLP channels, hidden size."""

    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    hidden: int

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.heads // self.kv_heads

    @classmethod
    def of(cls, tcfg) -> Geometry:
        heads = int(tcfg.num_attention_heads)
        kv = int(getattr(tcfg, "num_key_value_heads", None) or heads)
        hd = int(getattr(tcfg, "head_dim", None) or tcfg.hidden_size // heads)
        inter = getattr(tcfg, "intermediate_size", None)
        if not isinstance(inter, int):
            raise UserError(f"model type {tcfg.model_type!r}: intermediate_size is {inter!r}, width pruning needs one "
                            f"MLP width for all layers")
        return cls(heads, kv, hd, inter, int(tcfg.hidden_size))


def query_heads(groups: Sequence[int], geo: Geometry) -> list[int]:
    """Query heads of the given KV groups, in order."""
    return [g * geo.group + i for g in groups for i in range(geo.group)]


def head_rows(heads: Sequence[int], head_dim: int) -> torch.Tensor:
    """Row (or column) indices of the given heads in a projection laid out head by head."""
    return torch.tensor([h * head_dim + i for h in heads for i in range(head_dim)], dtype=torch.long)


def removed(kept: Sequence[int], n: int) -> list[int]:
    keep = set(kept)
    return [i for i in range(n) if i not in keep]


def bias_flags(model_type: str) -> tuple[str | None, str | None]:
    return BIAS_FLAGS.get(model_type, (None, None))


# -- the plan's width entry applied to tensors (used by the executor) ------------------------------------------
class WidthEdit:
    """A plan's width entry over the depth-edited stack: new shapes, sliced tensors, added biases, config."""

    def __init__(self, width: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], tcfg, num_layers: int,
                 layer_names: Sequence[str]):
        """`tcfg`: the (depth-edited) text config; `layer_names`: tensor names inside one decoder layer."""
        self.geo = Geometry.of(tcfg)
        self.model_type = tcfg.model_type
        groups, channels = width.get("kv_groups"), width.get("channels")
        if not isinstance(groups, list) or not isinstance(channels, list):
            raise UserError("plan width: expected per-layer lists `kv_groups` and `channels`")
        if len(groups) != num_layers or len(channels) != num_layers:
            raise UserError(f"plan width lists {len(groups)} / {len(channels)} layers but the model has {num_layers} "
                            f"after the plan's windows: width indices refer to the layers after depth merging")
        self.groups = [sorted({int(g) for g in gs}) for gs in groups]
        self.channels = [sorted({int(c) for c in cs}) for cs in channels]
        for what, lists, n in (("kv_groups", self.groups, self.geo.kv_heads),
                               ("channels", self.channels, self.geo.intermediate)):
            for pos, kept in enumerate(lists):
                if not kept or kept[0] < 0 or kept[-1] >= n:
                    raise UserError(f"plan width {what} of layer {pos}: {len(kept)} kept, indices must lie in "
                                    f"0..{n - 1} and at least one must stay")
        sizes = {(len(g), len(c)) for g, c in zip(self.groups, self.channels)}
        if len(sizes) > 1:
            raise UserError(f"plan width keeps different sizes per layer ({sorted(sizes)[:3]} KV groups/channels): "
                            f"the {self.model_type} config holds one num_attention_heads and intermediate_size for "
                            f"all layers, so every layer must keep the same counts")
        self.kept_groups, self.kept_channels = sizes.pop()
        self.tensors = dict(tensors)
        self.bias = dict(width.get("bias") or {})
        names = set(layer_names)
        self.added: dict[str, tuple[int, ...]] = {}  # name inside a layer -> shape of a bias the edit creates
        attn_flag, mlp_flag = bias_flags(self.model_type)
        g = self.geo
        if self.bias.get("attention") and O_BIAS not in names:
            if attn_flag is None:
                raise UserError(f"model type {self.model_type!r} has no bias on o_proj: width bias compensation of "
                                f"attention cannot be stored; set select.width_bias=false")
            self.added.update({f"{ATTN}.{p}_proj.bias": (n,) for p, n in (
                ("q", self.kept_groups * g.group * g.head_dim), ("k", self.kept_groups * g.head_dim),
                ("v", self.kept_groups * g.head_dim), ("o", g.hidden))})
        if self.bias.get("mlp") and DOWN_BIAS not in names:
            if mlp_flag is None:
                raise UserError(f"model type {self.model_type!r} has no bias on down_proj: width bias compensation "
                                f"of the MLP cannot be stored; set select.width_bias=false")
            self.added.update({f"{MLP}.gate_proj.bias": (self.kept_channels,),
                               f"{MLP}.up_proj.bias": (self.kept_channels,), DOWN_BIAS: (g.hidden,)})
        self._index: dict[int, dict[str, torch.Tensor]] = {}

    def indices(self, pos: int) -> dict[str, torch.Tensor]:
        """Kept row/column indices of layer `pos`: q (query-head rows), kv (KV-head rows), ch (channels)."""
        if pos not in self._index:
            q = head_rows(query_heads(self.groups[pos], self.geo), self.geo.head_dim)
            kv = head_rows(self.groups[pos], self.geo.head_dim)
            self._index[pos] = {"q": q, "kv": kv, "ch": torch.tensor(self.channels[pos], dtype=torch.long)}
        return self._index[pos]

    @staticmethod
    def _rule(rest: str) -> tuple[str, int] | None:
        """(index kind, dim) a tensor is sliced along, None when width leaves it as it is."""
        for part, kind, dim_w in (("q_proj", "q", 0), ("k_proj", "kv", 0), ("v_proj", "kv", 0), ("o_proj", "q", 1),
                                  ("gate_proj", "ch", 0), ("up_proj", "ch", 0), ("down_proj", "ch", 1)):
            if f".{part}." in f".{rest}":
                if rest.endswith(".bias"):
                    return None if dim_w == 1 else (kind, 0)
                return (kind, dim_w) if rest.endswith(".weight") else None
        return None

    def shape(self, pos: int, rest: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        rule = self._rule(rest)
        if rule is None:
            return shape
        kind, dim = rule
        out = list(shape)
        out[dim] = len(self.indices(pos)[kind])
        return tuple(out)

    def touches(self, rest: str) -> bool:
        return self._rule(rest) is not None or rest in (O_BIAS, DOWN_BIAS)

    def delta(self, pos: int, rest: str) -> torch.Tensor | None:
        return self.tensors.get(f"width.{pos}.{rest}")

    def slice(self, pos: int, rest: str, t: torch.Tensor) -> torch.Tensor:
        """Layer `pos`'s tensor `rest` (already depth-merged) after width pruning."""
        rule = self._rule(rest)
        if rule is not None:
            kind, dim = rule
            t = t.index_select(dim, self.indices(pos)[kind]).contiguous()
        d = self.delta(pos, rest)
        if d is not None:
            t = (t.to(torch.float32) + d.to(torch.float32)).to(t.dtype)
        return t

    def new_tensor(self, pos: int, rest: str, dtype: torch.dtype) -> torch.Tensor:
        """A bias the edit creates: zeros, plus the compensation where the plan has one."""
        t = torch.zeros(self.added[rest], dtype=torch.float32)
        d = self.delta(pos, rest)
        return (t + d.to(torch.float32) if d is not None else t).to(dtype)

    def edit_config(self, tcfg) -> None:
        """The architecture's own config with the kept widths (and the bias flags the compensation needs)."""
        tcfg.num_key_value_heads = self.kept_groups
        tcfg.num_attention_heads = self.kept_groups * self.geo.group
        tcfg.head_dim = self.geo.head_dim  # explicit, so that it is not recomputed from hidden_size / heads
        tcfg.intermediate_size = self.kept_channels
        attn_flag, mlp_flag = bias_flags(self.model_type)
        if any(n.startswith(f"{ATTN}.") for n in self.added) and attn_flag:
            setattr(tcfg, attn_flag, True)
        if any(n.startswith(f"{MLP}.") for n in self.added) and mlp_flag:
            setattr(tcfg, mlp_flag, True)


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


def keep_top(scores: np.ndarray, k: int) -> list[list[int]]:
    """Per row of (L, N) scores the k highest entries' indices, sorted (ties: the lower index stays)."""
    out = []
    for row in np.asarray(scores, dtype=np.float64):
        order = sorted(range(len(row)), key=lambda j: (-row[j], j))
        out.append(sorted(order[:k]))
    return out


def standardise(scores: np.ndarray) -> np.ndarray:
    """FLAP's standardisation of one structure type over all layers: (s − mean) / std of every entry."""
    s = np.asarray(scores, dtype=np.float64)
    std = s.std()
    return (s - s.mean()) / (std if std > 0 else 1.0)


# -- FLAP --------------------------------------------------------------------------------------------------------
@torch.inference_mode()
def width_stats_sums(stack, input_ids: np.ndarray, batches: Sequence[tuple[int, int]],
                     windows: Sequence[Sequence[int]] = (), merge: str = "reference",
                     attention: str = "global") -> list[dict[str, np.ndarray]]:
    """Per minibatch: float64 sums and sums of squares over its tokens of every input feature of o_proj
    (`attn_sum`, `attn_sq`: (L', heads·head_dim)) and of down_proj (`mlp_sum`, `mlp_sq`: (L', intermediate)),
    and the token count (`tokens`), on the stack with `windows` merged (L' layers). Layer-major, like
    `baselines.block_influence_sums`: every layer is built once. Additive: `add_width_sums` adds minibatches."""
    from swm_ray.edits.merge import new_layer_sources

    sources = new_layer_sources(stack.num_layers, windows, stack.layer_types, attention, merge)
    pros = [stack.prologue(torch.tensor(np.asarray(input_ids[a:b]))) for a, b in batches]
    hidden = [p.hidden for p in pros]
    out: list[dict[str, Any]] = [{"tokens": int(p.hidden.shape[0] * p.hidden.shape[1])} for p in pros]
    current = [0]

    def recorder(key: str, pos: int):
        def hook(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double().cpu()
            rec = out[current[0]]
            if f"{key}_sum" not in rec:
                rec[f"{key}_sum"] = np.zeros((len(sources), x.shape[1]))
                rec[f"{key}_sq"] = np.zeros((len(sources), x.shape[1]))
            rec[f"{key}_sum"][pos] += x.sum(0).numpy()
            rec[f"{key}_sq"][pos] += (x * x).sum(0).numpy()
        return hook

    for pos, (low, high, anchor) in enumerate(sources):
        with stack.group(low, high, merge, attention) as layer:
            handles = [getattr(layer, ATTN).o_proj.register_forward_pre_hook(recorder("attn", pos)),
                       getattr(layer, MLP).down_proj.register_forward_pre_hook(recorder("mlp", pos))]
            try:
                for k, p in enumerate(pros):
                    current[0] = k
                    hidden[k] = stack.run(layer, hidden[k], p.kwargs[anchor])
            finally:
                for h in handles:
                    h.remove()
    return out


def add_width_sums(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Minibatch sums added in the order given (minibatch order: the result does not depend on the actors)."""
    total: dict[str, Any] = {}
    for part in parts:
        for k, v in part.items():
            total[k] = total[k] + v if k in total else (np.array(v, dtype=np.float64) if k != "tokens" else int(v))
    return total


def _moments(total: Mapping[str, Any], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(mean, sample variance) of every input feature over the calibration tokens."""
    n = total["tokens"]
    s, sq = total[f"{key}_sum"], total[f"{key}_sq"]
    mean = s / n
    var = np.maximum((sq - s * s / n) / max(n - 1, 1), 0.0)
    return mean, var


@dataclasses.dataclass
class WidthChoice:
    """Per layer: KV groups and channels kept, their scores, and FLAP's bias deltas (name -> float32 tensor)."""

    kv_groups: list[list[int]]
    channels: list[list[int]]
    group_scores: np.ndarray
    channel_scores: np.ndarray
    biases: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)


def flap_scores(total: Mapping[str, Any], o_weights: Sequence[torch.Tensor], down_weights: Sequence[torch.Tensor],
                geo: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """((L', kv_heads) KV-group scores, (L', intermediate) channel scores): FLAP's fluctuation metric."""
    _, var_a = _moments(total, "attn")
    _, var_m = _moments(total, "mlp")
    col_a = np.stack([w.double().pow(2).sum(0).numpy() for w in o_weights])  # ‖W[:, j]‖²
    col_m = np.stack([w.double().pow(2).sum(0).numpy() for w in down_weights])
    cols = var_a * col_a  # (L', heads·head_dim)
    heads = cols.reshape(len(o_weights), geo.heads, geo.head_dim).sum(-1)
    groups = heads.reshape(len(o_weights), geo.kv_heads, geo.group).sum(-1)
    return groups, var_m * col_m


def flap_biases(total: Mapping[str, Any], o_weights, down_weights, choice: WidthChoice, geo: Geometry,
                attention: bool, mlp: bool) -> dict[str, torch.Tensor]:
    """FLAP's bias compensation: per layer W[:, removed] @ mean(x[removed]) for o_proj and down_proj."""
    mean_a, _ = _moments(total, "attn")
    mean_m, _ = _moments(total, "mlp")
    out: dict[str, torch.Tensor] = {}
    for pos in range(len(o_weights)):
        if attention:
            gone = head_rows(query_heads(removed(choice.kv_groups[pos], geo.kv_heads), geo), geo.head_dim)
            w = o_weights[pos].double()[:, gone]
            out[f"width.{pos}.{O_BIAS}"] = (w @ torch.from_numpy(mean_a[pos][gone.numpy()])).float()
        if mlp:
            gone = torch.tensor(removed(choice.channels[pos], geo.intermediate), dtype=torch.long)
            w = down_weights[pos].double()[:, gone]
            out[f"width.{pos}.{DOWN_BIAS}"] = (w @ torch.from_numpy(mean_m[pos][gone.numpy()])).float()
    return out


# -- Taylor ------------------------------------------------------------------------------------------------------
def taylor_scores(model, input_ids: np.ndarray, batches: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """((L, kv_heads), (L, intermediate)) first-order importance |Σ w·∂L/∂w| of every KV group (its q, k, v
    rows, o columns and q/k/v bias entries) and every MLP channel (gate and up rows with their bias entries,
    down column), L = mean next-token cross-entropy over all calibration rows (gradients accumulated over the
    minibatches). The model (in memory, its gradients beside it) is left with no gradients."""
    import torch.nn.functional as F

    from swm_ray.io.models import decoder_layers, text_config

    geo = Geometry.of(text_config(model))
    params = list(model.parameters())
    was = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    dev = next(model.parameters()).device
    targets = sum((b - a) * (input_ids.shape[1] - 1) for a, b in batches)
    try:
        with torch.enable_grad():
            for a, b in batches:
                ids = torch.tensor(np.asarray(input_ids[a:b]), device=dev)
                logits = model(input_ids=ids, use_cache=False).logits.float()
                loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                       reduction="sum") / targets
                loss.backward()
        group_s, chan_s = [], []
        for layer in decoder_layers(model):
            attn, mlp = getattr(layer, ATTN), getattr(layer, MLP)

            def wg(lin, bias: bool = False):
                p = lin.bias if bias else lin.weight
                return (p.detach().double() * p.grad.double()) if p is not None and p.grad is not None else None

            parts = {}
            for name, heads, dim in (("q", geo.heads, 1), ("k", geo.kv_heads, 1), ("v", geo.kv_heads, 1),
                                     ("o", geo.heads, 0)):
                lin = getattr(attn, f"{name}_proj")
                t = wg(lin).sum(dim).reshape(heads, geo.head_dim).sum(1)
                b = wg(lin, bias=True) if name != "o" else None  # o_proj's bias is not part of any head
                parts[name] = t + b.reshape(heads, geo.head_dim).sum(1) if b is not None else t
            q, k, v, o = parts["q"], parts["k"], parts["v"], parts["o"]
            per_group = (q + o).reshape(geo.kv_heads, geo.group).sum(1) + k + v
            group_s.append(per_group.abs().numpy())
            ch = wg(mlp.gate_proj).sum(1) + wg(mlp.up_proj).sum(1) + wg(mlp.down_proj).sum(0)
            for lin in (mlp.gate_proj, mlp.up_proj):
                b = wg(lin, bias=True)
                if b is not None:
                    ch = ch + b
            chan_s.append(ch.abs().numpy())
    finally:
        for p, w in zip(params, was):
            p.grad = None
            p.requires_grad_(w)
    return np.stack(group_s), np.stack(chan_s)


def choose(group_scores: np.ndarray, channel_scores: np.ndarray, kept_groups: int, kept_channels: int) -> WidthChoice:
    """Uniform selection: every layer keeps its `kept_groups` / `kept_channels` highest-scoring structures."""
    return WidthChoice(keep_top(group_scores, kept_groups), keep_top(channel_scores, kept_channels),
                       np.asarray(group_scores), np.asarray(channel_scores))


def width_record(method: str, choice: WidthChoice, geo: Geometry, bias: Mapping[str, bool], **extra) -> dict:
    """The plan's `width` entry (plain JSON)."""
    kg, kc = len(choice.kv_groups[0]), len(choice.channels[0])
    return {"method": method, "kv_groups": choice.kv_groups, "channels": choice.channels,
            "heads_before": geo.heads, "kv_heads_before": geo.kv_heads, "head_dim": geo.head_dim,
            "intermediate_before": geo.intermediate, "heads_after": kg * geo.group, "kv_heads_after": kg,
            "intermediate_after": kc, "bias": {"attention": bool(bias.get("attention")), "mlp": bool(bias.get("mlp"))},
            "layers": "positions after the plan's depth windows", **extra}


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
    if s.then_width is not None and (cfg.merge.compensate not in (None, "none") or (
            s.method == "auto" and any(c != "none" for c in s.auto_compensate))):
        raise UserError("select.then_width after a compensated depth plan is not supported: set merge.compensate "
                        "(and select.auto_compensate) to none, or drop then_width")


def check_width_target(cfg, config, layer_names: Sequence[str], method: str, fraction: float, num_layers: int,
                       params_before: int, what: str, depth: str = "") -> tuple[int, int]:
    """Before any model loads, from the source's config and one decoder layer's tensor names: the (KV groups,
    channels) per layer that `plan_width` will keep to remove `fraction` of `params_before` from `num_layers`
    layers (`depth`: how those remain after the depth plan, for the message), or a one-line error naming the
    largest fraction width can remove there."""
    from swm_ray.io.models import text_config_of

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


def plan_width(cfg, plan, path: str, calib, fraction: float, method: str,
               stats: Callable[[dict], Mapping[str, Any]], device: str = "cpu") -> dict:
    """Give `plan` (its depth windows already chosen) a width entry that removes `fraction` of the SOURCE
    model's parameters more, chosen by `method` on the merged model, and FLAP's biases in `plan.tensors`.

    `stats(request)`: FLAP's sums over every calibration row for {windows, merge, attention} (from actors, or
    from `width_stats_sums` in this process). Taylor materialises the merged model here, on `device`, in float32:
    gradients need the whole model in one process. Returns the width entry."""
    from swm_ray.io.checkpoint import Checkpoint
    from swm_ray.io.models import load_config, text_config_of
    from swm_ray.plan.executor import PlanView, materialize

    if plan.compensated:
        raise UserError("width pruning after a compensated depth plan is not supported: set merge.compensate to none")
    m = cfg.model
    config = load_config(path, m.trust_remote_code)
    ckpt = Checkpoint(path, m.allow_pickle)
    view = PlanView(ckpt, config, plan.windows, plan.merge, plan.attention)
    tcfg = text_config_of(view.config)
    geo = Geometry.of(tcfg)
    names = list(view.layer_keys(0))
    bias = decide_bias(cfg.select.width_bias, method, tcfg.model_type, names)
    if plan.params_before is None:
        plan.params_before = ckpt.param_count(bool(getattr(tcfg, "tie_word_embeddings", False)))
    what = "--ratio" if cfg.select.method in WIDTH_METHODS else "select.then_width"
    kg, kc = width_counts(geo, view.num_layers, fraction * plan.params_before,
                          qkv_bias=f"{ATTN}.q_proj.bias" in names or bias["attention"],
                          mlp_bias=f"{MLP}.gate_proj.bias" in names or bias["mlp"], what=what)
    prefix = view.layer_prefix
    if method == "flap":
        total = stats({"windows": [list(w) for w in plan.windows], "merge": plan.merge, "attention": plan.attention})
        o_w = [view.read(f"{prefix}.{pos}.{ATTN}.o_proj.weight", torch.float32) for pos in range(view.num_layers)]
        d_w = [view.read(f"{prefix}.{pos}.{MLP}.down_proj.weight", torch.float32) for pos in range(view.num_layers)]
        choice = choose(*flap_scores(total, o_w, d_w, geo), kg, kc)
        choice.biases = flap_biases(total, o_w, d_w, choice, geo, bias["attention"], bias["mlp"])
        tokens = int(total["tokens"])
    else:
        model = materialize(view, view.config, device, torch.float32)
        choice = choose(*taylor_scores(model, calib.input_ids, calib.batches), kg, kc)
        del model
        tokens = int(calib.input_ids.size)
    plan.width = width_record(method, choice, geo, bias, fraction=fraction, calibration_tokens=tokens,
                              rule="uniform: every layer keeps its highest-scoring KV groups and channels")
    plan.version = max(plan.version, 4)
    plan.tensors.update(choice.biases)
    return plan.width


def local_stats(stack, calib) -> Callable[[dict], Mapping[str, Any]]:
    """FLAP's sums computed in this process on a layer stack (in memory or streaming)."""
    def stats(request: dict) -> Mapping[str, Any]:
        return add_width_sums(width_stats_sums(stack, calib.input_ids, calib.batches, request["windows"],
                                               request["merge"], request["attention"]))
    return stats


def width_only_plan(cfg, path: str, n_layers: int, calib):
    """The plan of a width-only run (`select.method` flap or taylor): no windows, the source's size, the
    calibration it used; `plan_width` then gives it its width entry."""
    from swm_ray.io.checkpoint import Checkpoint
    from swm_ray.io.models import load_config, text_config_of
    from swm_ray.plan.plan import Plan

    s, m = cfg.select, cfg.model
    tied = bool(getattr(text_config_of(load_config(path, m.trust_remote_code)), "tie_word_embeddings", False))
    return Plan(windows=[], num_layers_before=n_layers, merge="keep-first", source_model=m.source,
                source_revision=m.revision, method=s.method, attention=cfg.merge.attention, search="width",
                params_before=Checkpoint(path, m.allow_pickle).param_count(tied),
                extra={"calibration": {"source": cfg.data.source, "samples": int(calib.input_ids.shape[0]),
                                       "seq_len": int(calib.input_ids.shape[1]),
                                       "bos_prepended": calib.bos_prepended}})


def stack_stats(cfg, path: str, calib, device: str | None = None) -> Callable[[dict], Mapping[str, Any]]:
    """FLAP's sums in this process on a layer stack opened for the pass (in memory or streaming, as it fits)."""
    def stats(request: dict) -> Mapping[str, Any]:
        from swm_ray.compute.stack import StackSpec, open_stack

        m = cfg.model
        stack = open_stack(StackSpec(path, device=device or m.device, dtype=m.dtype, stream=m.stream,
                                     max_memory=m.max_memory, allow_pickle=m.allow_pickle,
                                     trust_remote_code=m.trust_remote_code),
                           rows=int(calib.input_ids.shape[0]), seq_len=int(calib.input_ids.shape[1]))
        return local_stats(stack, calib)(request)
    return stats
