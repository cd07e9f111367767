"""synthetic:digits — sklearn's real handwritten digits as captioned 16x16 PNG samples."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from polydiff.image.synthetic import DIGITS_COUNT, digit_caption, digits, real_digits


def _image(sample: dict) -> Image.Image:
    return Image.open(io.BytesIO(sample["png"]))


def test_default_count_is_every_real_digit_once():
    samples = list(digits())
    assert len(samples) == DIGITS_COUNT == 1797
    assert len({s["__key__"] for s in samples}) == DIGITS_COUNT
    assert [s["json"]["index"] for s in samples] == list(range(DIGITS_COUNT))


def test_count_limits_the_samples():
    assert len(list(digits(5))) == 5
    assert list(digits(0)) == []


def test_captions_and_metadata_name_the_real_label():
    _, labels = real_digits()
    for sample in digits(30):
        meta = sample["json"]
        assert meta["label"] == labels[meta["index"]]
        assert (
            sample["txt"] == digit_caption(meta["label"]) == f"a handwritten digit {meta['label']}"
        )
        assert meta["source"] == "sklearn-digits"
        assert meta["size"] == 16
        assert "." not in sample["__key__"]


def test_png_is_8bit_grayscale_at_the_requested_size():
    for size in (16, 24):
        image = _image(next(digits(1, size=size)))
        assert image.format == "PNG"
        assert image.mode == "L"
        assert image.size == (size, size)


def test_png_upsamples_the_real_8x8_pixels():
    images, _ = real_digits()
    pixels = np.asarray(_image(next(digits(1))), dtype=np.float64)
    # Averaging 2x2 blocks recovers the 8x8 original up to interpolation blur.
    down = pixels.reshape(8, 2, 8, 2).mean(axis=(1, 3)) * 16 / 255
    assert np.corrcoef(down.ravel(), images[0].ravel())[0, 1] > 0.95


def test_count_beyond_the_set_repeats_with_jitter_and_the_same_labels():
    samples = list(digits(DIGITS_COUNT + 3))
    for offset in range(3):
        original, repeat = samples[offset], samples[DIGITS_COUNT + offset]
        assert repeat["json"]["index"] == original["json"]["index"] == offset
        assert repeat["txt"] == original["txt"]
        assert repeat["__key__"] != original["__key__"]
        assert not np.array_equal(np.asarray(_image(repeat)), np.asarray(_image(original)))
    # Seeded by the sample index: the same count gives the same bytes.
    again = list(digits(DIGITS_COUNT + 3))[-3:]
    assert [s["png"] for s in again] == [s["png"] for s in samples[-3:]]


def test_invalid_arguments_are_refused():
    with pytest.raises(ValueError, match="count"):
        list(digits(-1))
    with pytest.raises(ValueError, match="size"):
        list(digits(1, size=4))
