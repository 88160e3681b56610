"""Centered kernel alignment (Kornblith et al. 2019) between two sets of representations of the same inputs.

Inputs are [n_samples, n_features] tensors of any float dtype; the arithmetic runs in float64. Linear CKA is
computed in feature space (d x d cross-covariances, cost O(n d^2)), never with n x n Gram matrices, which is
much cheaper when n > d. The debiased variant uses the unbiased HSIC estimator (Song et al. 2012), also
evaluated in feature space through its Gram-matrix identities.
"""

from __future__ import annotations

import torch


def _as64(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.ndim != 2:
        raise ValueError(f"{name} must be [n_samples, n_features], got shape {tuple(x.shape)}")
    x = x.detach().to(torch.float64)
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")
    return x


def _check_pair(x: torch.Tensor, y: torch.Tensor, min_n: int = 2):
    x, y = _as64(x, "x"), _as64(y, "y")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same number of samples, got {x.shape[0]} and {y.shape[0]}")
    if x.shape[0] < min_n:
        raise ValueError(f"need at least {min_n} samples, got {x.shape[0]}")
    return x, y


def _unbiased_hsic(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """HSIC_1 of Song et al. (2012) for linear kernels K = x x^T, L = y y^T with zeroed diagonals."""
    n = x.shape[0]
    kx = (x * x).sum(1)  # diag(K)
    ly = (y * y).sum(1)  # diag(L)
    trace_kl = (y.T @ x).square().sum() - (kx * ly).sum()  # tr(K~ L~)
    k_row = x @ x.sum(0) - kx  # K~ 1
    l_row = y @ y.sum(0) - ly  # L~ 1
    k_sum, l_sum = k_row.sum(), l_row.sum()
    return (trace_kl + k_sum * l_sum / ((n - 1) * (n - 2)) - 2 * (k_row @ l_row) / (n - 2)) / (n * (n - 3))


def linear_cka(x: torch.Tensor, y: torch.Tensor, debiased: bool = False) -> float:
    """Linear CKA in [0, 1] (the debiased estimate can dip slightly below 0)."""
    x, y = _check_pair(x, y, min_n=4 if debiased else 2)
    if debiased:
        hxy, hxx, hyy = _unbiased_hsic(x, y), _unbiased_hsic(x, x), _unbiased_hsic(y, y)
    else:
        x = x - x.mean(0, keepdim=True)
        y = y - y.mean(0, keepdim=True)
        hxy = (y.T @ x).square().sum()
        hxx = (x.T @ x).square().sum()
        hyy = (y.T @ y).square().sum()
    denominator = torch.sqrt(hxx * hyy)
    if denominator <= 0:
        raise ValueError("CKA is undefined for a constant representation (zero variance)")
    return float(hxy / denominator)


def _centered_gram_rbf(x: torch.Tensor, sigma: float | None) -> torch.Tensor:
    sq = (x * x).sum(1)
    dist2 = (sq[:, None] + sq[None, :] - 2 * x @ x.T).clamp_min(0)
    if sigma is None:
        off_diagonal = dist2[~torch.eye(len(x), dtype=torch.bool)]
        sigma = float(torch.sqrt(torch.median(off_diagonal)))
    if sigma <= 0:
        raise ValueError("RBF bandwidth is zero: the representation has (almost) no distinct points")
    gram = torch.exp(-dist2 / (2 * sigma**2))
    means = gram.mean(0, keepdim=True)
    return gram - means - means.T + gram.mean()


def rbf_cka(x: torch.Tensor, y: torch.Tensor, sigma: float | None = None) -> float:
    """CKA with Gaussian kernels; `sigma=None` uses the median pairwise distance of each input."""
    x, y = _check_pair(x, y)
    kx, ky = _centered_gram_rbf(x, sigma), _centered_gram_rbf(y, sigma)
    return float((kx * ky).sum() / torch.sqrt((kx * kx).sum() * (ky * ky).sum()))


def cka_matrix(xs: list[torch.Tensor], ys: list[torch.Tensor], debiased: bool = False) -> torch.Tensor:
    """[len(xs), len(ys)] float64 matrix of linear CKA between every pair of layers."""
    return torch.tensor([[linear_cka(x, y, debiased=debiased) for y in ys] for x in xs], dtype=torch.float64)
