"""Centered kernel alignment (Kornblith et al. 2019) between two sets of representations of the same inputs.

Inputs are [n_samples, n_features] tensors of any float dtype; the arithmetic runs in float64. Linear CKA is
computed in feature space (d x d cross-covariances, cost O(n d^2)), never with n x n Gram matrices, which is
much cheaper when n > d. The debiased variant uses the unbiased HSIC estimator (Song et al. 2012), also
evaluated in feature space through its Gram-matrix identities.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

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


def debiased_cka(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Debiased linear CKA as a differentiable scalar: the measurement's estimator (linear_cka(debiased=True)),
    for a training objective that must constrain the very number the study reports.

    Same HSIC_1 code, not a re-derivation; only the dtype differs: float32, because a training step cannot afford
    float64 GEMMs on a GPU. That is safe after centring: the U-statistic is invariant to a shift of the features,
    and removing the few huge constant dimensions of hidden states first is what keeps float32 from cancelling
    (the fast path below does the same). Agrees with the float64 reference to ~1e-5 (tests/test_held.py)."""
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"need [n, d] inputs with the same n, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] < 4:
        raise ValueError(f"debiased CKA needs at least 4 samples, got {x.shape[0]}")
    x, y = x.float(), y.float()
    x, y = x - x.mean(0, keepdim=True), y - y.mean(0, keepdim=True)
    hxx, hyy = _unbiased_hsic(x, x), _unbiased_hsic(y, y)
    if not (hxx > 0 and hyy > 0):  # a (near-)constant representation, or too few tokens for the estimate
        raise ValueError(f"debiased CKA is undefined here: self-HSIC {float(hxx):.3g} and {float(hyy):.3g} "
                         f"on {x.shape[0]} samples")
    return _unbiased_hsic(x, y) / torch.sqrt(hxx * hyy)


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


# ---------------------------------------------------------------------------------------------------------------
# Fast path: one teacher, many artifacts.
#
# The measurement stage compares every artifact with the same teacher, layer by layer. Linear CKA and its debiased
# variant both reduce to a handful of products of the mean-centered features: tr(K L) = ||Y^T X||_F^2 (or the
# elementwise product of the n x n Grams when n < d), ||X^T X||_F^2, the diagonals of K and the row sums of K with
# its diagonal zeroed. The teacher's share of these is computed once; per artifact layer only Y^T X and X^T X
# remain, as float32 GEMMs (about twice as fast as float64 here), and every sum of their entries is accumulated in
# float64, which is where precision is lost otherwise. Centering first matters: hidden states carry a few huge
# constant dimensions, and subtracting their contribution after the product would cancel catastrophically in
# float32. The debiased (unbiased-HSIC) estimator is a U-statistic and invariant to a shift of the features, so it
# may use the centered features too.

_SYRK_BLOCK = 192  # column block of the symmetric X^T X product: big enough for GEMM efficiency, 2/3 of the work


@dataclass(frozen=True)
class _Side:
    """The per-layer quantities of one representation that both CKA variants need."""

    centered: torch.Tensor  # [n, d] float32, column means removed
    gram: torch.Tensor | None  # [n, n] float32 centered Gram, only when n < d (the Gram form is cheaper then)
    self_trace: torch.Tensor  # tr(K K) = ||X^T X||_F^2, float64 scalar
    diag: torch.Tensor  # diag(K), float64 [n]
    rows: torch.Tensor  # (K - diag(K)) 1, float64 [n]
    unbiased_self: torch.Tensor  # unbiased HSIC(X, X)


def _self_trace_feature_form(x: torch.Tensor) -> torch.Tensor:
    """||x^T x||_F^2 from the upper block triangle only: the product is symmetric, so a third of it is skipped."""
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, x.shape[1], _SYRK_BLOCK):
        block = x[:, start:start + _SYRK_BLOCK]
        row = (block.T @ x[:, start:]).double()  # [b, d - start]: diagonal block, then the blocks right of it
        diagonal_block = row[:, :block.shape[1]]
        total += 2 * row.square().sum() - diagonal_block.square().sum()
    return total


def _unbiased_hsic_from(trace_kl, k: _Side, l: _Side) -> torch.Tensor:
    """HSIC_1 of Song et al. (2012) from tr(K L) with diagonals, diag(K), diag(L) and the off-diagonal row sums."""
    n = k.diag.shape[0]
    trace_offdiag = trace_kl - k.diag @ l.diag
    return (trace_offdiag + k.rows.sum() * l.rows.sum() / ((n - 1) * (n - 2))
            - 2 * (k.rows @ l.rows) / (n - 2)) / (n * (n - 3))


def _side(z: torch.Tensor, name: str, gram_form: bool) -> _Side:
    if z.ndim != 2:
        raise ValueError(f"{name} must be [n_samples, n_features], got shape {tuple(z.shape)}")
    x = z.detach().to(torch.float32, copy=True)
    x -= x.mean(0)
    diag = x.square().sum(1).double()
    rows = (x @ x.sum(0)).double() - diag
    if gram_form:
        gram = x @ x.T
        self_trace = gram.square().sum(dtype=torch.float64)
    else:
        gram, self_trace = None, _self_trace_feature_form(x)
    side = _Side(x, gram, self_trace, diag, rows, torch.tensor(float("nan"), dtype=torch.float64))
    if x.shape[0] >= 4:
        side = replace(side, unbiased_self=_unbiased_hsic_from(self_trace, side, side))
    return side


class TeacherCKA:
    """Per-layer linear and debiased linear CKA of artifacts against one teacher, the teacher side computed once.

    `TeacherCKA(teacher_layers).compare(artifact_layers)` returns one `(linear, debiased)` pair of floats per
    layer, equal to `linear_cka(t, a)` and `linear_cka(t, a, debiased=True)` within 1e-6. Artifact layers are
    processed one at a time (pass a generator to stream them from disk). Inputs may be any float dtype
    (float16 caches included); the products run in float32 with float64 accumulation of their sums.
    """

    def __init__(self, teacher_layers):
        teacher_layers = list(teacher_layers)
        if not teacher_layers:
            raise ValueError("the teacher has no layers")
        self.n_samples = teacher_layers[0].shape[0]
        if self.n_samples < 2:
            raise ValueError(f"need at least 2 samples, got {self.n_samples}")
        # Both forms cost O(n d^2) vs O(n^2 d): the feature form (d x d products) wins when n > d.
        self.gram_form = teacher_layers[0].ndim == 2 and self.n_samples < teacher_layers[0].shape[1]
        self._teacher = [_side(y, f"teacher layer {i}", self.gram_form) for i, y in enumerate(teacher_layers)]
        if any(t.centered.shape[0] != self.n_samples for t in self._teacher):
            raise ValueError("teacher layers differ in their number of samples")
        if any(not torch.isfinite(t.self_trace) for t in self._teacher):
            raise ValueError("teacher activations contain NaN or inf")

    def __len__(self) -> int:
        return len(self._teacher)

    def layer(self, index: int, x: torch.Tensor) -> tuple[float, float]:
        """(linear CKA, debiased linear CKA) of artifact layer `x` against teacher layer `index`."""
        if not 0 <= index < len(self._teacher):
            raise ValueError(f"artifact layer {index} has no teacher counterpart ({len(self._teacher)} layers)")
        t = self._teacher[index]
        if x.ndim == 2 and x.shape[0] != self.n_samples:
            raise ValueError(f"layer {index}: the artifact has {x.shape[0]} samples, the teacher {self.n_samples}")
        a = _side(x, f"artifact layer {index}", self.gram_form)
        if t.gram is not None:
            trace_kl = (a.gram * t.gram).sum(dtype=torch.float64)
        else:
            trace_kl = (t.centered.T @ a.centered).square().sum(dtype=torch.float64)
        if not (torch.isfinite(trace_kl) and torch.isfinite(a.self_trace)):
            raise ValueError(f"artifact layer {index} contains NaN or inf")
        denominator = torch.sqrt(a.self_trace * t.self_trace)
        if denominator <= 0:
            raise ValueError(f"layer {index}: CKA is undefined for a constant representation (zero variance)")
        linear = float(trace_kl / denominator)
        if self.n_samples < 4:
            return linear, float("nan")
        debiased = _unbiased_hsic_from(trace_kl, a, t) / torch.sqrt(a.unbiased_self * t.unbiased_self)
        return linear, float(debiased)

    def compare(self, artifact_layers) -> list[tuple[float, float]]:
        results = [self.layer(i, x) for i, x in enumerate(artifact_layers)]
        if len(results) != len(self._teacher):
            raise ValueError(f"the artifact has {len(results)} layers, the teacher {len(self._teacher)}")
        return results
