"""The digit classifier that judges generated digits."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from polydiff.image.metrics import (
    digit_agreement,
    digit_classifier,
    make_classifier,
    to_digit_features,
)
from polydiff.image.synthetic import digits, real_digits


def test_classifier_is_accurate_on_held_out_real_digits():
    images, labels = real_digits()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(labels))
    train, test = order[:1350], order[1350:]
    clf = make_classifier().fit(images[train].reshape(len(train), -1), labels[train])
    assert clf.score(images[test].reshape(len(test), -1), labels[test]) >= 0.95
    # ... and on the same digits after the 16x16 PNG round trip that generated images take.
    pngs = list(digits())
    round_trip = to_digit_features([Image.open(io.BytesIO(pngs[i]["png"])) for i in test])
    assert clf.score(round_trip, labels[test]) >= 0.95


def test_classifier_is_cached():
    assert digit_classifier() is digit_classifier()


def test_agreement_of_real_digits_and_of_wrong_requests():
    samples = list(digits(200))
    images = [Image.open(io.BytesIO(s["png"])) for s in samples]
    labels = [s["json"]["label"] for s in samples]
    assert digit_agreement(images, labels) >= 0.97
    wrong = [(label + 1) % 10 for label in labels]
    assert digit_agreement(images, wrong) <= 0.03


def test_tensors_in_minus_one_one_are_judged_like_pngs():
    sample = next(digits(1))
    png = Image.open(io.BytesIO(sample["png"]))
    tensor = torch.from_numpy(np.asarray(png, dtype=np.float32) / 127.5 - 1.0)[None]
    assert np.allclose(to_digit_features([png]), to_digit_features([tensor]), atol=1e-6)
    assert to_digit_features([png]).shape == (1, 64)
    assert to_digit_features([png]).max() <= 16.0


def test_agreement_arguments_are_checked():
    with pytest.raises(ValueError, match="2 images but 1 digits"):
        digit_agreement([Image.new("L", (8, 8))] * 2, [1])
    with pytest.raises(ValueError, match="at least one"):
        digit_agreement([], [])
