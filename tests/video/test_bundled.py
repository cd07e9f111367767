"""The bundled moving-shapes model (trained by `polydiff train` from
shared/configs/video/moving-shapes.yaml) ships in the package and moves the asked-for shape
the asked-for way."""

from __future__ import annotations

import av
import pytest
import torch

from polydiff.cli.main import main
from polydiff.core.modality import bundled_checkpoint
from polydiff.video.pipeline import generate
from polydiff.video.recipe import VideoRecipe

DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


def _centroid(frame: torch.Tensor) -> tuple[float, float]:
    """Brightness-weighted centre (x, y) in pixels of a (C, H, W) frame in [-1, 1]."""
    lit = ((frame + 1) / 2).amax(0).clamp(min=0).double()
    lit = torch.where(lit > 0.25, lit, torch.zeros_like(lit))  # the shape, not the background
    ys, xs = torch.meshgrid(
        torch.arange(lit.shape[0], dtype=torch.float64),
        torch.arange(lit.shape[1], dtype=torch.float64),
        indexing="ij",
    )
    total = lit.sum().clamp(min=1e-9)
    return float((lit * xs).sum() / total), float((lit * ys).sum() / total)


@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_the_shape_moves_the_asked_direction(direction):
    dx, dy = DIRECTIONS[direction]
    prompts = [f"a {c} {s} moving {direction}" for c, s in
               (("red", "circle"), ("blue", "square"), ("yellow", "triangle"))]  # fmt: skip
    videos, _ = generate(prompts, num=2, seed=11)
    moved = 0
    for video in videos:
        (x0, y0), (x1, y1) = _centroid(video[:, 0]), _centroid(video[:, -1])
        along = (x1 - x0) * dx + (y1 - y0) * dy
        across = abs((x1 - x0) * dy) + abs((y1 - y0) * dx)
        moved += along > 4 and along > across
    assert moved >= 5  # of 6 videos


def test_the_shape_has_the_asked_colour():
    videos, _ = generate(["a red circle moving left", "a blue square moving down",
                          "a green triangle moving right"], seed=2)  # fmt: skip
    for video, channel in zip(videos, (0, 2, 1), strict=True):
        frame = (video[:, 8] + 1) / 2  # (3, H, W) in [0, 1]
        lit = frame.amax(0) > 0.4
        assert lit.any()
        assert int(frame[:, lit].mean(1).argmax()) == channel


def test_cli_writes_a_playable_mp4_from_the_bundled_model(tmp_path):
    assert bundled_checkpoint(VideoRecipe).is_dir()
    out = tmp_path / "left.mp4"
    code = main(["generate", "video", "--prompt", "a white circle moving left", "--out",
                 str(out), "--steps", "10"])  # fmt: skip
    assert code == 0
    with av.open(str(out)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 16 and frames[0].shape == (32, 32, 3)
    assert max(f.max() for f in frames) > 100  # a lit shape on the black background
