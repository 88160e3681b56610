"""The measures beyond CKA (issue 18): SVCCA, PWCCA, RSA, cross-validated linear predictivity and CKNNA, each against
an independent formulation (textbook CCA, scipy, scikit-learn, platonic-rep's form) and known properties: 1 on
identical inputs, invariances, chance level on shuffled tokens, and their place in the measurement stage."""

import pytest
import torch

from realign.measure import kernels
from realign.measure.kernels import (CCA_MAX_DIMS_PER_TOKEN, CCA_VARIANCE, PREDICTIVITY_FOLDS, PREDICTIVITY_RIDGE,
                                     cknna_from_gram, linear_predictivity, pwcca, rsa, svcca)
from reference_similarity import classical_cca, cknna_platonic, ridge_predictivity_sklearn, rsa_scipy


def _pair(n=120, d=30, seed=0, noise=0.6, rank=6):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, rank, generator=g, dtype=torch.float64)
    x = z @ torch.randn(rank, d, generator=g, dtype=torch.float64) + 0.2 * torch.randn(n, d, generator=g,
                                                                                         dtype=torch.float64)
    y = z @ torch.randn(rank, d + 4, generator=g, dtype=torch.float64) + noise * torch.randn(
        n, d + 4, generator=g, dtype=torch.float64)
    return x + 5.0, y - 2.0  # uncentred: every measure must centre


def _orthogonal(d, seed):
    return torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))[0]


SEQUENCES = torch.arange(12).repeat_interleave(10)


@pytest.mark.parametrize("n, d", [(120, 30), (24, 40)])  # more tokens than features (a real probe), and fewer
def test_cca_measures_equal_the_textbook_whitened_cross_covariance(n, d):
    x, y = _pair(n=n, d=d)
    _, variates, rho = classical_cca(x, y, CCA_VARIANCE, CCA_MAX_DIMS_PER_TOKEN)
    assert svcca(x, y) == pytest.approx(float(rho.mean()), abs=1e-9)
    xc = x - x.mean(0)
    weights = (variates.T @ xc).abs().sum(1)
    assert pwcca(x, y) == pytest.approx(float((weights * rho).sum() / weights.sum()), abs=1e-9)


def test_cca_measures_are_one_on_identical_inputs_and_invariant_to_rotation_and_scale():
    x, y = _pair(seed=1)
    assert svcca(x, x) == pytest.approx(1.0, abs=1e-9) and pwcca(x, x) == pytest.approx(1.0, abs=1e-9)
    turned = 2.5 * (y @ _orthogonal(y.shape[1], 3))
    assert svcca(x, turned) == pytest.approx(svcca(x, y), abs=1e-9)
    assert pwcca(x, turned) == pytest.approx(pwcca(x, y), abs=1e-9)


def test_rsa_equals_scipy_spearman_of_correlation_distances():
    x, y = _pair(n=60, seed=2)
    assert rsa(x, y) == pytest.approx(rsa_scipy(x, y), abs=1e-9)
    assert rsa(x, x) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("d", [30, 200])  # the primal form (folds train on more tokens than features), the dual
def test_linear_predictivity_equals_scikit_learn_ridge_per_fold_of_sequences(d):
    x, y = _pair(seed=3, d=d)
    expected = ridge_predictivity_sklearn(x, y, SEQUENCES, PREDICTIVITY_FOLDS, PREDICTIVITY_RIDGE)
    assert linear_predictivity(x, y, SEQUENCES) == pytest.approx(expected, abs=1e-8)
    assert linear_predictivity(x, 3.0 * x @ _orthogonal(x.shape[1], 4), SEQUENCES) > 0.99  # a linear map of x
    with pytest.raises(ValueError, match="2 probe sequences"):
        linear_predictivity(x, y, torch.zeros(len(x), dtype=torch.long))


def test_cknna_equals_platonic_reps_formulation():
    x, y = _pair(seed=5)
    xc, yc = x - x.mean(0), y - y.mean(0)
    assert cknna_from_gram(xc @ xc.T, yc @ yc.T, 8) == pytest.approx(cknna_platonic(x, y, 8), abs=1e-9)
    assert cknna_from_gram(xc @ xc.T, xc @ xc.T, 8) == pytest.approx(1.0, abs=1e-9)


def test_every_new_measure_falls_to_chance_on_shuffled_tokens():
    """Tokens paired wrongly: RSA, CKNNA and predictivity near or below 0; the CCA measures well below the related
    pair's (their floor is not 0 with k directions on n tokens, which is why the stage measures null floors)."""
    x, y = _pair(n=240, seed=6, noise=0.3)
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    seq = torch.arange(24).repeat_interleave(10)
    xc, sc = x - x.mean(0), shuffled - shuffled.mean(0)
    assert abs(rsa(x, shuffled)) < 0.05 and rsa(x, y) > 0.5
    assert abs(cknna_from_gram(xc @ xc.T, sc @ sc.T, 10)) < 0.1
    assert linear_predictivity(shuffled, x, seq) < 0.05 < 0.5 < linear_predictivity(y, x, seq)
    assert svcca(x, shuffled) < svcca(x, y) - 0.3 and pwcca(x, shuffled) < pwcca(x, y) - 0.3


def test_the_stage_reports_each_new_measure_per_layer_and_the_jackknife_and_check_keep_their_three():
    from realign.analysis.arms import OTHER_SIMILARITY
    from realign.measure.similarity import JACKKNIFE_MEASURES, compare_layers, jackknife_other_means

    x, y = _pair(seed=7)
    row = compare_layers([x], [y], SEQUENCES, n_boot=0, knn_k=5, matrix=False)["layers"][0]
    assert row["svcca"] == pytest.approx(svcca(x, y), abs=1e-9)
    assert row["rsa"] == pytest.approx(rsa(x, y), abs=1e-9)
    assert row["linear_predictivity"] == pytest.approx(linear_predictivity(y, x, SEQUENCES), abs=1e-9)
    reps = jackknife_other_means([x], [y], SEQUENCES, range(0, 1), groups=4, knn_k=5)
    assert set(reps) == set(JACKKNIFE_MEASURES) == {"rbf_cka", "procrustes_sim", "knn_overlap"}
    assert OTHER_SIMILARITY == ("rbf_cka", "procrustes_sim", "knn_overlap")  # pre-registered: unchanged
    assert kernels.CCA_VARIANCE == 0.99
