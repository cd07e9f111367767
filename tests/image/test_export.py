"""Saving generated images: --out FILE.png with --num N, each PNG with how it was made."""

from __future__ import annotations

import json
import os

import pytest
from PIL import Image

from polydiff.core.provenance import check_output
from polydiff.image.export import IMAGE_OUTPUT_SUFFIXES, output_paths, save_images, write_png
from tests.provenance_fixtures import records


def _images(n):
    return [Image.new("L", (4, 4), color=i * 10) for i in range(n)]


def _records(checkpoint, n, prompt="a handwritten digit 7"):
    return records(checkpoint, n, prompt=prompt)


def test_one_image_is_written_to_the_given_file(tmp_path):
    paths = save_images(_images(1), tmp_path / "out.png", 1)
    assert paths == [tmp_path / "out.png"]
    assert Image.open(paths[0]).size == (4, 4)
    assert os.listdir(tmp_path) == ["out.png"]  # no record given: no sidecar


def test_several_images_are_numbered_from_zero(tmp_path):
    paths = save_images(_images(3), tmp_path / "sub" / "digit.png", 3)
    assert [p.name for p in paths] == ["digit_0.png", "digit_1.png", "digit_2.png"]
    assert [Image.open(p).getpixel((0, 0)) for p in paths] == [0, 10, 20]
    assert not (tmp_path / "sub" / "digit.png").exists()


def test_a_missing_suffix_becomes_png(tmp_path):
    assert output_paths(tmp_path / "x", 1) == [tmp_path / "x.png"]
    assert output_paths(tmp_path / "x", 2)[1] == tmp_path / "x_1.png"


def test_count_mismatch_is_refused(tmp_path, checkpoint):
    with pytest.raises(ValueError, match="2 images to save as --num 3"):
        save_images(_images(2), tmp_path / "o.png", 3)
    with pytest.raises(ValueError, match="num must be an integer >= 1"):
        output_paths(tmp_path / "o.png", 0)
    with pytest.raises(ValueError, match="got 1 metadata records for 2 images"):
        save_images(_images(2), tmp_path / "o.png", _records(checkpoint, 1))
    with pytest.raises(ValueError, match="got 1 paths for 2 images"):
        save_images(_images(2), [tmp_path / "o.png"], _records(checkpoint, 2))
    assert os.listdir(tmp_path) == []


def test_pngs_carry_their_record_in_text_chunks_and_a_sidecar(tmp_path, checkpoint):
    records = _records(checkpoint, 2)
    paths = check_output(tmp_path / "seven.png", IMAGE_OUTPUT_SUFFIXES, 2)
    assert save_images(_images(2), paths, records) == paths
    for path, record in zip(paths, records, strict=True):
        text = Image.open(path).text
        assert json.loads(text["polydiff"]) == record
        assert text["parameters"].startswith("a handwritten digit 7\nSteps: 30, Sampler: unipc")
        assert f"Index: {record['index']}" in text["parameters"]
        assert f"Model hash: {record['checkpoint_id']}" in text["parameters"]
        assert json.loads((tmp_path / f"{path.name}.json").read_text()) == record
    assert sorted(os.listdir(tmp_path)) == [
        "seven_0.png",
        "seven_0.png.json",
        "seven_1.png",
        "seven_1.png.json",
    ]


def test_a_prompt_outside_latin_1_survives_the_png_chunks(tmp_path, checkpoint):
    record = _records(checkpoint, 1, prompt="数字 7 — ü")[0]
    path = write_png(_images(1)[0], tmp_path / "u.png", record)
    text = Image.open(path).text
    assert json.loads(text["polydiff"])["prompt"] == "数字 7 — ü"
    assert text["parameters"].startswith("数字 7 — ü\n")


def test_images_and_sidecars_are_readable_by_others(tmp_path, checkpoint, umask_022):
    paths = save_images(_images(2), tmp_path / "d.png", _records(checkpoint, 2))
    for path in [*paths, *(p.with_name(p.name + ".json") for p in paths)]:
        assert path.stat().st_mode & 0o777 == 0o644, path  # -rw-r--r--


def test_only_png_is_written_and_a_bad_path_is_refused_before_any_file(tmp_path, checkpoint):
    with pytest.raises(ValueError, match=r"unsupported suffix .jpg; use .png$"):
        save_images(_images(1), tmp_path / "photo.jpg", _records(checkpoint, 1))
    with pytest.raises(ValueError, match="images are saved as .png"):
        save_images(_images(2), [tmp_path / "a.png", tmp_path / "b.jpg"], _records(checkpoint, 2))
    assert os.listdir(tmp_path) == []


def test_an_existing_image_is_replaced_whole(tmp_path, checkpoint):
    path = tmp_path / "o.png"
    save_images(_images(1), path, 1)
    first = path.stat().st_ino
    save_images([Image.new("L", (4, 4), color=200)], path, _records(checkpoint, 1))
    assert Image.open(path).getpixel((0, 0)) == 200
    assert path.stat().st_ino != first  # renamed into place, never rewritten in place
    assert sorted(os.listdir(tmp_path)) == ["o.png", "o.png.json"]
