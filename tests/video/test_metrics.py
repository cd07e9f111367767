"""Video metrics: the bundled clip evaluator, prompt adherence, Fréchet distances, temporal
consistency and FVD with a user-supplied TorchScript network."""

from __future__ import annotations

import json
import random
import warnings

import pytest
import torch
from torch import nn

from polydiff.video import metrics
from polydiff.video.metrics import (
    ClipEvaluator,
    bundled_evaluator,
    clip_frechet_distance,
    fvd,
    load_evaluator,
    load_i3d,
    prompt_adherence,
    real_clips,
    resample_videos,
    temporal_consistency,
    train_evaluator,
)
from polydiff.video.synthetic import COLOURS, MOTIONS, SHAPES, caption, render_clip

HELD_OUT_SEED = 4242  # the bundled evaluator was trained on seed 0
SWAPPED = {
    "moving left": "moving right",
    "moving right": "moving left",
    "moving up": "moving down",
    "moving down": "moving up",
    "growing": "shrinking",
    "shrinking": "growing",
    "static": "growing",
}


@pytest.fixture(scope="module")
def held_out() -> tuple[torch.Tensor, list[tuple[str, str, str]]]:
    """210 real clips (MP4 round trip) the evaluator never saw, in [-1, 1], and their
    (shape, colour, motion)."""
    videos, labels = real_clips(210, seed=HELD_OUT_SEED)
    names = [
        (SHAPES[s], list(COLOURS)[c], MOTIONS[m])
        for s, c, m in zip(labels["shape"], labels["colour"], labels["motion"], strict=True)
    ]
    return videos.float() / 127.5 - 1.0, names


def clip(shape: str, colour: str, motion: str, **kwargs) -> torch.Tensor:
    """A freshly rendered clip (no MP4) as (3, T, H, W) in [-1, 1]."""
    frames = render_clip(shape, colour, motion, **kwargs)
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1.0


# --------------------------------------------------------------------------- the evaluator


def test_bundled_evaluator_reads_held_out_clips(held_out):
    videos, names = held_out
    seen = bundled_evaluator().predict(videos)
    for position, head in enumerate(("shape", "colour", "motion")):
        right = sum(p == n[position] for p, n in zip(seen[head], names, strict=True))
        assert right / len(names) >= 0.9, head


def test_bundled_evaluator_is_loaded_once_in_eval_mode():
    evaluator = bundled_evaluator()
    assert evaluator is bundled_evaluator()
    assert not evaluator.training
    assert isinstance(load_evaluator(), ClipEvaluator)


def test_evaluator_takes_any_clip_size_and_gives_logits_and_features():
    evaluator = ClipEvaluator(width=4, appearance_width=4, feature_dim=32).eval()
    for shape in [(2, 3, 2, 16, 16), (1, 3, 24, 48, 40)]:
        video = torch.zeros(shape)
        logits = evaluator(video)
        assert {k: tuple(v.shape) for k, v in logits.items()} == {
            "shape": (shape[0], 3),
            "colour": (shape[0], 5),
            "motion": (shape[0], 7),
        }
        assert evaluator.features(video).shape == (shape[0], 32)
    with pytest.raises(ValueError, match=r"\(B, 3, T, H, W\)"):
        evaluator.features(torch.zeros(1, 1, 4, 16, 16))


def test_missing_evaluator_folder_says_how_to_create_it(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="--train-evaluator .*nothing"):
        load_evaluator(tmp_path / "nothing")
    monkeypatch.setattr(metrics, "BUNDLED_EVALUATOR", tmp_path / "bundled" / "evaluator")
    with pytest.raises(FileNotFoundError, match="python -m polydiff.video.metrics"):
        load_evaluator()


def test_training_is_reproducible_and_leaves_the_callers_random_state_alone(tmp_path):
    torch.manual_seed(123)
    random.seed(123)
    expected_torch, expected_python = torch.rand(1), random.random()
    torch.manual_seed(123)
    random.seed(123)
    first = train_evaluator(count=6, steps=2, batch_size=3)
    assert torch.rand(1) == expected_torch and random.random() == expected_python
    second = train_evaluator(count=6, steps=2, batch_size=3)
    other = train_evaluator(count=6, steps=2, batch_size=3, seed=1)
    # Equal up to float rounding: on some CPUs oneDNN's conv kernels round differently with
    # the memory alignment of their buffers (seen: 3e-8 in a gradient), and AdamW turns a
    # near-zero gradient's rounding into a whole step of +-lr (3e-3) either way.
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert float((a.double() - b.double()).abs().max()) < 1e-2, name
    pairs = zip(first.parameters(), other.parameters(), strict=True)
    assert max(float((a - c).abs().max().detach()) for a, c in pairs) > 0.05  # another seed


def test_command_line_trains_reports_and_saves_a_loadable_evaluator(tmp_path, capsys):
    out = tmp_path / "evaluator"
    args = ["--train-evaluator", str(out), "--count", "6", "--steps", "1", "--held-out", "3"]
    assert metrics.main(args) == 0
    assert "held-out accuracy: shape" in capsys.readouterr().out
    record = json.loads((out / "config.json").read_text())
    assert record["class"] == "polydiff.video.metrics:ClipEvaluator"
    assert isinstance(load_evaluator(out), ClipEvaluator)


# --------------------------------------------------------------------------- prompt adherence


def test_real_clips_adhere_to_their_own_captions_and_not_to_swapped_motions(held_out):
    videos, names = held_out
    own = prompt_adherence(videos, [caption(*n) for n in names])
    assert min(own["shape"], own["colour"], own["motion"], own["all"]) >= 0.9
    assert own["count"] == len(names)
    swapped = prompt_adherence(videos, [caption(s, c, SWAPPED[m]) for s, c, m in names])
    assert swapped["motion"] <= 0.1 and swapped["all"] <= 0.1
    assert swapped["shape"] == own["shape"] and swapped["colour"] == own["colour"]


def test_clips_played_backwards_read_as_the_opposite_motion(held_out):
    # Frame order matters: the evaluator is not judging motion from single frames.
    videos, names = held_out
    opposite = {**SWAPPED, "static": "static"}
    backwards = prompt_adherence(videos.flip(2), [caption(s, c, opposite[m]) for s, c, m in names])
    assert backwards["motion"] >= 0.9


def test_only_moving_shapes_prompts_are_judged(held_out):
    videos, names = held_out
    prompts = [caption(*n) if i % 2 else "a photo of a cat" for i, n in enumerate(names[:10])]
    assert prompt_adherence(videos[:10], prompts)["count"] == 5
    with pytest.raises(ValueError, match="no prompt is a moving-shapes caption"):
        prompt_adherence(videos[:2], ["a cat", "a dog"])
    with pytest.raises(ValueError, match="2 videos but 1 prompts"):
        prompt_adherence(videos[:2], ["a red circle static"])


def test_other_sizes_and_lengths_are_resampled_to_what_the_evaluator_knows():
    # Rendered at 48x48 with 24 and with 10 frames; moving shapes cross the same distance
    # in any length, so after resampling the motion reads as in training.
    names = [(SHAPES[i % 3], list(COLOURS)[i % 5], MOTIONS[i % 7]) for i in range(21)]
    for frames in (24, 10):
        videos = [
            clip(*n, frames=frames, size=48, rng=random.Random(f"resample/{i}"))
            for i, n in enumerate(names)
        ]
        score = prompt_adherence(videos, [caption(*n) for n in names])
        assert score["all"] >= 0.8, (frames, score)


def test_resampling_keeps_first_and_last_frames():
    video = torch.arange(31.0).reshape(1, 1, 31, 1, 1).expand(1, 3, 31, 16, 16)
    longer = resample_videos(video, 16, 32)
    assert longer.shape == (1, 3, 16, 32, 32)
    assert torch.allclose(longer[0, 0, :, 0, 0], torch.arange(0.0, 31.0, 2.0))  # every other
    shorter = resample_videos(video[:, :, :4], 7, 16)  # 0 1 2 3 -> 0 .5 1 ... 3
    assert torch.allclose(shorter[0, 0, :, 0, 0], torch.arange(7.0) / 2)


def test_grey_videos_are_judged_as_three_equal_channels(held_out):
    videos, names = held_out
    grey = videos[:12].mean(dim=1, keepdim=True)
    prompts = [caption(*n) for n in names[:12]]
    rgb = grey.expand(-1, 3, -1, -1, -1)
    assert prompt_adherence(grey, prompts) == prompt_adherence(rgb, prompts)


# --------------------------------------------------------------------------- Fréchet distance


def test_clip_frechet_distance_separates_real_clips_from_noise(held_out):
    videos, _ = held_out
    first, second = videos[:105], videos[105:]
    noise = torch.rand(105, 3, 16, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert clip_frechet_distance(first, first) == pytest.approx(0.0, abs=1e-6)
    real_vs_real = clip_frechet_distance(first, second)
    real_vs_noise = clip_frechet_distance(first, noise)
    assert real_vs_noise > 10 * real_vs_real


# --------------------------------------------------------------------------- temporal


def test_a_static_clip_has_no_flicker_and_full_similarity():
    still = clip("square", "red", "static")
    assert torch.equal(still[:, 0], still[:, -1])
    result = temporal_consistency([still])
    assert result == {"frame_similarity": pytest.approx(1.0), "flicker": 0.0}
    black = -torch.ones(2, 3, 4, 16, 16)
    assert temporal_consistency(black) == {"frame_similarity": 1.0, "flicker": 0.0}


def test_noise_flickers_and_motion_flickers_a_little():
    noise = torch.rand(4, 3, 16, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    result = temporal_consistency(noise)
    assert result["flicker"] == pytest.approx(1 / 3, abs=0.01)  # E|u - v| of uniforms
    assert result["frame_similarity"] == pytest.approx(0.75, abs=0.01)  # E[uv] / E[u^2]
    moving = temporal_consistency([clip("circle", "white", "moving right")])
    assert 0 < moving["flicker"] < 0.1
    assert 0.5 < moving["frame_similarity"] < 1.0


def test_temporal_consistency_needs_two_frames():
    with pytest.raises(ValueError, match="T >= 2"):
        temporal_consistency(torch.zeros(1, 3, 1, 16, 16))


# --------------------------------------------------------------------------- FVD


class TinyI3D(nn.Module):
    """Stands in for I3D: conv3d + pooling + linear, (N, 3, T, H, W) -> (N, 16)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(3, 8, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.linear = nn.Linear(8, 16)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.linear(self.pool(torch.relu(self.conv(video))).flatten(1))


@pytest.fixture
def i3d_file(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "i3d.pt"
    with warnings.catch_warnings():  # torch >= 2.10 deprecates TorchScript; FVD still uses it
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(TinyI3D()).save(str(path))
    return path


def test_fvd_is_zero_for_the_same_videos_and_grows_with_the_damage(i3d_file):
    videos = torch.rand(12, 3, 8, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    noise = torch.randn(videos.shape, generator=torch.Generator().manual_seed(2))
    assert fvd(videos, videos, i3d_file, size=32) == pytest.approx(0.0, abs=1e-6)
    distances = [fvd(videos, videos + 0.3 * k * noise, i3d_file, size=32) for k in (1, 2, 3)]
    assert 0 < distances[0] < distances[1] < distances[2]
    shifted = [fvd(videos, videos + shift, i3d_file, size=32) for shift in (0.1, 0.5)]
    assert 0 < shifted[0] < shifted[1]


def test_fvd_takes_a_loaded_module_and_feeds_it_resized_rgb_batches(i3d_file):
    seen: list[tuple[int, ...]] = []

    class Recorder(nn.Module):
        def forward(self, video: torch.Tensor) -> torch.Tensor:
            seen.append(tuple(video.shape))
            return video.mean(dim=(2, 3, 4))[:, :, None].expand(-1, -1, 2)  # (n, 3, 2): flattened

    grey = [torch.rand(1, 5, 16, 24) * 2 - 1 for _ in range(5)]
    value = fvd(grey, grey, Recorder(), size=40, batch_size=2)
    assert value == pytest.approx(0.0, abs=1e-9)
    assert seen[:3] == [(2, 3, 5, 40, 40), (2, 3, 5, 40, 40), (1, 3, 5, 40, 40)]
    assert fvd(grey, grey, load_i3d(i3d_file), size=16) == pytest.approx(0.0, abs=1e-6)


def test_load_i3d_gives_a_cpu_model_in_eval_mode(i3d_file):
    model = load_i3d(i3d_file)
    assert isinstance(model, torch.jit.ScriptModule)
    assert not model.training
    assert model(torch.zeros(1, 3, 4, 16, 16)).shape == (1, 16)


def test_load_i3d_names_a_missing_file_and_a_file_that_is_not_torchscript(tmp_path):
    with pytest.raises(FileNotFoundError, match="i3d_torchscript.pt"):
        load_i3d(tmp_path / "i3d_torchscript.pt")
    text = tmp_path / "notes.txt"
    text.write_text("not a model")
    with pytest.raises(ValueError, match="notes.txt is not a TorchScript model"):
        load_i3d(text)
    weights = tmp_path / "weights.pt"
    torch.save(TinyI3D().state_dict(), weights)  # a plain checkpoint, not TorchScript
    with pytest.raises(ValueError, match="weights.pt is not a TorchScript model"):
        fvd(torch.zeros(2, 3, 2, 16, 16), torch.zeros(2, 3, 2, 16, 16), weights)
