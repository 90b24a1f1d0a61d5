"""CKA maths: hand-derived values and invariants."""

import numpy as np
import pytest
import torch

from swm_ray.compute.similarity import cka, cka_from_sums, gram, hsic_matrix


def hsic(k: torch.Tensor, l: torch.Tensor) -> float:
    return float(hsic_matrix(torch.stack([k, l]))[0, 1])


def _pairs(a: list[tuple[int, int]]) -> torch.Tensor:
    k = torch.zeros(4, 4, dtype=torch.float64)
    for i, j in a:
        k[i, j] = k[j, i] = 1.0
    return k


def test_hand_derived_hsic_values():
    # K̃ pairs (0,1),(2,3): tr(K̃²)=4, 1ᵀK̃1=4, 1ᵀK̃²1=4 -> [4 + 16/6 - 8/2] / 4 = 2/3
    k = _pairs([(0, 1), (2, 3)])
    assert hsic(k, k) == pytest.approx(2 / 3)
    # other pairing: tr(K̃L̃)=0, 1ᵀK̃L̃1=4 -> [0 + 16/6 - 4] / 4 = -1/3, CKA = -1/3 / (2/3) = -0.5
    l = _pairs([(0, 2), (1, 3)])
    assert hsic(k, l) == pytest.approx(-1 / 3)
    s = hsic_matrix(torch.stack([k, l]))
    assert cka_from_sums(s)[0, 1] == pytest.approx(-0.5)
    # a constant kernel carries no dependence: unbiased HSIC is exactly 0
    ones = torch.ones(4, 4, dtype=torch.float64)
    assert hsic(ones, k) == pytest.approx(0.0, abs=1e-12)
    # the diagonal is ignored
    assert hsic(k + 5 * torch.eye(4, dtype=torch.float64), k) == pytest.approx(2 / 3)


def _naive_hsic(k: np.ndarray, l: np.ndarray) -> float:
    b = k.shape[0]
    k = k.copy()
    l = l.copy()
    np.fill_diagonal(k, 0)
    np.fill_diagonal(l, 0)
    one = np.ones(b)
    t = np.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((b - 1) * (b - 2)) - 2 * one @ k @ l @ one / (b - 2)
    return t / (b * (b - 3))


def test_vectorised_matches_naive_formula():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(7, 20, generator=g, dtype=torch.float64) for _ in range(3)]
    grams = torch.stack([gram(x) for x in xs])
    h = hsic_matrix(grams)
    for i in range(3):
        for j in range(3):
            assert h[i, j] == pytest.approx(_naive_hsic(grams[i].numpy(), grams[j].numpy()), rel=1e-10)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_invariants(kernel):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 30, generator=g, dtype=torch.float64)
    y = torch.randn(8, 30, generator=g, dtype=torch.float64) + 0.5 * x
    q, _ = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64))
    assert cka(x, x, kernel) == pytest.approx(1.0)
    assert cka(x, y, kernel) == pytest.approx(cka(y, x, kernel))
    assert cka(x @ q, y, kernel) == pytest.approx(cka(x, y, kernel), rel=1e-9)  # orthogonal transform
    assert cka(3.7 * x, y, kernel) == pytest.approx(cka(x, y, kernel), rel=1e-9)  # isotropic scaling
    assert abs(cka(x, y, kernel)) < 1.0


def test_sums_over_minibatches_add_up_in_any_split():
    """S is a plain sum over minibatches: any split over actors, added in minibatch order, gives the same."""
    g = torch.Generator().manual_seed(2)
    batches = [torch.stack([gram(torch.randn(5, 12, generator=g, dtype=torch.float64)) for _ in range(4)])
               for _ in range(3)]
    per_batch = [hsic_matrix(b) for b in batches]
    whole = per_batch[0] + per_batch[1] + per_batch[2]
    split = np.zeros((4, 4))
    for part in (per_batch[:1], per_batch[1:]):  # two actors, their minibatches added in order
        for s in part:
            split += s
    np.testing.assert_array_equal(split, whole)
    m = cka_from_sums(whole)
    np.testing.assert_allclose(np.diag(m), 1.0)
    np.testing.assert_allclose(m, m.T)


def test_minibatch_below_four_is_refused():
    with pytest.raises(ValueError, match="at least 4"):
        hsic_matrix(torch.zeros(2, 3, 3))
