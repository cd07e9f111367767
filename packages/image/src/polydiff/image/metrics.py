"""Does a generated digit show the digit that was asked for? A classifier on the real digits.

``digit_classifier()`` is an RBF support-vector machine fitted on all 1,797 real 8x8 digits of
scikit-learn (grey levels 0..16); on a held-out quarter it scores about 99 %. Generated images
are brought to the same form (grayscale, 8x8 by area averaging, levels 0..16) before they are
classified, so a 16x16 model output is judged like the real data it was trained on.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from .synthetic import real_digits

__all__ = ["digit_agreement", "digit_classifier", "predict_digits", "to_digit_features"]

_SVC_PARAMS = {"kernel": "rbf", "gamma": 0.001, "C": 10.0}


def make_classifier() -> Any:
    """An unfitted copy of the digit classifier (for held-out checks)."""
    from sklearn.svm import SVC

    return SVC(**_SVC_PARAMS)


@functools.cache
def digit_classifier() -> Any:
    """The digit classifier fitted on every real digit (cached per process; about 0.3 s)."""
    images, labels = real_digits()
    return make_classifier().fit(images.reshape(len(images), -1), labels)


def _as_gray_image(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("L")
    array = image.detach().cpu().float().numpy() if isinstance(image, torch.Tensor) else image
    array = np.asarray(array, dtype=np.float32)
    if array.ndim == 3:  # (C, H, W) in [-1, 1]: average the channels
        array = array.mean(axis=0)
    if array.ndim != 2:
        raise ValueError(f"expected a (H, W) or (C, H, W) image, got shape {array.shape}")
    return Image.fromarray(np.clip(np.rint((array + 1.0) * 127.5), 0, 255).astype(np.uint8))


def to_digit_features(images: Sequence[Any]) -> np.ndarray:
    """Images -> (N, 64) features like sklearn's digits (8x8, levels 0..16).

    Args:
        images: PIL images (any mode), or (C, H, W) / (H, W) tensors or arrays in [-1, 1].
    """
    rows = []
    for image in images:
        gray = _as_gray_image(image).resize((8, 8), Image.Resampling.BOX)
        rows.append(np.asarray(gray, dtype=np.float64).reshape(-1) * (16.0 / 255.0))
    return np.stack(rows) if rows else np.zeros((0, 64))


def predict_digits(images: Sequence[Any]) -> np.ndarray:
    """The digit (0..9) the classifier sees in each image: (N,) int."""
    if len(images) == 0:
        return np.zeros(0, dtype=np.int64)
    return digit_classifier().predict(to_digit_features(images)).astype(np.int64)


def digit_agreement(images: Sequence[Any], digits: Sequence[int]) -> float:
    """Fraction of ``images`` in which the classifier sees the digit that was asked for.

    Args:
        images: N images (see :func:`to_digit_features`).
        digits: N requested digits 0..9.

    Returns:
        A value in [0, 1].
    """
    if len(images) != len(digits):
        raise ValueError(f"got {len(images)} images but {len(digits)} digits")
    if len(images) == 0:
        raise ValueError("digit_agreement needs at least one image")
    predicted = predict_digits(images)
    return float(np.mean(predicted == np.asarray(digits, dtype=np.int64)))
