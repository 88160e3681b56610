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


def _reduced(x, variance, max_dims):
    """x's coordinates on its leading right singular directions (a direct SVD of the features)."""
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    share = torch.cumsum(s**2, 0) / (s**2).sum()
    keep = max(1, min(int((share < variance).sum()) + 1, int(max_dims)))
    return u[:, :keep] * s[:keep]


def classical_cca(x, y, variance, max_dims_per_token):
    """Canonical correlations and x's canonical variates by the textbook route: covariances of the SVD-reduced
    coordinates, the whitened cross-covariance Sxx^-1/2 Sxy Syy^-1/2 and its SVD."""
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    xr, yr = _reduced(x, variance, max_dims_per_token * len(x)), _reduced(y, variance, max_dims_per_token * len(y))

    def inv_sqrt(c):
        w, v = torch.linalg.eigh(c)
        return v @ torch.diag(w.rsqrt()) @ v.T

    sxx, syy, sxy = xr.T @ xr, yr.T @ yr, xr.T @ yr
    a, rho, _ = torch.linalg.svd(inv_sqrt(sxx) @ sxy @ inv_sqrt(syy), full_matrices=False)
    variates = xr @ inv_sqrt(sxx) @ a
    return x, variates / torch.linalg.vector_norm(variates, dim=0), rho


def rsa_scipy(x, y):
    from scipy.spatial.distance import pdist
    from scipy.stats import spearmanr

    xc, yc = (z.double() - z.double().mean(0) for z in (x, y))
    return float(spearmanr(pdist(xc.numpy(), "correlation"), pdist(yc.numpy(), "correlation")).statistic)


def ridge_predictivity_sklearn(x, y, groups, folds, ridge_share):
    """Primal ridge (scikit-learn, with intercept) per fold of whole sequences, R^2 pooled over folds and features
    against each training fold's mean."""
    from sklearn.linear_model import Ridge

    x, y = x.double().numpy(), y.double().numpy()
    sequences = torch.unique(groups, return_inverse=True)[1].numpy()
    sse = sst = 0.0
    for f in range(folds):
        test, train = sequences % folds == f, sequences % folds != f
        xtr = x[train] - x[train].mean(0)
        alpha = ridge_share * float((xtr**2).sum(1).mean())
        model = Ridge(alpha=alpha, fit_intercept=True, solver="svd").fit(x[train], y[train])
        sse += float(((y[test] - model.predict(x[test])) ** 2).sum())
        sst += float(((y[test] - y[train].mean(0)) ** 2).sum())
    return 1 - sse / sst


def cknna_platonic(x, y, topk):
    """CKNNA as platonic-rep writes it (Huh et al. 2024): row-normalised features, inner-product kernels, top-k masks
    with the diagonal excluded, HSIC_1 as sum(K * L^T) + ... on the masked kernels."""
    def hsic_unbiased(k, l):
        m = k.shape[0]
        k, l = k.clone().fill_diagonal_(0), l.clone().fill_diagonal_(0)
        return ((k * l.T).sum() + k.sum() * l.sum() / ((m - 1) * (m - 2)) - 2 * (k @ l).sum() / (m - 2)) / (m * (m - 3))

    def normalised(z):
        z = z.double() - z.double().mean(0)
        return z / z.norm(dim=1, keepdim=True)

    fa, fb = normalised(x), normalised(y)
    k, l = fa @ fa.T, fb @ fb.T
    n = len(k)

    def mask(g):
        idx = g.clone().fill_diagonal_(float("-inf")).topk(topk, dim=1).indices
        return torch.zeros(n, n, dtype=torch.float64).scatter_(1, idx, 1.0)

    mk, ml = mask(k), mask(l)
    return float(hsic_unbiased(mk * ml * k, mk * ml * l) / torch.sqrt(hsic_unbiased(mk * k, mk * k) * hsic_unbiased(ml * l, ml * l)))
