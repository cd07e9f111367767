"""BVH both ways: our files hold the SMPL skeleton and give its joints back, other parsers read
them, any BVH (other channel orders, position channels, extra joints, centimetres, CRLF) reads
to the 22 joints, malformed files are refused in one line, and motions resample in time."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from polydiff.motion.bvh import bvh_joints, guess_unit_scale, read_bvh, resample, write_bvh
from polydiff.motion.skeleton import (
    JOINT_NAMES,
    PARENTS,
    REST_OFFSETS,
    children,
    fit_skeleton,
    forward_kinematics,
)

LEAVES = {"head", "left_wrist", "right_wrist", "left_foot", "right_foot"}


def _fk_motion(seed: int = 0, frames: int = 24, offsets: np.ndarray = REST_OFFSETS) -> np.ndarray:
    """(T, 22, 3) a rigid motion: random local rotations (up to ~1 rad) and a wandering root."""
    rng = np.random.default_rng(seed)
    turns = Rotation.from_rotvec(rng.normal(scale=0.6, size=(frames * 22, 3)))
    local = turns.as_matrix().reshape(frames, 22, 3, 3)
    root = np.cumsum(rng.normal(scale=0.05, size=(frames, 3)), axis=0) + [0.0, 0.95, 0.0]
    return forward_kinematics(local, root, offsets)


def test_a_written_bvh_reads_back_to_the_same_joints(tmp_path):
    joints = _fk_motion()
    path = write_bvh(joints, tmp_path / "walk.bvh")
    motion = read_bvh(path)
    assert sorted(motion.names) == sorted(JOINT_NAMES) and motion.names[0] == "pelvis"
    for name, parent in zip(motion.names, motion.parents, strict=True):  # nested as PARENTS
        expected = PARENTS[JOINT_NAMES.index(name)]
        assert (parent == -1) if expected == -1 else motion.names[parent] == JOINT_NAMES[expected]
    assert motion.channels[0] == (
        "Xposition", "Yposition", "Zposition", "Zrotation", "Yrotation", "Xrotation"
    )  # fmt: skip
    assert all(c == ("Zrotation", "Yrotation", "Xrotation") for c in motion.channels[1:])
    assert motion.frames == len(joints) and motion.frame_time == pytest.approx(0.05)
    assert motion.fps == pytest.approx(20.0)
    np.testing.assert_allclose(bvh_joints(motion), joints, atol=1e-4)


def test_a_skeleton_of_another_size_keeps_its_bone_lengths(tmp_path):
    offsets = REST_OFFSETS * 1.15  # a taller body
    joints = _fk_motion(seed=1, offsets=offsets)
    motion = read_bvh(write_bvh(joints, tmp_path / "tall.bvh"))
    by_name = dict(zip(motion.names, motion.offsets, strict=True))
    np.testing.assert_allclose([by_name[n] for n in JOINT_NAMES], offsets, atol=1e-5)
    np.testing.assert_allclose(bvh_joints(motion), joints, atol=1e-4)


def test_the_file_is_metres_with_zyx_euler_degrees(tmp_path):
    joints = _fk_motion(seed=2, frames=3)
    motion = read_bvh(write_bvh(joints, tmp_path / "a.bvh", fps=30))
    assert motion.fps == pytest.approx(30.0, rel=1e-6)
    np.testing.assert_allclose(motion.values[:, :3], joints[:, 0], atol=1e-6)  # root, metres
    fit = fit_skeleton(joints)
    knee = motion.names.index("left_knee")
    column = 6 + 3 * (knee - 1)
    angles = motion.values[:, column : column + 3]  # Zrotation Yrotation Xrotation
    z, y, x = (Rotation.from_euler(a, angles[:, [i]], degrees=True) for i, a in enumerate("zyx"))
    rebuilt = (z * y * x).as_matrix()  # Rz @ Ry @ Rx
    np.testing.assert_allclose(rebuilt, fit.local[:, JOINT_NAMES.index("left_knee")], atol=1e-5)


def test_leaf_joints_end_in_an_end_site_and_the_file_is_plain_bvh(tmp_path, checkpoint):
    record = {"format": "polydiff-provenance/1", "modality": "motion", "prompt": "a kick"}
    path = write_bvh(_fk_motion(frames=2), tmp_path / "kick.bvh", metadata=record)
    text = path.read_text(encoding="ascii")
    assert text.startswith("HIERARCHY\n") and text.endswith("\n")
    assert text.count("End Site") == len(LEAVES)
    assert "#" not in text and "//" not in text and "polydiff" not in text  # no comments
    assert json.loads((tmp_path / "kick.bvh.json").read_text(encoding="utf-8")) == record
    write_bvh(_fk_motion(frames=2), tmp_path / "bare.bvh")
    assert sorted(os.listdir(tmp_path)) == ["bare.bvh", "kick.bvh", "kick.bvh.json"]


def test_the_bvh_package_parses_our_file(tmp_path):
    bvh = pytest.importorskip("bvh")
    joints = _fk_motion(seed=3, frames=5)
    path = write_bvh(joints, tmp_path / "a.bvh")
    theirs = bvh.Bvh(path.read_text())
    ours = read_bvh(path)
    assert theirs.get_joints_names() == list(ours.names)
    assert theirs.nframes == 5 and theirs.frame_time == pytest.approx(0.05)
    assert theirs.joint_channels("pelvis") == list(ours.channels[0])
    for j, name in enumerate(ours.names):
        assert theirs.joint_offset(name) == pytest.approx(tuple(ours.offsets[j]), abs=1e-6)
        parent = ours.parents[j]
        assert theirs.joint_parent_index(name) == parent
    for frame in range(5):
        position = theirs.frame_joint_channels(frame, "pelvis", ["Xposition", "Yposition"])
        np.testing.assert_allclose(position, joints[frame, 0, :2], atol=1e-6)
        elbow = theirs.frame_joint_channels(frame, "left_elbow", ["Zrotation", "Xrotation"])
        column = 6 + 3 * (ours.names.index("left_elbow") - 1)
        np.testing.assert_allclose(elbow, ours.values[frame, [column, column + 2]], atol=1e-9)


# --- other people's BVH files --------------------------------------------------------


def _hierarchy_order() -> list[int]:
    order = []

    def visit(j):
        order.append(j)
        for c in children(j):
            visit(c)

    visit(0)
    return order


def _bvh_text(joints, frame_time, newline="\n"):
    """A BVH from [(name, parent index or -1, offset, channels, values (T, n), end site)].

    Written as other exporters do: tabs, braces on the joint's line, the given line ending."""
    lines = ["HIERARCHY"]

    def visit(index, depth):
        name, parent, offset, channels, _, end = joints[index]
        pad = "\t" * depth
        lines.append(f"{pad}{'ROOT' if parent < 0 else 'JOINT'} {name} {{")
        lines.append(f"{pad}\tOFFSET\t{offset[0]:.6f}\t{offset[1]:.6f}\t{offset[2]:.6f}")
        lines.append(f"{pad}\tCHANNELS {len(channels)} {' '.join(channels)}")
        for child, spec in enumerate(joints):
            if spec[1] == index:
                visit(child, depth + 1)
        if end is not None:
            lines.append(f"{pad}\tEnd Site\n{pad}\t{{\n{pad}\t\tOFFSET {end[0]} {end[1]} {end[2]}")
            lines.append(f"{pad}\t}}")
        lines.append(f"{pad}}}")

    visit(0, 0)
    values = np.concatenate([spec[4] for spec in joints], axis=1)
    lines += ["MOTION", f"Frames:\t{len(values)}", f"Frame Time:  {frame_time}"]
    lines += [" ".join(f"{v:.6f}" for v in row) for row in values]
    return newline.join(lines) + newline


def _foreign_file(joints, units=100.0, rename=str.upper):
    """Our skeleton's motion as another exporter might write it: centimetres, a different
    Euler order per joint, rotations before positions on the root, position channels on a
    knee, a spine4 between spine3 and neck that turns its children, fingers under a wrist,
    joint names in another case."""
    fit = fit_skeleton(joints)
    frames = len(joints)
    orders = ["XYZ", "XZY", "YXZ", "YZX", "ZXY", "ZYX"]
    extra_turn = Rotation.from_euler("XYZ", [20.0, -30.0, 10.0], degrees=True).as_matrix()
    specs = []
    index_of = {}
    for k, j in enumerate(_hierarchy_order()):
        name, parent = JOINT_NAMES[j], PARENTS[j]
        offset, local = fit.offsets[j], fit.local[:, j]
        parent_index = index_of[parent] if parent >= 0 else -1
        if name == "neck":  # spine4 takes half the bone and a constant turn
            spine4_offset = 0.5 * offset
            specs.append(
                (
                    "Spine4",
                    parent_index,
                    spine4_offset * units,
                    ("Zrotation", "Xrotation", "Yrotation"),
                    np.tile(
                        Rotation.from_matrix(extra_turn).as_euler("ZXY", degrees=True), (frames, 1)
                    ),
                    None,
                )
            )
            parent_index = len(specs) - 1
            offset = extra_turn.T @ (offset - spine4_offset)
            local = extra_turn.T @ local
        order = orders[k % len(orders)]
        rotations = tuple(f"{axis}rotation" for axis in order)
        angles = Rotation.from_matrix(local).as_euler(order, degrees=True)
        if j == 0:
            channels = (*rotations, "Xposition", "Yposition", "Zposition")
            values = np.concatenate([angles, fit.root * units], axis=1)
        elif name == "left_knee":  # position channels replace the OFFSET (they repeat it)
            channels = ("Xposition", "Yposition", "Zposition", *rotations)
            values = np.concatenate([np.tile(offset * units, (frames, 1)), angles], axis=1)
        else:
            channels, values = rotations, angles
        end = (0.0, 5.0, 0.0) if name in LEAVES and name != "left_wrist" else None
        specs.append((rename(name), parent_index, offset * units, channels, values, end))
        index_of[j] = len(specs) - 1
        if name == "left_wrist":
            finger = Rotation.from_rotvec(np.full((frames, 3), 0.3)).as_euler("XYZ", degrees=True)
            specs.append(
                ("LeftIndex1", len(specs) - 1, np.array([6.0, 0.0, 0.0]),
                 ("Xrotation", "Yrotation", "Zrotation"), finger, (2.0, 0.0, 0.0))
            )  # fmt: skip
    return specs


def test_any_channel_order_extra_joints_and_centimetres_read_to_the_same_joints(tmp_path):
    joints = _fk_motion(seed=4, frames=12)
    text = _bvh_text(_foreign_file(joints), 1 / 30, newline="\r\n")
    path = tmp_path / "mocap.bvh"
    path.write_bytes(text.encode("utf-8"))
    motion = read_bvh(path)
    assert "Spine4" in motion.names and "LeftIndex1" in motion.names
    assert motion.fps == pytest.approx(30.0, rel=1e-6)
    assert guess_unit_scale(motion) == 0.01  # centimetres
    np.testing.assert_allclose(bvh_joints(motion), joints, atol=1e-4)
    np.testing.assert_allclose(bvh_joints(motion, scale=1.0), joints * 100, atol=1e-2)
    # The same file as text and as bytes.
    np.testing.assert_allclose(bvh_joints(read_bvh(text)), joints, atol=1e-4)
    np.testing.assert_allclose(bvh_joints(read_bvh(text.encode("utf-8"))), joints, atol=1e-4)


def test_our_metre_files_are_guessed_as_metres(tmp_path):
    motion = read_bvh(write_bvh(_fk_motion(frames=2), tmp_path / "a.bvh"))
    assert guess_unit_scale(motion) == 1.0


def test_a_missing_joint_is_named_and_names_can_be_mapped(tmp_path):
    joints = _fk_motion(seed=5, frames=4)
    rename = {"head": "Skull"}
    specs = _foreign_file(joints, units=1.0, rename=lambda n: rename.get(n, n))
    motion = read_bvh(_bvh_text(specs, 0.05))
    with pytest.raises(ValueError, match="the BVH has no joint 'head'"):
        bvh_joints(motion)
    names = [rename.get(n, n).lower() for n in JOINT_NAMES]
    np.testing.assert_allclose(bvh_joints(motion, names=names), joints, atol=1e-4)


GOOD = (
    "HIERARCHY\nROOT hips\n{\n OFFSET 0 0 0\n CHANNELS 3 Xposition Yposition Zposition\n"
    " End Site\n {\n  OFFSET 0 1 0\n }\n}\nMOTION\nFrames: 2\nFrame Time: 0.05\n0 0 0\n1 2 3\n"
)


def test_a_minimal_bvh_parses():
    motion = read_bvh(GOOD)
    assert motion.names == ("hips",) and motion.parents == (-1,)
    np.testing.assert_array_equal(motion.values, [[0, 0, 0], [1, 2, 3]])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "not a BVH file"),
        ("hello world", "not a BVH file"),
        (GOOD.replace("MOTION", "MOTON"), "no MOTION section"),
        (GOOD.replace("1 2 3\n", "1 2\n"), "2 frames of 3 channels need 6 values"),
        (GOOD.replace("1 2 3", "1 2 x"), "frame value 'x' is not a number"),
        (GOOD.replace("Zposition", "Wposition"), "channel 'Wposition'"),
        (GOOD.replace("OFFSET 0 0 0", "OFFSET 0 zero 0"), "OFFSET of hips is not a number"),
        (GOOD.replace("Frame Time: 0.05", "Frame Time: 0"), "frame time must be > 0"),
        (GOOD.replace("Frames: 2", "Frames: two"), "frame count"),
        (GOOD[: GOOD.index("}\nMOTION")] + "MOTION\nFrames: 0\nFrame Time: 1", "closing joint"),
        (GOOD.replace("1 2 3", "1 2 nan"), "NaN or infinite"),
    ],
)
def test_a_malformed_bvh_is_refused_in_one_line(text, message):
    with pytest.raises(ValueError, match=message) as caught:
        read_bvh(text.encode("utf-8"))
    assert "\n" not in str(caught.value)


def test_an_unreadable_file_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="cannot read BVH file"):
        read_bvh(tmp_path / "missing.bvh")


def test_writing_refuses_bad_motions_and_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match=r"expected \(T, 22, 3\) joints"):
        write_bvh(np.zeros((4, 21, 3)), tmp_path / "a.bvh")
    with pytest.raises(ValueError, match="NaN"):
        write_bvh(np.full((4, 22, 3), np.nan), tmp_path / "a.bvh")
    with pytest.raises(ValueError, match="fps must be"):
        write_bvh(_fk_motion(frames=2), tmp_path / "a.bvh", fps=0)
    assert os.listdir(tmp_path) == []


def test_a_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    target = write_bvh(_fk_motion(frames=2), tmp_path / "a.bvh")
    before = target.read_bytes()

    def half_then_crash(self, text, *args, **kwargs):
        with open(self, "w") as handle:
            handle.write(text[: len(text) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(type(target), "write_text", half_then_crash)
    with pytest.raises(OSError, match="disk full"):
        write_bvh(_fk_motion(seed=9, frames=3), target, metadata={"prompt": "x"})
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["a.bvh"]  # no temporary, no sidecar


# --- resampling ----------------------------------------------------------------------


def _linear_motion(frames, fps):
    """(T, 22, 3) joints moving at constant velocity: any resampling is exact."""
    t = np.arange(frames)[:, None, None] / fps
    start = np.random.default_rng(0).normal(size=(1, 22, 3))
    return start + t * np.linspace(-1, 1, 66).reshape(1, 22, 3)


def test_resampling_interpolates_linearly_in_time():
    motion = _linear_motion(31, fps=30.0)  # 1 s
    out = resample(motion, 30.0, 20.0)
    assert out.shape == (21, 22, 3)
    np.testing.assert_allclose(out, _linear_motion(21, fps=20.0), atol=1e-12)
    up = resample(motion[:3], 30.0, 60.0)
    assert up.shape == (5, 22, 3)
    np.testing.assert_allclose(up[1], (motion[0] + motion[1]) / 2, atol=1e-12)


def test_resampling_keeps_frames_that_line_up():
    motion = np.random.default_rng(1).normal(size=(61, 22, 3))
    np.testing.assert_allclose(resample(motion, 60.0, 20.0), motion[::3], atol=1e-12)
    np.testing.assert_allclose(resample(motion, 20.0, 20.0), motion)
    assert resample(motion[:1], 120.0, 20.0).shape == (1, 22, 3)


def test_resampling_refuses_bad_rates_and_empty_motions():
    with pytest.raises(ValueError, match="fps_in must be > 0"):
        resample(np.zeros((3, 22, 3)), 0.0)
    with pytest.raises(ValueError, match="no frames"):
        resample(np.zeros((0, 22, 3)), 30.0)


def test_a_bvh_at_another_rate_resamples_to_twenty_fps(tmp_path):
    joints = _fk_motion(seed=6, frames=31)
    motion = read_bvh(write_bvh(joints, tmp_path / "a.bvh", fps=60))
    out = resample(bvh_joints(motion), motion.fps, 20.0)
    assert out.shape == (11, 22, 3)
    np.testing.assert_allclose(out, joints[::3], atol=1e-4)
