"""Selection loops on scripted similarity oracles: hand-worked traces."""

import numpy as np
import pytest

from swm_ray.errors import UserError
from swm_ray.selection import (
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
    from swm_ray.baselines import drop_windows, shortgpt_windows

    assert drop_windows([5, 3, 4, 9]) == [(8, 9), (2, 5)]
    bi = np.array([0.0, 0.5, 0.1, 0.2, 0.9, 0.05])
    assert shortgpt_windows(bi, 2) == [(4, 5), (1, 2)]  # layer 0 is never dropped
    assert shortgpt_windows(bi, 2, protected=[5]) == [(2, 3), (1, 2)][:0] or shortgpt_windows(bi, 2, [5]) == [(1, 3)]


def test_top_down_respects_protected_layers():
    ev = Oracle(TABLE)
    sel = top_down(6, 0.5, ev, paper_loop=True, protected=[2])
    # (2, 4) would contain layer 2: it fails unevaluated, so (3, 4) is committed instead
    assert sel.windows == [(3, 4)]
    assert (2, 4) not in ev.calls
