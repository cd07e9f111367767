"""The shape networks: the point denoiser is permutation-equivariant and takes any point
count, the point autoencoder is a latent codec of (N, 3) clouds with an occupancy field on a
grid, the latent denoiser carries it, and the configs refuse what cannot be built."""

from __future__ import annotations

import copy

import pytest
import torch

from polydiff.core.modality import ConfigError, LatentCodec
from polydiff.shape.model import (
    FIELD_BOUND,
    LatentShapeDenoiser,
    PointAutoencoder,
    PointDenoiser,
    autoencoder_loss,
)
from polydiff.shape.recipe import ShapeRecipe
from tests.modality_fixtures import jitter
from tests.shape.conftest import TINY, TINY_AUTOENCODER


def _denoiser(**changes) -> PointDenoiser:
    torch.manual_seed(0)
    model = PointDenoiser(dim=32, depth=2, heads=2, context_dim=8, pooled_dim=8, **changes)
    jitter(model)
    return model.eval()


def test_point_denoiser_is_permutation_equivariant_for_any_point_count():
    model = _denoiser()
    context, mask, pooled = (
        torch.randn(2, 3, 8),
        torch.ones(2, 3, dtype=torch.bool),
        torch.randn(2, 8),
    )
    for count in (17, 64):
        x, t = torch.randn(2, count, 3), torch.tensor([10.0, 500.0])
        order = torch.randperm(count)
        out = model(x, t, context, mask, pooled)
        assert out.shape == (2, count, 3)
        shuffled = model(x[:, order], t, context, mask, pooled)
        torch.testing.assert_close(shuffled, out[:, order], rtol=1e-4, atol=1e-5)


def test_label_conditioning_embeds_classes_and_reserves_the_null_label():
    model = _denoiser(conditioning="label", num_classes=3)
    x, t = torch.randn(4, 16, 3), torch.full((4,), 100.0)
    out = model(x, t, label=torch.tensor([0, 1, 2, 3]))  # 3 = no label (CFG's null input)
    assert out.shape == x.shape
    assert not torch.allclose(out[0], model(x, t, label=torch.tensor([1, 1, 1, 1]))[0])
    with pytest.raises(ValueError, match="label"):
        model(x, t)


def test_point_autoencoder_is_a_latent_codec_of_clouds_of_any_size():
    torch.manual_seed(0)
    codec = PointAutoencoder(**TINY_AUTOENCODER["autoencoder"]).eval()
    assert isinstance(codec, LatentCodec)
    assert codec.latent_shape((100, 3)) == codec.latent_shape((2048, 3)) == (4, 4)
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        codec.latent_shape((3, 16, 16))
    points = torch.randn(2, 50, 3)
    z = codec.encode_latents(points)
    assert z.shape == (2, 4, 4)
    torch.testing.assert_close(z, codec.encode_latents(points[:, torch.randperm(50)]),
                               rtol=1e-4, atol=1e-5)  # a set encoder: order is nothing  # fmt: skip
    decoded = codec.decode_latents(z, count=30)
    assert decoded.shape == (2, 30, 3)
    assert torch.equal(decoded, codec.decode_latents(z, count=30))  # deterministic seeds
    grid = codec.occupancy_grid(z, resolution=5, chunk=7)  # chunks that do not divide 125
    assert grid.shape == (2, 5, 5, 5)
    corner = codec.field(codec.decode_tokens(z * codec.latent_std),
                         torch.full((2, 1, 3), -FIELD_BOUND))  # fmt: skip
    torch.testing.assert_close(grid[:, 0, 0, 0], corner[:, 0], rtol=1e-4, atol=1e-5)


def test_autoencoder_loss_learns_a_field_and_tracks_the_latent_scale():
    torch.manual_seed(0)
    codec = PointAutoencoder(latents=4, latent_channels=4, dim=32, heads=2, encoder_depth=1,
                             decoder_depth=1, frequencies=2)  # fmt: skip
    # A sphere of radius 0.8: inside iff |q| < 0.8.
    points = torch.nn.functional.normalize(torch.randn(4, 64, 3), dim=-1) * 0.8
    queries = torch.rand(4, 128, 3) * 2.2 - 1.1
    batch = {"points": points, "queries": queries,
             "occupancy": (queries.norm(dim=-1) < 0.8).float(),
             "has_field": torch.ones(4, dtype=torch.bool)}  # fmt: skip
    weights = {"points_weight": 1.0, "field_weight": 1.0, "kl_weight": 1e-3}
    optimizer = torch.optim.Adam(codec.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    first = None
    for _ in range(60):
        loss, parts = autoencoder_loss(codec, batch, weights, generator)
        first = first or {k: float(v) for k, v in parts.items()}
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(parts["field_bce"]) < 0.5 * first["field_bce"]
    assert float(parts["chamfer"]) < first["chamfer"]
    assert int(codec.latent_std_updates) == 60 and float(codec.latent_std) != 1.0
    # shapes without a field (point-cloud inputs) add nothing to the field loss
    batch["has_field"] = torch.zeros(4, dtype=torch.bool)
    _, parts = autoencoder_loss(codec, batch, weights, generator)
    assert float(parts["field_bce"]) == 0.0


def test_latent_denoiser_carries_the_autoencoder_frozen(autoencoder_checkpoint):
    recipe = ShapeRecipe.from_config(
        {**TINY, "kind": "latent", "codec": str(autoencoder_checkpoint)}
    )
    model = recipe.build_model()
    assert isinstance(model, LatentShapeDenoiser) and model.latent_shape == (4, 4)
    assert not any(p.requires_grad for p in model.autoencoder.parameters())
    trained = PointAutoencoder(**TINY_AUTOENCODER["autoencoder"])
    from polydiff.core.pretrained import from_pretrained

    trained = from_pretrained(autoencoder_checkpoint)
    carried = model.autoencoder.state_dict()
    assert all(torch.equal(carried[k], v) for k, v in trained.state_dict().items())


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"kind": "latent"}, "codec"),
        ({"codec": "somewhere"}, "codec"),
        ({"conditioning": "label"}, "classes"),
        ({"conditioning": "label", "classes": ["a box", "a box"]}, "distinct"),
        ({"classes": ["a box"]}, "classes"),
        ({"points": 10**9}, "points"),
        ({"autoencoder": {"dim": 16}}, "autoencoder"),
        ({"normalize": "cube"}, "normalize"),
    ],
)
def test_configs_refuse_what_cannot_be_built(changes, message):
    with pytest.raises(ConfigError, match=message):
        ShapeRecipe.validate({**copy.deepcopy(TINY), **changes})


def test_latent_config_refuses_a_codec_that_is_not_an_autoencoder(tmp_path, points_checkpoint):
    recipe = ShapeRecipe.from_config({**TINY, "kind": "latent", "codec": str(points_checkpoint)})
    with pytest.raises(ConfigError, match="not a latent codec"):
        recipe.build_model()
    recipe = ShapeRecipe.from_config({**TINY, "kind": "latent", "codec": str(tmp_path / "none")})
    with pytest.raises(ConfigError, match="model.codec"):
        recipe.build_model()
