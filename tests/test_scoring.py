"""Candidate checks without model copies equal the brute-force procedure (deep copy + full forward)."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_models import ARCHS, tiny_model

from swm_ray.merge import apply_windows
from swm_ray.scoring import LocalEvaluator, ShardScorer, chunk_rows, reduce_scores
from swm_ray.stack import InMemoryStack, StreamingStack


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
    ev = LocalEvaluator([ShardScorer(stack, ids[:3], criterion, "reference"),  # shards split by rows
                         ShardScorer(stack, ids[3:], criterion, "reference")], criterion)
    got = ev.score(None, [(2, 3), (1, 4)])
    want = [_brute(model, ids, [(2, 3)], criterion), _brute(model, ids, [(1, 4)], criterion)]
    np.testing.assert_allclose(got, want, atol=2e-5)
    ev.commit(None, (3, 4))  # cumulative: later candidates contain the committed window
    got = ev.score(None, [(1, 2), (0, 2)])
    want = [_brute(model, ids, [(3, 4), (1, 2)], criterion), _brute(model, ids, [(3, 4), (0, 2)], criterion)]
    np.testing.assert_allclose(got, want, atol=2e-5)
    ev.reset()
    np.testing.assert_allclose(ev.score(None, [(2, 3)]), [_brute(model, ids, [(2, 3)], criterion)], atol=2e-5)


def test_identity_candidate_is_perfect():
    model, _ = tiny_model("llama", n_layers=4)
    ids = np.random.default_rng(1).integers(4, 256, size=(4, 10))
    out = ShardScorer(InMemoryStack(model), ids, "output", "reference").score([(1, 1)])
    kl = ShardScorer(InMemoryStack(model), ids, "kl", "reference").score([(1, 1)])
    assert _mean(out[0]) == pytest.approx(1.0, abs=1e-6) and out[0][1] == 4 and len(out[0][0]) == 4
    assert _mean(kl[0]) == pytest.approx(0.0, abs=1e-6) and kl[0][1] == 40


def test_noop_candidate_scores_the_current_model():
    model, _ = tiny_model("qwen3", n_layers=6)
    ids = np.random.default_rng(2).integers(4, 256, size=(4, 10))
    sc = ShardScorer(InMemoryStack(model), ids, "output", "reference")
    sc.commit((2, 4))
    (noop,) = sc.score([(1, 1)])  # shortcut: no forward at all
    want = _brute(model, ids, [(2, 4)], "output")
    assert _mean(noop) == pytest.approx(want, abs=2e-5)
    (merged_noop,) = sc.score([(2, 4)])  # the committed window itself is also the current model
    np.testing.assert_allclose(merged_noop[0], noop[0], atol=1e-9)


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
    cached = ShardScorer(InMemoryStack(model), ids, "kl", "reference")
    recomputed = ShardScorer(InMemoryStack(model), ids, "kl", "reference", logp_cache_bytes=0)
    assert cached.ref_logp is not None and recomputed.ref_logp is None
    a, b = cached.score([(2, 3)])[0], recomputed.score([(2, 3)])[0]
    assert a[1] == b[1] and _mean(a) == pytest.approx(_mean(b), rel=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["reference", "consistent", "mean", "keep-last"])
def test_streaming_scores_equal_in_memory(tmp_path, arch, method):
    """Layer streaming (layers read from the safetensors files one at a time, candidates layer-major, merged
    windows composed from the groups' states) gives the same per-row scores, bit for bit."""
    model, _ = tiny_model(arch, n_layers=6)
    model.save_pretrained(tmp_path)
    ids = np.random.default_rng(4).integers(4, 256, size=(5, 12))
    mem = ShardScorer(InMemoryStack(model), ids, "kl", method)
    stream_stack = StreamingStack.from_path(str(tmp_path), torch.device("cpu"), torch.float32)
    streamed = ShardScorer(stream_stack, ids, "kl", method, max_chunk=2)
    for sc in (mem, streamed):
        sc.commit((3, 4))
    cands = [(0, 1), (1, 2), (2, 4), (3, 5), (2, 2)]
    for a, b in zip(mem.score(cands), streamed.score(cands)):
        assert a[1] == b[1]
        np.testing.assert_allclose(a[0], b[0], rtol=1e-6, atol=1e-9)


def test_streaming_pass_builds_each_layer_once(tmp_path):
    """A best-first step over every adjacent pair reads each original layer once (reference merge)."""
    model, _ = tiny_model("llama", n_layers=6)
    model.save_pretrained(tmp_path)
    ids = np.random.default_rng(5).integers(4, 256, size=(4, 10))
    stack = StreamingStack.from_path(str(tmp_path), torch.device("cpu"), torch.float32)
    sc = ShardScorer(stack, ids, "output", "reference")
    sc.commit((1, 2))
    before = stack.layer_loads
    sc.score([(0, 2), (1, 3), (3, 4), (4, 5)])
    assert stack.layer_loads - before == 6
    limited = ShardScorer(stack, ids, "output", "reference", max_streams=2)  # two passes of two candidates
    before = stack.layer_loads
    limited.score([(0, 1), (1, 2), (2, 3), (3, 4)])
    assert stack.layer_loads - before == 12
