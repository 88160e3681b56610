"""Every representation-similarity measure the study reports, from one teacher/artifact pair of activation caches.

CKA alone is not enough to hang a conclusion on: it can be driven up or down without changing what a network
computes (Davari et al., ICLR 2023). So each layer gets three CKA estimates and two measures of another family:

* linear CKA (Kornblith et al. 2019), the biased HSIC estimator: inflated when the number of probe tokens n is
  not much larger than the feature dimension (the null floors below show it);
* debiased linear CKA: the unbiased HSIC estimator of Song et al. (2012), as in Nguyen et al. (2021);
* RBF CKA with the median-distance bandwidth of each input;
* orthogonal Procrustes similarity ||X^T Y||_* of the centred, unit-Frobenius-norm representations, i.e.
  1 - d^2 / 2 with d the Procrustes distance of Ding et al. (2021): 1 = equal up to a rotation;
* mutual k-nearest-neighbour overlap (Huh et al. 2024): the fraction of each token's k nearest neighbours
  (cosine, centred features) shared by both representations; chance is k / (n - 1).

Uncertainty over the probe set: tokens come in probe sequences, and tokens of one sequence are not independent,
so the bootstrap resamples whole sequences, for the debiased estimator only: resampling duplicates tokens, and
the biased estimator, which counts each token's pairing with itself, is inflated by duplicates as it is at small
n (its bootstrap distribution can lie wholly above the full-sample estimate). A replicate is a vector of sequence counts v, and the unbiased HSIC is a
closed-form polynomial in v of a few per-sequence sums of the n x n Gram matrices, so thousands
of replicates cost less than one Gram matrix. A sequence drawn twice contributes identical tokens; the debiased
estimator treats pairs of copies of one token like the diagonal it already excludes, otherwise duplicates would
bring back exactly the small-sample inflation that estimator removes. The same seed gives the same replicates for
every artifact of a study, so the replicates of an artifact and its damaged parent are paired.

RBF CKA, Procrustes and k-NN overlap have no such closed form, and each is a plug-in estimator that duplicated
tokens would distort, so their layer means get a delete-a-group jackknife over probe sequences instead
(`other_means_jackknife`): the sequences fall into G seeded groups, each group is left out in turn and the
measure recomputed on the remaining tokens, and the interval is the full-sample value +- t(G - 1) x the jackknife
standard error (Efron & Stein 1981; the grouped form: Kott 2001). The manipulation check of the held arm reads
the damaged parent's upper bound.

All arithmetic is float64 on features centred once with the full-sample mean; centred Gram matrices are then
simply X X^T. Everything works in the n x n (Gram) space, so cost grows as n^2 d, not d^2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def centered64(x: torch.Tensor, name: str = "x") -> torch.Tensor:
    if x.ndim != 2:
        raise ValueError(f"{name} must be [n_samples, n_features], got shape {tuple(x.shape)}")
    x = x.detach().to(torch.float64)
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")
    return x - x.mean(0, keepdim=True)


@dataclass(frozen=True)
class Gram:
    """The linear-kernel Gram matrix K = X X^T of one layer's centred features, with the per-sequence sums
    that let bootstrap replicates be evaluated without touching K again."""

    gram: torch.Tensor  # [n, n]
    zero_diag: torch.Tensor  # K with its diagonal set to 0 (the unbiased estimator never uses k(x_i, x_i))
    block_rows0: torch.Tensor  # [n, S]: sum of K[i, j], j != i, over the tokens j of sequence s


def gram(x: torch.Tensor, sequence_of_token: torch.Tensor, n_sequences: int) -> Gram:
    k = x @ x.T
    k0 = k.clone()
    k0.fill_diagonal_(0)
    onehot = torch.nn.functional.one_hot(sequence_of_token, n_sequences).to(torch.float64)
    return Gram(k, k0, k0 @ onehot)


def _block_sum(m: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    return onehot.T @ m @ onehot  # [S, S]: sums of m over the token pairs of each pair of sequences


@dataclass(frozen=True)
class PairSums:
    """Per-sequence sums of K * L for one pair of Gram matrices (K, L may be the same)."""

    blocks0: torch.Tensor  # [S, S] sums of K[i, j] L[i, j] over token pairs i != j


def pair_sums(k: Gram, l: Gram, onehot: torch.Tensor) -> PairSums:
    return PairSums(_block_sum(k.zero_diag * l.zero_diag, onehot))


def unbiased_hsic_replicates(k: Gram, l: Gram, sums: PairSums, counts: torch.Tensor,
                             sequence_of_token: torch.Tensor) -> torch.Tensor:
    """HSIC_1 of Song et al. (2012) of K and L for each replicate, over the resampled rows, pairs of copies of
    one token excluded like the diagonal; counts: [S, B] times each sequence is drawn. With w the per-token
    counts and K0 = K with a zero diagonal: tr(K~L~) = sum_{i != j} w_i w_j K_ij L_ij, K~1 = K0 w per token."""
    w = counts[sequence_of_token]  # [n, B]
    n = w.sum(0)
    kw0, lw0 = k.block_rows0 @ counts, l.block_rows0 @ counts
    trace = (counts * (sums.blocks0 @ counts)).sum(0)
    k_sum, l_sum = (w * kw0).sum(0), (w * lw0).sum(0)
    return (trace + k_sum * l_sum / ((n - 1) * (n - 2)) - 2 * (w * kw0 * lw0).sum(0) / (n - 2)) / (n * (n - 3))


def bootstrap_counts(n_sequences: int, n_boot: int, seed: int) -> torch.Tensor:
    """[S, 1 + n_boot] float64 sequence counts; column 0 is the full sample (every count 1)."""
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, n_sequences, (n_boot, n_sequences), generator=generator)
    counts = torch.zeros(n_boot, n_sequences, dtype=torch.float64)
    counts.scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.float64))
    return torch.cat([torch.ones(1, n_sequences, dtype=torch.float64), counts]).T.contiguous()


def rbf_cka_from_gram(k: torch.Tensor, l: torch.Tensor) -> float:
    """RBF CKA with each input's median pairwise distance as bandwidth (= cka.rbf_cka), from linear Grams."""

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
    x, y = centered64(x, "x"), centered64(y, "y")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same number of samples, got {x.shape[0]} and {y.shape[0]}")
    return mutual_knn_from_gram(x @ x.T, y @ y.T, n_neighbours)


def _cka(hxy, hxx, hyy):
    return hxy / torch.sqrt(hxx * hyy)


def compare_layers(teacher_layers, artifact_layers, sequence_of_token: torch.Tensor, *, n_boot: int = 1000,
                   seed: int = 0, knn_k: int = 10, matrix: bool = True, matrix_tokens: int = 2048) -> dict:
    """Every measure, layer by layer, of an artifact against the teacher on the same probe tokens.

    Returns {"layers": [per-layer dicts: layer, linear_cka, debiased_cka, rbf_cka, procrustes_sim, knn_overlap,
    debiased_cka_ci_low/high (95% percentile bootstrap over sequences)], "replicates": [B, L] tensor of the
    debiased CKA per bootstrap replicate and layer, "matrix": {"linear": [L, L], "debiased": [L, L]} (teacher layer x artifact
    layer, on at most `matrix_tokens` tokens; see cka_matrices) when `matrix`}.

    Memory: the n x n Gram matrices of one layer pair at a time (about 8 n^2 float64 values)."""
    if len(teacher_layers) != len(artifact_layers):
        raise ValueError(f"the artifact has {len(artifact_layers)} layers, the teacher {len(teacher_layers)}")
    sequence_of_token = torch.unique(sequence_of_token, return_inverse=True)[1]
    n_sequences = int(sequence_of_token.max()) + 1
    n = len(sequence_of_token)
    if n < 4:
        raise ValueError(f"need at least 4 probe tokens, got {n}")
    onehot = torch.nn.functional.one_hot(sequence_of_token, n_sequences).to(torch.float64)
    counts = bootstrap_counts(n_sequences, n_boot, seed)
    rows, replicates = [], []
    for i, (t, a) in enumerate(zip(teacher_layers, artifact_layers)):
        xt, xa = centered64(t, f"teacher layer {i}"), centered64(a, f"artifact layer {i}")
        if xt.shape[0] != n or xa.shape[0] != n:
            raise ValueError(f"layer {i}: {xt.shape[0]} teacher and {xa.shape[0]} artifact tokens for {n} indices")
        gt, ga = gram(xt, sequence_of_token, n_sequences), gram(xa, sequence_of_token, n_sequences)
        if float(torch.diagonal(gt.gram).sum()) == 0 or float(torch.diagonal(ga.gram).sum()) == 0:
            raise ValueError(f"layer {i}: CKA is undefined for a constant representation (zero variance)")
        debiased = _cka(*(unbiased_hsic_replicates(a, b, pair_sums(a, b, onehot), counts, sequence_of_token)
                          for a, b in ((gt, ga), (gt, gt), (ga, ga))))
        linear = _cka((gt.gram * ga.gram).sum(), (gt.gram * gt.gram).sum(), (ga.gram * ga.gram).sum())
        row = {"layer": i, "linear_cka": float(linear), "debiased_cka": float(debiased[0]),
               **_other_measures(xt, xa, gt.gram, ga.gram, knn_k)}
        row["debiased_cka_ci_low"], row["debiased_cka_ci_high"] = percentile_ci(debiased[1:])
        rows.append(row)
        replicates.append(debiased[1:])
    out = {"layers": rows, "n_tokens": n, "n_sequences": n_sequences, "n_boot": n_boot, "seed": seed,
           "knn_k": knn_k,
           "replicates": torch.stack(replicates, 1)}
    if matrix:
        out["matrix"] = cka_matrices(teacher_layers, artifact_layers, matrix_tokens, seed)
    return out


JACKKNIFE_MEASURES = ("rbf_cka", "procrustes_sim", "knn_overlap")  # the layer means with a jackknife interval


def _centre_gram(k: torch.Tensor) -> torch.Tensor:
    """H K H: the Gram matrix of the same features centred on this subset's own mean."""
    row = k.mean(0, keepdim=True)
    return k - row - row.T + k.mean()


def _other_measures(xt: torch.Tensor, xa: torch.Tensor, kt: torch.Tensor, ka: torch.Tensor, knn_k: int) -> dict:
    """RBF CKA, Procrustes similarity and mutual k-NN overlap of one layer pair (centred features and their
    Grams), as compare_layers computes them."""
    return {"rbf_cka": rbf_cka_from_gram(kt, ka), "procrustes_sim": procrustes_similarity(xt, xa),
            "knn_overlap": mutual_knn_from_gram(kt, ka, knn_k)}


def jackknife_other_means(teacher_layers, artifact_layers, sequence_of_token: torch.Tensor, layers: range, *,
                          groups: int = 8, seed: int = 0, knn_k: int = 10) -> dict[str, torch.Tensor]:
    """Delete-a-group jackknife replicates over probe sequences (module docstring) of the mean over `layers` of
    each JACKKNIFE_MEASURES measure: {measure: [G] tensor}, replicate g computed without the tokens of group g.
    Groups are a seeded partition of the sequences, the same for every artifact of a study; on the remaining
    tokens every part of a measure (centring, bandwidth, neighbours) is recomputed."""
    sequence_of_token = torch.unique(sequence_of_token, return_inverse=True)[1]
    n_sequences = int(sequence_of_token.max()) + 1
    if not 2 <= groups <= n_sequences:
        raise ValueError(f"the jackknife needs 2..{n_sequences} groups of probe sequences, got {groups}")
    order = torch.randperm(n_sequences, generator=torch.Generator().manual_seed(seed))
    group_of_sequence = torch.empty(n_sequences, dtype=torch.long)
    group_of_sequence[order] = torch.arange(n_sequences) % groups
    group_of_token = group_of_sequence[sequence_of_token]
    sums = {m: torch.zeros(groups, dtype=torch.float64) for m in JACKKNIFE_MEASURES}
    for i in layers:
        xt, xa = centered64(teacher_layers[i], f"teacher layer {i}"), centered64(artifact_layers[i], f"artifact layer {i}")
        kt, ka = xt @ xt.T, xa @ xa.T
        for g in range(groups):
            keep = group_of_token != g
            sub = _other_measures(xt[keep], xa[keep], _centre_gram(kt[keep][:, keep]), _centre_gram(ka[keep][:, keep]),
                                  knn_k)
            for m, v in sub.items():
                sums[m][g] += v
    return {m: v / len(layers) for m, v in sums.items()}


def jackknife_interval(estimate: float, replicates: torch.Tensor, level: float = 0.95) -> tuple[float, float, float]:
    """(standard error, low, high): the delete-a-group jackknife's standard error sqrt((G-1)/G sum (r_g - r.)^2)
    and the interval estimate +- t(G - 1) x it."""
    from scipy.stats import t as student_t

    groups = len(replicates)
    if groups < 2 or not torch.isfinite(replicates).all() or not math.isfinite(estimate):
        return math.nan, math.nan, math.nan
    stderr = math.sqrt((groups - 1) / groups * float(((replicates - replicates.mean()) ** 2).sum()))
    half = float(student_t.ppf((1 + level) / 2, groups - 1)) * stderr
    return stderr, estimate - half, estimate + half


def percentile_ci(values: torch.Tensor, level: float = 0.95) -> tuple[float, float]:
    values = values[torch.isfinite(values)]
    if values.numel() < 10:
        return math.nan, math.nan
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=values.dtype)
    low, high = torch.quantile(values, q).tolist()
    return low, high


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
        trace0 = k_a @ k_b.T - d_a @ d_b.T
        sums = r_a.sum(1)[:, None] * r_b.sum(1)[None, :]
        return (trace0 + sums / ((m - 1) * (m - 2)) - 2 * (r_a @ r_b.T) / (m - 2)) / (m * (m - 3))

    biased = kt @ ka.T
    self_t, self_a = (kt * kt).sum(1), (ka * ka).sum(1)
    u_ta = unbiased(kt, dt, rt, ka, da, ra)
    u_t = torch.diagonal(unbiased(kt, dt, rt, kt, dt, rt))
    u_a = torch.diagonal(unbiased(ka, da, ra, ka, da, ra))
    return {"linear": biased / torch.sqrt(self_t[:, None] * self_a[None, :]),
            "debiased": u_ta / torch.sqrt(u_t[:, None] * u_a[None, :]), "n_tokens": m}
