"""Image denoisers and the KL autoencoder: shapes, zero-initialised outputs, save/load."""

from __future__ import annotations

import pytest
import torch

from polydiff.core.modality import TextConditioner
from polydiff.core.pretrained import from_pretrained, save_pretrained
from polydiff.image.model import KLAutoencoder, LatentDiT, PixelDiT, PixelUNet

DENOISERS = ["unet", "dit", "latent_dit"]


def _inputs(cfg, shape):
    torch.manual_seed(0)
    cond = TextConditioner.from_config(cfg).encode(
        ["a handwritten digit 3", ""], torch.device("cpu"), torch.float32
    )
    return torch.randn(2, *shape), torch.tensor([10.0, 900.0]), cond


def _shape(model, cfg):
    if isinstance(model, LatentDiT):
        f = model.autoencoder.downsample_factor
        return (model.latent_channels, cfg["image_size"] // f, cfg["image_size"] // f)
    return (cfg["channels"], cfg["image_size"], cfg["image_size"])


@pytest.mark.parametrize("kind", DENOISERS)
def test_fresh_denoiser_outputs_zeros_shaped_like_its_input(recipe, tiny, kind):
    cfg = tiny(kind)
    model = recipe(cfg).build_model()
    x, t, cond = _inputs(cfg, _shape(model, cfg))
    out = model(x, t, **cond)
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0  # zero-initialised output layers


@pytest.mark.parametrize("kind", DENOISERS)
def test_trained_denoiser_depends_on_the_text(recipe, tiny, kind):
    cfg = tiny(kind)
    model = recipe(cfg).build_model()
    with torch.no_grad():  # stand-in for training: wake every zero-initialised layer
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    x, t, cond = _inputs(cfg, _shape(model, cfg))
    same_x = x[:1].expand(2, *x.shape[1:])
    out = model(same_x, t[:1].expand(2), **cond)
    assert not torch.allclose(out[0], out[1])


def test_models_record_their_config_and_text_widths(recipe, tiny):
    unet = recipe(tiny("unet")).build_model()
    assert isinstance(unet, PixelUNet)
    assert unet.config["context_dim"] == unet.config["pooled_dim"] == 384  # MiniLM
    dit = recipe(tiny("dit")).build_model()
    assert isinstance(dit, PixelDiT) and dit.config["patch"] == 2


def test_latent_dit_holds_the_trained_autoencoder(recipe, tiny, autoencoder_folder):
    model = recipe(tiny("latent_dit")).build_model()
    saved = from_pretrained(autoencoder_folder, KLAutoencoder)
    assert model.config["autoencoder"] == saved.config
    for name, tensor in saved.state_dict().items():
        assert torch.equal(model.autoencoder.state_dict()[name], tensor)
    assert not any(p.requires_grad for p in model.autoencoder.parameters())
    assert all(p.requires_grad for p in model.net.parameters())


def test_latent_dit_encode_decode_shapes(recipe, tiny):
    model = recipe(tiny("latent_dit")).build_model()
    images = torch.rand(3, 1, 8, 8) * 2 - 1
    latents = model.encode(images)
    assert latents.shape == (3, 2, 4, 4)
    assert model.decode(latents).shape == images.shape


def test_autoencoder_shapes_and_sampling_noise(recipe, tiny):
    model = recipe(tiny("autoencoder")).build_model()
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    mean, logvar = model.encode(x)
    assert mean.shape == logvar.shape == (2, 2, 4, 4)
    assert model.decode(mean).shape == x.shape
    recon, m, _ = model(x, torch.zeros_like(mean))
    assert torch.allclose(recon, model.decode(mean)) and torch.equal(m, mean)
    with pytest.raises(ValueError, match="divisible by 2"):
        model.encode(torch.zeros(1, 1, 7, 8))


def test_autoencoder_tracks_the_latent_spread():
    model = KLAutoencoder(channels=1, latent_channels=2, base_channels=8, channel_mult=[1, 2])
    model.track_latent_std(torch.full((4, 2, 4, 4), 3.0) + torch.randn(4, 2, 4, 4) * 2)
    assert 1.7 < float(model.latent_std) < 2.3  # the first batch replaces the initial 1
    assert int(model.latent_std_updates) == 1


@pytest.mark.parametrize("kind", ["unet", "dit", "latent_dit", "autoencoder"])
def test_save_and_load_round_trip(recipe, tiny, kind, tmp_path):
    model = recipe(tiny(kind)).build_model()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    save_pretrained(model, tmp_path / kind)
    loaded = from_pretrained(tmp_path / kind)
    assert type(loaded) is type(model)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
