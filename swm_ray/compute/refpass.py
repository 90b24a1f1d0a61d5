"""The one pass over the original model that every planner starts from.

A run walks the original model once, layer by layer (in memory, device map or streaming: each layer is read
once), over a shard of calibration rows, and keeps what the planners and `auto` need before they search:

- `inputs`: the hidden state entering every layer (in memory; the candidate checks start from it, so a
  check runs only the layers at and above its window);
- `ref_final` / `ref_logp`: the original's final hidden states (output criterion) and log-probabilities
  (kl criterion, within a memory budget);
- `influence`: per row and layer the sum over tokens of 1 − cos(layer input, layer output) (ShortGPT's Block
  Influence);
- `angular`: per row the angular distances arccos(cos)/π between all hidden states at the last token (or, with
  `angular_tokens` "all", their mean over every position but the first, at most 128 of them per row)
  (ReplaceMe's signal);
- `hsic`: the (L+1)² HSIC sums of every calibration minibatch that lies inside the shard (CKA);
- `val_nll`: per held-out validation row the original's next-token NLL sum (auto), and with `inputs` the
  validation rows' hidden state entering every layer (a plan's validation loss starts at its lowest window).

Everything that leaves a shard is per row (or per minibatch for HSIC), so the driver adds shards in row
order and the result does not depend on how rows were split (`math.fsum` for per-row values).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

from swm_ray.compute.stack import LayerStack

MAX_CHUNK = 32  # rows run together in one forward (bigger GEMMs, the same per-row results)


def chunk_rows(rows: int, max_rows: int) -> list[tuple[int, int]]:
    """Consecutive row ranges of at most `max_rows` rows covering 0..rows."""
    return [(a, min(a + max_rows, rows)) for a in range(0, rows, max_rows)]


@dataclass(frozen=True)
class Needs:
    """What the reference pass computes (the union of what the run's planners use)."""

    checks: bool = False  # candidate checks follow: keep every layer's input (in memory)
    final: bool = False  # the original's final hidden states (output and kl criteria)
    logp: bool = False  # the original's log-probabilities (kl criterion)
    influence: bool = False  # Block Influence
    angular: bool = False  # angular distances between the layers' hidden states (ReplaceMe)
    hsic: bool = False  # CKA sums
    kernel: str = "linear"
    skip_first_tokens: int = 1
    angular_tokens: str = "last"  # the positions they are read at: "last" token, or "all" but the first

    def __or__(self, other: Needs) -> Needs:
        merged = {f.name: getattr(self, f.name) or getattr(other, f.name)
                  for f in fields(self) if isinstance(getattr(self, f.name), bool)}
        hsic_from = self if self.hsic else other
        angular_from = self if self.angular else other
        return Needs(**merged, kernel=hsic_from.kernel, skip_first_tokens=hsic_from.skip_first_tokens,
                     angular_tokens=angular_from.angular_tokens)

    def covers(self, other: Needs) -> bool:
        """True when everything `other` asks for is already computed here."""
        return all(getattr(self, f.name) or not getattr(other, f.name)
                   for f in fields(self) if isinstance(getattr(self, f.name), bool)) and (
            not other.hsic or (self.kernel, self.skip_first_tokens) == (other.kernel, other.skip_first_tokens)) and (
            not other.angular or self.angular_tokens == other.angular_tokens)

    def record(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is True]


@dataclass
class RefStats:
    """What one shard's reference pass returns to the driver (small: per row or per minibatch)."""

    rows: int
    tokens: int
    influence: np.ndarray | None = None  # (rows, L) float64
    angular: np.ndarray | None = None  # (rows, L+1, L+1) float64
    hsic: dict[int, np.ndarray] | None = None  # minibatch index -> (L+1, L+1)
    val_nll: np.ndarray | None = None  # (val rows,) float64 NLL sums
    val_tokens: int = 0


def rows_of(chunks: Sequence[torch.Tensor], a: int, b: int) -> torch.Tensor:
    """Rows a..b of a list of consecutive chunks (each (rows, ...)), concatenated."""
    out, start = [], 0
    for c in chunks:
        stop = start + c.shape[0]
        lo, hi = max(a, start), min(b, stop)
        if lo < hi:
            out.append(c[lo - start : hi - start])
        start = stop
    return torch.cat(out) if len(out) > 1 else out[0]


def row_nll(stack: LayerStack, final_hidden: torch.Tensor, ids: torch.Tensor) -> tuple[np.ndarray, int]:
    """Per-row next-token NLL sums (nats, float64) of (b, T) `ids` from their final hidden states, and the count of
    predicted tokens."""
    logp = F.log_softmax(stack.logits(final_hidden).float(), dim=-1)
    ids = ids.to(logp.device)
    nll = -logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)  # (b, T-1)
    return nll.double().sum(1).cpu().numpy(), int(nll.numel())


class Reference:
    """The original model's pass over one shard of rows (see the module docstring).

    `input_ids` (rows, T): the shard's planning rows; `hsic_batches`: minibatch index -> (a, b) row range
    inside the shard (only minibatches wholly inside it); `val_ids`: the shard's validation rows with their
    minibatches `val_batches` (row ranges inside them)."""

    def __init__(self, stack: LayerStack, input_ids: np.ndarray, needs: Needs, *,
                 hsic_batches: dict[int, tuple[int, int]] | None = None, val_ids: np.ndarray | None = None,
                 val_batches: Sequence[tuple[int, int]] = (), max_chunk: int = MAX_CHUNK,
                 cache_inputs: bool | None = None, logp_cache_bytes: int = 2**30):
        self.stack = stack
        self.needs = needs
        ids = torch.tensor(np.asarray(input_ids))  # a copy: Ray hands out read-only arrays
        self.rows, self.seq_len = int(ids.shape[0]), int(ids.shape[1]) if ids.ndim == 2 else 0
        self.chunks = [ids[a:b].to(stack.device) for a, b in chunk_rows(self.rows, max_chunk)]
        self.pros = [stack.prologue(c) for c in self.chunks]
        cache = (not stack.streaming) if cache_inputs is None else cache_inputs
        self.cache = cache and needs.checks  # the planning rows' inputs serve candidate checks
        self.cache_val = cache  # the validation rows' inputs serve every plan's validation loss
        vocab = stack.model.get_output_embeddings().weight.shape[0]
        self.keep_logp = needs.logp and self.rows * self.seq_len * vocab * 4 <= logp_cache_bytes
        self.hsic_batches = dict(hsic_batches or {})
        if val_ids is not None and len(val_batches):
            v = torch.tensor(np.asarray(val_ids))
            self.val_chunks = [v[a:b].to(stack.device) for a, b in val_batches]
            self.val_pros = [stack.prologue(c) for c in self.val_chunks]
        else:
            self.val_chunks, self.val_pros = [], []
        self.inputs: list[list[torch.Tensor]] | None = None
        self.val_inputs: list[list[torch.Tensor]] | None = None
        self.stats = self._pass()

    @property
    def val_rows(self) -> int:
        return sum(int(c.shape[0]) for c in self.val_chunks)

    @torch.inference_mode()
    def _pass(self) -> RefStats:
        s, n = self.stack, self.needs
        h = [p.hidden for p in self.pros]
        v = [p.hidden for p in self.val_pros]
        inputs = [h] if self.cache else None
        val_inputs = [v] if self.cache_val and v else None
        influence = np.zeros((self.rows, s.num_layers)) if n.influence else None
        last = [[_angular_state(x, n.angular_tokens)] for x in h] if n.angular else None
        grams = {b: [self._gram(h, b)] for b in self.hsic_batches} if n.hsic else {}
        for i in range(s.num_layers):
            with s.layer(i) as layer:
                out = [s.run(layer, x, p.kwargs[i]) for x, p in zip(h, self.pros)]
                v = [s.run(layer, x, p.kwargs[i]) for x, p in zip(v, self.val_pros)]
            if influence is not None:
                start = 0
                for x, y in zip(h, out):
                    # a device map leaves each layer's output on that layer's GPU
                    cos = F.cosine_similarity(x.float(), y.to(x.device).float(), dim=-1)  # (b, T)
                    influence[start : start + x.shape[0], i] = (1 - cos).double().sum(1).cpu().numpy()
                    start += x.shape[0]
            h = out
            if inputs is not None:
                inputs.append(h)
            if val_inputs is not None:
                val_inputs.append(v)
            if last is not None:
                for k, x in enumerate(h):
                    last[k].append(_angular_state(x, n.angular_tokens))
            for b in grams:
                grams[b].append(self._gram(h, b))
        self.inputs, self.val_inputs = inputs, val_inputs
        finals = [s.final(x) for x in h]
        if n.final or n.logp:
            self.ref_final = [f.reshape(f.shape[0], -1).float() for f in finals]
        self.ref_logp = [F.log_softmax(s.logits(f), dim=-1) for f in finals] if self.keep_logp else None
        stats = RefStats(self.rows, self.rows * self.seq_len, influence=influence)
        if last is not None:
            stats.angular = np.concatenate([_angular(states) for states in last]) if last else None
        if grams:
            from swm_ray.compute.similarity import hsic_matrix, stack_on_one_device

            stats.hsic = {b: hsic_matrix(stack_on_one_device(g)) for b, g in grams.items()}
        if self.val_chunks:
            parts = [row_nll(s, s.final(x), c) for x, c in zip(v, self.val_chunks)]
            stats.val_nll = np.concatenate([p[0] for p in parts])
            stats.val_tokens = sum(p[1] for p in parts)
        return stats

    def _gram(self, hidden: list[torch.Tensor], batch: int) -> torch.Tensor:
        from swm_ray.compute.similarity import features, gram

        a, b = self.hsic_batches[batch]
        return gram(features(rows_of(hidden, a, b), self.needs.skip_first_tokens), self.needs.kernel)


ANGULAR_POSITIONS = 128  # "all": positions kept per row at most (evenly spaced beyond), bounding the memory


def angular_positions(seq_len: int) -> torch.Tensor:
    """The positions "all" reads: every one but the first (the attention sink), or `ANGULAR_POSITIONS` of them
    evenly spaced from the second to the last where a row is longer."""
    if seq_len - 1 <= ANGULAR_POSITIONS:
        return torch.arange(1, seq_len)
    return torch.linspace(1, seq_len - 1, ANGULAR_POSITIONS).round().long()


def _angular_state(x: torch.Tensor, tokens: str) -> torch.Tensor:
    """What the angular distances keep of one layer's hidden states (b, T, d): the last token's (b, 1, d) in
    float64 (ReplaceMe as published), or for "all" the positions of `angular_positions` (b, ≤ 128, d) in float32
    (rows × 128 × (L+1) × d × 4 bytes at most, held until the pass ends)."""
    if tokens == "last":
        return x[:, -1:, :].double().cpu()
    return x[:, angular_positions(x.shape[1]).to(x.device), :].float().cpu()


def _angular(states: list[torch.Tensor]) -> np.ndarray:
    """(b, L+1, L+1) angular distances arccos(cos)/π between the states of one chunk (`_angular_state`), per row
    the mean over its positions (one at the last token)."""
    unit = F.normalize(torch.stack(states, dim=2), dim=-1)  # (b, positions, L+1, d)
    cos = (unit @ unit.transpose(2, 3)).clamp(-1.0, 1.0)  # (b, positions, L+1, L+1)
    return (torch.arccos(cos) / np.pi).mean(1).double().numpy()


def add_row_stats(parts: Sequence[RefStats], n_layers: int) -> dict:
    """The driver's reduction of the shards' `RefStats` (shards in row order): mean Block Influence over tokens,
    mean angular distances over rows, HSIC sums added in minibatch order, validation NLL per row."""
    out: dict = {}
    tokens = sum(p.tokens for p in parts)
    rows = sum(p.rows for p in parts)
    if any(p.influence is not None for p in parts):
        per_row = np.concatenate([p.influence for p in parts if p.influence is not None])
        out["influence"] = _ordered_sum(per_row) / max(tokens, 1)
    if any(p.angular is not None for p in parts):
        per_row = np.concatenate([p.angular for p in parts if p.angular is not None])
        out["angular"] = _ordered_sum(per_row) / max(rows, 1)
    hsic = {b: m for p in parts for b, m in (p.hsic or {}).items()}
    if hsic:
        total = np.zeros((n_layers + 1, n_layers + 1))
        for b in sorted(hsic):
            total += hsic[b]
        out["hsic"] = total
        out["hsic_batches"] = sorted(hsic)
    vals = [p.val_nll for p in parts if p.val_nll is not None]
    if vals:
        out["val_nll"] = np.concatenate(vals)
        out["val_tokens"] = sum(p.val_tokens for p in parts)
    return out


def _ordered_sum(per_row: np.ndarray) -> np.ndarray:
    """Rows added one after the other, in row order (the same result however rows were split)."""
    total = np.zeros(per_row.shape[1:])
    for r in per_row:
        total += r
    return total
