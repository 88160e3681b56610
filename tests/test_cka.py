import math

import pytest
import torch

from realign.measure.kernels import linear_cka
from reference_similarity import cka_matrix, gram_linear_cka, gram_unbiased_hsic, rbf_cka


@pytest.fixture
def xy():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 32, generator=g)
    y = x @ torch.randn(32, 24, generator=g) + 0.5 * torch.randn(200, 24, generator=g)
    return x, y


def test_identical_inputs_give_one(xy):
    x, _ = xy
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-9)
    assert linear_cka(x, x, debiased=True) == pytest.approx(1.0, abs=1e-9)
    assert rbf_cka(x, x) == pytest.approx(1.0, abs=1e-9)


def test_invariant_to_orthogonal_transform_and_isotropic_scaling(xy):
    x, y = xy
    q, _ = torch.linalg.qr(torch.randn(24, 24, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    transformed = 3.7 * (y.double() @ q)
    assert linear_cka(x, transformed) == pytest.approx(linear_cka(x, y), abs=1e-6)
    assert linear_cka(x, transformed, debiased=True) == pytest.approx(linear_cka(x, y, debiased=True), abs=1e-6)
    assert rbf_cka(x, transformed) == pytest.approx(rbf_cka(x, y), abs=1e-6)


def test_not_invariant_to_anisotropic_scaling(xy):
    x, y = xy
    stretched = y * torch.linspace(0.1, 10, y.shape[1])
    assert abs(linear_cka(x, stretched) - linear_cka(x, y)) > 1e-3


def test_matches_gram_matrix_formulation(xy):
    x, y = xy
    assert linear_cka(x, y) == pytest.approx(gram_linear_cka(x, y), abs=1e-6)


def test_debiased_matches_gram_matrix_unbiased_hsic(xy):
    x, y = xy
    xd, yd = x.double(), y.double()
    k, l = xd @ xd.T, yd @ yd.T
    expected = gram_unbiased_hsic(k, l) / math.sqrt(gram_unbiased_hsic(k, k) * gram_unbiased_hsic(l, l))
    assert linear_cka(x, y, debiased=True) == pytest.approx(float(expected), abs=1e-6)


def test_debiased_removes_small_sample_inflation():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(40, 200, generator=g), torch.randn(40, 200, generator=g)
    # Independent noise: the biased estimator is inflated when n << d, the debiased one stays near 0.
    assert linear_cka(x, y) > 0.5
    assert abs(linear_cka(x, y, debiased=True)) < 0.1


def test_low_precision_inputs_are_accumulated_in_float64(xy):
    x, y = xy
    assert linear_cka(x.half(), y.half()) == pytest.approx(linear_cka(x.half().float(), y.half().float()), abs=1e-9)


def test_returns_python_float(xy):
    x, y = xy
    assert type(linear_cka(x, y)) is float and type(rbf_cka(x, y)) is float


def test_matrix_diagonal_is_one_for_same_layers(xy):
    x, y = xy
    m = cka_matrix([x, y], [x, y])
    assert m.shape == (2, 2)
    assert torch.allclose(torch.diagonal(m), torch.ones(2, dtype=torch.float64))
    assert float(m[0, 1]) == pytest.approx(float(m[1, 0]), abs=1e-12)


def test_bad_inputs_are_clear_errors(xy):
    x, y = xy
    with pytest.raises(ValueError, match="same number of samples"):
        linear_cka(x, y[:-1])
    with pytest.raises(ValueError, match="n_samples, n_features"):
        linear_cka(x[0], y[0])
    with pytest.raises(ValueError, match="NaN"):
        linear_cka(torch.full_like(x, float("nan")), y)
    with pytest.raises(ValueError, match="constant"):
        linear_cka(torch.ones(10, 3), torch.randn(10, 3))


def hidden_states(n, d, seed):
    """Low-rank signal + noise with a few huge constant dimensions, like LLM hidden states, stored float16."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 8, generator=g) @ torch.randn(8, d, generator=g) + 0.3 * torch.randn(n, d, generator=g)
    z[:, :2] += torch.tensor([300.0, -80.0])
    return z


def test_measurement_stage_values_equal_float64_linear_cka(tmp_path):
    from realign.measure.activations import load_activations, save_activations
    from realign.measure.stage import similarity_to_teacher

    index = torch.stack([torch.arange(300), torch.arange(300)], 1)
    g = torch.Generator().manual_seed(4)
    teacher = {f"layer.{i}": hidden_states(300, 40, i) for i in range(3)}
    artifact = {k: v + torch.randn(v.shape, generator=g) for k, v in teacher.items()}
    for name, acts in (("teacher", teacher), ("artifact", artifact)):
        save_activations({**acts, "token_index": index}, tmp_path / f"{name}.safetensors", {"artifact": name})
    frame = similarity_to_teacher(tmp_path / "teacher.safetensors", tmp_path / "artifact.safetensors",
                           tmp_path / "cka.parquet", tmp_path / "cka.json", n_boot=50)
    (t_layers, _), (a_layers, _) = (load_activations(tmp_path / f"{n}.safetensors") for n in ("teacher", "artifact"))
    assert list(frame["layer"]) == [0, 1, 2]
    for row, t, a in zip(frame.itertuples(), t_layers, a_layers):
        assert row.linear_cka == pytest.approx(linear_cka(t, a), abs=1e-6)
        assert row.debiased_cka == pytest.approx(linear_cka(t, a, debiased=True), abs=1e-6)
        assert row.linear_cka < 1 - 1e-4


def test_measurement_stage_gives_the_other_measures_jackknife_intervals(tmp_path):
    """The CKA step's summary carries, for RBF CKA, Procrustes and k-NN, the layer mean's delete-a-group jackknife
    interval over probe sequences (measure.jackknife_groups), centred on the layer mean, and the table reads it."""
    import json

    from realign.measure.activations import save_activations
    from realign.measure.stage import similarity_to_teacher

    index = torch.stack([torch.arange(240) // 10, torch.arange(240) % 10], 1)  # 24 sequences x 10 positions
    g = torch.Generator().manual_seed(5)
    teacher = {f"layer.{i}": hidden_states(240, 24, i) for i in range(4)}
    artifact = {k: v + 0.7 * torch.randn(v.shape, generator=g) for k, v in teacher.items()}
    for name, acts in (("teacher", teacher), ("artifact", artifact)):
        save_activations({**acts, "token_index": index}, tmp_path / f"{name}.safetensors", {"artifact": name})
    frame = similarity_to_teacher(tmp_path / "teacher.safetensors", tmp_path / "artifact.safetensors",
                           tmp_path / "cka.parquet", tmp_path / "cka.json", n_boot=20, jackknife_groups=6)
    summary = json.loads((tmp_path / "cka.json").read_text())
    assert summary["jackknife_groups"] == 6
    body = frame[frame["in_alignment_range"]]
    for m in ("rbf_cka", "procrustes_sim", "knn_overlap"):
        low, high = summary["other_means_jackknife"][m]["ci"]
        assert low < body[m].mean() < high and high - low < 0.5, m
        assert (low + high) / 2 == pytest.approx(body[m].mean(), abs=1e-12)
        assert len(summary["other_means_jackknife"][m]["replicates"]) == 6
    similarity_to_teacher(tmp_path / "teacher.safetensors", tmp_path / "artifact.safetensors", tmp_path / "cka0.parquet",
                   tmp_path / "cka0.json", n_boot=20, jackknife_groups=0)
    assert json.loads((tmp_path / "cka0.json").read_text())["other_means_jackknife"] == {}
