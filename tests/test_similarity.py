"""realign.measure.similarity: every measure against an independent formulation or a known property, the
sequence bootstrap against brute force on resampled rows, and the null floors of the measurement stage."""

import math

import pytest
import torch

from realign.measure.kernels import linear_cka, mutual_knn, procrustes_similarity
from realign.measure.similarity import bootstrap_counts, compare_layers
from reference_similarity import cka_matrix, rbf_cka


def _sequences(n_sequences=8, per=6):
    return torch.arange(n_sequences).repeat_interleave(per)


def _pair(n, d, seed, noise=0.5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = x @ torch.randn(d, d + 3, generator=g, dtype=torch.float64) + noise * torch.randn(n, d + 3, generator=g,
                                                                                          dtype=torch.float64)
    return x, y


def _orthogonal(d, seed):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def test_every_measure_equals_its_reference_formulation():
    seq = _sequences()
    pairs = [_pair(len(seq), 7, seed) for seed in range(3)]
    xs, ys = [p[0] for p in pairs], [p[1] for p in pairs]
    out = compare_layers(xs, ys, seq, n_boot=20, seed=0, knn_k=5)
    for row, x, y in zip(out["layers"], xs, ys):
        assert row["linear_cka"] == pytest.approx(linear_cka(x, y), abs=1e-12)
        assert row["debiased_cka"] == pytest.approx(linear_cka(x, y, debiased=True), abs=1e-12)
        assert row["rbf_cka"] == pytest.approx(rbf_cka(x, y), abs=1e-12)
        assert row["procrustes_sim"] == pytest.approx(procrustes_similarity(x, y), abs=1e-12)
        assert row["knn_overlap"] == pytest.approx(mutual_knn(x, y, 5), abs=1e-12)
    torch.testing.assert_close(out["matrix"]["linear"], cka_matrix(xs, ys), atol=1e-12, rtol=0)
    torch.testing.assert_close(out["matrix"]["debiased"], cka_matrix(xs, ys, debiased=True), atol=1e-12, rtol=0)
    assert out["matrix"]["n_tokens"] == len(seq)


def test_matrix_on_a_token_subset_above_the_cap():
    seq = _sequences(10, 10)
    pairs = [_pair(len(seq), 6, seed) for seed in range(2)]
    xs, ys = [p[0] for p in pairs], [p[1] for p in pairs]
    capped = compare_layers(xs, xs, seq, n_boot=0, matrix_tokens=40)["matrix"]
    assert capped["n_tokens"] == 40
    torch.testing.assert_close(torch.diagonal(capped["debiased"]), torch.ones(2, dtype=torch.float64))
    picked = torch.randperm(100, generator=torch.Generator().manual_seed(0))[:40].sort().values
    expected = cka_matrix([x[picked] for x in xs], [y[picked] for y in ys], debiased=True)
    got = compare_layers(xs, ys, seq, n_boot=0, matrix_tokens=40)["matrix"]["debiased"]
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)


def _unbiased_cka_on_rows(x, y, origin):
    """Song et al.'s HSIC_1 on explicit n x n Grams, with pairs of copies of one token zeroed like the diagonal."""
    same = origin[:, None] == origin[None, :]

    def hsic(k, l):
        k, l = k.masked_fill(same, 0), l.masked_fill(same, 0)
        n = len(k)
        one = torch.ones(n, dtype=k.dtype)
        return (torch.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
                - 2 / (n - 2) * (one @ k @ l @ one)) / (n * (n - 3))

    k, l = x @ x.T, y @ y.T
    return float(hsic(k, l) / torch.sqrt(hsic(k, k) * hsic(l, l)))


def test_bootstrap_replicates_equal_brute_force_on_resampled_sequences():
    seq = _sequences()
    x, y = _pair(len(seq), 5, 3)
    out = compare_layers([x], [y], seq, n_boot=12, seed=7)
    # With copies of tokens the estimator is not exactly shift-invariant: it is defined on the features centred
    # once with the full-sample mean.
    x, y = x - x.mean(0), y - y.mean(0)
    counts = bootstrap_counts(8, 12, 7)
    for b in (1, 5, 12):
        rows = torch.cat([torch.nonzero(seq == s).flatten().repeat(int(counts[s, b])) for s in range(8)])
        expected = _unbiased_cka_on_rows(x[rows], y[rows], rows)
        assert float(out["replicates"][b - 1, 0]) == pytest.approx(expected, abs=1e-10)


def test_bootstrap_does_not_inflate_unrelated_representations():
    """Resampling duplicates tokens; treated naively that brings back the inflation the debiased estimator
    removes. Unrelated inputs: the replicates centre on the estimate (~0); the naive duplicated-row estimate does not."""
    seq = _sequences(12, 8)
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randn(len(seq), 40, generator=g, dtype=torch.float64) for _ in range(2))
    out = compare_layers([x], [y], seq, n_boot=200, seed=1)
    estimate = out["layers"][0]["debiased_cka"]
    assert abs(estimate) < 0.06 and abs(float(out["replicates"].mean()) - estimate) < 0.02
    counts = bootstrap_counts(12, 20, 1)
    naive = []
    for b in range(1, 21):
        rows = torch.cat([torch.nonzero(seq == s).flatten().repeat(int(counts[s, b])) for s in range(12)])
        naive.append(linear_cka(x[rows], y[rows], debiased=True))
    assert sum(naive) / len(naive) > 0.15  # what the copy-pair rule prevents (measured: ~0.3)
    low, high = out["layers"][0]["debiased_cka_ci_low"], out["layers"][0]["debiased_cka_ci_high"]
    assert low < out["layers"][0]["debiased_cka"] < high


def test_procrustes_properties():
    x, y = _pair(60, 6, 1)
    assert procrustes_similarity(x, x) == pytest.approx(1.0, abs=1e-12)
    rotated = 3.0 * x @ _orthogonal(6, 2) + 5.0
    assert procrustes_similarity(x, rotated) == pytest.approx(1.0, abs=1e-12)  # rotation, scale, shift
    assert procrustes_similarity(x, y) == pytest.approx(procrustes_similarity(3 * x @ _orthogonal(6, 4), y), abs=1e-12)
    # independent formulation: ||X^T Y||_* = tr((X^T Y Y^T X)^{1/2}) from the eigenvalues
    xc, yc = x - x.mean(0), y - y.mean(0)
    xc, yc = xc / torch.linalg.matrix_norm(xc), yc / torch.linalg.matrix_norm(yc)
    m = xc.T @ yc
    expected = torch.linalg.eigvalsh(m @ m.T).clamp_min(0).sqrt().sum()
    assert procrustes_similarity(x, y) == pytest.approx(float(expected), abs=1e-10)
    assert 0 < procrustes_similarity(x, y) < 1
    anisotropic = x * torch.tensor([10.0, 1, 1, 1, 1, 1], dtype=torch.float64)
    assert procrustes_similarity(x, anisotropic) < 0.99


def test_mutual_knn_properties():
    x, _ = _pair(200, 8, 5)
    assert mutual_knn(x, x, 10) == 1.0
    assert mutual_knn(x, 2 * x @ _orthogonal(8, 6), 10) == pytest.approx(1.0)
    g = torch.Generator().manual_seed(9)
    unrelated = torch.randn(200, 8, generator=g, dtype=torch.float64)
    chance = 10 / 199
    assert abs(mutual_knn(x, unrelated, 10) - chance) < 0.03
    with pytest.raises(ValueError, match="knn_k"):
        mutual_knn(x, x, 200)


def test_mismatched_layers_and_tokens_are_clear_errors():
    seq = _sequences()
    x, y = _pair(len(seq), 4, 0)
    with pytest.raises(ValueError, match="layers"):
        compare_layers([x, x], [y], seq)
    with pytest.raises(ValueError, match="layer 0"):
        compare_layers([x[:-1]], [y[:-1]], seq)
    with pytest.raises(ValueError, match="constant"):
        compare_layers([x], [torch.zeros_like(y)], seq)


def test_null_floors_and_summary(tmp_path):
    from realign.io import read_json
    from realign.measure.activations import save_activations
    from realign.measure.stage import similarity_to_teacher, null_floors

    g = torch.Generator().manual_seed(0)
    n, d, layers = 240, 64, 3
    index = torch.stack([torch.arange(n) // 12, torch.arange(n) % 12 + 1], 1)  # 20 sequences of 12 tokens
    teacher = {f"layer.{i}": torch.randn(n, d, generator=g) for i in range(layers)}
    random_init = {f"layer.{i}": torch.randn(n, d, generator=g) for i in range(layers)}
    for name, acts in (("teacher", teacher), ("random", random_init)):
        save_activations({**acts, "token_index": index}, tmp_path / f"{name}.safetensors", {"artifact": name})
    floors = null_floors(tmp_path / "teacher.safetensors", tmp_path / "random.safetensors", tmp_path / "floors.parquet",
                         sample_sizes=(16, 64), repeats=3)
    full = floors[floors["n_samples"] == n]
    assert set(full["null"]) == {"random-init", "token-shuffled"}
    assert full["debiased_cka"].abs().max() < 0.05
    small = floors[(floors["n_samples"] == 16)].groupby("null")[["linear_cka", "debiased_cka"]].mean()
    assert (small["linear_cka"] > 0.4).all()  # d = 64 features, 16 tokens: the biased estimator is inflated
    assert (small["debiased_cka"].abs() < small["linear_cka"] / 3).all()

    frame = similarity_to_teacher(tmp_path / "teacher.safetensors", tmp_path / "teacher.safetensors", tmp_path / "c.parquet",
                           tmp_path / "c.json", n_boot=50)
    assert frame["debiased_cka"].tolist() == pytest.approx([1.0] * layers)
    summary = read_json(tmp_path / "c.json")
    assert len(summary["debiased_cka_mean_replicates"]) == 50
    assert summary["layer_means"]["procrustes_sim"] == pytest.approx(1.0)
    assert summary["debiased_cka_mean_ci"] == pytest.approx([1.0, 1.0])
    assert len(summary["matrix"]["debiased"]) == layers and math.isclose(summary["matrix"]["debiased"][1][1], 1.0)


def test_alignment_summary_over_the_pre_registered_range(tmp_path):
    """measure.alignment_layers: "inner" = hidden states 1..L-1; the embeddings (0) and the final post-norm state (L)
    are reported apart; an explicit range is checked against the model's depth."""
    from realign.io import read_json
    from realign.measure.activations import save_activations
    from realign.measure.stage import alignment_range, similarity_to_teacher

    assert alignment_range("inner", 31) == (1, 29) and alignment_range([2, 30], 31) == (2, 30)
    with pytest.raises(ValueError, match=r"measure.alignment_layers = \[1, 31\] is not a range within 1..30"):
        alignment_range([1, 31], 31)
    with pytest.raises(ValueError, match="measure.alignment_layers = 'inner' .* 1 transformer block"):
        alignment_range("inner", 2)

    g = torch.Generator().manual_seed(1)
    n, d, layers = 120, 32, 5
    index = torch.stack([torch.arange(n) // 12, torch.arange(n) % 12 + 1], 1)
    teacher = {f"layer.{i}": torch.randn(n, d, generator=g) for i in range(layers)}
    # the artifact equals the teacher at the embeddings and the final state only
    artifact = {k: v if k in ("layer.0", f"layer.{layers - 1}") else torch.randn(n, d, generator=g)
                for k, v in teacher.items()}
    for name, acts in (("teacher", teacher), ("artifact", artifact)):
        save_activations({**acts, "token_index": index}, tmp_path / f"{name}.safetensors", {"artifact": name})
    paths = [tmp_path / f"{name}.safetensors" for name in ("teacher", "artifact")]
    frame = similarity_to_teacher(*paths, tmp_path / "c.parquet", tmp_path / "c.json", n_boot=50)
    summary = read_json(tmp_path / "c.json")
    assert summary["alignment_layers"] == [1, 3] and summary["final_layer"] == 4
    assert frame["in_alignment_range"].tolist() == [False, True, True, True, False]
    assert summary["embedding"]["debiased_cka"] == pytest.approx(1.0)
    assert summary["final"]["debiased_cka"] == pytest.approx(1.0)
    assert abs(summary["layer_means"]["debiased_cka"]) < 0.1 and summary["debiased_cka_mean_ci"][1] < 0.2
    assert summary["layer_means"]["linear_cka"] == pytest.approx(frame["linear_cka"][1:4].mean())
    similarity_to_teacher(*paths, tmp_path / "e.parquet", tmp_path / "e.json", n_boot=50, alignment_layers=[2, 4])
    explicit = read_json(tmp_path / "e.json")
    assert explicit["alignment_layers"] == [2, 4] and explicit["layer_means"]["debiased_cka"] > 0.2
    with pytest.raises(ValueError, match=r"measure.alignment_layers = \[2, 5\]"):
        similarity_to_teacher(*paths, tmp_path / "x.parquet", tmp_path / "x.json", n_boot=0, alignment_layers=[2, 5])


def test_jackknife_replicates_recompute_each_measure_without_the_left_out_sequences():
    """Replicate g equals the reference formulations run on the rows of the other groups (the independent path:
    raw rows, each reference centring them itself), averaged over the layers."""
    from realign.measure.similarity import jackknife_other_means

    seq = _sequences(n_sequences=9, per=5)
    pairs = [_pair(len(seq), 6, seed) for seed in range(3)]
    xs, ys = [p[0] + 3.0 for p in pairs], [p[1] - 1.0 for p in pairs]  # uncentred: the subset must be recentred
    groups = 3
    reps = jackknife_other_means(xs, ys, seq, range(1, 3), groups=groups, seed=4, knn_k=4)
    order = torch.randperm(9, generator=torch.Generator().manual_seed(4))
    group_of_sequence = torch.empty(9, dtype=torch.long)
    group_of_sequence[order] = torch.arange(9) % groups
    for g in range(groups):
        keep = group_of_sequence[seq] != g
        layers = [(xs[i][keep], ys[i][keep]) for i in (1, 2)]
        assert float(reps["rbf_cka"][g]) == pytest.approx(sum(rbf_cka(x, y) for x, y in layers) / 2, abs=1e-12)
        assert float(reps["procrustes_sim"][g]) == pytest.approx(
            sum(procrustes_similarity(x, y) for x, y in layers) / 2, abs=1e-12)
        assert float(reps["knn_overlap"][g]) == pytest.approx(sum(mutual_knn(x, y, 4) for x, y in layers) / 2,
                                                              abs=1e-12)


def test_jackknife_interval_of_a_mean_is_the_textbook_standard_error():
    """For the mean of G equal groups the delete-a-group jackknife's standard error is sd(group means) / sqrt(G)
    (Efron & Stein 1981), and the interval is the estimate +- t(G - 1) of it."""
    from scipy.stats import t as student_t

    from realign.measure.similarity import jackknife_interval

    means = torch.tensor([0.3, 0.5, 0.2, 0.9, 0.4, 0.6], dtype=torch.float64)
    groups = len(means)
    estimate = float(means.mean())
    replicates = (means.sum() - means) / (groups - 1)
    stderr, low, high = jackknife_interval(estimate, replicates)
    assert stderr == pytest.approx(float(means.std()) / math.sqrt(groups), rel=1e-12)
    half = float(student_t.ppf(0.975, groups - 1)) * stderr
    assert (low, high) == pytest.approx((estimate - half, estimate + half), rel=1e-12)


def test_jackknife_on_identical_representations_is_exactly_one():
    from realign.measure.similarity import JACKKNIFE_MEASURES, jackknife_interval, jackknife_other_means

    seq = _sequences(n_sequences=8, per=6)
    x = _pair(len(seq), 5, 0)[0]
    reps = jackknife_other_means([x], [x @ _orthogonal(5, 1)], seq, range(0, 1), groups=4, knn_k=3)
    # RSA's correlation distance centres each token over features, which a rotation changes; ridge predictivity
    # shrinks even an exact linear map: both are checked for their own properties in test_similarity_families.py
    for m in set(JACKKNIFE_MEASURES) - {"rsa", "linear_predictivity"}:
        assert torch.allclose(reps[m], torch.full((4,), 1.0, dtype=torch.float64), atol=1e-9), m
        assert jackknife_interval(1.0, reps[m])[0] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="groups"):
        jackknife_other_means([x], [x], seq, range(0, 1), groups=9)


def test_the_registry_is_the_one_list_of_measures_every_stage_reads():
    """MEASURES is the single home: compare_layers computes exactly its entries, the jackknife covers the measures
    it computes by function, and the table, the breakdowns and the report list the same names."""
    from realign.analysis.breakdowns import MEASURE_LABELS
    from realign.analysis.report import MEASURE_COLS
    from realign.analysis.table import LAYER_COLUMNS
    from realign.measure.similarity import JACKKNIFE_MEASURES, MEASURE_NAMES, MEASURES, PRIMARY_MEASURE

    seq = _sequences()
    x, y = _pair(len(seq), 5, 0)
    row = compare_layers([x], [y], seq, n_boot=10, knn_k=3, matrix=False)["layers"][0]
    assert set(row) - {"layer", "debiased_cka_ci_low", "debiased_cka_ci_high"} == set(MEASURE_NAMES)
    assert len(set(MEASURE_NAMES)) == len(MEASURES)
    assert set(JACKKNIFE_MEASURES) == {m.name for m in MEASURES if m.interval == "jackknife"}
    assert set(JACKKNIFE_MEASURES) <= {m.name for m in MEASURES if m.of_pair is not None}
    assert LAYER_COLUMNS[:len(MEASURE_NAMES)] == MEASURE_NAMES
    assert list(MEASURE_LABELS) == [PRIMARY_MEASURE, *[m for m in MEASURE_NAMES if m != PRIMARY_MEASURE]]
    assert [c for c, _ in MEASURE_COLS] == [f"{m}_mean" for m in MEASURE_LABELS]
