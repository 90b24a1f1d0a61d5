"""Minibatch CKA as additive statistics.

For each minibatch of b sequences and each representation l (0 = embedding output, l = decoder layer l's
output) we form the b×b Gram matrix K_l, then the unbiased HSIC (Song et al. 2012) for every pair:

    HSIC_1(K, L) = [tr(K̃L̃) + (1ᵀK̃1)(1ᵀL̃1)/((b−1)(b−2)) − 2·1ᵀK̃L̃1/(b−2)] / (b(b−3)),

K̃, L̃ being K, L with zeroed diagonals. S[i, j] = Σ_minibatches HSIC_1 (float64) is a plain sum, so shards
add up; CKA[i, j] = S[i, j] / sqrt(S[i, i]·S[j, j]).
"""

from __future__ import annotations

import numpy as np
import torch


def features(hidden: torch.Tensor, skip_first_tokens: int = 0) -> torch.Tensor:
    """(b, T, d) hidden states -> (b, (T-skip)·d) float64 feature rows (one sequence = one sample)."""
    if skip_first_tokens >= hidden.shape[1]:
        raise ValueError(f"skip_first_tokens={skip_first_tokens} leaves no position of {hidden.shape[1]}")
    return hidden[:, skip_first_tokens:, :].reshape(hidden.shape[0], -1).to(torch.float64)


def gram(x: torch.Tensor, kernel: str = "linear") -> torch.Tensor:
    """(b, f) float64 features -> (b, b) Gram matrix. RBF uses the median-distance bandwidth."""
    k = x @ x.T
    if kernel == "linear":
        return k
    if kernel == "rbf":
        sq = torch.diag(k)
        d2 = (sq[:, None] + sq[None, :] - 2 * k).clamp_min(0)
        off = d2[~torch.eye(d2.shape[0], dtype=torch.bool, device=d2.device)]
        med = torch.median(off) if off.numel() else torch.tensor(1.0, dtype=d2.dtype)
        return torch.exp(-d2 / (2 * med.clamp_min(1e-30)))
    raise ValueError(f"unknown kernel {kernel!r}")


def stack_on_one_device(grams: list[torch.Tensor]) -> torch.Tensor:
    """Gram matrices of successive layers stacked on the first one's device (a device map leaves each layer's
    output, and so its Gram matrix, on that layer's GPU)."""
    return torch.stack([g.to(grams[0].device) for g in grams])


def hsic_matrix(grams: torch.Tensor) -> np.ndarray:
    """(n, b, b) Gram matrices of n representations -> (n, n) unbiased HSIC for all pairs (float64)."""
    g = grams.to(torch.float64).clone()
    n, b, _ = g.shape
    if b < 4:
        raise ValueError(f"unbiased HSIC needs a minibatch of at least 4 sequences, got {b}")
    g.diagonal(dim1=1, dim2=2).zero_()
    flat = g.reshape(n, b * b)
    trace = flat @ flat.T  # tr(K_i K_j) for symmetric K
    total = flat.sum(dim=1)  # 1ᵀ K 1
    rows = g.sum(dim=2)  # K 1, shape (n, b)
    h = trace + torch.outer(total, total) / ((b - 1) * (b - 2)) - 2 * (rows @ rows.T) / (b - 2)
    return (h / (b * (b - 3))).cpu().numpy()


def cka_from_sums(s: np.ndarray) -> np.ndarray:
    """CKA[i, j] = S[i, j] / sqrt(S[i, i] S[j, j])."""
    d = np.sqrt(np.clip(np.diag(s), 1e-300, None))
    return s / np.outer(d, d)


def cka(x: torch.Tensor, y: torch.Tensor, kernel: str = "linear") -> float:
    """CKA of two (b, f) feature sets from one minibatch (convenience for tests and small checks)."""
    s = hsic_matrix(torch.stack([gram(x.to(torch.float64), kernel), gram(y.to(torch.float64), kernel)]))
    return float(cka_from_sums(s)[0, 1])
