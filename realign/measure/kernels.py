"""The mathematics of representation similarity, each estimator written once: one unbiased HSIC, one CKA of each
kind, Procrustes similarity and mutual k-NN overlap. Inputs are [n_samples, n_features] representations of the same
inputs (tokens); realign.measure.similarity lists the measures the study reports and computes them layer by layer.

* linear CKA (Kornblith et al. 2019) with the biased HSIC estimator: inflated when the number of tokens n is not
  much larger than the feature dimension;
* debiased linear CKA: the unbiased HSIC estimator HSIC_1 of Song et al. (2012), as in Nguyen et al. (2021);
* RBF CKA with the median pairwise distance of each input as bandwidth (Kornblith et al. 2019);
* orthogonal Procrustes similarity ||X^T Y||_* of the centred, unit-Frobenius-norm representations, i.e.
  1 - d^2 / 2 with d the Procrustes distance of Ding et al. (2021): 1 = equal up to a rotation;
* mutual k-nearest-neighbour overlap (Huh et al. 2024): the fraction of each token's k nearest neighbours
  (cosine, centred features) shared by both representations; chance is k / (n - 1).

The slow textbook formulations these are checked against (explicit H K H, n x n Gram matrices) live in
tests/reference_similarity.py.
"""

from __future__ import annotations

import math

import torch


def centered64(x: torch.Tensor, name: str = "x") -> torch.Tensor:
    """`x` as float64 with its column means removed; a clear error for a wrong shape or a non-finite value."""
    if x.ndim != 2:
        raise ValueError(f"{name} must be [n_samples, n_features], got shape {tuple(x.shape)}")
    x = x.detach().to(torch.float64)
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")
    return x - x.mean(0, keepdim=True)


def centered_pair(x: torch.Tensor, y: torch.Tensor, min_n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = centered64(x, "x"), centered64(y, "y")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same number of samples, got {x.shape[0]} and {y.shape[0]}")
    if x.shape[0] < min_n:
        raise ValueError(f"need at least {min_n} samples, got {x.shape[0]}")
    return x, y


def hsic1(trace_offdiag, k_sum, l_sum, rows_dot, n):
    """HSIC_1 of Song et al. (2012) from its sufficient sums, for kernels K, L with zeroed diagonals (K0, L0):
    trace_offdiag = tr(K0 L0), k_sum = 1^T K0 1, l_sum = 1^T L0 1, rows_dot = (K0 1)^T (L0 1). Every unbiased
    HSIC of the package (feature-space, Gram-space, weighted bootstrap replicates, layer x layer) goes through here;
    arguments may be tensors of any matching shape."""
    return (trace_offdiag + k_sum * l_sum / ((n - 1) * (n - 2)) - 2 * rows_dot / (n - 2)) / (n * (n - 3))


def _feature_hsic1(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """HSIC_1 for linear kernels K = x x^T, L = y y^T, evaluated in feature space (d x d products, O(n d^2))."""
    kx, ly = (x * x).sum(1), (y * y).sum(1)  # diag(K), diag(L)
    k_rows, l_rows = x @ x.sum(0) - kx, y @ y.sum(0) - ly  # K0 1, L0 1
    trace_offdiag = (y.T @ x).square().sum() - (kx * ly).sum()
    return hsic1(trace_offdiag, k_rows.sum(), l_rows.sum(), k_rows @ l_rows, x.shape[0])


def cka_from_hsic(hxy, hxx, hyy):
    return hxy / torch.sqrt(hxx * hyy)


def linear_cka(x: torch.Tensor, y: torch.Tensor, debiased: bool = False) -> float:
    """Linear CKA in [0, 1] (the debiased estimate can dip slightly below 0), in float64 and feature space, which
    is the cheap form when n > d (the null floors at small token counts use it)."""
    xc, yc = centered_pair(x, y, min_n=4 if debiased else 2)
    if debiased:  # a U-statistic, invariant to a shift of the features: the uncentred float64 values serve as well
        x, y = x.detach().to(torch.float64), y.detach().to(torch.float64)
        hxy, hxx, hyy = _feature_hsic1(x, y), _feature_hsic1(x, x), _feature_hsic1(y, y)
    else:
        hxy, hxx, hyy = (yc.T @ xc).square().sum(), (xc.T @ xc).square().sum(), (yc.T @ yc).square().sum()
    if torch.sqrt(hxx * hyy) <= 0:
        raise ValueError("CKA is undefined for a constant representation (zero variance)")
    return float(cka_from_hsic(hxy, hxx, hyy))


def debiased_cka(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Debiased linear CKA as a differentiable scalar: the measurement's estimator (linear_cka(debiased=True)),
    for a training objective that must constrain the very number the study reports.

    Same HSIC_1 code, not a re-derivation; only the dtype differs: float32, because a training step cannot afford
    float64 GEMMs on a GPU. That is safe after centring: the U-statistic is invariant to a shift of the features,
    and removing the few huge constant dimensions of hidden states first is what keeps float32 from cancelling.
    Agrees with the float64 estimate to ~1e-5 (tests/test_held.py)."""
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"need [n, d] inputs with the same n, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] < 4:
        raise ValueError(f"debiased CKA needs at least 4 samples, got {x.shape[0]}")
    x, y = x.float(), y.float()
    x, y = x - x.mean(0, keepdim=True), y - y.mean(0, keepdim=True)
    hxx, hyy = _feature_hsic1(x, x), _feature_hsic1(y, y)
    if not (hxx > 0 and hyy > 0):  # a (near-)constant representation, or too few tokens for the estimate
        raise ValueError(f"debiased CKA is undefined here: self-HSIC {float(hxx):.3g} and {float(hyy):.3g} "
                         f"on {x.shape[0]} samples")
    return cka_from_hsic(_feature_hsic1(x, y), hxx, hyy)


def rbf_cka_from_gram(k: torch.Tensor, l: torch.Tensor) -> float:
    """RBF CKA with each input's median pairwise distance as bandwidth, from the linear Gram matrices X X^T."""

    def centred_rbf(g: torch.Tensor) -> torch.Tensor:
        sq = torch.diagonal(g)
        dist2 = (sq[:, None] + sq[None, :] - 2 * g).clamp_min(0)
        off = dist2[~torch.eye(len(g), dtype=torch.bool)]
        sigma2 = float(torch.median(off))
        if sigma2 <= 0:
            raise ValueError("RBF bandwidth is zero: the representation has (almost) no distinct points")
        r = torch.exp(-dist2 / (2 * sigma2))
        means = r.mean(0, keepdim=True)
        return r - means - means.T + r.mean()

    kr, lr = centred_rbf(k), centred_rbf(l)
    return float((kr * lr).sum() / torch.sqrt((kr * kr).sum() * (lr * lr).sum()))


def procrustes_similarity(x: torch.Tensor, y: torch.Tensor) -> float:
    """||X^T Y||_* for centred X, Y scaled to unit Frobenius norm: 1 - (Procrustes distance)^2 / 2, in [0, 1]."""
    x, y = centered64(x, "x"), centered64(y, "y")
    nx, ny = torch.linalg.matrix_norm(x), torch.linalg.matrix_norm(y)
    if nx == 0 or ny == 0:
        raise ValueError("Procrustes similarity is undefined for a constant representation")
    return float(torch.linalg.svdvals((x / nx).T @ (y / ny)).sum())


def _neighbours(g: torch.Tensor, k: int) -> torch.Tensor:
    norms = torch.sqrt(torch.diagonal(g)).clamp_min(1e-300)
    cosine = g / norms[:, None] / norms[None, :]
    cosine.fill_diagonal_(-math.inf)
    return cosine.topk(k, dim=1).indices


def mutual_knn_from_gram(k: torch.Tensor, l: torch.Tensor, n_neighbours: int) -> float:
    """Mean fraction of shared cosine k-nearest neighbours (self excluded) of each token in the two spaces."""
    if not 1 <= n_neighbours < len(k):
        raise ValueError(f"knn_k must be between 1 and n_samples - 1 = {len(k) - 1}, got {n_neighbours}")
    a, b = _neighbours(k, n_neighbours), _neighbours(l, n_neighbours)
    shared = (a[:, :, None] == b[:, None, :]).any(-1).sum(1)
    return float(shared.double().mean() / n_neighbours)


def mutual_knn(x: torch.Tensor, y: torch.Tensor, n_neighbours: int = 10) -> float:
    x, y = centered_pair(x, y)
    return mutual_knn_from_gram(x @ x.T, y @ y.T, n_neighbours)


def cka_matrices(teacher_layers, artifact_layers, max_tokens: int = 2048, seed: int = 0) -> dict:
    """Linear and debiased CKA of every teacher layer (rows) with every artifact layer (columns).

    All layers' Gram matrices are held at once, so above `max_tokens` probe tokens a seeded random subset of that
    size is used (the debiased estimator keeps the subset free of small-sample inflation): memory is
    2 x layers x max_tokens^2 float64 values. Terms of the zero-diagonal Grams come from the full ones minus
    their diagonals, so only one Gram per layer is stored."""
    n = teacher_layers[0].shape[0]
    pick = torch.arange(n) if n <= max_tokens else torch.randperm(n, generator=torch.Generator().manual_seed(seed))[
        :max_tokens].sort().values
    m = len(pick)

    def grams(layers):
        flat = []
        for x in layers:
            xc = centered64(x[pick])
            flat.append((xc @ xc.T).reshape(-1))
        stacked = torch.stack(flat)  # [L, m * m]
        diag = stacked[:, :: m + 1]  # [L, m]
        rows0 = stacked.view(len(layers), m, m).sum(2) - diag  # row sums of K with a zero diagonal
        return stacked, diag, rows0

    kt, dt, rt = grams(teacher_layers)
    ka, da, ra = grams(artifact_layers)

    def unbiased(k_a, d_a, r_a, k_b, d_b, r_b):
        return hsic1(k_a @ k_b.T - d_a @ d_b.T, r_a.sum(1)[:, None], r_b.sum(1)[None, :], r_a @ r_b.T, m)

    biased = kt @ ka.T
    self_t, self_a = (kt * kt).sum(1), (ka * ka).sum(1)
    u_ta = unbiased(kt, dt, rt, ka, da, ra)
    u_t = torch.diagonal(unbiased(kt, dt, rt, kt, dt, rt))
    u_a = torch.diagonal(unbiased(ka, da, ra, ka, da, ra))
    return {"linear": cka_from_hsic(biased, self_t[:, None], self_a[None, :]),
            "debiased": cka_from_hsic(u_ta, u_t[:, None], u_a[None, :]), "n_tokens": m}
