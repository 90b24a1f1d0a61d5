"""Candidate checks on a shard of calibration rows: how does "the current model with a window merged" compare
with the original?

A `ShardScorer` serves one merge method on one shard. It starts from the shard's `refpass.Reference` (the
original's pass, shared by every merge method and planner of the run) and keeps a few *current models* at
once, one per layer-group state asked for (planners racing each other stand at different states): each is a
list of groups (ranges of original layers), the merged layers it holds and, in memory, its hidden state at
every position (positions below its lowest change are the reference's own tensors). It never copies the
model. Candidates of one state are evaluated layer-major by the state's plan runner
(`planrun.PlanRunner.run_variants`: each candidate is a variant of the state's plan): one pass goes up the
current stack position by position, every candidate's stream of hidden states starts at its window and passes
through each layer above it while that layer is at hand, so a streaming producer builds each layer once per
pass whatever the number of candidates. In memory a pass starts at its lowest window.

One forward returns every signal asked of it, per calibration row (the driver concatenates the shards' rows
and adds them with `math.fsum`, which is exact, so scores do not depend on how the rows were split):
- `output`: cosine between the original's and the candidate's final hidden states (after the final norm),
  each row flattened to one vector (the paper's released signal); count = rows.
- `kl`: KL(original || candidate) of next-token distributions, summed over the row's tokens; count = tokens.
- `nll`: the candidate's own next-token negative log-likelihood of the row (nats), summed over predicted
  tokens (SLEB's signal: calibration perplexity = exp(mean)); count = tokens − 1 per row.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from swm_ray.compute.planrun import PlanRunner
from swm_ray.compute.refpass import Reference
from swm_ray.compute.stack import LayerStack
from swm_ray.edits.windows import Group

SIGNALS = ("output", "kl", "nll")
RowScores = tuple[np.ndarray, int]  # per-row sums (float64) and the count they are divided by
MAX_STATES = 8  # current models kept per merge method (one per racing planner is enough)


def merged_groups(groups: Iterable[Group]) -> tuple[Group, ...]:
    """The key of a layer-group state: its merged windows (the model depends on nothing else)."""
    return tuple(sorted((int(a), int(b)) for a, b in groups if b > a))


def groups_from(num_layers: int, windows: Iterable[Group]) -> list[Group]:
    """The group list of the original with `windows` merged."""
    wins = {int(a): int(b) for a, b in windows}
    out, i = [], 0
    while i < num_layers:
        out.append((i, wins.get(i, i)))
        i = wins.get(i, i) + 1
    return out


@dataclass
class _State:
    """One current model: its groups and, in memory, its hidden state entering every position (+ the final)."""

    groups: list[Group]
    inputs: list[list[torch.Tensor]] | None = None
    windows: tuple[Group, ...] = field(default=())
    runner: PlanRunner | None = None


class ShardScorer:
    """Candidate checks of one merge method over one shard (see the module docstring).

    `max_streams`: candidate streams alive at once in one pass (default: the stack's budget allows, else
    unbounded); `max_states`: current models kept (least recently used ones are dropped)."""

    def __init__(self, ref: Reference, method: str, *, attention: str = "global", max_streams: int | None = None,
                 max_states: int = MAX_STATES):
        self.ref = ref
        self.stack: LayerStack = ref.stack
        self.method = method
        self.attention = attention
        self.rows = ref.rows
        self.max_streams = max_streams or getattr(self.stack, "max_streams", None) or 10**9
        self.max_states = max_states
        self.states: OrderedDict[tuple[Group, ...], _State] = OrderedDict()
        self.built: dict[Group, torch.nn.Module] = {}  # merged layers of the kept states (in memory only), shared
        # with their runners
        self.checks = 0  # candidate models run

    @classmethod
    def over(cls, stack: LayerStack, input_ids: np.ndarray, method: str, *, attention: str = "global",
             max_chunk: int | None = None, **kw) -> ShardScorer:
        """A scorer with a reference pass of its own over `input_ids` (every signal available): tests, benchmarks
        and the GPU check, which score one merge method without a run around them."""
        from swm_ray.compute.refpass import MAX_CHUNK, Needs

        ref = Reference(stack, input_ids, Needs(checks=True, final=True, logp=True), max_chunk=max_chunk or MAX_CHUNK)
        return cls(ref, method, attention=attention, **kw)

    # -- states --------------------------------------------------------------------------------------------
    def state(self, groups: Sequence[Group]) -> _State:
        """The current model of `groups` (made from the closest kept state, or from the reference)."""
        key = merged_groups(groups)
        if key in self.states:
            self.states.move_to_end(key)
            return self.states[key]
        groups = [tuple(g) for g in groups]
        st = _State(groups, windows=key, runner=PlanRunner(self.stack, key, self.method, self.attention,
                                                           built=self.built))
        st.runner.prebuild()
        if self.ref.inputs is not None:
            st.inputs = self._inputs(st)
        self.states[key] = st
        while len(self.states) > self.max_states:
            self.states.popitem(last=False)
        used = {g for s in self.states.values() for g in s.windows}
        for g in [g for g in self.built if g not in used]:
            del self.built[g]
        return st

    @torch.inference_mode()
    def _inputs(self, st: _State) -> list[list[torch.Tensor]]:
        """Hidden states entering every position of a state, recomputed only above the highest position where a
        kept state (or the original) agrees with it."""
        groups = st.groups
        best, start = self.ref.inputs, _agree(groups, [(i, i) for i in range(self.stack.num_layers)])
        for other in self.states.values():
            p = _agree(groups, other.groups)
            if p > start:
                best, start = other.inputs, p
        fresh = list(best[: start + 1])
        h = fresh[-1]
        for p in range(start, len(groups)):
            kw = st.runner.kwargs(p, self.ref.pros)
            with st.runner.layer_at(p) as layer:
                h = [self.stack.run(layer, x, kw[k]) for k, x in enumerate(h)]
            fresh.append(h)
        return fresh

    # -- scoring -------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def score(self, groups: Sequence[Group], candidates: Sequence[Group],
              signals: Sequence[str] = ("output",)) -> list[dict[str, RowScores]]:
        """Per candidate (whole groups of `groups` merged into one layer): per signal, (per-row sums over this
        shard, count). One forward per candidate serves every signal."""
        bad = [s for s in signals if s not in SIGNALS]
        if bad:
            raise ValueError(f"unknown signals {bad}: choose among {SIGNALS}")
        st = self.state(groups)
        todo = [(i, tuple(w), *_positions(st.groups, w)) for i, w in enumerate(candidates)]
        out: list[dict | None] = [None] * len(todo)
        todo.sort(key=lambda t: t[2])
        for start in range(0, len(todo), self.max_streams):
            for i, finals in st.runner.run_variants(todo[start : start + self.max_streams], self.ref.pros,
                                                    st.inputs).items():
                out[i] = self._compare(finals, signals)
        self.checks += len(todo)
        return out  # type: ignore[return-value]

    # -- signals -------------------------------------------------------------------------------------------
    def _compare(self, hidden: list[torch.Tensor], signals: Sequence[str]) -> dict[str, RowScores]:
        parts: dict[str, list] = {s: [] for s in signals}
        for k, h in enumerate(hidden):
            final = self.stack.final(h)
            b = final.shape[0]
            if "output" in parts:
                ref = self.ref.ref_final[k].to(final.device)
                cos = F.cosine_similarity(final.reshape(b, -1).float(), ref, dim=1)
                parts["output"].append((cos.double().cpu().numpy(), b))
            if "nll" in parts or "kl" in parts:
                logp = F.log_softmax(self.stack.logits(final), dim=-1)
                if "nll" in parts:
                    ids = self.ref.chunks[k].to(logp.device)
                    nll = -logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)  # (b, T-1)
                    parts["nll"].append((nll.double().sum(1).cpu().numpy(), int(nll.numel())))
                if "kl" in parts:
                    ref = self._ref_logp(k, final)
                    kl = (ref.exp() * (ref - logp)).sum(-1)  # (b, T)
                    parts["kl"].append((kl.double().sum(1).cpu().numpy(), int(kl.numel())))
        return {s: (np.concatenate([v for v, _ in p]), sum(c for _, c in p)) for s, p in parts.items()}

    def _ref_logp(self, k: int, final: torch.Tensor) -> torch.Tensor:
        if self.ref.ref_logp is not None:
            return self.ref.ref_logp[k].to(final.device)
        ref_final = self.ref.ref_final[k].reshape(final.shape).to(final.dtype)
        return F.log_softmax(self.stack.logits(ref_final), dim=-1)


def _agree(a: Sequence[Group], b: Sequence[Group]) -> int:
    """The number of leading positions where two group lists are equal (inputs up to that position agree)."""
    n = 0
    for x, y in zip(a, b):
        if tuple(x) != tuple(y):
            break
        n += 1
    return n


def _positions(groups: Sequence[Group], window: Group) -> tuple[int, int]:
    starts = [g[0] for g in groups]
    ends = [g[1] for g in groups]
    if window[0] not in starts or window[1] not in ends:
        raise ValueError(f"window {window} does not align with the current groups {list(groups)}")
    return starts.index(window[0]), ends.index(window[1])


def reduce_scores(parts: Sequence[Sequence[RowScores]]) -> list[float]:
    """Scores per candidate from every shard's (per-row sums, count), shards in row order; `math.fsum` adds
    exactly, so the result does not depend on how rows were split or in what order shards arrive."""
    out = []
    for i in range(len(parts[0])):
        total = math.fsum(float(v) for p in parts for v in p[i][0])
        count = sum(p[i][1] for p in parts)
        out.append(total / max(count, 1))
    return out


def reduce_signals(parts: Sequence[Sequence[dict[str, RowScores]]]) -> list[dict[str, float]]:
    """`reduce_scores` for every signal: per candidate {signal: mean over every shard's rows}."""
    n = len(parts[0])
    signals = list(parts[0][0]) if n else []
    return [{s: reduce_scores([[p[i][s]] for p in parts])[0] for s in signals} for i in range(n)]


class LocalEvaluator:
    """A selection `Evaluator` of one criterion over in-process shard scorers (tests, benchmarks, the GPU check:
    no Ray, no memo)."""

    def __init__(self, scorers: Sequence[ShardScorer], criterion: str):
        self.scorers = list(scorers)
        self.criterion = criterion
        self.higher_is_better = criterion == "output"

    def score(self, groups, candidates):
        return reduce_scores([[d[self.criterion] for d in s.score(groups, candidates, (self.criterion,))]
                              for s in self.scorers])

    def commit(self, groups, window):
        pass  # a scorer serves any state by its groups
