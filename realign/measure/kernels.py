"""The mathematics of representation similarity, each estimator written once: one unbiased HSIC, one CKA of each
kind, Procrustes similarity, neighbourhood, canonical-correlation, representational-similarity and predictivity
measures. Inputs are [n_samples, n_features] representations of the same inputs (tokens);
realign.measure.similarity lists the measures the study reports and computes them layer by layer.

* linear CKA (Kornblith et al. 2019) with the biased HSIC estimator: inflated when the number of tokens n is not
  much larger than the feature dimension; its differentiable float32 form `minibatch_linear_cka` is the training
  term of the CKA-regularised recoveries;
* debiased linear CKA: the unbiased HSIC estimator HSIC_1 of Song et al. (2012), as in Nguyen et al. (2021);
* RBF CKA with the median pairwise distance of each input as bandwidth (Kornblith et al. 2019);
* orthogonal Procrustes similarity ||X^T Y||_* of the centred, unit-Frobenius-norm representations, i.e.
  1 - d^2 / 2 with d the Procrustes distance of Ding et al. (2021): 1 = equal up to a rotation;
* mutual k-nearest-neighbour overlap (Huh et al. 2024): the fraction of each token's k nearest neighbours
  (cosine, centred features) shared by both representations; chance is k / (n - 1); and CKNNA, its kernel-aligned
  form (platonic-rep);
* SVCCA (Raghu et al. 2017) and PWCCA (Morcos et al. 2018) on the leading singular subspaces;
* RSA: the Spearman correlation of the correlation-distance dissimilarity matrices (Kriegeskorte et al. 2008);
* linear predictivity: cross-validated ridge R^2 from the artifact's representation to the teacher's, folds of
  whole probe sequences.

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
    Agrees with the float64 estimate to ~1e-5 (tests/test_held.py). With fewer tokens than features (a held
    batch: ~500 content tokens, 576 features in SmolLM2) the same HSIC_1 goes through the n x n Gram matrices, whose
    products and gradients cost about 0.6 of the three d x d ones (n^2 d against n d^2 multiply-adds each)."""
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"need [n, d] inputs with the same n, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] < 4:
        raise ValueError(f"debiased CKA needs at least 4 samples, got {x.shape[0]}")
    x, y = x.float(), y.float()
    x, y = x - x.mean(0, keepdim=True), y - y.mean(0, keepdim=True)
    if x.shape[0] < max(x.shape[1], y.shape[1]):
        k0, l0 = _off_diagonal(x @ x.T), _off_diagonal(y @ y.T)
        hxx, hyy, hxy = _hsic1_gram(k0, k0), _hsic1_gram(l0, l0), _hsic1_gram(k0, l0)
    else:
        hxx, hyy, hxy = _feature_hsic1(x, x), _feature_hsic1(y, y), None
    if not (hxx > 0 and hyy > 0):  # a (near-)constant representation, or too few tokens for the estimate
        raise ValueError(f"debiased CKA is undefined here: self-HSIC {float(hxx):.3g} and {float(hyy):.3g} "
                         f"on {x.shape[0]} samples")
    return cka_from_hsic(_feature_hsic1(x, y) if hxy is None else hxy, hxx, hyy)


def _off_diagonal(k: torch.Tensor) -> torch.Tensor:
    """K with its diagonal set to 0, differentiably."""
    return k - torch.diag_embed(torch.diagonal(k))


def minibatch_linear_cka(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Differentiable linear CKA between [n, d] student and teacher features of the same n tokens.

    Feature-space form (d x d cross-covariance), float32; the biased estimator, as in CKA-regularised training,
    where the batch is the sample: the training term of the CKA-regularised recoveries (realign.recover.losses),
    never a measurement."""
    x = x.float() - x.float().mean(0, keepdim=True)
    y = y.float() - y.float().mean(0, keepdim=True)
    cross = (y.T @ x).square().sum()
    return cross / ((x.T @ x).square().sum().sqrt() * (y.T @ y).square().sum().sqrt() + 1e-12)


def rbf_cka_from_gram(k: torch.Tensor, l: torch.Tensor) -> float:
    """RBF CKA with each input's median pairwise distance as bandwidth, from the linear Gram matrices X X^T."""

    def centred_rbf(g: torch.Tensor) -> torch.Tensor:
        sq = torch.diagonal(g)
        dist2 = (sq[:, None] + sq[None, :]).sub_(g, alpha=2).clamp_min_(0)  # in place: n x n is the cost here
        # The median over the upper triangle is the off-diagonal median: each distance stands twice off the
        # diagonal, and the lower median of that doubled list is the same value (at half the memory and time).
        rows, cols = torch.triu_indices(len(g), len(g), 1)
        sigma2 = float(torch.median(dist2[rows, cols]))
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


def _cosine(g: torch.Tensor) -> torch.Tensor:
    """The cosine kernel of a Gram matrix."""
    norms = torch.sqrt(torch.diagonal(g)).clamp_min(1e-300)
    return g / norms[:, None] / norms[None, :]


def _nearest(cosine: torch.Tensor, k: int) -> torch.Tensor:
    """[n, k] indices of each token's k nearest neighbours under a cosine kernel, itself excluded."""
    cosine = cosine.clone().fill_diagonal_(-math.inf)
    return cosine.topk(k, dim=1).indices


def _check_neighbours(n_neighbours: int, n_samples: int) -> None:
    if not 1 <= n_neighbours < n_samples:
        raise ValueError(f"knn_k must be between 1 and n_samples - 1 = {n_samples - 1}, got {n_neighbours}")


def mutual_knn_from_gram(k: torch.Tensor, l: torch.Tensor, n_neighbours: int) -> float:
    """Mean fraction of shared cosine k-nearest neighbours (self excluded) of each token in the two spaces."""
    _check_neighbours(n_neighbours, len(k))
    a, b = _nearest(_cosine(k), n_neighbours), _nearest(_cosine(l), n_neighbours)
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


# ---------------------------------------------------------------------------------------------------------------
# Families beyond CKA (issue 18): CCA-based, representational similarity analysis, linear predictivity and CKNNA.
# The probe has about as many tokens as the model has features, so estimators that fit a linear map (CCA, ridge)
# are reduced or regularised as stated at each; their null floors (realign.measure.stage.null_floors: random-init
# model, shuffled tokens) show what chance gives them on the study's own token count.

CCA_VARIANCE = 0.99  # SVCCA keeps the leading singular directions that explain this share of the variance ...
CCA_MAX_DIMS_PER_TOKEN = 0.1  # ... and at most this many per token: k canonical correlations fitted on n tokens are
#                               inflated by about k / n, and Raghu et al. (2017) fitted on far more points than dims
PREDICTIVITY_FOLDS = 5  # cross-validation folds of whole probe sequences (tokens of a sequence are not independent)
PREDICTIVITY_RIDGE = 1e-2  # ridge penalty as a share of the mean squared token norm of the training fold


def _hsic1_gram(k0: torch.Tensor, l0: torch.Tensor) -> torch.Tensor:
    """HSIC_1 of two explicit kernel matrices whose diagonals are already zero, in its matrix form tr(K0 L0) and
    1^T K0 L0 1, which also holds for the non-symmetric neighbour-masked kernels of CKNNA."""
    return hsic1((k0 * l0.T).sum(), k0.sum(), l0.sum(), k0.sum(0) @ l0.sum(1), len(k0))


def cknna_from_gram(k: torch.Tensor, l: torch.Tensor, n_neighbours: int) -> float:
    """CKNNA (Huh et al. 2024, the kernel-aligned mutual k-NN of platonic-rep): the unbiased-HSIC CKA of the cosine
    kernels restricted to the token pairs that are k-nearest neighbours in both spaces, normalised by each space's
    self-alignment over its own neighbour pairs. 1 when the two neighbourhood structures and kernels agree."""
    _check_neighbours(n_neighbours, len(k))
    ck, cl = _cosine(k), _cosine(l)

    def neighbour_mask(c: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(c).scatter_(1, _nearest(c, n_neighbours), 1.0)

    mk, ml = neighbour_mask(ck), neighbour_mask(cl)
    both = mk * ml
    hkl, hkk, hll = _hsic1_gram(both * ck, both * cl), _hsic1_gram(mk * ck, mk * ck), _hsic1_gram(ml * cl, ml * cl)
    return float(hkl / torch.sqrt(hkk * hll))


def _leading_subspace(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis [n, k] of the leading left singular directions of centred features X [n, d]:
    CCA_VARIANCE of the variance, at most CCA_MAX_DIMS_PER_TOKEN x n directions. From the thin SVD of X, which
    costs n d min(n, d): an eigensolve of the n x n Gram matrix X X^T gives the same directions at n^3 (measured
    at the confirmatory study's 2304 probe tokens and 576 features: SVCCA of one layer pair 8.3 s before, 1.1 s now)."""
    vectors, singular, _ = torch.linalg.svd(x, full_matrices=False)
    values = singular.square()
    share = torch.cumsum(values, 0) / values.sum()
    keep = int((share < CCA_VARIANCE).sum()) + 1
    return vectors[:, :max(1, min(keep, int(CCA_MAX_DIMS_PER_TOKEN * len(x))))]


def _canonical(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(canonical variates of the first representation [n, m] as unit vectors, canonical correlations [m]), of
    centred features."""
    ux, uy = _leading_subspace(x), _leading_subspace(y)
    p, rho, _ = torch.linalg.svd(ux.T @ uy, full_matrices=False)
    return ux @ p, rho.clamp(0, 1)


def svcca(x: torch.Tensor, y: torch.Tensor) -> float:
    """SVCCA (Raghu et al. 2017): the mean canonical correlation between the leading singular subspaces of the two
    representations."""
    x, y = centered_pair(x, y, min_n=4)
    return float(_canonical(x, y)[1].mean())


def pwcca(x: torch.Tensor, y: torch.Tensor) -> float:
    """PWCCA (Morcos et al. 2018): the same canonical correlations weighted by how much of x (here the teacher)
    each canonical variate accounts for, alpha_i = sum_j |<h_i, x_j>| over x's centred features."""
    x, y = centered_pair(x, y, min_n=4)
    variates, rho = _canonical(x, y)
    weights = (variates.T @ x).abs().sum(1)
    return float((weights * rho).sum() / weights.sum())


def _ranks(v: torch.Tensor) -> torch.Tensor:
    ranks = torch.empty_like(v)
    ranks[v.argsort()] = torch.arange(len(v), dtype=v.dtype)
    return ranks


def rsa(x: torch.Tensor, y: torch.Tensor) -> float:
    """Representational similarity analysis (Kriegeskorte et al. 2008): the Spearman correlation between the two
    representational dissimilarity matrices (1 - Pearson correlation of every pair of tokens), upper triangles."""
    x, y = centered_pair(x, y, min_n=3)

    def rdm(z: torch.Tensor) -> torch.Tensor:
        z = z - z.mean(1, keepdim=True)
        z = z / torch.linalg.vector_norm(z, dim=1, keepdim=True).clamp_min(1e-300)
        upper = torch.triu_indices(len(z), len(z), 1)
        return 1 - (z @ z.T)[upper[0], upper[1]]

    rx, ry = _ranks(rdm(x)), _ranks(rdm(y))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx @ ry) / torch.sqrt((rx @ rx) * (ry @ ry)))


def linear_predictivity(x: torch.Tensor, y: torch.Tensor, groups: torch.Tensor) -> float:
    """Cross-validated R^2 of ridge regression predicting y (the teacher) from x (the artifact): PREDICTIVITY_FOLDS
    folds of whole sequences (`groups`: the sequence of each token), the penalty PREDICTIVITY_RIDGE x the fold's mean
    squared token norm, R^2 = 1 - SSE / SST pooled over folds and features, against each training fold's mean.
    Not symmetric; 1: the teacher's features are a linear function of the artifact's; <= 0: no better than the mean.
    Solved in whichever form is smaller, the same estimate (the push-through identity
    X^T (X X^T + r I)^-1 = (X^T X + r I)^-1 X^T): the dual (n x n) when a fold trains on fewer tokens than there are
    features, the primal (features x features) otherwise (the confirmatory study's 2304 probe tokens and 576
    features: several times faster)."""
    x, y = centered_pair(x, y, min_n=4)
    sequences = torch.unique(groups, return_inverse=True)[1]
    n_sequences = int(sequences.max()) + 1
    folds = min(PREDICTIVITY_FOLDS, n_sequences)
    if folds < 2:
        raise ValueError("linear predictivity needs at least 2 probe sequences to cross-validate")
    fold_of_token = sequences % folds
    sse = sst = 0.0
    for f in range(folds):
        test, train = fold_of_token == f, fold_of_token != f
        x_mean, y_mean = x[train].mean(0), y[train].mean(0)
        xtr, ytr, xte, yte = x[train] - x_mean, y[train] - y_mean, x[test] - x_mean, y[test] - y_mean
        ridge = PREDICTIVITY_RIDGE * float(xtr.square().sum()) / len(xtr)  # x the mean squared token norm
        if len(xtr) <= xtr.shape[1]:  # dual: coefficients on the training tokens
            k = xtr @ xtr.T
            predicted = xte @ xtr.T @ torch.linalg.solve(k + ridge * torch.eye(len(k), dtype=k.dtype), ytr)
        else:  # primal: coefficients on the features
            c = xtr.T @ xtr
            predicted = xte @ torch.linalg.solve(c + ridge * torch.eye(len(c), dtype=c.dtype), xtr.T @ ytr)
        sse += float((yte - predicted).square().sum())
        sst += float(yte.square().sum())
    if sst <= 0:
        raise ValueError("linear predictivity is undefined for a constant target representation")
    return 1 - sse / sst
