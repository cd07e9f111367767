"""Saving motions: BVH, stick-figure MP4 and NPY by suffix, each with its provenance record (an
MP4 also in its comment), the --num naming rule, refusals before any file, readable
permissions, and an old file left whole when writing fails."""

from __future__ import annotations

import json
import os

import av
import numpy as np
import pytest

from polydiff.motion.bvh import bvh_joints, read_bvh
from polydiff.motion.export import (
    MOTION_OUTPUT_SUFFIXES,
    Motion,
    output_paths,
    read_provenance,
    save_motions,
)
from polydiff.motion.skeleton import REST_JOINTS
from tests.provenance_fixtures import records


def _motion(seed: int = 0, frames: int = 8) -> Motion:
    """A small motion: the rest pose on the floor drifting forward with some jitter."""
    rng = np.random.default_rng(seed)
    joints = np.broadcast_to(REST_JOINTS - [0, REST_JOINTS[:, 1].min(), 0], (frames, 22, 3))
    joints = joints + np.linspace(0, 0.5, frames)[:, None, None] * [0, 0, 1]
    features = rng.normal(size=(frames, 263))
    return Motion(features.astype(np.float32), joints.astype(np.float32), caption="walks")


def _records(checkpoint, n):
    return records(checkpoint, n, modality="motion", prompt="a person walks", frames=8)


def test_each_suffix_gets_its_format_and_record(tmp_path, checkpoint):
    motions = [_motion(i) for i in range(3)]
    paths = [tmp_path / "a.bvh", tmp_path / "b.mp4", tmp_path / "c.npy"]
    recs = _records(checkpoint, 3)
    assert save_motions(motions, paths, recs) == paths
    np.testing.assert_allclose(bvh_joints(read_bvh(paths[0])), motions[0].joints, atol=1e-4)
    with av.open(str(paths[1])) as container:
        assert json.loads(container.metadata["comment"]) == recs[1]
        assert container.streams.video[0].frames == 8
    joints = np.load(paths[2], allow_pickle=False)
    assert joints.dtype == np.float32 and joints.shape == (8, 22, 3)
    np.testing.assert_array_equal(joints, motions[2].joints)
    for path, record in zip(paths, recs, strict=True):
        sidecar = path.with_name(path.name + ".json")
        assert json.loads(sidecar.read_text(encoding="utf-8")) == record
        assert read_provenance(path) == record
    assert len(os.listdir(tmp_path)) == 6


def test_npy_can_hold_the_features(tmp_path):
    motion = _motion(frames=5)
    (path,) = save_motions([motion], [tmp_path / "m.npy"], npy="features")
    features = np.load(path, allow_pickle=False)
    assert features.dtype == np.float32 and features.shape == (5, 263)
    np.testing.assert_array_equal(features, motion.features)


def test_the_bvh_frame_time_is_the_motions_rate(tmp_path):
    motion = _motion()
    motion.fps = 30.0
    (path,) = save_motions([motion], tmp_path / "m.bvh")
    assert read_bvh(path).fps == pytest.approx(30.0, rel=1e-6)


def test_one_out_file_is_expanded_by_the_num_rule_and_bare_files_have_no_record(tmp_path):
    written = save_motions([_motion(0), _motion(1)], tmp_path / "sub" / "walk.npy")
    assert [p.name for p in written] == ["walk_0.npy", "walk_1.npy"]
    assert sorted(os.listdir(tmp_path / "sub")) == ["walk_0.npy", "walk_1.npy"]
    assert read_provenance(written[0]) is None
    assert output_paths(tmp_path / "walk", 1) == [tmp_path / "walk.bvh"]
    assert MOTION_OUTPUT_SUFFIXES[0] == ".bvh"


def test_bad_requests_are_refused_before_any_file(tmp_path, checkpoint):
    good, flat = _motion(), _motion()
    flat.joints = flat.joints[:, :21]
    with pytest.raises(ValueError, match="cannot write '.fbx' motions; use one of .bvh, .mp4"):
        save_motions([good], tmp_path / "m.fbx")
    with pytest.raises(ValueError, match="got 1 metadata records for 2 motions"):
        save_motions([good, good], tmp_path / "m.bvh", _records(checkpoint, 1))
    with pytest.raises(ValueError, match=r"b.bvh: expected \(T, 22, 3\) joints"):
        save_motions([good, flat], [tmp_path / "a.bvh", tmp_path / "b.bvh"])
    with pytest.raises(ValueError, match="npy must be one of joints, features"):
        save_motions([good], tmp_path / "m.npy", npy="rotations")
    no_features = Motion(np.zeros((8, 12), np.float32), good.joints)
    with pytest.raises(ValueError, match=r"expected \(T, 263\) features"):
        save_motions([good, no_features], [tmp_path / "a.npy", tmp_path / "b.npy"], npy="features")
    with pytest.raises(ValueError, match="no motions to save"):
        save_motions([], tmp_path / "m.bvh")
    assert os.listdir(tmp_path) == []


def test_outputs_and_sidecars_are_readable_by_others(tmp_path, checkpoint, umask_022):
    paths = [tmp_path / "a.bvh", tmp_path / "b.mp4", tmp_path / "c.npy"]
    save_motions([_motion(i) for i in range(3)], paths, _records(checkpoint, 3))
    for path in sorted(tmp_path.iterdir()):
        assert path.stat().st_mode & 0o777 == 0o644, path  # -rw-r--r--


def test_a_failed_npy_write_leaves_the_old_file(tmp_path, checkpoint, monkeypatch):
    target = tmp_path / "m.npy"
    save_motions([_motion(0)], [target])
    before = target.read_bytes()

    def half_then_crash(file, array, **kwargs):
        with open(file, "wb") as handle:
            handle.write(b"\x93NUMPY half")
        raise OSError("disk full")

    monkeypatch.setattr(np, "save", half_then_crash)
    with pytest.raises(OSError, match="disk full"):
        save_motions([_motion(1)], [target], _records(checkpoint, 1))
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.npy"]  # no temporary, no sidecar


def test_a_failed_mp4_encode_leaves_the_old_file(tmp_path, checkpoint, monkeypatch):
    target = tmp_path / "m.mp4"
    save_motions([_motion(0)], [target])
    before = target.read_bytes()
    calls = []
    original = av.VideoFrame.from_ndarray

    def crash_on_third(frame, format):
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("encoder crashed")
        return original(frame, format=format)

    monkeypatch.setattr(av.VideoFrame, "from_ndarray", crash_on_third)
    with pytest.raises(RuntimeError, match="encoder crashed"):
        save_motions([_motion(1)], [target], _records(checkpoint, 1))
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.mp4"]
