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

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from swm_ray.edits.width import ATTN, MLP, Geometry
from swm_ray.errors import UserError
from swm_ray.methods.width_scores import WidthChoice, choose, flap_biases, flap_scores, taylor_scores
from swm_ray.methods.width_targets import WIDTH_METHODS, decide_bias, width_counts


def width_record(method: str, choice: WidthChoice, geo: Geometry, bias: Mapping[str, bool], **extra) -> dict:
    """The plan's `width` entry (plain JSON)."""
    kg, kc = len(choice.kv_groups[0]), len(choice.channels[0])
    return {"method": method, "kv_groups": choice.kv_groups, "channels": choice.channels,
            "heads_before": geo.heads, "kv_heads_before": geo.kv_heads, "head_dim": geo.head_dim,
            "intermediate_before": geo.intermediate, "heads_after": kg * geo.group, "kv_heads_after": kg,
            "intermediate_after": kc, "bias": {"attention": bool(bias.get("attention")), "mlp": bool(bias.get("mlp"))},
            "layers": "positions after the plan's depth windows", **extra}


def plan_width(cfg, plan, path: str, calib, fraction: float, method: str,
               stats: Callable[[dict], Mapping[str, Any]], device: str = "cpu") -> dict:
    """Give `plan` (its depth windows already chosen) a width entry that removes `fraction` of the SOURCE
    model's parameters more, chosen by `method` on the merged model, and FLAP's biases in `plan.tensors`.

    `stats(request)`: FLAP's sums over every calibration row for {windows, merge, attention} (from actors, or
    from `width_stats_sums` in this process). Taylor materialises the merged model here, on `device`, in float32:
    gradients need the whole model in one process. Returns the width entry."""
    from swm_ray.io.anatomy import text_config_of
    from swm_ray.io.checkpoint import Checkpoint
    from swm_ray.io.models import load_config
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
        # read one layer's weight at a time when indexed (the driver never holds every layer's: 97 GB at 70B)
        o_w = LayerReads(lambda pos: view.read(f"{prefix}.{pos}.{ATTN}.o_proj.weight", torch.float32), view.num_layers)
        d_w = LayerReads(lambda pos: view.read(f"{prefix}.{pos}.{MLP}.down_proj.weight", torch.float32),
                         view.num_layers)
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


class LayerReads(Sequence):
    """A per-layer tensor read from the checkpoint each time it is indexed, never kept (FLAP's o_proj and
    down_proj weights: the scores reduce each to its column norms, the biases use one layer at a time)."""

    def __init__(self, read: Callable[[int], torch.Tensor], n: int):
        self.read, self.n = read, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, pos):
        if isinstance(pos, slice):
            return [self[i] for i in range(*pos.indices(self.n))]
        if not -self.n <= pos < self.n:
            raise IndexError(pos)
        return self.read(pos % self.n)


def width_only_plan(cfg, path: str, n_layers: int, calib):
    """The plan of a width-only run (`select.method` flap or taylor): no windows, the source's size, the
    calibration it used; `plan_width` then gives it its width entry."""
    from swm_ray.io.anatomy import text_config_of
    from swm_ray.io.checkpoint import Checkpoint
    from swm_ray.io.models import load_config
    from swm_ray.plan.plan import Plan

    s, m = cfg.select, cfg.model
    tied = bool(getattr(text_config_of(load_config(path, m.trust_remote_code)), "tie_word_embeddings", False))
    return Plan(windows=[], num_layers_before=n_layers, merge="keep-first", source_model=m.source,
                source_revision=m.revision, method=s.method, attention=cfg.merge.attention, search="width",
                params_before=Checkpoint(path, m.allow_pickle).param_count(tied),
                extra={"calibration": {"source": cfg.data.source, "samples": int(calib.input_ids.shape[0]),
                                       "seq_len": int(calib.input_ids.shape[1]),
                                       "bos_prepended": calib.bos_prepended}})
