"""Selection loops on scripted similarity oracles: hand-worked traces."""

import numpy as np
import pytest

from swm_ray.errors import UserError
from swm_ray.methods.selection import (
    CkaEvaluator,
    MemoEvaluator,
    Selection,
    best_first,
    check_threshold,
    layers_for_ratio,
    search_threshold,
    top_down,
)


class Oracle:
    """Scores from a table keyed by window; a single layer (the current model itself) scores `current`."""

    higher_is_better = True

    def __init__(self, table, current=1.0):
        self.table, self.current = table, current
        self.calls, self.commits = [], []

    def score(self, groups, candidates):
        self.calls.extend(candidates)
        return [self.current if c in groups else self.table.get(c, 0.0) for c in candidates]

    def commit(self, groups, window):
        self.commits.append(window)


TABLE = {(3, 4): 0.9, (2, 4): 0.8, (1, 4): 0.3, (0, 1): 0.4}


def test_paper_loop_hand_trace_grow_commit_noop_slide():
    ev = Oracle(TABLE)
    sel = top_down(6, 0.5, ev, paper_loop=True)
    assert [(e, w) for e, w, _ in sel.trace] == [
        ("pass", (3, 4)),  # high = L-2 = 4, low = 3: grow
        ("pass", (2, 4)),
        ("commit", (2, 4)),  # (1, 4) fails: commit the last passing window
        ("pass", (1, 1)),  # the no-op re-test of the model just committed
        ("fail", (0, 1)),  # two layers fail: slide down, low becomes -1, loop ends
    ]
    assert ev.calls == [(3, 4), (2, 4), (1, 4), (1, 1), (0, 1)]
    assert sel.windows == [(2, 4)] and sel.scores == [0.8] and sel.removed == 2
    assert ev.commits == [(2, 4)]


def test_pending_window_dropped_by_paper_loop_committed_by_fix():
    table = {**TABLE, (0, 1): 0.7}
    paper = top_down(6, 0.5, Oracle(table), paper_loop=True)
    assert paper.windows == [(2, 4)] and paper.trace[-1][:2] == ("drop", (0, 1))  # layer 0 never a base
    fixed_ev = Oracle(table)
    fixed = top_down(6, 0.5, fixed_ev, paper_loop=False)
    assert fixed.windows == [(2, 4), (0, 1)]
    assert (1, 1) not in fixed_ev.calls  # the no-op re-test is skipped


def test_last_layer_never_merged_and_first_fail_slides():
    ev = Oracle({(3, 4): 0.1, (2, 3): 0.9, (1, 3): 0.2})
    sel = top_down(6, 0.5, ev, paper_loop=True)
    assert all(w[1] <= 4 for w in ev.calls)
    assert sel.trace[0][:2] == ("fail", (3, 4)) and sel.trace[1][:2] == ("pass", (2, 3))
    assert sel.windows == [(2, 3)]


def test_failing_noop_retest_is_guarded():
    ev = Oracle(TABLE, current=0.1)  # a non-deterministic re-test that fails: the authors' loop spins
    sel = top_down(6, 0.5, ev, paper_loop=True)
    assert sel.windows == [(2, 4)] and "no-op" in sel.note
    assert top_down(6, 0.5, Oracle({}, current=1.0), max_steps=3).evaluations <= 3


def test_best_first_commits_best_pair_anywhere():
    table = {(0, 1): 0.1, (1, 2): 0.6, (2, 3): 0.95, (3, 4): 0.7, (4, 5): 0.99,
             (1, 3): 0.9, (2, 4): 0.8, (0, 2): 0.1}
    ev = Oracle(table)
    sel = best_first(6, ev, layers_to_remove=2, protected=[5])
    assert ev.commits == [(2, 3), (1, 3)]  # (4, 5) scores best but touches the protected last layer
    assert sel.windows == [(1, 3)] and sel.scores == [0.9] and sel.removed == 2
    stop = best_first(6, Oracle(table), threshold=0.92, protected=[5])
    assert stop.windows == [(2, 3)] and stop.trace[-1][0] == "stop"


def test_memo_evaluator_replays_commits_only_when_needed():
    inner = Oracle(TABLE)
    memo = MemoEvaluator(inner)
    top_down(6, 0.5, memo)
    first = len(inner.calls)
    top_down(6, 0.5, memo)  # the same run again: every score comes from the memo
    assert len(inner.calls) == first and memo.misses == first


def test_cka_evaluator_reads_bottom_and_top_outputs():
    m = np.eye(5)
    m[2, 4] = m[4, 2] = 0.93  # outputs of layers 1 and 3
    assert CkaEvaluator(m).score(None, [(1, 3)]) == [0.93]


def test_threshold_search_handles_non_monotone_counts():
    counts = {round(t, 4): n for t, n in [(1.0, 0), (0.9375, 1), (0.875, 3), (0.8125, 6), (0.75, 0)]}

    def run(t):
        n = counts.get(round(t, 4), 0 if t < 0.75 else 2 if t > 0.84 else 4)
        return Selection([(0, n)] if n else [], [], threshold=t)

    sel = search_threshold(run, 2, 0.0, 1.0, higher_is_better=True)
    assert sel.removed == 2 and 0.84 < sel.threshold < 0.9375
    miss = search_threshold(lambda t: Selection([(0, 3)] if t < 0.5 else [], [], threshold=t), 2, 0, 1, True)
    assert miss.removed == 3 and "closest" in miss.note


def test_targets_and_ranges():
    assert layers_for_ratio(0.2, 1000, 40, 30) == 5
    with pytest.raises(UserError, match="largest reachable"):
        layers_for_ratio(0.99, 1000, 33, 30)
    with pytest.raises(UserError, match="out of range"):
        check_threshold("output", 1.5)
    with pytest.raises(UserError, match="> 0"):
        check_threshold("kl", 0.0)
    check_threshold("kl", 3.0)


def test_shortgpt_windows_are_keep_first_plans():
    from swm_ray.methods.baselines import drop_windows, shortgpt_windows

    assert drop_windows([5, 3, 4, 9]) == [(8, 9), (2, 5)]
    bi = np.array([0.0, 0.5, 0.1, 0.2, 0.9, 0.05])
    assert shortgpt_windows(bi, 2) == [(4, 5), (1, 2)]  # layer 0 is never dropped
    # layer 5 protected: the two lowest BI among 1..4 are layers 2 (0.1) and 3 (0.2), one run kept by layer 1
    assert shortgpt_windows(bi, 2, protected=[5]) == [(1, 3)]
    assert shortgpt_windows(bi, 3, protected=[5]) == [(0, 3)]  # + layer 1 (0.5): the run 1..3 is kept by layer 0


def test_top_down_respects_protected_layers():
    ev = Oracle(TABLE)
    sel = top_down(6, 0.5, ev, paper_loop=True, protected=[2])
    # (2, 4) would contain layer 2: it fails unevaluated, so (3, 4) is committed instead
    assert sel.windows == [(3, 4)]
    assert (2, 4) not in ev.calls


LAST = {(4, 5): 0.9, (3, 5): 0.2}  # on 6 layers: merging the last layer into layer 4 is the best window


def test_fixed_loop_merges_the_last_layer_unless_protected():
    ev = Oracle(LAST)
    sel = top_down(6, 0.5, ev, paper_loop=False, protect_last=False)
    assert ev.calls[:2] == [(4, 5), (3, 5)]  # starts at L-1
    assert sel.windows == [(4, 5)] and sel.scores == [0.9]
    kept = Oracle(LAST)
    sel = top_down(6, 0.5, kept, paper_loop=False, protect_last=True)
    assert kept.calls[0] == (3, 4) and all(w[1] <= 4 for w in kept.calls) and sel.windows == []


def test_paper_loop_is_unchanged_by_protect_last():
    runs = []
    for protect_last in (True, False):
        ev = Oracle({**TABLE, **LAST})
        sel = top_down(6, 0.5, ev, paper_loop=True, protect_last=protect_last)
        runs.append((ev.calls, sel.trace, sel.windows))
    assert runs[0] == runs[1]
    assert all(w[1] <= 4 for w in runs[0][0]) and runs[0][2] == [(2, 4)]  # the authors' loop starts at L-2


@pytest.mark.parametrize("paper_loop, protect_last, merges_last", [
    (False, False, True), (False, True, False), (True, False, False), (True, True, False)])
def test_select_windows_passes_protect_last_to_the_fixed_loop(paper_loop, protect_last, merges_last):
    from swm_ray.config import build_config
    from swm_ray.methods.selection import select_windows

    cfg = build_config(sets={"select.search": "top-down", "select.threshold": 0.5,
                             "select.paper_loop": paper_loop, "select.protect_last": protect_last})
    ev = Oracle(LAST)
    sel = select_windows(cfg, ev, 6, None)
    assert ((4, 5) in sel.windows) is merges_last
    assert any(5 in range(a, b + 1) for a, b in ev.calls) is merges_last  # never even scored when protected
