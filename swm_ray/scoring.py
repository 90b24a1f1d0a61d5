"""Candidate checks on a data shard: how close is "current model with a window merged" to the original?

A `ShardScorer` holds the original model, its calibration minibatches, and the current layer stack as a
list of groups (ranges of original layers). It never deep-copies the model: a candidate is the current
stack with positions lo..hi replaced by one freshly merged layer, run from the cached hidden state at the
window's input (the layers below it are unchanged) through the layers above it, batched.

Criteria (sums over this shard; the driver adds shards and divides by the count):
- `output`: cosine between the original's and the candidate's final hidden states (after the final norm),
  each crop flattened to one vector (the paper's released signal); count = crops.
- `kl`: KL(original || candidate) of next-token distributions, summed over tokens; count = tokens.
- `nll`: the candidate's own next-token negative log-likelihood of the calibration text (nats), summed
  over predicted tokens (SLEB's signal: calibration perplexity = exp(mean)); count = tokens − 1 per row.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from swm_ray.merge import merge_layers
from swm_ray.models import decoder_layers, inner_model

Group = tuple[int, int]


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


class _Chunk:
    """One minibatch: per-layer call kwargs (masks, rotary), hidden states at each position, references."""

    def __init__(self, kwargs: list[dict], inputs: list[torch.Tensor], ref_final: torch.Tensor, ref_logp,
                 ids: torch.Tensor):
        self.ids = ids  # (b, T) token ids, the labels of `nll`
        self.kwargs = kwargs  # by ORIGINAL layer index
        self.inputs_orig = inputs  # hidden state entering each original layer; [-1] = last layer's output
        self.inputs = list(inputs)  # the same for the CURRENT stack, by position
        self.ref_final = ref_final  # (b, T·d) float32, after the final norm
        self.ref_logp = ref_logp  # (b, T, V) float32 log-probs for `kl` when they fit the cache budget


def coalesce(batches: Sequence[tuple[int, int]], max_rows: int) -> list[tuple[int, int]]:
    """Join consecutive row ranges into chunks of at most `max_rows` rows (bigger GEMMs, same crops)."""
    out: list[tuple[int, int]] = []
    for a, b in batches:
        if out and out[-1][1] == a and b - out[-1][0] <= max_rows:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


class ShardScorer:
    """Candidate checks over one data shard (see the module docstring). `max_chunk`: crops run together."""

    def __init__(self, model, input_ids: np.ndarray, batches: Sequence[tuple[int, int]], criterion: str,
                 method: str, max_chunk: int = 32, logp_cache_bytes: int = 2**30):
        if criterion not in ("output", "kl", "nll"):
            raise ValueError(f"ShardScorer scores output, kl or nll, not {criterion!r}")
        self.model = model
        self.inner = inner_model(model)
        self.original = list(decoder_layers(model))
        self.criterion = criterion
        self.method = method
        self.device = next(model.parameters()).device
        rows = sum(b - a for a, b in batches)
        vocab = model.get_output_embeddings().weight.shape[0]
        # the original's log-probs are kept when they fit the budget, else recomputed from its final hidden state
        self.keep_logp = rows * input_ids.shape[1] * vocab * 4 <= logp_cache_bytes
        self.chunks = [self._capture(torch.tensor(input_ids[a:b], device=self.device))
                       for a, b in coalesce(batches, max_chunk)]
        self.reset()

    # -- state ---------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Back to the original model (every group a single layer)."""
        self.groups: list[Group] = [(i, i) for i in range(len(self.original))]
        self.layers = list(self.original)
        for ch in self.chunks:
            ch.inputs = list(ch.inputs_orig)

    @torch.inference_mode()
    def commit(self, window: Group) -> None:
        """Make `window` (an original range made of whole current groups) one layer; refresh hidden states."""
        lo, hi = self._positions(window)
        merged = merge_layers(self.original[window[0] : window[1] + 1], self.method)
        self.groups = self.groups[:lo] + [window] + self.groups[hi + 1 :]
        self.layers = self.layers[:lo] + [merged] + self.layers[hi + 1 :]
        for ch in self.chunks:
            h = ch.inputs[lo]
            fresh = [h]
            for p in range(lo, len(self.layers)):
                h = self._run(p, h, ch)
                fresh.append(h)
            ch.inputs = ch.inputs[:lo] + fresh

    # -- scoring -------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def score(self, candidates: Sequence[Group]) -> list[tuple[float, int]]:
        """(sum, count) per candidate over this shard's minibatches."""
        out = []
        for window in candidates:
            lo, hi = self._positions(window)
            if lo == hi:  # one current layer "merged" with nothing: the candidate is the current model
                parts = [self._compare(self.inner.norm(ch.inputs[-1]), ch) for ch in self.chunks]
            else:
                merged = merge_layers(self.original[window[0] : window[1] + 1], self.method)
                parts = [self._compare(self.inner.norm(self._above(merged, lo, hi, ch)), ch) for ch in self.chunks]
            out.append((sum(p[0] for p in parts), sum(p[1] for p in parts)))
        return out

    def _above(self, merged, lo: int, hi: int, ch: _Chunk) -> torch.Tensor:
        """Run the merged layer from the cached input of position lo, then every current layer above hi."""
        h = _first(merged(ch.inputs[lo], **ch.kwargs[self.groups[lo][0]]))
        for p in range(hi + 1, len(self.layers)):
            h = self._run(p, h, ch)
        return h

    # -- internals -----------------------------------------------------------------------------------------
    def _positions(self, window: Group) -> tuple[int, int]:
        starts = [g[0] for g in self.groups]
        ends = [g[1] for g in self.groups]
        if window[0] not in starts or window[1] not in ends:
            raise ValueError(f"window {window} does not align with the current groups {self.groups}")
        return starts.index(window[0]), ends.index(window[1])

    def _run(self, p: int, h: torch.Tensor, ch: _Chunk) -> torch.Tensor:
        return _first(self.layers[p](h, **ch.kwargs[self.groups[p][0]]))

    def _compare(self, final: torch.Tensor, ch: _Chunk) -> tuple[float, int]:
        if self.criterion == "output":
            cand = final.reshape(final.shape[0], -1).float()
            cos = F.cosine_similarity(cand, ch.ref_final, dim=1)
            return float(cos.double().sum()), int(cos.numel())
        logp = F.log_softmax(self._logits(final), dim=-1)
        if self.criterion == "nll":
            nll = -logp[:, :-1].gather(-1, ch.ids[:, 1:, None]).squeeze(-1)  # (b, T-1)
            return float(nll.double().sum()), int(nll.numel())
        ref = ch.ref_logp
        if ref is None:
            ref = F.log_softmax(self._logits(ch.ref_final.reshape(final.shape).to(final.dtype)), dim=-1)
        kl = (ref.exp() * (ref - logp)).sum(-1)  # (b, T)
        return float(kl.double().sum()), int(kl.numel())

    def _logits(self, final: torch.Tensor) -> torch.Tensor:
        logits = self.model.lm_head(final).float()
        cap = getattr(self.model.config, "final_logit_softcapping", None)  # Gemma 2/3
        return torch.tanh(logits / cap) * cap if cap else logits

    @torch.inference_mode()
    def _capture(self, ids: torch.Tensor) -> _Chunk:
        """One forward of the original model recording each layer's call kwargs and input hidden state."""
        kwargs: list[dict] = [{} for _ in self.original]
        inputs: list[torch.Tensor] = [None] * (len(self.original) + 1)  # type: ignore[list-item]

        def make_pre(i: int):
            def pre(_m, args, kw):
                hidden = args[0] if args else kw["hidden_states"]
                inputs[i] = hidden
                kwargs[i] = {k: v for k, v in kw.items() if k != "hidden_states"}
                kwargs[i]["use_cache"] = False
                kwargs[i].pop("past_key_values", None)
                kwargs[i].pop("past_key_value", None)

            return pre

        def last_hook(_m, _a, out):
            inputs[-1] = _first(out)

        handles = [layer.register_forward_pre_hook(make_pre(i), with_kwargs=True)
                   for i, layer in enumerate(self.original)]
        handles.append(self.original[-1].register_forward_hook(last_hook))
        try:
            out = self.inner(input_ids=ids, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        final = out.last_hidden_state
        ref_final = final.reshape(final.shape[0], -1).float()
        keep = self.criterion == "kl" and self.keep_logp
        ref_logp = F.log_softmax(self._logits(final), dim=-1) if keep else None
        return _Chunk(kwargs, inputs, ref_final, ref_logp, ids)


def reduce_scores(parts: Sequence[Sequence[tuple[float, int]]]) -> list[float]:
    """Add the shards' (sum, count) per candidate in a fixed order and divide."""
    n = len(parts[0])
    out = []
    for i in range(n):
        total = sum(p[i][0] for p in parts)
        count = sum(p[i][1] for p in parts)
        out.append(total / max(count, 1))
    return out


class LocalEvaluator:
    """An `Evaluator` over in-process shard scorers (tests, benchmarks, the GPU check: no Ray)."""

    def __init__(self, scorers: Sequence[ShardScorer], criterion: str):
        self.scorers = list(scorers)
        self.higher_is_better = criterion == "output"

    def score(self, groups, candidates):
        return reduce_scores([s.score(candidates) for s in self.scorers])

    def commit(self, groups, window):
        for s in self.scorers:
            s.commit(window)

    def reset(self):
        for s in self.scorers:
            s.reset()
