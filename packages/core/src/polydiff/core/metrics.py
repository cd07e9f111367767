"""Fréchet distance between two sets of feature vectors (the statistic behind FID and FVD).

Each set of N feature vectors of dimension D is summarised by a Gaussian, its mean ``mu``
(D,) and covariance ``sigma`` (D, D); the squared 2-Wasserstein (Fréchet) distance between
the two Gaussians is::

    d^2 = ||mu_a - mu_b||^2 + Tr(sigma_a + sigma_b - 2 (sigma_a sigma_b)^(1/2))

It is in squared feature units and 0 only for equal statistics. Everything is computed in
float64. The trace of the matrix square root uses the identity
``Tr((Sa Sb)^(1/2)) = Tr((Sa^(1/2) Sb Sa^(1/2))^(1/2))``: the right-hand matrix is symmetric
positive semi-definite, so its eigenvalues are real and ``numpy.linalg.eigh`` gives the
answer without the complex round-off (and the "tiny imaginary part" clean-up) that a general
``sqrtm`` of the non-symmetric ``Sa Sb`` produces. No modality is imported here.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["feature_statistics", "frechet_distance", "frechet_distance_from_statistics"]


def _as_features(features: Any, name: str) -> np.ndarray:
    if hasattr(features, "detach"):  # a torch tensor, possibly on a GPU or in bf16
        features = features.detach().float().cpu().numpy()
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name}: expected an (N, D) array of features, got shape {array.shape}")
    if array.shape[0] < 2:
        raise ValueError(
            f"{name}: a covariance needs at least 2 feature vectors, got N = {array.shape[0]}"
        )
    if not np.isfinite(array).all():
        raise ValueError(f"{name}: the features contain NaN or infinite values")
    return array


def feature_statistics(features: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of a set of feature vectors.

    Args:
        features: (N, D) array or tensor, N >= 2.

    Returns:
        ``(mu, sigma)``: (D,) mean and (D, D) unbiased covariance (divided by N - 1), float64.

    Raises:
        ValueError: not 2-D, N < 2, or non-finite values.
    """
    array = _as_features(features, "features")
    return array.mean(axis=0), np.atleast_2d(np.cov(array, rowvar=False))


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a positive semi-definite matrix."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    # Round-off can push zero eigenvalues of a rank-deficient covariance slightly negative.
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance_from_statistics(mu_a: Any, sigma_a: Any, mu_b: Any, sigma_b: Any) -> float:
    """Fréchet distance between the Gaussians N(mu_a, sigma_a) and N(mu_b, sigma_b).

    Args:
        mu_a, mu_b: (D,) means. sigma_a, sigma_b: (D, D) covariances (symmetric PSD).

    Returns:
        The squared Fréchet distance (>= 0), in squared feature units.

    Raises:
        ValueError: shapes that do not agree.
    """
    mu_a, mu_b = (
        np.atleast_1d(np.asarray(mu_a, np.float64)),
        np.atleast_1d(np.asarray(mu_b, np.float64)),
    )
    sigma_a = np.atleast_2d(np.asarray(sigma_a, np.float64))
    sigma_b = np.atleast_2d(np.asarray(sigma_b, np.float64))
    d = mu_a.shape[0]
    if (
        mu_a.shape != (d,)
        or mu_b.shape != (d,)
        or sigma_a.shape != (d, d)
        or sigma_b.shape != (d, d)
    ):
        raise ValueError(
            f"statistics do not agree: mu_a {mu_a.shape}, sigma_a {sigma_a.shape}, "
            f"mu_b {mu_b.shape}, sigma_b {sigma_b.shape}"
        )
    root_a = _sqrt_psd(sigma_a)
    middle = root_a @ sigma_b @ root_a
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    diff = mu_a - mu_b
    value = diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * cross
    # The true value is >= 0; cancellation can leave about -1e-12 for equal statistics.
    return float(max(value, 0.0))


def frechet_distance(features_a: Any, features_b: Any) -> float:
    """Fréchet distance between Gaussians fitted to two sets of feature vectors.

    Args:
        features_a: (N_a, D) array or tensor, N_a >= 2.
        features_b: (N_b, D) array or tensor, N_b >= 2 (N_b may differ from N_a).

    Returns:
        ``||mu_a - mu_b||^2 + Tr(Sa + Sb - 2 (Sa Sb)^(1/2))`` (>= 0), in squared feature units.
        It is biased upwards for small N (each covariance is estimated), so compare values
        computed with the same N.

    Raises:
        ValueError: a set that is not 2-D, has fewer than 2 vectors or non-finite values, or
            feature dimensions that differ.
    """
    a = _as_features(features_a, "features_a")
    b = _as_features(features_b, "features_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"feature dimensions differ: features_a has D = {a.shape[1]}, "
            f"features_b has D = {b.shape[1]}"
        )
    return frechet_distance_from_statistics(*feature_statistics(a), *feature_statistics(b))
