"""Candidate checks without model copies equal the brute-force procedure (deep copy + full forward)."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_models import ARCHS, tiny_model

from swm_ray.merge import apply_windows
from swm_ray.scoring import LocalEvaluator, ShardScorer


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
    ev = LocalEvaluator([ShardScorer(model, ids, [(0, 4)], criterion, "reference"),
                         ShardScorer(model, ids, [(4, 8)], criterion, "reference")], criterion)
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
    out = ShardScorer(model, ids, [(0, 4)], "output", "reference").score([(1, 1)])
    kl = ShardScorer(model, ids, [(0, 4)], "kl", "reference").score([(1, 1)])
    assert out[0][0] / out[0][1] == pytest.approx(1.0, abs=1e-6) and out[0][1] == 4
    assert kl[0][0] / kl[0][1] == pytest.approx(0.0, abs=1e-6) and kl[0][1] == 40


def test_noop_candidate_scores_the_current_model():
    model, _ = tiny_model("qwen3", n_layers=6)
    ids = np.random.default_rng(2).integers(4, 256, size=(4, 10))
    sc = ShardScorer(model, ids, [(0, 4)], "output", "reference")
    sc.commit((2, 4))
    (noop,) = sc.score([(1, 1)])  # shortcut: no forward at all
    want = _brute(model, ids, [(2, 4)], "output")
    assert noop[0] / noop[1] == pytest.approx(want, abs=2e-5)
    (merged_noop,) = sc.score([(2, 4)])  # the committed window itself is also the current model
    assert merged_noop[0] == pytest.approx(noop[0], abs=1e-9)


def test_coalesce_keeps_every_row_once():
    from swm_ray.scoring import coalesce

    assert coalesce([(0, 5), (5, 10), (10, 15)], 10) == [(0, 10), (10, 15)]
    assert coalesce([(0, 4), (8, 12)], 32) == [(0, 4), (8, 12)]  # not adjacent: not joined


def test_kl_without_cached_log_probs_is_the_same():
    model, _ = tiny_model("gemma3", n_layers=6)
    ids = np.random.default_rng(3).integers(4, 256, size=(4, 10))
    cached = ShardScorer(model, ids, [(0, 4)], "kl", "reference")
    recomputed = ShardScorer(model, ids, [(0, 4)], "kl", "reference", logp_cache_bytes=0)
    assert cached.keep_logp and not recomputed.keep_logp
    a, b = cached.score([(2, 3)])[0], recomputed.score([(2, 3)])[0]
    assert a[1] == b[1] and a[0] == pytest.approx(b[0], rel=1e-5)
