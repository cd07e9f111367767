"""The video recipe: strict configs, a loss that trains, previews, entry points."""

from __future__ import annotations

import pytest
import torch

from polydiff.core.train import ConfigError, load_config, load_recipe
from polydiff.video.config import DEFAULTS
from polydiff.video.recipe import VideoRecipe


def test_is_the_installed_video_modality():
    assert load_recipe("video") is VideoRecipe


def test_validate_fills_every_default(recipe):
    cfg = recipe.validate({})
    assert {k: cfg[k] for k in DEFAULTS} == DEFAULTS
    assert cfg["dit"]["patch"] == [2, 4, 4] and cfg["dit"]["attention"] == "full"


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"frame": 16}, "model.frame"),
        ({"dit": {"patchsize": 2}}, "model.dit.patchsize"),
        ({"frames": 15}, "model.frames"),
        ({"height": 30}, "model.height"),
        ({"buckets": [[16, 32, 30]]}, "model.buckets"),
        ({"buckets": [[16, 32]]}, "model.buckets"),
        ({"dit": {"attention": "sparse"}}, "model.dit.attention"),
        ({"dit": {"patch": [2, 4]}}, "model.dit.patch"),
        ({"dit": {"dim": 20, "heads": 4}}, "model.dit.heads"),
        ({"decoder": "ffmpeg"}, "model.decoder"),
        ({"first_frame_prob": 1.5}, "model.first_frame_prob"),
        ({"channels": 4}, "model.channels"),
        ({"sampler": "nope"}, "model.sampler"),
    ],
)
def test_bad_values_are_refused_naming_the_key(recipe, change, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        recipe.validate(change)


def test_loss_is_finite_and_falls_when_trained(recipe, tiny, clips):
    cfg = tiny()
    model = recipe(cfg).build_model()
    batch = recipe(cfg).collate([recipe(cfg).decode(c) for c in clips[:4]])
    assert batch["video"].shape == (4, 3, 8, 32, 32)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(30):
        generator = torch.Generator().manual_seed(step % 3)
        loss = recipe(cfg).loss(model, batch, generator, "model")
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5])


def test_a_given_first_frame_is_left_out_of_the_loss(recipe, tiny, clips, monkeypatch):
    cfg = tiny(first_frame_prob=1.0, cond_drop=0.0)
    seen = {}

    def spy(model, x0, schedule, **kwargs):
        seen.update(kwargs)
        return torch.zeros(())

    monkeypatch.setattr("polydiff.core.modality.denoising.diffusion_loss", spy)
    batch = recipe(cfg).collate([recipe(cfg).decode(c) for c in clips[:2]])
    recipe(cfg).loss(recipe(cfg).build_model(), batch, torch.Generator().manual_seed(0), "model")
    assert seen["cond"]["first_frame_given"].all()
    torch.testing.assert_close(seen["cond"]["first_frame"], batch["video"][:, :, 0])
    assert (seen["mask"][:, :, 0] == 0).all() and (seen["mask"][:, :, 1:] == 1).all()


def test_preview_writes_an_mp4_and_a_contact_sheet(recipe, tiny, tmp_path):
    import av

    cfg = tiny()
    model = recipe(cfg).build_model().eval()  # the trainer previews in eval mode
    paths = recipe(cfg).preview(model, tmp_path, 0)
    assert [p.name for p in paths] == ["previews.mp4", "previews.png"]
    with av.open(str(paths[0])) as container:
        frames = list(container.decode(video=0))
    assert len(frames) == 8 and frames[0].width == 5 * 32  # five prompts side by side


def test_synthetic_and_source_entry_points(recipe, tmp_path):
    sample = next(recipe.synthetic("moving-shapes", 1))
    assert "mp4" in sample and sample["txt"].startswith("a ")
    with pytest.raises(ValueError, match="moving-shapes"):
        recipe.synthetic("digits", 1)
    with pytest.raises(FileNotFoundError):
        list(recipe.source(tmp_path / "missing"))


@pytest.mark.parametrize("preset", ["tiny", "moving-shapes", "dit-b", "dit-xl"])
def test_shipped_presets_are_valid_training_configs(preset):
    cfg = load_config(f"shared/configs/video/{preset}.yaml")
    assert cfg.modality == "video"
