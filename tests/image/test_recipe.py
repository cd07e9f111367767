"""ImageRecipe: config validation, losses, previews and data entry points."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from polydiff.core.train import ConfigError, Recipe, load_recipe
from polydiff.image.config import DEFAULTS
from polydiff.image.recipe import ImageRecipe
from polydiff.image.synthetic import digits


def _batch(recipe, cfg, n=8):
    return recipe(cfg).collate([recipe(cfg).decode(s) for s in digits(n)])


def test_is_the_installed_image_modality():
    recipe = load_recipe("image")
    assert recipe is ImageRecipe and issubclass(recipe, Recipe)
    assert recipe.name == "image"


def test_validate_fills_every_default(recipe):
    cfg = recipe.validate({})
    assert {k: cfg[k] for k in DEFAULTS} == DEFAULTS
    assert cfg["unet"]["channel_mult"] == [1, 2]
    assert "dit" not in cfg and "autoencoder" not in cfg


def test_validate_names_unknown_keys(recipe):
    with pytest.raises(ConfigError, match=r"model\.learning_rte"):
        recipe.validate({"learning_rte": 1})
    with pytest.raises(ConfigError, match=r"model\.unet\.base_chanels"):
        recipe.validate({"unet": {"base_chanels": 8}})


@pytest.mark.parametrize(
    ("cfg", "key"),
    [
        ({"kind": "gan"}, "model.kind"),
        ({"channels": 2}, "model.channels"),
        ({"prediction": "noise"}, "model.prediction"),
        ({"schedule": "sigmoid"}, "model.schedule"),
        ({"sampler": "plms"}, "model.sampler"),
        ({"cond_drop": 1.5}, "model.cond_drop"),
        ({"guidance": -1.0}, "model.guidance"),
        ({"image_size": 15}, "model.image_size"),
        ({"unet": {"attention_levels": [3]}}, "model.unet.attention_levels"),
        ({"dit": {"patch": 2}}, "model.dit"),  # not used by the default kind unet
        ({"kind": "latent_dit"}, "model.autoencoder"),  # needs a trained autoencoder
        ({"zero_terminal_snr": True, "prediction": "eps"}, "model.prediction"),
    ],
)
def test_validate_refuses_bad_values_naming_the_key(recipe, cfg, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        recipe.validate(cfg)


def test_decode_bucket_collate(recipe):
    cfg = recipe.validate({})
    sample = next(digits(1))
    assert recipe(cfg).bucket(sample) is None
    batch = _batch(recipe, cfg, 4)
    assert batch["image"].shape == (4, 1, 16, 16) and len(batch["caption"]) == 4


@pytest.mark.parametrize("kind", ["unet", "dit", "latent_dit", "autoencoder"])
def test_loss_is_finite_and_decreases_when_trained(recipe, tiny, kind):
    torch.manual_seed(0)
    cfg = tiny(kind)
    model = recipe(cfg).build_model().train()
    batch = _batch(recipe, cfg, 8)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)

    def loss() -> torch.Tensor:
        # The same times, noise and dropped captions every step: one fixed objective.
        return recipe(cfg).loss(model, batch, torch.Generator().manual_seed(1), "model")

    first = loss()
    assert first.ndim == 0 and torch.isfinite(first)
    for _ in range(15):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert loss().item() < 0.9 * first.item()


def test_cfg_dropout_replaces_captions_with_the_empty_prompt(recipe, tiny):
    model = recipe(tiny("unet")).build_model()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = _batch(recipe, tiny("unet"), 4)
    empty = {**batch, "caption": [""] * 4}

    def loss(cfg, b):
        return recipe(cfg).loss(model, b, torch.Generator().manual_seed(3), "model")

    always = tiny("unet", cond_drop=1.0)
    never = tiny("unet", cond_drop=0.0)
    assert torch.allclose(loss(always, batch), loss(never, empty))
    assert not torch.allclose(loss(never, batch), loss(never, empty))


def test_autoencoder_training_tracks_the_latent_spread(recipe, tiny):
    cfg = tiny("autoencoder")
    model = recipe(cfg).build_model().train()
    recipe(cfg).loss(model, _batch(recipe, cfg, 4), torch.Generator().manual_seed(0), "model")
    assert int(model.latent_std_updates) == 1
    model.eval()
    recipe(cfg).loss(model, _batch(recipe, cfg, 4), torch.Generator().manual_seed(0), "model")
    assert int(model.latent_std_updates) == 1  # evaluation leaves the statistics alone


@pytest.mark.parametrize("kind", ["unet", "autoencoder"])
def test_preview_writes_a_png_grid_and_keeps_training_mode(recipe, tiny, kind, tmp_path):
    cfg = tiny(kind)
    model = recipe(cfg).build_model().train()
    [path] = recipe(cfg).preview(model, tmp_path / "step_000100", 100)
    name = "digits.png" if kind == "unet" else "reconstructions.png"
    assert path == tmp_path / "step_000100" / name
    with Image.open(path) as grid:
        rows = 1 if kind == "unet" else 2  # digits 0..9, or originals over reconstructions
        assert grid.size == (10 * 8 * 4, rows * 8 * 4)
    assert model.training


def test_synthetic_and_source_entry_points(recipe, tmp_path):
    assert len(list(recipe.synthetic("digits", 3))) == 3
    with pytest.raises(ValueError, match="unknown synthetic image set 'cats'.*digits"):
        recipe.synthetic("cats", 1)
    Image.new("L", (4, 4)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("black")
    [sample] = list(recipe.source(tmp_path))
    assert sample["txt"] == "black"


def test_float_keys_accept_yaml_exponent_strings(recipe):
    # YAML 1.1 reads 1e-4 (without a dot) as the string "1e-4".
    cfg = recipe.validate({"kind": "autoencoder", "autoencoder": {"kl_weight": "1e-4"}})
    assert cfg["autoencoder"]["kl_weight"] == 1e-4
    with pytest.raises(ConfigError, match=r"model\.guidance"):
        recipe.validate({"guidance": "strong"})


def test_the_bundled_model_recipe_is_a_valid_training_config():
    from pathlib import Path

    from polydiff.core.train.config import load_config

    root = Path(__file__).resolve().parents[2]
    cfg = load_config(root / "shared" / "configs" / "image" / "digits.yaml")
    assert cfg.modality == "image"
    assert cfg.model["kind"] == "unet" and cfg.model["image_size"] == 16
