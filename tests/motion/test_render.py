"""Stick-figure pictures: frames of the asked size with the body's sides in their colours, a
camera that keeps a walker in view, MP4s that PyAV opens at the motion's rate with their
provenance, and contact-sheet PNGs."""

from __future__ import annotations

import json
import os

import av
import numpy as np
import pytest
from PIL import Image
from scipy.spatial.transform import Rotation

from polydiff.motion.render import contact_sheet, render_frames, write_stick_figure_mp4
from polydiff.motion.skeleton import REST_JOINTS, forward_kinematics
from tests.provenance_fixtures import records


def _walk(frames: int = 40, speed: float = 1.2) -> np.ndarray:
    """(T, 22, 3) a body standing on the floor, swinging its legs, moving forward (+Z)."""
    t = np.arange(frames) / 20.0
    local = np.broadcast_to(np.eye(3), (frames, 22, 3, 3)).copy()
    swing = 0.5 * np.sin(2 * np.pi * t)[:, None]
    local[:, 1] = Rotation.from_euler("x", -swing).as_matrix()
    local[:, 2] = Rotation.from_euler("x", swing).as_matrix()
    standing = REST_JOINTS[0, 1] - REST_JOINTS[:, 1].min()  # pelvis height, feet on y = 0
    root = np.stack([np.zeros(frames), np.full(frames, standing), speed * t], axis=1)
    return forward_kinematics(local, root)


def _coloured(frame: np.ndarray) -> tuple[int, int]:
    """(blue, red) pixel counts: the body's left and right sides."""
    r, g, b = (frame[..., i].astype(int) for i in range(3))
    return int(((b > r + 80) & (b > g + 40)).sum()), int(((r > b + 80) & (r > g + 80)).sum())


def test_frames_have_the_asked_size_and_show_both_sides():
    frames = render_frames(_walk(6), size=(160, 120))
    assert frames.shape == (6, 120, 160, 3) and frames.dtype == np.uint8
    for frame in frames:
        blue, red = _coloured(frame)
        assert blue > 20 and red > 20


def test_the_camera_keeps_a_walker_in_view():
    joints = _walk(100, speed=2.0)  # 10 m forward
    frames = render_frames(joints, size=(96, 96))
    assert joints[-1, 0, 2] - joints[0, 0, 2] > 9.5
    for frame in frames[::10]:
        assert sum(_coloured(frame)) > 10


def test_rendering_is_deterministic():
    joints = _walk(3)
    np.testing.assert_array_equal(render_frames(joints, (64, 64)), render_frames(joints, (64, 64)))


def test_bad_motions_and_sizes_are_refused():
    with pytest.raises(ValueError, match=r"expected \(T, 22, 3\) joints"):
        render_frames(np.zeros((4, 22, 2)))
    with pytest.raises(ValueError, match="NaN"):
        render_frames(np.full((2, 22, 3), np.inf))
    with pytest.raises(ValueError, match="size must be"):
        render_frames(_walk(2), size=(8, 8))


def test_the_mp4_has_every_frame_at_the_motion_rate_and_its_record(tmp_path, checkpoint):
    record = records(checkpoint, 1, modality="motion", prompt="a person walks")[0]
    path = write_stick_figure_mp4(
        _walk(30), tmp_path / "walk.mp4", fps=20, metadata=record, size=(128, 96)
    )
    with av.open(str(path)) as container:
        assert json.loads(container.metadata["comment"]) == record
        stream = container.streams.video[0]
        assert stream.average_rate == 20
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    assert len(decoded) == 30 and decoded[0].shape == (96, 128, 3)
    assert json.loads((tmp_path / "walk.mp4.json").read_text(encoding="utf-8")) == record
    assert sorted(os.listdir(tmp_path)) == ["walk.mp4", "walk.mp4.json"]


def test_a_contact_sheet_is_a_grid_of_frames(tmp_path):
    path = contact_sheet(
        [_walk(20), _walk(7)], tmp_path / "previews" / "sheet.png", frames=3, cell=64,
        captions=["a person walks forward", ""],
    )  # fmt: skip
    image = Image.open(path)
    assert image.format == "PNG" and image.size == (3 * 64, 2 * 64)
    pixels = np.asarray(image.convert("RGB"))
    for row in range(2):
        for column in range(3):
            cell = pixels[row * 64 : (row + 1) * 64, column * 64 : (column + 1) * 64]
            assert sum(_coloured(cell)) > 5
    assert os.listdir(tmp_path / "previews") == ["sheet.png"]


def test_a_contact_sheet_refuses_bad_arguments_before_writing(tmp_path):
    with pytest.raises(ValueError, match="no motions"):
        contact_sheet([], tmp_path / "a.png")
    with pytest.raises(ValueError, match="got 1 captions for 2 motions"):
        contact_sheet([_walk(2), _walk(2)], tmp_path / "a.png", captions=["x"])
    with pytest.raises(ValueError, match="frames must be"):
        contact_sheet([_walk(2)], tmp_path / "a.png", frames=0)
    assert os.listdir(tmp_path) == []
