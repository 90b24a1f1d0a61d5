"""Width slicing: the heads and channels a decoder layer keeps, and the slicing that turns a plan's width entry
into tensors (`WidthEdit`); `Geometry` is a layer's attention and MLP shape (`methods/width.py` describes the
width entry and how it is chosen)."""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from swm_ray.errors import UserError

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
def _index(v) -> int:
    """An index of a hand-edited plan: an integer (a bool, a float or a string is a mistake, not an index)."""
    if isinstance(v, bool):
        raise TypeError(v)
    return operator.index(v)  # int or numpy integer; a float or a string raises TypeError


def _same_shape(delta: torch.Tensor, shape, rest: str) -> None:
    if tuple(delta.shape) != tuple(shape):
        raise UserError(f"the plan's width compensation for {rest} has shape {tuple(delta.shape)}, the model's "
                        f"tensor {tuple(shape)}: the plan was made for a model of another size (--force cannot "
                        f"apply a compensated width plan to it)")


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
        try:
            self.groups = [sorted({_index(g) for g in gs}) for gs in groups]
            self.channels = [sorted({_index(c) for c in cs}) for cs in channels]
        except (TypeError, ValueError):
            raise UserError("plan width: kv_groups and channels must be per-layer lists of integers") from None
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
            _same_shape(d, t.shape, rest)
            t = (t.to(torch.float32) + d.to(torch.float32)).to(t.dtype)
        return t

    def new_tensor(self, pos: int, rest: str, dtype: torch.dtype) -> torch.Tensor:
        """A bias the edit creates: zeros, plus the compensation where the plan has one."""
        t = torch.zeros(self.added[rest], dtype=torch.float32)
        d = self.delta(pos, rest)
        if d is not None:
            _same_shape(d, t.shape, rest)
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
