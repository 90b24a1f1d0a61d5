"""Width scores: FLAP (fluctuation of every input times its weight column, with bias compensation) and
first-order Taylor (|Σ w·∂L/∂w| over a coupled group), and the choice of what every layer keeps."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from swm_ray.edits.width import ATTN, DOWN_BIAS, MLP, O_BIAS, Geometry, head_rows, query_heads, removed


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

    from swm_ray.io.anatomy import decoder_layers, text_config

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
            group_s.append(per_group.abs().cpu().numpy())
            ch = wg(mlp.gate_proj).sum(1) + wg(mlp.up_proj).sum(1) + wg(mlp.down_proj).sum(0)
            for lin in (mlp.gate_proj, mlp.up_proj):
                b = wg(lin, bias=True)
                if b is not None:
                    ch = ch + b
            chan_s.append(ch.abs().cpu().numpy())
    finally:
        for p, w in zip(params, was):
            p.grad = None
            p.requires_grad_(w)
    return np.stack(group_s), np.stack(chan_s)


def choose(group_scores: np.ndarray, channel_scores: np.ndarray, kept_groups: int, kept_channels: int) -> WidthChoice:
    """Uniform selection: every layer keeps its `kept_groups` / `kept_channels` highest-scoring structures."""
    return WidthChoice(keep_top(group_scores, kept_groups), keep_top(channel_scores, kept_channels),
                       np.asarray(group_scores), np.asarray(channel_scores))
