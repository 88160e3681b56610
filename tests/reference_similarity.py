"""Slow, textbook formulations of the similarity measures, independent of realign.measure.kernels' fast forms:
explicit centring matrices H K H and n x n Grams (Kornblith et al. 2019, eq. 2; Song et al. 2012, HSIC_1), the RBF
kernel built from the features. The tests check the package's estimators against these."""

import math

import torch

from realign.measure.kernels import centered_pair, linear_cka


def gram_linear_cka(x, y):
    """Linear CKA from HSIC with centred n x n Gram matrices, H K H."""
    x, y = x.double(), y.double()
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k, l = h @ (x @ x.T) @ h, h @ (y @ y.T) @ h
    return float((k * l).sum() / torch.sqrt((k * k).sum() * (l * l).sum()))


def gram_unbiased_hsic(k, l):
    """HSIC_1 of Song et al. (2012) written with matrix products on explicit Grams."""
    n = k.shape[0]
    k, l = k.clone(), l.clone()
    k.fill_diagonal_(0)
    l.fill_diagonal_(0)
    one = torch.ones(n, dtype=torch.float64)
    return (torch.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
            - 2 / (n - 2) * (one @ k @ l @ one)) / (n * (n - 3))


def gram_debiased_cka(x, y):
    xd, yd = x.double(), y.double()
    k, l = xd @ xd.T, yd @ yd.T
    return float(gram_unbiased_hsic(k, l) / math.sqrt(gram_unbiased_hsic(k, k) * gram_unbiased_hsic(l, l)))


def _centred_rbf_gram(x: torch.Tensor, sigma: float | None) -> torch.Tensor:
    dist2 = torch.cdist(x, x).square()
    if sigma is None:
        sigma = float(torch.sqrt(torch.median(dist2[~torch.eye(len(x), dtype=torch.bool)])))
    gram = torch.exp(-dist2 / (2 * sigma**2))
    n = len(x)
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    return h @ gram @ h


def rbf_cka(x: torch.Tensor, y: torch.Tensor, sigma: float | None = None) -> float:
    """CKA with Gaussian kernels built from the features; `sigma=None`: each input's median pairwise distance."""
    x, y = centered_pair(x, y)
    kx, ky = _centred_rbf_gram(x, sigma), _centred_rbf_gram(y, sigma)
    return float((kx * ky).sum() / torch.sqrt((kx * kx).sum() * (ky * ky).sum()))


def cka_matrix(xs, ys, debiased: bool = False) -> torch.Tensor:
    """[len(xs), len(ys)] linear CKA of every pair of layers, one feature-space linear_cka at a time."""
    return torch.tensor([[linear_cka(x, y, debiased=debiased) for y in ys] for x in xs], dtype=torch.float64)
