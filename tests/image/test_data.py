"""Folders of captioned images in, decoded tensors out (real PNG/JPEG files, real shards)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from polydiff.core.data import Skip, iter_shard, write_shards
from polydiff.image.data import decode, folder_source
from polydiff.image.synthetic import digits


def _write_image(path, size=(12, 10), mode="RGB", fmt="PNG", value=200):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color=value if mode == "L" else (value, 10, 30)).save(path, format=fmt)
    return path


def _samples(folder):
    return list(folder_source(folder))


def test_sidecar_txt_captions(tmp_path):
    _write_image(tmp_path / "cat.png")
    (tmp_path / "cat.txt").write_text("a cat on a mat\n")
    [sample] = _samples(tmp_path)
    assert sample["__key__"] == "cat"
    assert sample["txt"] == "a cat on a mat"
    assert Image.open(io.BytesIO(sample["png"])).size == (12, 10)
    assert sample["json"] == {"file": "cat.png", "width": 12, "height": 10, "mode": "RGB"}


def test_captions_csv(tmp_path):
    _write_image(tmp_path / "a.png")
    _write_image(tmp_path / "sub" / "b.jpg", fmt="JPEG")
    (tmp_path / "captions.csv").write_text(
        'file,caption\na.png,first one\nsub/b.jpg,"second, too"\n'
    )
    samples = {s["__key__"]: s for s in _samples(tmp_path)}
    assert samples["a"]["txt"] == "first one"
    assert samples["sub/b"]["txt"] == "second, too"
    assert "jpg" in samples["sub/b"] and "png" not in samples["sub/b"]


def test_captions_jsonl(tmp_path):
    _write_image(tmp_path / "x.jpeg", fmt="JPEG")
    (tmp_path / "captions.jsonl").write_text(json.dumps({"file": "x.jpeg", "caption": "ex"}) + "\n")
    [sample] = _samples(tmp_path)
    assert sample["txt"] == "ex"
    assert sample["jpg"][:2] == b"\xff\xd8"  # the original JPEG bytes are kept


def test_corrupt_image_is_skipped_with_a_reason(tmp_path):
    _write_image(tmp_path / "good.png")
    (tmp_path / "good.txt").write_text("fine")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (tmp_path / "broken.txt").write_text("never read")
    good_bytes = (tmp_path / "good.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(good_bytes[: len(good_bytes) // 2])  # truncated
    samples = _samples(tmp_path)
    skips = [s for s in samples if isinstance(s, Skip)]
    assert sorted(s.key for s in skips) == ["broken", "cut"]
    assert all(s.reason.startswith("unreadable image") for s in skips)
    assert [s["__key__"] for s in samples if not isinstance(s, Skip)] == ["good"]


def test_image_without_caption_is_skipped(tmp_path):
    _write_image(tmp_path / "lonely.png")
    assert _samples(tmp_path) == [Skip("lonely", "no caption")]


def test_keys_never_contain_dots(tmp_path):
    _write_image(tmp_path / "v1.2" / "img.final.png")
    (tmp_path / "v1.2" / "img.final.txt").write_text("dotted")
    [sample] = _samples(tmp_path)
    assert "." not in sample["__key__"]


def test_missing_folder_and_bad_captions_file_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        _samples(tmp_path / "nowhere")
    (tmp_path / "captions.csv").write_text("name,text\na.png,x\n")
    with pytest.raises(ValueError, match=r"captions\.csv.*file,caption"):
        _samples(tmp_path)


def test_decode_gives_channels_first_float_in_minus_one_one(recipe):
    cfg = recipe.validate({})
    sample = next(digits(1))
    out = decode(sample, cfg)
    assert out["caption"] == sample["txt"]
    image = out["image"]
    assert image.shape == (1, 16, 16) and image.dtype == torch.float32
    assert image.min() >= -1.0 and image.max() <= 1.0
    assert image.min() == -1.0  # black background
    assert image.max() > 0.5  # white strokes


def test_decode_resizes_and_converts_channels(recipe, tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (40, 20), (255, 0, 0)).save(buffer, format="PNG")
    sample = {"__key__": "wide", "png": buffer.getvalue(), "txt": b"red"}
    out = decode(sample, recipe.validate({"channels": 3, "image_size": 8}))
    assert out["image"].shape == (3, 8, 8)
    assert out["caption"] == "red"  # shard text arrives as bytes
    assert torch.allclose(out["image"][0], torch.ones(8, 8))
    assert torch.allclose(out["image"][1], -torch.ones(8, 8))
    gray = decode(sample, recipe.validate({"channels": 1, "image_size": 8}))["image"]
    assert gray.shape == (1, 8, 8)


def test_decode_of_a_corrupt_png_names_the_key(recipe):
    cfg = recipe.validate({})
    with pytest.raises(ValueError, match="bad-sample-7"):
        decode({"__key__": "bad-sample-7", "png": b"garbage", "txt": "x"}, cfg)
    with pytest.raises(ValueError, match="no image field"):
        decode({"__key__": "k", "txt": "x"}, cfg)


def test_collate_stacks_images_and_lists_captions(recipe):
    cfg = recipe.validate({})
    batch = recipe(cfg).collate([decode(s, cfg) for s in digits(3)])
    assert batch["image"].shape == (3, 1, 16, 16)
    assert batch["caption"] == [s["txt"] for s in digits(3)]


def test_folder_to_real_shards_and_back(recipe, tmp_path):
    source = tmp_path / "images"
    for i in range(3):
        _write_image(source / f"img{i}.png", mode="L", value=40 * i)
        (source / f"img{i}.txt").write_text(f"gray level {i}")
    (source / "bad.png").write_bytes(b"nope")
    (source / "bad.txt").write_text("x")
    summary = write_shards(recipe.source(source), tmp_path / "shards", maxcount=2)
    assert summary.written == 3
    assert summary.skipped == {"unreadable image (UnidentifiedImageError)": 1}
    cfg = recipe.validate({"image_size": 8})
    decoded = [recipe(cfg).decode(s) for url in summary.shards for s in iter_shard(url)]
    assert sorted(d["caption"] for d in decoded) == ["gray level 0", "gray level 1", "gray level 2"]
    levels = sorted(float(d["image"].mean()) for d in decoded)
    assert np.allclose(levels, [i * 40 / 127.5 - 1 for i in range(3)], atol=1e-2)
