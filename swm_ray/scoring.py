"""Candidate checks on a shard of calibration rows: how close is "current model with a window merged" to the
original?

A `ShardScorer` holds a layer stack (`stack.py`), its rows of the calibration set and the current layer
stack as a list of groups (ranges of original layers). It never copies the model. Candidates are evaluated
layer-major: one pass goes up the current stack position by position, every candidate's stream of hidden
states starts at its window and passes through each layer above it while that layer is at hand, so a
streaming producer builds each layer once per pass whatever the number of candidates. In memory the
current model's hidden state at every position is cached, so a pass starts at its lowest window.

Criteria, per calibration row (the driver concatenates the shards' rows and adds them with `math.fsum`,
which is exact, so scores do not depend on how the rows were split over actors):
- `output`: cosine between the original's and the candidate's final hidden states (after the final norm),
  each row flattened to one vector (the paper's released signal); count = rows.
- `kl`: KL(original || candidate) of next-token distributions, summed over the row's tokens; count = tokens.
- `nll`: the candidate's own next-token negative log-likelihood of the row (nats), summed over predicted
  tokens (SLEB's signal: calibration perplexity = exp(mean)); count = tokens − 1 per row.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from swm_ray.merge import follows_weight, is_norm_param
from swm_ray.selection import Group
from swm_ray.stack import LayerStack

RowScores = tuple[np.ndarray, int]  # per-row sums (float64) and the count they are divided by
COMPOSABLE = ("reference", "consistent", "keep-first", "keep-last")  # merged windows built from their groups' states


def chunk_rows(rows: int, max_rows: int) -> list[tuple[int, int]]:
    """Consecutive row ranges of at most `max_rows` rows covering 0..rows (bigger GEMMs, same rows)."""
    return [(a, min(a + max_rows, rows)) for a in range(0, rows, max_rows)]


class ShardScorer:
    """Candidate checks over one shard of rows (see the module docstring).

    `max_chunk`: rows run together; `cache_inputs`: keep the current model's hidden state at every position
    (default: in memory yes, streaming no); `max_streams`: candidate streams alive at once in one pass
    (default: the stack's budget allows, else unbounded)."""

    def __init__(self, stack: LayerStack, input_ids: np.ndarray, criterion: str, method: str, *,
                 attention: str = "global", max_chunk: int = 32, logp_cache_bytes: int = 2**30,
                 cache_inputs: bool | None = None, max_streams: int | None = None):
        if criterion not in ("output", "kl", "nll"):
            raise ValueError(f"ShardScorer scores output, kl or nll, not {criterion!r}")
        self.stack = stack
        self.criterion = criterion
        self.method = method
        self.attention = attention
        self.rows = int(input_ids.shape[0])
        self.max_streams = max_streams or getattr(stack, "max_streams", None) or 10**9
        cache = (not stack.streaming) if cache_inputs is None else cache_inputs
        vocab = stack.model.get_output_embeddings().weight.shape[0]
        keep_logp = criterion == "kl" and self.rows * input_ids.shape[1] * vocab * 4 <= logp_cache_bytes
        ids = torch.tensor(np.asarray(input_ids))  # copy: Ray hands out read-only arrays
        self.chunks = [ids[a:b].to(stack.device) for a, b in chunk_rows(self.rows, max_chunk)]
        self.pros = [stack.prologue(c) for c in self.chunks]
        self._reference(cache, keep_logp)
        self.reset()

    # -- state ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def _reference(self, cache: bool, keep_logp: bool) -> None:
        """One pass of the original model: reference outputs (and, cached, every layer's input)."""
        h = [p.hidden for p in self.pros]
        inputs = [h] if cache else None
        for i in range(self.stack.num_layers):
            with self.stack.layer(i) as layer:
                h = [self.stack.run(layer, x, p.kwargs[i]) for x, p in zip(h, self.pros)]
            if inputs is not None:
                inputs.append(h)
        self.inputs_orig = inputs
        finals = [self.stack.final(x) for x in h]
        self.ref_final = [f.reshape(f.shape[0], -1).float() for f in finals]
        self.ref_logp = [F.log_softmax(self.stack.logits(f), dim=-1) for f in finals] if keep_logp else None

    def reset(self) -> None:
        """Back to the original model (every group a single layer)."""
        self.groups: list[Group] = [(i, i) for i in range(self.stack.num_layers)]
        self.commits: list[Group] = []  # windows committed since the original, in order
        self.built: dict[Group, torch.nn.Module] = {}  # merged current layers, in memory only
        self.inputs = list(self.inputs_orig) if self.inputs_orig is not None else None

    @torch.inference_mode()
    def commit(self, window: Group) -> None:
        """Make `window` (an original range made of whole current groups) one layer; refresh cached states."""
        lo, hi = self._positions(window)
        self.groups = self.groups[:lo] + [tuple(window)] + self.groups[hi + 1 :]
        self.commits.append(tuple(window))
        if not self.stack.streaming:
            anchor = self.stack.anchor(window[0], window[1], self.attention)
            self.built[tuple(window)] = self.stack.build(anchor, self.stack.state(window[0], window[1], self.method),
                                                         window[0])
        if self.inputs is not None:
            h = self.inputs[lo]
            fresh = [h]
            for p in range(lo, len(self.groups)):
                with self._current(p) as layer:
                    h = [self.stack.run(layer, x, self._kw(p, k)) for k, x in enumerate(h)]
                fresh.append(h)
            self.inputs = self.inputs[:lo] + fresh

    # -- scoring -------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def score(self, candidates: Sequence[Group]) -> list[RowScores]:
        """Per candidate: (per-row sums over this shard, count)."""
        todo = [(i, tuple(w), *self._positions(w)) for i, w in enumerate(candidates)]
        out: list[RowScores | None] = [None] * len(todo)
        todo.sort(key=lambda t: t[2])
        for start in range(0, len(todo), self.max_streams):
            for i, finals in self._pass(todo[start : start + self.max_streams]).items():
                out[i] = self._compare(finals)
        return out  # type: ignore[return-value]

    def _pass(self, todo: list[tuple[int, Group, int, int]]) -> dict[int, list[torch.Tensor]]:
        """One walk up the current stack that runs every candidate of `todo`; returns their final hidden
        states (per chunk). A candidate is (index, window, lo, hi) in positions of the current stack."""
        n_pos = len(self.groups)
        finals: dict[int, list[torch.Tensor]] = {}
        merges = [t for t in todo if t[3] > t[2]]
        noops = [t for t in todo if t[3] == t[2]]  # "merging" one layer with nothing: the current model
        if noops and self.inputs is not None:
            for i, *_ in noops:
                finals[i] = self.inputs[-1]
            noops = []
        start = min((t[2] for t in merges), default=n_pos if not noops else 0)
        if noops:
            start = 0
        cur = self.inputs[start] if self.inputs is not None else [p.hidden for p in self.pros]
        if self.inputs is None:
            start = 0
        streams: dict[int, list[torch.Tensor]] = {}
        waiting = {t[0]: t for t in merges}  # not started yet
        held: dict[int, list[torch.Tensor]] = {}  # current hidden state at positions some candidate starts from
        norms: dict[int, dict[str, torch.Tensor]] = {}
        for p in range(start, n_pos):
            if not waiting and not streams and not noops:
                break
            if any(t[2] == p for t in waiting.values()):
                held[p] = cur
            state = self._current_state(p)
            with self._layer_from(p, state) as layer:
                for i in [i for i, s in streams.items() if self._top(i, merges) < p]:
                    streams[i] = [self.stack.run(layer, x, self._kw(p, k)) for k, x in enumerate(streams[i])]
                if self.method in ("reference", "consistent") and state is not None:
                    norms[p] = {n: t for n, t in state.items() if is_norm_param(n)}
                for i, window, lo, hi in [t for t in list(waiting.values()) if self._starts_at(t) == p]:
                    with self._candidate(window, lo, hi, state, norms) as merged:
                        kw = self._window_kw(window)
                        streams[i] = [self.stack.run(merged, x, kw[k]) for k, x in enumerate(held[lo])]
                    del waiting[i]
                if waiting or noops:
                    cur = [self.stack.run(layer, x, self._kw(p, k)) for k, x in enumerate(cur)]
            for q in [q for q in held if not any(t[2] == q for t in waiting.values())]:
                del held[q]
        for i, *_ in noops:
            finals[i] = cur
        finals.update(streams)
        return finals

    # -- layers of the pass --------------------------------------------------------------------------------
    def _starts_at(self, t: tuple[int, Group, int, int]) -> int:
        """Where a candidate's merged layer is built: at its top position when it is composed from the
        groups' own states (the top group's state is at hand there), else at its bottom."""
        return t[3] if self.stack.streaming and self.method in ("reference", "consistent", "keep-last") else t[2]

    @staticmethod
    def _top(i: int, merges: list) -> int:
        return next(t[3] for t in merges if t[0] == i)

    def _current_state(self, p: int):
        """The state of the current layer at p when streaming (read once per pass), else None."""
        if not self.stack.streaming:
            return None
        g = self.groups[p]
        return self.stack.state(g[0], g[1], self.method)

    def _layer_from(self, p: int, state):
        if state is None:
            return self._current(p)
        g = self.groups[p]
        return _built(self.stack, self.stack.anchor(g[0], g[1], self.attention), state, p)

    def _current(self, p: int):
        g = self.groups[p]
        if not self.stack.streaming and g in self.built:
            return contextlib.nullcontext(self.built[g])
        return self.stack.group(g[0], g[1], self.method, self.attention)

    def _candidate(self, window: Group, lo: int, hi: int, state, norms):
        """The merged layer of a candidate window, composed from the groups' states where exact."""
        anchor = self.stack.anchor(window[0], window[1], self.attention)
        if state is None or self.method not in COMPOSABLE:
            return _built(self.stack, anchor, self.stack.state(window[0], window[1], self.method), window[0])
        if self.method in ("reference", "consistent"):  # norms of the bottom group, the rest of the top group
            consistent = self.method == "consistent"  # (norms that follow a weight: of the top group too)
            merged = {n: norms[lo][n] if is_norm_param(n) and not (consistent and follows_weight(n, state)) else t
                      for n, t in state.items()}
        else:  # keep-first at its bottom, keep-last at its top: the group's state as it is
            merged = state
        return _built(self.stack, anchor, merged, window[0])

    def _kw(self, p: int, k: int) -> dict:
        g = self.groups[p]
        return self.pros[k].kwargs[self.stack.anchor(g[0], g[1], self.attention)]

    def _window_kw(self, window: Group) -> list[dict]:
        a = self.stack.anchor(window[0], window[1], self.attention)
        return [p.kwargs[a] for p in self.pros]

    def bring_to(self, commits: Sequence[Group]) -> None:
        """Make the current model the original with `commits` applied in order (a restarted actor rebuilds its
        state from them); a prefix of them already applied is kept."""
        commits = [tuple(w) for w in commits]
        if self.commits != commits[: len(self.commits)]:
            self.reset()
        for w in commits[len(self.commits) :]:
            self.commit(w)

    def _positions(self, window: Group) -> tuple[int, int]:
        starts = [g[0] for g in self.groups]
        ends = [g[1] for g in self.groups]
        if window[0] not in starts or window[1] not in ends:
            raise ValueError(f"window {window} does not align with the current groups {self.groups}")
        return starts.index(window[0]), ends.index(window[1])

    # -- criteria ------------------------------------------------------------------------------------------
    def _compare(self, hidden: list[torch.Tensor]) -> RowScores:
        values, count = [], 0
        for k, h in enumerate(hidden):
            v, c = self._compare_chunk(self.stack.final(h), k)
            values.append(v)
            count += c
        return np.concatenate(values), count

    def _compare_chunk(self, final: torch.Tensor, k: int) -> tuple[np.ndarray, int]:
        b = final.shape[0]
        if self.criterion == "output":
            cos = F.cosine_similarity(final.reshape(b, -1).float(), self.ref_final[k].to(final.device), dim=1)
            return cos.double().cpu().numpy(), b
        logp = F.log_softmax(self.stack.logits(final), dim=-1)
        if self.criterion == "nll":
            ids = self.chunks[k].to(logp.device)
            nll = -logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)  # (b, T-1)
            return nll.double().sum(1).cpu().numpy(), int(nll.numel())
        if self.ref_logp is not None:
            ref = self.ref_logp[k].to(logp.device)
        else:
            ref = F.log_softmax(self.stack.logits(self.ref_final[k].reshape(final.shape).to(final.dtype)), dim=-1)
        kl = (ref.exp() * (ref - logp)).sum(-1)  # (b, T)
        return kl.double().sum(1).cpu().numpy(), int(kl.numel())


@contextlib.contextmanager
def _built(stack: LayerStack, anchor: int, state, position: int):
    """A layer built from a state for the duration of a `with` block."""
    layer = stack.build(anchor, state, position)
    try:
        yield layer
    finally:
        del layer


def reduce_scores(parts: Sequence[Sequence[RowScores]]) -> list[float]:
    """Scores per candidate from every shard's (per-row sums, count), shards in row order; `math.fsum` adds
    exactly, so the result does not depend on how rows were split or in what order shards arrive."""
    out = []
    for i in range(len(parts[0])):
        total = math.fsum(float(v) for p in parts for v in p[i][0])
        count = sum(p[i][1] for p in parts)
        out.append(total / max(count, 1))
    return out


class LocalEvaluator:
    """An `Evaluator` over in-process shard scorers (tests, benchmarks, grid trials, the GPU check: no Ray)."""

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
