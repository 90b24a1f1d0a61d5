"""Candidate checks without model copies equal the brute-force procedure (deep copy + full forward); one forward
gives every signal; a scorer serves several current models (racing planners) with the same answers."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_models import ARCHS, tiny_model

from swm_ray.compute.refpass import Needs, Reference, chunk_rows
from swm_ray.compute.scoring import LocalEvaluator, ShardScorer, groups_from, reduce_scores
from swm_ray.compute.stack import InMemoryStack, StreamingStack
from swm_ray.edits.merge import apply_windows

ALL = Needs(checks=True, final=True, logp=True)


def _scorer(stack, ids, method, max_chunk=32, **kw):
    return ShardScorer(Reference(stack, ids, ALL, max_chunk=max_chunk,
                                 logp_cache_bytes=kw.pop("logp_cache_bytes", 2**30)), method, **kw)


def _g(n, *windows):
    return groups_from(n, windows)


def _mean(row_scores) -> float:
    values, count = row_scores
    return float(np.sum(values)) / count


def _brute(model, ids, windows, criterion):
    cand = copy.deepcopy(model)
    apply_windows(cand, windows, "reference")
    x = torch.tensor(ids)
    with torch.no_grad():
        o = model(x, output_hidden_states=True)
        n = cand(x, output_hidden_states=True)
    if criterion == "output":
        a, b = o.hidden_states[-1].flatten(1), n.hidden_states[-1].flatten(1)
        return F.cosine_similarity(a, b, dim=1).mean().item()
    if criterion == "nll":  # the candidate's own loss on the text, as transformers computes it
        with torch.no_grad():
            return cand(x, labels=x).loss.item()
    lo, ln = F.log_softmax(o.logits.float(), -1), F.log_softmax(n.logits.float(), -1)
    return (lo.exp() * (lo - ln)).sum(-1).mean().item()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("criterion", ["output", "kl", "nll"])
def test_scorer_matches_brute_force(arch, criterion):
    model, _ = tiny_model(arch, n_layers=6)
    ids = np.random.default_rng(0).integers(4, 256, size=(8, 12))
    stack = InMemoryStack(model)
    ev = LocalEvaluator([_scorer(stack, ids[:3], "reference"),  # shards split by rows
                         _scorer(stack, ids[3:], "reference")], criterion)
    got = ev.score(_g(6), [(2, 3), (1, 4)])
    want = [_brute(model, ids, [(2, 3)], criterion), _brute(model, ids, [(1, 4)], criterion)]
    np.testing.assert_allclose(got, want, atol=2e-5)
    # cumulative: later candidates contain the committed window
    got = ev.score(_g(6, (3, 4)), [(1, 2), (0, 2)])
    want = [_brute(model, ids, [(3, 4), (1, 2)], criterion), _brute(model, ids, [(3, 4), (0, 2)], criterion)]
    np.testing.assert_allclose(got, want, atol=2e-5)
    np.testing.assert_allclose(ev.score(_g(6), [(2, 3)]), [_brute(model, ids, [(2, 3)], criterion)], atol=2e-5)


def test_one_forward_gives_every_signal_as_separate_checks_would():
    """A check asked for output, kl and nll together returns, per signal, the bits of a check asked for it alone,
    and runs each candidate model once."""
    model, _ = tiny_model("qwen3", n_layers=6)
    ids = np.random.default_rng(6).integers(4, 256, size=(5, 12))
    stack = InMemoryStack(model)
    together = _scorer(stack, ids, "keep-first")
    both = together.score(_g(6, (3, 4)), [(0, 1), (1, 2), (3, 5)], ("output", "kl", "nll"))
    assert together.checks == 3
    for signal in ("output", "kl", "nll"):
        alone = _scorer(stack, ids, "keep-first").score(_g(6, (3, 4)), [(0, 1), (1, 2), (3, 5)], (signal,))
        for a, b in zip(both, alone):
            assert a[signal][1] == b[signal][1]
            np.testing.assert_array_equal(a[signal][0], b[signal][0])


def test_a_scorer_serves_several_current_models():
    """Racing planners stand at different states: a scorer that switches between them gives the same scores as
    a fresh scorer for each state, and it keeps at most max_states current models."""
    model, _ = tiny_model("gemma2", n_layers=8)
    ids = np.random.default_rng(7).integers(4, 256, size=(4, 10))
    stack = InMemoryStack(model)
    states = [_g(8), _g(8, (5, 6)), _g(8, (1, 2), (5, 6)), _g(8, (1, 3)), _g(8, (5, 6))]
    shared = _scorer(stack, ids, "reference", max_states=2)
    for groups in states:
        cands = [(groups[p][0], groups[p + 1][1]) for p in range(len(groups) - 1)]
        got = shared.score(groups, cands, ("output",))
        fresh = _scorer(stack, ids, "reference").score(groups, cands, ("output",))
        for a, b in zip(got, fresh):
            np.testing.assert_allclose(a["output"][0], b["output"][0], rtol=0, atol=1e-6)
        assert len(shared.states) <= 2


def test_identity_candidate_is_perfect():
    model, _ = tiny_model("llama", n_layers=4)
    ids = np.random.default_rng(1).integers(4, 256, size=(4, 10))
    (got,) = _scorer(InMemoryStack(model), ids, "reference").score(_g(4), [(1, 1)], ("output", "kl"))
    out, kl = got["output"], got["kl"]
    assert _mean(out) == pytest.approx(1.0, abs=1e-6) and out[1] == 4 and len(out[0]) == 4
    assert _mean(kl) == pytest.approx(0.0, abs=1e-6) and kl[1] == 40


def test_noop_candidate_scores_the_current_model():
    model, _ = tiny_model("qwen3", n_layers=6)
    ids = np.random.default_rng(2).integers(4, 256, size=(4, 10))
    sc = _scorer(InMemoryStack(model), ids, "reference")
    groups = _g(6, (2, 4))
    (noop,) = sc.score(groups, [(1, 1)])  # shortcut: no forward at all
    want = _brute(model, ids, [(2, 4)], "output")
    assert _mean(noop["output"]) == pytest.approx(want, abs=2e-5)
    (merged_noop,) = sc.score(groups, [(2, 4)])  # the committed window itself is also the current model
    np.testing.assert_allclose(merged_noop["output"][0], noop["output"][0], atol=1e-9)


def test_chunks_keep_every_row_once():
    assert chunk_rows(15, 10) == [(0, 10), (10, 15)]
    assert chunk_rows(3, 32) == [(0, 3)]


def test_reduction_is_exact_whatever_the_split():
    """fsum over per-row values: any split of the rows, in any order, gives the same bits."""
    rng = np.random.default_rng(0)
    values = rng.normal(size=40) * 10.0 ** rng.integers(-8, 8, size=40)
    whole = reduce_scores([[(values, 40)]])
    for cuts in ([13], [1, 2, 3, 39], list(range(1, 40))):
        parts = np.split(values, cuts)
        assert reduce_scores([[(p, len(p))] for p in parts]) == whole
        assert reduce_scores([[(p, len(p))] for p in reversed(parts)]) == whole


def test_kl_without_cached_log_probs_is_the_same():
    model, _ = tiny_model("gemma3", n_layers=6)
    ids = np.random.default_rng(3).integers(4, 256, size=(4, 10))
    cached = _scorer(InMemoryStack(model), ids, "reference")
    recomputed = _scorer(InMemoryStack(model), ids, "reference", logp_cache_bytes=0)
    assert cached.ref.ref_logp is not None and recomputed.ref.ref_logp is None
    a = cached.score(_g(6), [(2, 3)], ("kl",))[0]["kl"]
    b = recomputed.score(_g(6), [(2, 3)], ("kl",))[0]["kl"]
    assert a[1] == b[1] and _mean(a) == pytest.approx(_mean(b), rel=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["reference", "consistent", "mean", "keep-last"])
def test_streaming_scores_equal_in_memory(tmp_path, arch, method):
    """Layer streaming (layers read from the safetensors files one at a time, candidates layer-major, merged
    windows composed from the groups' states) gives the same per-row scores, bit for bit."""
    model, _ = tiny_model(arch, n_layers=6)
    model.save_pretrained(tmp_path)
    ids = np.random.default_rng(4).integers(4, 256, size=(5, 12))
    mem = _scorer(InMemoryStack(model), ids, method)
    stream_stack = StreamingStack.from_path(str(tmp_path), torch.device("cpu"), torch.float32)
    streamed = _scorer(stream_stack, ids, method, max_chunk=2)
    cands = [(0, 1), (1, 2), (2, 4), (3, 5), (2, 2)]
    for a, b in zip(mem.score(_g(6, (3, 4)), cands, ("kl",)), streamed.score(_g(6, (3, 4)), cands, ("kl",))):
        assert a["kl"][1] == b["kl"][1]
        np.testing.assert_allclose(a["kl"][0], b["kl"][0], rtol=1e-6, atol=1e-9)


def test_streaming_pass_builds_each_layer_once(tmp_path):
    """A best-first step over every adjacent pair reads each original layer once (reference merge), and the
    reference pass reads each layer once whatever it computes."""
    model, _ = tiny_model("llama", n_layers=6)
    model.save_pretrained(tmp_path)
    ids = np.random.default_rng(5).integers(4, 256, size=(4, 10))
    stack = StreamingStack.from_path(str(tmp_path), torch.device("cpu"), torch.float32)
    ref = Reference(stack, ids, Needs(checks=True, final=True, influence=True, angular=True, hsic=True),
                    hsic_batches={0: (0, 4)}, val_ids=ids, val_batches=[(0, 4)])
    assert stack.layer_loads == 6
    sc = ShardScorer(ref, "reference")
    before = stack.layer_loads
    sc.score(_g(6, (1, 2)), [(0, 2), (1, 3), (3, 4), (4, 5)])
    assert stack.layer_loads - before == 6
    limited = ShardScorer(ref, "reference", max_streams=2)  # two passes of two candidates
    before = stack.layer_loads
    limited.score(_g(6), [(0, 1), (1, 2), (2, 3), (3, 4)])
    assert stack.layer_loads - before == 12


@pytest.mark.parametrize("method", ["keep-first", "reference", "mean"])
def test_a_streamed_window_counts_the_layers_its_merge_reads(tmp_path, method, monkeypatch):
    """`layer_reads` (plan.json, streaming) counts the window's layers the merge reads a tensor of: a
    keep-first window of three layers reads its first layer only, a mean all three."""
    import re

    from swm_ray.io.checkpoint import Checkpoint

    model, _ = tiny_model("llama", n_layers=6)
    model.save_pretrained(tmp_path)
    stack = StreamingStack.from_path(str(tmp_path), torch.device("cpu"), torch.float32)
    read, layers = Checkpoint.read, set()

    def spy(self, name, *a, **kw):
        m = re.search(r"layers\.(\d+)\.", name)
        if m:
            layers.add(int(m[1]))
        return read(self, name, *a, **kw)

    monkeypatch.setattr(Checkpoint, "read", spy)
    before = stack.layer_loads
    stack.state(1, 3, method)
    assert stack.layer_loads - before == len(layers) == {"keep-first": 1, "mean": 3}.get(method, len(layers))
    assert layers <= {1, 2, 3}


def test_checks_in_memory_run_only_the_candidates_layers():
    """With the plan's hidden states kept, a step runs each candidate from its window up and nothing else: the
    plan's own layers above the lowest window are not run again."""
    from swm_ray.compute.scoring import groups_from

    model, _ = tiny_model("llama", n_layers=6)
    stack = InMemoryStack(model)
    ids = np.random.default_rng(0).integers(4, 256, size=(4, 10))
    sc = ShardScorer(Reference(stack, ids, Needs(checks=True, final=True)), "reference")
    groups = groups_from(6, [(4, 5)])  # 5 positions
    sc.state(groups)
    before = stack.token_runs
    cands = [(0, 1), (1, 2), (2, 3), (3, 5)]
    sc.score(groups, cands)  # the values: test_scorer_matches_brute_force, test_streaming_scores_equal_in_memory
    # a window at positions lo..hi: its merged layer, then the positions above it
    need = sum(1 + (len(groups) - 1 - hi) for hi in (1, 2, 3, 4))
    assert (stack.token_runs - before) == need * ids.size
