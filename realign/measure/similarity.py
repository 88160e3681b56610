"""Every representation-similarity measure the study reports, from one teacher/artifact pair of activation caches.

CKA alone is not enough to hang a conclusion on: it can be driven up or down without changing what a network
computes (Davari et al., ICLR 2023). So each layer gets three CKA estimates and two measures of other families,
listed once in :data:`MEASURES` (their mathematics: realign.measure.kernels). The table, the statistics, the
manipulation check and the report read that list; adding a measure is one entry there plus its function.

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
from collections.abc import Callable
from dataclasses import dataclass

import torch

from realign.measure.kernels import (centered64, cka_from_hsic, cka_matrices, cknna_from_gram, hsic1,
                                     linear_predictivity, mutual_knn_from_gram, procrustes_similarity,
                                     pwcca, rbf_cka_from_gram, rsa, svcca)


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
    return hsic1(trace, k_sum, l_sum, (w * kw0 * lw0).sum(0), n)


def bootstrap_counts(n_sequences: int, n_boot: int, seed: int) -> torch.Tensor:
    """[S, 1 + n_boot] float64 sequence counts; column 0 is the full sample (every count 1)."""
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, n_sequences, (n_boot, n_sequences), generator=generator)
    counts = torch.zeros(n_boot, n_sequences, dtype=torch.float64)
    counts.scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.float64))
    return torch.cat([torch.ones(1, n_sequences, dtype=torch.float64), counts]).T.contiguous()


@dataclass(frozen=True)
class LayerPair:
    """One layer of the teacher (t) and the artifact (a) on the same probe tokens: centred float64 features and
    their Gram matrices X X^T, what every measure of :data:`MEASURES` reads."""

    xt: torch.Tensor
    xa: torch.Tensor
    kt: torch.Tensor
    ka: torch.Tensor
    knn_k: int
    sequences: torch.Tensor  # the probe sequence of each token (folds of the cross-validated measures)


@dataclass(frozen=True)
class Measure:
    """One similarity measure: its column in every per-layer table and summary (`name`), how the report names it,
    its family, how its uncertainty over probe sequences is estimated, and, for the measures outside the HSIC
    bootstrap, the function of one layer pair."""

    name: str
    label: str  # the report's long name
    short: str  # the report's column heading
    family: str  # "cka" or the family of another kind of measure
    interval: str  # "bootstrap": closed-form sequence bootstrap; "jackknife": delete-a-group; "none"
    reference: str
    of_pair: Callable[[LayerPair], float] | None = None  # None: computed with the HSIC bootstrap (compare_layers)
    manipulation_check: bool = False  # one of the measures the pre-registered check of the held arm reads


MEASURES: tuple[Measure, ...] = (
    Measure("linear_cka", "linear CKA (biased)", "linear CKA", "cka", "none", "Kornblith et al. 2019"),
    Measure("debiased_cka", "debiased linear CKA", "debiased CKA", "cka", "bootstrap",
            "Song et al. 2012; Nguyen et al. 2021"),
    Measure("rbf_cka", "RBF CKA (median)", "RBF CKA", "cka", "jackknife", "Kornblith et al. 2019",
            lambda p: rbf_cka_from_gram(p.kt, p.ka), manipulation_check=True),
    Measure("procrustes_sim", "orthogonal Procrustes similarity", "Procrustes sim.", "shape", "jackknife",
            "Ding et al. 2021", lambda p: procrustes_similarity(p.xt, p.xa), manipulation_check=True),
    Measure("knn_overlap", "mutual k-NN overlap", "mutual k-NN", "neighbourhood", "jackknife", "Huh et al. 2024",
            lambda p: mutual_knn_from_gram(p.kt, p.ka, p.knn_k), manipulation_check=True),
    # Added after the manipulation check was pre-registered: described and correlated, never part of the check, and
    # without a jackknife interval: eight recomputations of five more measures on every layer cost a damaged
    # artifact's similarity job ~100 s more (measured: 129 s against 31 s), beyond the measurement budget.
    Measure("svcca", "SVCCA (mean canonical correlation)", "SVCCA", "cca", "none", "Raghu et al. 2017",
            lambda p: svcca(p.xt, p.xa)),
    Measure("pwcca", "PWCCA (projection-weighted CCA)", "PWCCA", "cca", "none", "Morcos et al. 2018",
            lambda p: pwcca(p.xt, p.xa)),
    Measure("rsa", "RSA (Spearman of correlation-distance RDMs)", "RSA", "rsa", "none",
            "Kriegeskorte et al. 2008", lambda p: rsa(p.xt, p.xa)),
    Measure("linear_predictivity", "linear predictivity (CV ridge R², artifact → teacher)", "lin. predictivity",
            "regression", "none", "Yamins et al. 2014; Schrimpf et al. 2018",
            lambda p: linear_predictivity(p.xa, p.xt, p.sequences)),
    Measure("cknna", "CKNNA (mutual-k-NN-restricted CKA)", "CKNNA", "neighbourhood", "none", "Huh et al. 2024",
            lambda p: cknna_from_gram(p.kt, p.ka, p.knn_k)),
)
MEASURE_NAMES = tuple(m.name for m in MEASURES)
PRIMARY_MEASURE = "debiased_cka"  # the estimator the held arm constrains and the verdict reads
JACKKNIFE_MEASURES = tuple(m.name for m in MEASURES if m.interval == "jackknife")  # layer means with a jackknife CI
CHECKED_MEASURES = tuple(m.name for m in MEASURES if m.manipulation_check)  # RBF CKA, Procrustes, k-NN: fixed


def measures_primary_first() -> list[Measure]:
    """MEASURES with the primary estimator first, the order of the report's sections."""
    return sorted(MEASURES, key=lambda m: m.name != PRIMARY_MEASURE)


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
        debiased = cka_from_hsic(*(unbiased_hsic_replicates(a, b, pair_sums(a, b, onehot), counts, sequence_of_token)
                          for a, b in ((gt, ga), (gt, gt), (ga, ga))))
        linear = cka_from_hsic((gt.gram * ga.gram).sum(), (gt.gram * gt.gram).sum(), (ga.gram * ga.gram).sum())
        row = {"layer": i, "linear_cka": float(linear), "debiased_cka": float(debiased[0]),
               **_other_measures(xt, xa, gt.gram, ga.gram, knn_k, sequence_of_token)}
        row["debiased_cka_ci_low"], row["debiased_cka_ci_high"] = percentile_ci(debiased[1:])
        rows.append(row)
        replicates.append(debiased[1:])
    out = {"layers": rows, "n_tokens": n, "n_sequences": n_sequences, "n_boot": n_boot, "seed": seed,
           "knn_k": knn_k,
           "replicates": torch.stack(replicates, 1)}
    if matrix:
        out["matrix"] = cka_matrices(teacher_layers, artifact_layers, matrix_tokens, seed)
    return out


def _centre_gram(k: torch.Tensor) -> torch.Tensor:
    """H K H: the Gram matrix of the same features centred on this subset's own mean."""
    row = k.mean(0, keepdim=True)
    return k - row - row.T + k.mean()


def _other_measures(xt: torch.Tensor, xa: torch.Tensor, kt: torch.Tensor, ka: torch.Tensor, knn_k: int,
                    sequences: torch.Tensor, names: tuple[str, ...] | None = None) -> dict:
    """The measures of MEASURES outside the HSIC bootstrap (or those of them in `names`), of one layer pair
    (centred features and their Grams)."""
    pair = LayerPair(xt, xa, kt, ka, knn_k, sequences)
    return {m.name: m.of_pair(pair) for m in MEASURES
            if m.of_pair is not None and (names is None or m.name in names)}


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
                                  knn_k, sequence_of_token[keep], JACKKNIFE_MEASURES)
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
