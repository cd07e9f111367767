"""generate(): text to images from a checkpoint folder, and its one-line errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from polydiff.core.modality import bundled_checkpoint
from polydiff.core.pretrained import CheckpointError, save_pretrained
from polydiff.image import pipeline
from polydiff.image.pipeline import generate
from polydiff.image.recipe import ImageRecipe


def _save_final(model, model_cfg, folder, modality="image"):
    """What the trainer writes to <out>/final: save_pretrained + modality + model config."""
    save_pretrained(model, folder)
    config = folder / "config.json"
    record = json.loads(config.read_text())
    record.update({"modality": modality, "model": model_cfg})
    config.write_text(json.dumps(record))
    return folder


@pytest.fixture
def checkpoint(recipe, tiny, tmp_path):
    torch.manual_seed(0)
    cfg = tiny("unet")
    model = recipe(cfg).build_model()
    with torch.no_grad():  # an untrained model outputs zeros; any weights will do here
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return _save_final(model, cfg, tmp_path / "final")


def test_generate_returns_num_images_per_prompt(checkpoint):
    images = generate(
        ["a handwritten digit 1", "a handwritten digit 2"], checkpoint=checkpoint, num=3
    )
    assert len(images) == 6
    assert all(
        isinstance(im, Image.Image) and im.size == (8, 8) and im.mode == "L" for im in images
    )


def test_generate_is_reproducible_by_seed(checkpoint):
    def pixels(seed):
        [image] = generate("a handwritten digit 4", checkpoint=checkpoint, seed=seed, steps=2)
        return np.asarray(image).tolist()

    assert pixels(5) == pixels(5)
    assert pixels(5) != pixels(6)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "euler_ancestral"])
def test_generate_accepts_every_sampler_and_guidance(checkpoint, sampler):
    images = generate(["a handwritten digit 0"], checkpoint=checkpoint, sampler=sampler,
                      steps=2, guidance=1.0)  # fmt: skip
    assert len(images) == 1
    assert len(generate(["x"], checkpoint=checkpoint, sampler=sampler, steps=2, guidance=0.0)) == 1


@pytest.mark.parametrize("kind", ["dit", "latent_dit"])
def test_generate_from_dit_and_latent_checkpoints(recipe, tiny, tmp_path, kind):
    cfg = tiny(kind)
    folder = _save_final(recipe(cfg).build_model(), cfg, tmp_path / kind)
    images = generate(["a handwritten digit 9"], checkpoint=folder, num=2)
    assert [im.size for im in images] == [(8, 8), (8, 8)]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompts": []}, "no prompt given"),
        ({"guidance": -0.5}, r"guidance must be a number in \[0, 50\]"),
        ({"guidance": math.inf}, r"guidance must be a number in \[0, 50\]"),
        ({"guidance": math.nan}, r"guidance must be a number in \[0, 50\]"),
        ({"guidance": 51}, r"guidance must be a number in \[0, 50\]"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"dtype": "float64"}, "dtype 'float64' is not one of"),
        ({"sampler": "plms"}, "unknown sampler 'plms'; valid: ddpm"),
        ({"steps": 0}, "steps must be an integer >= 1"),
        ({"num": 0}, "num must be an integer >= 1"),
    ],
)
def test_bad_arguments_fail_with_one_clear_line(checkpoint, kwargs, message):
    args = {"prompts": ["a handwritten digit 1"], "checkpoint": checkpoint, **kwargs}
    with pytest.raises(ValueError, match=message) as info:
        generate(args.pop("prompts"), **args)
    assert "\n" not in str(info.value)


def test_missing_checkpoint_folder(tmp_path):
    with pytest.raises(ValueError, match="checkpoint folder not found"):
        generate(["a"], checkpoint=tmp_path / "nope")


def test_corrupt_checkpoint(checkpoint):
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        generate(["a"], checkpoint=checkpoint)


def test_checkpoint_of_another_modality_or_without_model_config(recipe, tiny, tmp_path):
    cfg = tiny("unet")
    model = recipe(cfg).build_model()
    other = _save_final(model, cfg, tmp_path / "audio", modality="audio")
    with pytest.raises(CheckpointError, match="'audio' model, not an image model"):
        generate(["a"], checkpoint=other)
    bare = save_pretrained(model, tmp_path / "bare")
    with pytest.raises(CheckpointError, match="no 'model' section"):
        generate(["a"], checkpoint=bare)


def test_autoencoder_checkpoint_cannot_generate(recipe, tiny, tmp_path):
    cfg = tiny("autoencoder")
    folder = _save_final(recipe(cfg).build_model(), cfg, tmp_path / "ae")
    with pytest.raises(CheckpointError, match="is an autoencoder"):
        generate(["a"], checkpoint=folder)


def test_missing_bundled_checkpoint_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(ImageRecipe, "bundled", (tmp_path / "bundled" / "digits", "x.yaml"))
    with pytest.raises(FileNotFoundError, match="bundled image checkpoint is missing"):
        bundled_checkpoint(ImageRecipe)
    with pytest.raises(FileNotFoundError, match="--checkpoint"):
        generate(["a handwritten digit 1"])


def test_bundled_checkpoint_lives_in_the_package():
    expected = pipeline.__file__.rsplit("/", 1)[0] + "/bundled/digits"
    assert str(ImageRecipe.bundled[0]) == expected
