"""Saving generated images: --out FILE.png with --num N."""

from __future__ import annotations

import pytest
from PIL import Image

from polydiff.image.export import output_paths, save_images


def _images(n):
    return [Image.new("L", (4, 4), color=i * 10) for i in range(n)]


def test_one_image_is_written_to_the_given_file(tmp_path):
    paths = save_images(_images(1), tmp_path / "out.png", num=1)
    assert paths == [tmp_path / "out.png"]
    assert Image.open(paths[0]).size == (4, 4)


def test_several_images_are_numbered_from_zero(tmp_path):
    paths = save_images(_images(3), tmp_path / "sub" / "digit.png", num=3)
    assert [p.name for p in paths] == ["digit_0.png", "digit_1.png", "digit_2.png"]
    assert [Image.open(p).getpixel((0, 0)) for p in paths] == [0, 10, 20]
    assert not (tmp_path / "sub" / "digit.png").exists()


def test_a_missing_suffix_becomes_png(tmp_path):
    assert output_paths(tmp_path / "x", 1) == [tmp_path / "x.png"]
    assert output_paths(tmp_path / "x", 2)[1] == tmp_path / "x_1.png"


def test_count_mismatch_is_refused(tmp_path):
    with pytest.raises(ValueError, match="2 images to save as --num 3"):
        save_images(_images(2), tmp_path / "o.png", num=3)
    with pytest.raises(ValueError, match="num must be an integer >= 1"):
        output_paths(tmp_path / "o.png", 0)
