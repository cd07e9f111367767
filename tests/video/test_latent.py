"""Latent video diffusion: a trained autoencoder plugs in by path, the DiT diffuses its
latents frame by frame, and the checkpoint carries the frozen autoencoder."""

from __future__ import annotations

import copy

import pytest
import torch

from polydiff.core.pretrained import save_pretrained
from polydiff.core.train import ConfigError
from polydiff.core.train.trainer import write_final
from polydiff.image.model import KLAutoencoder
from polydiff.video.export import write_mp4
from polydiff.video.pipeline import generate

from .conftest import TINY


@pytest.fixture(scope="module")
def autoencoder_folder(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("ae") / "final"
    save_pretrained(KLAutoencoder(channels=3, latent_channels=4, base_channels=8), folder)
    return folder


def test_the_dit_diffuses_per_frame_latents_and_keeps_the_autoencoder_frozen(
    recipe, autoencoder_folder, clips
):
    cfg = recipe.validate({**copy.deepcopy(TINY), "autoencoder": str(autoencoder_folder)})
    model = recipe(cfg).build_model()
    assert model.channels == 4 and model.model_shape(3, 8, 32, 32) == (4, 8, 16, 16)
    batch = recipe(cfg).collate([recipe(cfg).decode(c) for c in clips[:2]])
    loss = recipe(cfg).loss(model, batch, torch.Generator().manual_seed(0), "model")
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is None for p in model.autoencoder.parameters())
    assert any(p.grad is not None for p in model.dit.parameters())
    video = batch["video"][:1]
    back = model.decode_video(model.encode_video(video))
    assert back.shape == video.shape


def test_a_latent_checkpoint_generates_pixel_videos_alone(recipe, autoencoder_folder, tmp_path):
    cfg = recipe.validate({**copy.deepcopy(TINY), "autoencoder": str(autoencoder_folder)})
    folder = tmp_path / "final"
    write_final(recipe(cfg).build_model(), folder, "video", cfg)
    (autoencoder_folder / "model.safetensors").rename(tmp_path / "moved")  # not needed now
    try:
        videos, fps = generate(["a red circle moving left"], checkpoint=folder, steps=2,
                               frames=12, overlap=2)  # fmt: skip
    finally:
        (tmp_path / "moved").rename(autoencoder_folder / "model.safetensors")
    assert videos[0].shape == (3, 12, 32, 32)
    assert write_mp4(videos[0], tmp_path / "a.mp4", fps).stat().st_size > 0


def test_latents_the_patch_does_not_divide_are_refused_naming_the_autoencoder(
    recipe, autoencoder_folder
):
    cfg = recipe.validate({**copy.deepcopy(TINY), "autoencoder": str(autoencoder_folder),
                           "dit": {**TINY["dit"], "patch": [2, 32, 32]}})  # fmt: skip
    with pytest.raises(ConfigError, match="model.autoencoder"):
        recipe(cfg).build_model()
