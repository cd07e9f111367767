"""Fréchet distance between feature sets (polydiff.core.metrics)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from polydiff.core.metrics import (
    feature_statistics,
    frechet_distance,
    frechet_distance_from_statistics,
)


def test_identical_sets_are_at_distance_zero():
    features = np.random.default_rng(0).normal(size=(200, 16))
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-8)


def test_a_shifted_set_is_at_the_squared_length_of_the_shift():
    features = np.random.default_rng(1).normal(size=(300, 8))
    delta = np.arange(8, dtype=np.float64) / 4.0
    # Same covariance, so only the mean term is left.
    assert frechet_distance(features, features + delta) == pytest.approx(delta @ delta, rel=1e-9)


def test_diagonal_covariances_match_the_closed_form():
    # Zero-mean, orthogonal columns: the sample covariance is exactly diagonal.
    signs = np.array([[1, 1], [-1, 1], [1, -1], [-1, -1]], dtype=np.float64)
    a = signs * np.array([1.0, 3.0])
    b = signs * np.array([2.0, 0.5]) + np.array([1.0, -2.0])
    var_a, var_b = np.array([1.0, 9.0]) * 4 / 3, np.array([4.0, 0.25]) * 4 / 3
    expected = 1.0 + 4.0 + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-12)


def test_general_covariances_match_a_matrix_square_root():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(2)
    a = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6)) + 0.5
    (mu_a, s_a), (mu_b, s_b) = feature_statistics(a), feature_statistics(b)
    root = scipy_linalg.sqrtm(s_a @ s_b).real
    expected = np.sum((mu_a - mu_b) ** 2) + np.trace(s_a + s_b - 2 * root)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)
    # Symmetric, and the statistics form gives the same number.
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance_from_statistics(mu_a, s_a, mu_b, s_b) == frechet_distance(a, b)


def test_rank_deficient_covariances_give_a_finite_non_negative_distance():
    # Fewer vectors than dimensions, as with few generated videos and 64-D features.
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(5, 32)), rng.normal(size=(7, 32))
    value = frechet_distance(a, b)
    assert np.isfinite(value) and value > 0
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


def test_statistics_are_the_mean_and_unbiased_covariance():
    features = torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, 8.0]])
    mu, sigma = feature_statistics(features)
    assert mu.dtype == np.float64
    np.testing.assert_allclose(mu, [2.0, 4.0])
    np.testing.assert_allclose(sigma, [[4.0, 7.0], [7.0, 13.0]])


def test_torch_tensors_are_accepted_and_computed_in_float64():
    features = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    shifted = features.to(torch.bfloat16) + 1
    assert frechet_distance(features, shifted) == pytest.approx(4.0, rel=0.02)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="dimensions differ.*D = 3.*D = 4"):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="features_b: a covariance needs at least 2"):
        frechet_distance(np.zeros((5, 3)), np.zeros((1, 3)))
    with pytest.raises(ValueError, match=r"expected an \(N, D\) array"):
        frechet_distance(np.zeros(5), np.zeros(5))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.full((3, 2), np.nan), np.zeros((3, 2)))
