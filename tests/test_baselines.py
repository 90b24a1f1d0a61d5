"""LaCo and Shortened-LLM (PPL) planners: hand-worked traces on a scripted evaluator, and the planners on a tiny
real model against brute force (deep copies, `apply_windows`, transformers' own forward)."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_model

from swm_ray.compute.scoring import LocalEvaluator, ShardScorer
from swm_ray.compute.stack import InMemoryStack
from swm_ray.edits.merge import apply_windows
from swm_ray.errors import UserError
from swm_ray.methods.baselines import laco, shortened_ppl


class Scripted:
    """An `Evaluator` whose scores come from a hand-written table keyed by candidate window; records every call
    (a copy of the groups it was given and the candidates) and every commit."""

    def __init__(self, table, higher_is_better=True):
        self.table, self.higher_is_better = table, higher_is_better
        self.calls, self.commits = [], []

    def score(self, groups, candidates):
        self.calls.append((list(groups), list(candidates)))
        return [self.table[c] for c in candidates]  # a KeyError means the planner asked for an unplanned window

    def commit(self, groups, window):
        self.commits.append(window)

    @property
    def asked(self):
        return [c for _, cands in self.calls for c in cands]


# --- LaCo on a scripted evaluator ----------------------------------------------------------------------------

def test_laco_hand_trace_accept_skips_by_interval_reject_moves_by_one_protected_layer():
    # 12 layers, C = 3, I = 2, T = 0.5, H = 11 (default), L = 0, layer 3 protected. Hand computation:
    #   l = H - C = 8: current 8,9,10 = (8,10)          0.9  > T  accept; groups 0..7,(8,10),11;    l = 8-2 = 6
    #   l = 6: current 6,7,(8,10) = (6,10)             0.5 == T  reject (the test is strict);         l = 5
    #   l = 5: current 5,6,7 = (5,7)                   0.8  > T  accept; groups 0..4,(5,7),(8,10),11; l = 3
    #   l = 3: current 3,4,(5,7) = (3,7)               0.7  > T  accept (protected 3 is the base, it stays);
    #          (5,7) is absorbed;                                groups 0,1,2,(3,7),(8,10),11;        l = 1
    #   l = 1: current 1,2,(3,7) = (1,7)  would merge protected 3 away: skipped, never scored;        l = 0
    #   l = 0: current 0,1,2 = (0,2)                   0.2 <= T  reject;                              l = -1: end
    table = {(8, 10): 0.9, (6, 10): 0.5, (5, 7): 0.8, (3, 7): 0.7, (0, 2): 0.2}
    ev = Scripted(table)
    events = []
    sel = laco(12, ev, merge_layers=3, interval=2, threshold=0.5, protected=[3],
               on_event=lambda e, w, s: events.append((e, w)))
    assert ev.asked == [(8, 10), (6, 10), (5, 7), (3, 7), (0, 2)]
    assert [(e, w) for e, w, _ in sel.trace] == [
        ("commit", (8, 10)), ("fail", (6, 10)), ("commit", (5, 7)), ("commit", (3, 7)), ("skip", (1, 7)),
        ("fail", (0, 2))]
    assert events == [(e, w) for e, w, _ in sel.trace]
    assert ev.commits == [(8, 10), (5, 7), (3, 7)]
    # the (3,7) candidate was scored on top of the model holding both earlier merges
    assert ev.calls[3][0] == [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4), (5, 7), (8, 10), (11, 11)]
    assert sel.windows == [(8, 10), (3, 7)] and sel.scores == [0.9, 0.7]
    assert sel.removed == 6 and sel.evaluations == 5 and sel.threshold == 0.5
    assert "protected" in sel.note


def test_laco_nested_windows_and_cut_at_the_highest_layer():
    # 6 layers, C = 4, I = 1, T = 0.5, H = 5:
    #   l = 5-4 = 1: current 1,2,3,4 = (1,4)          accept; groups 0,(1,4),5;  l = 0
    #   l = 0: current 0..3 does not exist: cut at the current layer holding 5 (position 2) = (0,5): accept, (1,4)
    #          is absorbed;                                                    l = -1: end
    ev = Scripted({(1, 4): 0.9, (0, 5): 0.6})
    sel = laco(6, ev, merge_layers=4, interval=1, threshold=0.5)
    assert ev.asked == [(1, 4), (0, 5)] and sel.windows == [(0, 5)] and sel.scores == [0.6]
    # H = 4 instead: the first window is 0..3 (l = H-C = 0), and nothing ever reaches layer 5
    ev = Scripted({(0, 3): 0.9})
    assert laco(6, ev, merge_layers=4, interval=1, threshold=0.5, highest=4).windows == [(0, 3)]
    # protecting the last layer stops (0,5) unevaluated: (1,4) stays
    ev = Scripted({(1, 4): 0.9})
    sel = laco(6, ev, merge_layers=4, interval=1, threshold=0.5, protected=[5])
    assert ev.asked == [(1, 4)] and sel.windows == [(1, 4)]


def test_laco_lower_is_better_and_lowest_layer():
    # a KL-like evaluator: accept when score <= T. L = 3 stops the loop before the base reaches 2.
    #   l = 9-3 = 6: current 6,7,8 = (6,8)      0.1 <= 0.3 accept, l = 4
    #   l = 4:       current 4,5,(6,8) = (4,8)  0.4 >  0.3 reject, l = 3
    #   l = 3:       current 3,4,5 = (3,5)      0.2 <= 0.3 accept, l = 1 < L: end
    ev = Scripted({(6, 8): 0.1, (4, 8): 0.4, (3, 5): 0.2}, higher_is_better=False)
    sel = laco(10, ev, merge_layers=3, interval=2, threshold=0.3, lowest=3)
    assert ev.asked == [(6, 8), (4, 8), (3, 5)] and sel.windows == [(6, 8), (3, 5)] and sel.scores == [0.1, 0.2]


def test_laco_rejects_bad_parameters():
    with pytest.raises(UserError, match="at least 2"):
        laco(8, Scripted({}), merge_layers=1, interval=1, threshold=0.5)
    with pytest.raises(UserError, match="at least 1"):
        laco(8, Scripted({}), merge_layers=2, interval=0, threshold=0.5)
    with pytest.raises(UserError, match="layer range"):
        laco(8, Scripted({}), merge_layers=2, interval=1, threshold=0.5, highest=8)
    sel = laco(4, Scripted({}), merge_layers=4, interval=1, threshold=0.5)  # H - C < L: nothing to try
    assert sel.windows == [] and sel.evaluations == 0 and "no window" in sel.note


# --- Shortened-LLM PPL on a scripted evaluator ---------------------------------------------------------------

def test_shortened_ppl_hand_ranking():
    # 12 layers, keep_first = 4, keep_last = 2: eligible blocks 4..9; block 7 protected -> 4,5,6,8,9.
    # Candidate "remove block i" = window (i-1, i). NLL with the block removed:
    #   4: 3.0   5: 2.1   6: 2.5   7: (1.0, protected, never scored)   8: 2.2   9: 2.9
    # rank (lowest first): 5 (2.1), 8 (2.2), 6 (2.5), 9 (2.9), 4 (3.0); remove 3 -> blocks {5, 6, 8}
    # runs: 5..6 -> keep-first window (4, 6); 8 -> (7, 8); top first: [(7, 8), (4, 6)]
    # scores per window: the largest NLL of its blocks: (7, 8) -> 2.2, (4, 6) -> max(2.1, 2.5) = 2.5
    table = {(3, 4): 3.0, (4, 5): 2.1, (5, 6): 2.5, (6, 7): 1.0, (7, 8): 2.2, (8, 9): 2.9}
    ev = Scripted(table, higher_is_better=False)
    sel = shortened_ppl(12, ev, 3, protected=[7])
    assert len(ev.calls) == 1  # one-shot: a single batch, on the original model
    groups, asked = ev.calls[0]
    assert groups == [(i, i) for i in range(12)] and asked == [(3, 4), (4, 5), (5, 6), (7, 8), (8, 9)]
    assert ev.commits == []
    assert sel.windows == [(7, 8), (4, 6)] and sel.scores == [2.2, 2.5] and sel.removed == 3
    assert sel.evaluations == 5
    assert sel.trace == [("remove", (4, 5), 2.1), ("remove", (7, 8), 2.2), ("remove", (5, 6), 2.5),
                         ("keep", (8, 9), 2.9), ("keep", (3, 4), 3.0)]
    # without the protection block 7 (1.0) ranks first: {7, 5, 8} -> one run 7..8 -> (6, 8), and (4, 5)
    sel = shortened_ppl(12, Scripted(table, higher_is_better=False), 3)
    assert sel.windows == [(6, 8), (4, 5)] and sel.scores == [2.2, 2.1]


def test_shortened_ppl_errors():
    ev = Scripted({}, higher_is_better=False)
    with pytest.raises(UserError, match="only 4 of 10"):
        shortened_ppl(10, ev, 5)  # eligible: 4..7
    with pytest.raises(UserError, match="keep_first"):
        shortened_ppl(10, ev, 1, keep_first=0)
    assert ev.calls == []


# --- real tiny model against brute force ---------------------------------------------------------------------

def _nll(model, ids) -> float:
    with torch.no_grad():
        x = torch.tensor(ids)
        return model(x, labels=x).loss.item()  # transformers' own mean token NLL


def _output_cosine(model, cand, ids) -> float:
    x = torch.tensor(ids)
    with torch.no_grad():
        a = model(x, output_hidden_states=True).hidden_states[-1].flatten(1)
        b = cand(x, output_hidden_states=True).hidden_states[-1].flatten(1)
    return F.cosine_similarity(a, b, dim=1).mean().item()


def test_shortened_ppl_on_a_tiny_model_equals_removing_blocks_by_hand():
    model, _ = tiny_model("llama", n_layers=12)
    ids = np.random.default_rng(0).integers(4, 256, size=(6, 12))
    stack = InMemoryStack(model)
    ev = LocalEvaluator([ShardScorer.over(stack, ids[:4], "keep-first"),  # two shards, split by rows
                         ShardScorer.over(stack, ids[4:], "keep-first")], "nll")
    n = 3
    sel = shortened_ppl(12, ev, n)
    brute = {}
    for i in range(4, 12 - 2):  # blocks 0..3 and the last two are never removed
        cand = copy.deepcopy(model)
        apply_windows(cand, [(i - 1, i)], "keep-first")
        brute[i] = _nll(cand, ids)
    ranked = sorted(brute, key=lambda i: brute[i])
    assert brute[ranked[n]] - brute[ranked[n - 1]] > 1e-4  # the cut is not a float tie: the test can decide
    chosen = sorted(ranked[:n])
    runs = []
    for i in chosen:  # keep-first windows by hand: a run i..j is kept by layer i-1
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i - 1, i])
    assert sel.windows == sorted((tuple(r) for r in runs), reverse=True)
    got = {w[1]: s for e, w, s in sel.trace}
    assert got.keys() == brute.keys()
    np.testing.assert_allclose([got[i] for i in brute], list(brute.values()), atol=2e-5)


def _brute_laco(model, ids, c, interval, threshold, protected=()):
    """LaCo written out independently: the current model as a list of lists of original layers; every candidate
    is a fresh deep copy of the ORIGINAL with the accepted windows plus the candidate applied (`paper` merge)."""
    layers = [[i] for i in range(len(model.model.layers))]
    accepted, events = [], []
    l = len(layers) - 1 - c
    while l >= 0:
        members = [i for g in layers[l : l + c] for i in g]  # the slice stops at the top, like the released code
        window = (members[0], members[-1])
        if any(p in members[1:] for p in protected):
            events.append(("skip", window))
            l -= 1
            continue
        plan = [w for w in accepted if not window[0] <= w[0] <= window[1]] + [window]
        cand = copy.deepcopy(model)
        apply_windows(cand, plan, "paper")
        s = _output_cosine(model, cand, ids)
        if s > threshold:
            events.append(("commit", window, s))
            accepted = plan
            layers = layers[:l] + [members] + layers[l + c :]
            l -= interval
        else:
            events.append(("fail", window, s))
            l -= 1
    return sorted(accepted, reverse=True), events


# (2, 0.3): accepts skip by 2, rejects move by 1, windows stay disjoint;
# (1, 0.15): an accepted window absorbs the previous one and later windows reach the last layer (cut at the top);
# (1, 0.2): rejected windows that contain an earlier merge, and a second disjoint accept
@pytest.mark.parametrize("interval, threshold, nested", [(2, 0.3, False), (1, 0.15, True), (1, 0.2, False)])
def test_laco_on_a_tiny_model_equals_brute_force(interval, threshold, nested):
    model, _ = tiny_model("llama", n_layers=12)
    ids = np.random.default_rng(0).integers(4, 256, size=(6, 12))
    ev = LocalEvaluator([ShardScorer.over(InMemoryStack(model), ids, "paper")], "output")
    sel = laco(12, ev, merge_layers=3, interval=interval, threshold=threshold, protected=[2])
    windows, events = _brute_laco(model, ids, 3, interval, threshold, protected=[2])
    kinds = [e[0] for e in events]
    assert "commit" in kinds and "fail" in kinds and "skip" in kinds  # every branch of the loop is exercised
    commits = [e[1] for e in events if e[0] == "commit"]
    absorbed = any(a[0] <= b[0] and b[1] <= a[1] for i, a in enumerate(commits) for b in commits[:i])
    assert absorbed is nested
    assert all(abs(e[2] - threshold) > 1e-4 for e in events if e[0] != "skip")  # no decision is a float tie
    assert sel.windows == windows
    assert [(e[0], e[1]) for e in sel.trace] == [(e[0], e[1]) for e in events]
    scored = [e[2] for e in events if e[0] != "skip"]
    np.testing.assert_allclose([s for _, _, s in sel.trace if s is not None], scored, atol=2e-5)
