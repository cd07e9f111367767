"""BVH (Biovision Hierarchy) motion files, both ways: writing the SMPL 22-joint skeleton, and
reading any BVH into joint positions.

A BVH is a skeleton (``HIERARCHY``: nested joints, each with an ``OFFSET`` from its parent
and the ``CHANNELS`` it animates) followed by ``MOTION``: the frame count, the frame time in
seconds and one line of channel values per frame, joints in hierarchy order. Blender, Maya,
MotionBuilder and three.js import it; it is the usual exchange format of motion capture.

What :func:`write_bvh` writes:

* Joints named exactly :data:`~.skeleton.JOINT_NAMES`, ``pelvis`` the ``ROOT``, nested as
  :data:`~.skeleton.PARENTS`; every joint without children (head, wrists, feet) ends in an
  ``End Site`` (a short stub: the head's up, a wrist's along its forearm, a foot's forward)
  so importers can give the last bones a length.
* Units are metres, Y up, the rest pose a T-pose facing +Z: the numbers of the joints as they
  are. Mocap BVHs are often centimetres; Blender's BVH importer has a ``Scale`` option, and
  metres at scale 1 are Blender's own unit.
* ``OFFSET``\\ s are the rest offsets at the motion's own bone lengths
  (:func:`~.skeleton.fit_skeleton`); the root's is zero and its position channels hold the
  pelvis's world position, so readers that add the root offset and readers that do not agree.
* The root has ``Xposition Yposition Zposition Zrotation Yrotation Xrotation``, every other
  joint ``Zrotation Yrotation Xrotation``: angles in degrees, the rotation
  ``R = Rz(z) @ Ry(y) @ Rx(x)`` (intrinsic Z, Y, X, on column vectors), the most common order
  in BVH files and the one every importer handles.
* A BVH has no comment or metadata syntax, so the provenance record goes only into the sidecar
  ``<name>.bvh.json`` (:func:`polydiff.core.provenance.write_sidecar`); the file itself stays
  plain BVH that any parser reads.

:func:`read_bvh` parses any BVH (any channel order per joint, position channels on any joint,
any whitespace and line endings) and :func:`bvh_joints` runs its forward kinematics to the 22
SMPL joints, matched by name; :func:`resample` brings the result to 20 fps.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.spatial.transform import Rotation

from polydiff.core.provenance import atomic_output, write_sidecar

from .features import FPS
from .skeleton import JOINT_NAMES, NUM_JOINTS, REST_OFFSETS, children, fit_skeleton

__all__ = [
    "BVHMotion",
    "bvh_joints",
    "guess_unit_scale",
    "read_bvh",
    "resample",
    "write_bvh",
]

_ROOT_CHANNELS = ("Xposition", "Yposition", "Zposition", "Zrotation", "Yrotation", "Xrotation")
_JOINT_CHANNELS = ("Zrotation", "Yrotation", "Xrotation")
_CHANNEL_NAMES = {
    name.lower(): name
    for name in ("Xposition", "Yposition", "Zposition", "Xrotation", "Yrotation", "Zrotation")
}
#: End Site stubs, metres at the SMPL body's size: head up, wrist along the forearm, foot
#: forward (level, so the toe tip stays at toe height instead of sinking into the floor).
_HEAD_STUB, _HAND_STUB, _TOE_STUB = 0.10, 0.10, 0.05
#: Candidate file units (metres per unit) for :func:`guess_unit_scale`.
_UNITS = {"metres": 1.0, "centimetres": 0.01, "millimetres": 0.001, "inches": 0.0254}
_TYPICAL_SIZE = 1.5  # metres: the largest rest-pose extent of an adult skeleton


def _hierarchy_order() -> list[int]:
    """The SMPL joints depth first from the pelvis (children in index order): BVH's order."""
    order: list[int] = []

    def visit(joint: int) -> None:
        order.append(joint)
        for child in children(joint):
            visit(child)

    visit(0)
    return order


def _end_site(joint: int, offsets: np.ndarray) -> np.ndarray:
    """(3,) the End Site offset of leaf ``joint``, scaled with the fitted skeleton."""
    size = np.linalg.norm(offsets, axis=-1).sum()
    scale = size / max(float(np.linalg.norm(REST_OFFSETS, axis=-1).sum()), 1e-12)
    name = JOINT_NAMES[joint]
    if name == "head":
        return np.array([0.0, _HEAD_STUB * scale, 0.0])
    bone = offsets[joint].astype(np.float64).copy()
    if name.endswith("_foot"):
        bone[1] = 0.0  # level: toes point forward, not into the floor
        length = _TOE_STUB
    else:
        length = _HAND_STUB
    norm = np.linalg.norm(bone)
    if norm < 1e-9:
        return np.array([0.0, length * scale, 0.0])
    return bone / norm * length * scale


def _number(value: float) -> str:
    text = f"{value:.6f}"
    return "0.000000" if text == "-0.000000" else text


def write_bvh(
    joints: np.ndarray,
    path: str | os.PathLike[str],
    fps: float = FPS,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write a motion as a BVH file (the layout in the module doc), atomically.

    The joints are fitted to the skeleton (:func:`~.skeleton.fit_skeleton`): a motion made by
    forward kinematics comes back exactly (to the 6 decimals written); any other comes back as
    the nearest rigid motion.

    Args:
        joints: (T, 22, 3) joint positions in metres (Y up), T >= 1.
        path: the ``.bvh`` file (parent folders are created). fps: frames per second (> 0);
            the file's ``Frame Time`` is ``1 / fps`` seconds.
        metadata: a provenance record, written as the sidecar ``<name>.bvh.json``; ``None``
            writes no sidecar.

    Returns:
        ``path``. Nothing is left beside it when writing fails.

    Raises:
        ValueError: joints of another shape, NaN / infinite joints, fps <= 0, or a record
            that is not JSON.
    """
    joints = np.asarray(joints, dtype=np.float64)
    if joints.ndim != 3 or joints.shape[1:] != (NUM_JOINTS, 3) or len(joints) < 1:
        raise ValueError(f"expected (T, {NUM_JOINTS}, 3) joints with T >= 1, got {joints.shape}")
    if not np.isfinite(joints).all():
        raise ValueError("the motion has NaN or infinite joint positions")
    try:
        rate = float(fps)
    except (TypeError, ValueError):
        rate = float("nan")
    if not (np.isfinite(rate) and rate > 0):
        raise ValueError(f"fps must be a number > 0, got {fps!r}")
    fit = fit_skeleton(joints)
    order = _hierarchy_order()

    lines = ["HIERARCHY"]

    def visit(joint: int, depth: int) -> None:
        pad = "  " * depth
        keyword = "ROOT" if joint == 0 else "JOINT"
        channels = _ROOT_CHANNELS if joint == 0 else _JOINT_CHANNELS
        offset = fit.offsets[joint]
        lines.append(f"{pad}{keyword} {JOINT_NAMES[joint]}")
        lines.append(f"{pad}{{")
        lines.append(f"{pad}  OFFSET {' '.join(_number(v) for v in offset)}")
        lines.append(f"{pad}  CHANNELS {len(channels)} {' '.join(channels)}")
        kids = children(joint)
        for child in kids:
            visit(child, depth + 1)
        if not kids:
            stub = _end_site(joint, fit.offsets)
            lines.append(f"{pad}  End Site")
            lines.append(f"{pad}  {{")
            lines.append(f"{pad}    OFFSET {' '.join(_number(v) for v in stub)}")
            lines.append(f"{pad}  }}")
        lines.append(f"{pad}}}")

    visit(0, 0)
    frames = len(joints)
    with warnings.catch_warnings():
        # Gimbal lock (y = +-90 degrees) only makes the split between z and x arbitrary; the
        # angles still give the same rotation.
        warnings.simplefilter("ignore", UserWarning)
        euler = Rotation.from_matrix(fit.local[:, order].reshape(-1, 3, 3)).as_euler(
            "ZYX", degrees=True
        )
    values = np.concatenate([fit.root, euler.reshape(frames, -1)], axis=1)  # (T, 3 + 66)
    lines += ["MOTION", f"Frames: {frames}", f"Frame Time: {1.0 / rate:.8f}"]
    buffer = io.StringIO()
    np.savetxt(buffer, values, fmt="%.6f", delimiter=" ")
    text = "\n".join(lines) + "\n" + buffer.getvalue().replace("-0.000000", "0.000000")

    path = Path(path)
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="ascii", newline="\n")
    if metadata is not None:
        write_sidecar(path, metadata)
    return path


@dataclass(frozen=True)
class BVHMotion:
    """A parsed BVH file.

    Attributes:
        names: (J,) joint names in file (hierarchy) order; End Sites are not joints.
        parents: (J,) each joint's parent index (-1: the root); parents come first.
        offsets: (J, 3) each joint's OFFSET from its parent, in the file's units.
        channels: (J,) each joint's channel names, canonical case (``"Zrotation"``).
        frame_time: seconds per frame (``fps`` is its inverse).
        values: (T, C) channel values per frame, C = the total channel count, joints in file
            order; rotations in degrees.
    """

    names: tuple[str, ...]
    parents: tuple[int, ...]
    offsets: np.ndarray
    channels: tuple[tuple[str, ...], ...]
    frame_time: float
    values: np.ndarray

    @property
    def fps(self) -> float:
        """Frames per second (``1 / frame_time``)."""
        return 1.0 / self.frame_time

    @property
    def frames(self) -> int:
        """The number of frames T."""
        return int(self.values.shape[0])


class _Tokens:
    """Whitespace-separated words with a cursor, for the hierarchy parser."""

    def __init__(self, words: list[str]) -> None:
        self.words, self.at = words, 0

    def next(self, what: str) -> str:
        if self.at >= len(self.words):
            raise ValueError(f"malformed BVH: the file ends where {what} was expected")
        word = self.words[self.at]
        self.at += 1
        return word

    def peek(self) -> str | None:
        return self.words[self.at] if self.at < len(self.words) else None

    def expect(self, keyword: str) -> None:
        word = self.next(keyword)
        if word.upper() != keyword.upper():
            raise ValueError(f"malformed BVH: expected {keyword!r}, got {word!r}")

    def number(self, what: str) -> float:
        word = self.next(what)
        try:
            value = float(word)
        except ValueError:
            raise ValueError(f"malformed BVH: {what} is not a number: {word!r}") from None
        if not np.isfinite(value):
            raise ValueError(f"malformed BVH: {what} is not finite: {word!r}")
        return value


def _text(source: str | bytes | os.PathLike[str]) -> str:
    """The text of a BVH given as a path, bytes or the text itself."""
    if isinstance(source, bytes | bytearray):
        data = bytes(source)
    elif isinstance(source, str) and ("\n" in source or source.lstrip()[:9].upper() == "HIERARCHY"):
        return source.lstrip("\ufeff")
    elif isinstance(source, str | os.PathLike):
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise ValueError(f"cannot read BVH file {source}: {exc.strerror or exc}") from None
    else:
        raise ValueError(f"expected a BVH path, bytes or text, got {type(source).__name__}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")  # old exporters write joint names in a local code page
    return text.lstrip("\ufeff")


def read_bvh(source: str | bytes | os.PathLike[str]) -> BVHMotion:
    """Parse a BVH file.

    Args:
        source: a path (``str`` or ``PathLike``), the file's bytes, or its text (a ``str``
            with a line break, or starting with ``HIERARCHY``). Any whitespace and line
            endings (LF, CRLF, CR) are accepted, keywords in any case.

    Returns:
        The skeleton and the channel values (:class:`BVHMotion`); ``motion.fps`` tells callers
        how to :func:`resample`.

    Raises:
        ValueError: one line naming the problem: a file that cannot be read, a malformed
            hierarchy, unknown channels, a missing or non-positive frame time, or a frame
            count that does not match the values.
    """
    # Braces may touch their neighbours ("{OFFSET"); give them room before splitting.
    text = _text(source).replace("{", " { ").replace("}", " } ")
    if text.lstrip()[:9].upper() != "HIERARCHY":
        raise ValueError("not a BVH file: it does not start with HIERARCHY")
    motion_keyword = re.search(r"(?<!\S)MOTION(?!\S)", text, flags=re.IGNORECASE)
    if motion_keyword is None:
        raise ValueError("malformed BVH: no MOTION section")
    head, motion_text = text[: motion_keyword.start()], text[motion_keyword.end() :]
    tokens = _Tokens(head.split())
    tokens.expect("HIERARCHY")
    names: list[str] = []
    parents: list[int] = []
    offsets: list[tuple[float, float, float]] = []
    channels: list[tuple[str, ...]] = []

    def parse_joint(parent: int) -> None:
        name = tokens.next("a joint name")
        if name in "{}":
            raise ValueError("malformed BVH: a joint without a name")
        index = len(names)
        names.append(name)
        parents.append(parent)
        offsets.append((0.0, 0.0, 0.0))
        channels.append(())
        tokens.expect("{")
        while True:
            word = tokens.next(f"'}}' closing joint {name}")
            key = word.upper()
            if key == "}":
                return
            if key == "OFFSET":
                offsets[index] = tuple(tokens.number(f"the OFFSET of {name}") for _ in range(3))
            elif key == "CHANNELS":
                count_word = tokens.next(f"the channel count of {name}")
                if not count_word.isdigit():
                    raise ValueError(f"malformed BVH: channel count of {name} is {count_word!r}")
                found = []
                for _ in range(int(count_word)):
                    channel = tokens.next(f"a channel of {name}")
                    if channel.lower() not in _CHANNEL_NAMES:
                        raise ValueError(f"malformed BVH: joint {name} has channel {channel!r}")
                    found.append(_CHANNEL_NAMES[channel.lower()])
                channels[index] = tuple(found)
            elif key == "JOINT":
                parse_joint(index)
            elif key == "END":
                tokens.expect("Site")
                tokens.expect("{")
                while tokens.next(f"'}}' closing the End Site of {name}") != "}":
                    pass  # an End Site only gives the last bone a length; not a joint
            else:
                raise ValueError(f"malformed BVH: unexpected {word!r} in joint {name}")

    tokens.expect("ROOT")
    parse_joint(-1)
    if tokens.peek() is not None:
        extra = tokens.next("")
        if extra.upper() == "ROOT":
            raise ValueError("unsupported BVH: more than one ROOT skeleton")
        raise ValueError(f"malformed BVH: unexpected {extra!r} after the hierarchy")

    words = motion_text.split()
    if len(words) < 4 or words[0].upper() != "FRAMES:":
        raise ValueError("malformed BVH: MOTION must start with 'Frames: N'")
    if not words[1].isdigit():
        raise ValueError(f"malformed BVH: frame count is {words[1]!r}")
    count = int(words[1])
    if words[2].upper() != "FRAME" or words[3].upper() != "TIME:" or len(words) < 5:
        raise ValueError("malformed BVH: 'Frame Time: SECONDS' must follow the frame count")
    try:
        frame_time = float(words[4])
    except ValueError:
        raise ValueError(f"malformed BVH: frame time is {words[4]!r}") from None
    if not (np.isfinite(frame_time) and frame_time > 0):
        raise ValueError(f"malformed BVH: frame time must be > 0 seconds, got {words[4]!r}")
    width = sum(len(c) for c in channels)
    try:
        values = np.array(words[5:], dtype=np.float64)
    except ValueError:
        bad = next(w for w in words[5:] if not _is_number(w))
        raise ValueError(f"malformed BVH: frame value {bad!r} is not a number") from None
    if width == 0:
        raise ValueError("malformed BVH: no joint has channels")
    if values.size != count * width:
        raise ValueError(
            f"malformed BVH: {count} frames of {width} channels need {count * width} values, "
            f"the file has {values.size}"
        )
    if not np.isfinite(values).all():
        raise ValueError("malformed BVH: NaN or infinite frame values")
    return BVHMotion(
        names=tuple(names),
        parents=tuple(parents),
        offsets=np.array(offsets, dtype=np.float64).reshape(-1, 3),
        channels=tuple(channels),
        frame_time=frame_time,
        values=values.reshape(count, width),
    )


def _is_number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True


def _axis_rotations(axis: str, degrees: np.ndarray) -> np.ndarray:
    """(T,) angles about ``axis`` ('X', 'Y', 'Z') -> (T, 3, 3) rotation matrices."""
    angle = np.radians(degrees)
    cos, sin = np.cos(angle), np.sin(angle)
    rot = np.zeros((len(angle), 3, 3))
    a, b = {"X": (1, 2), "Y": (2, 0), "Z": (0, 1)}[axis]
    c = 3 - a - b
    rot[:, c, c] = 1.0
    rot[:, a, a], rot[:, a, b] = cos, -sin
    rot[:, b, a], rot[:, b, b] = sin, cos
    return rot


def guess_unit_scale(motion: BVHMotion) -> float:
    """Metres per file unit, guessed from the size of the rest skeleton: whichever of metres,
    centimetres, millimetres and inches makes its largest extent (T-pose height or arm span)
    nearest to an adult's 1.5 m, in ratio. A skeleton with no extent is taken as metres."""
    rest = np.zeros((len(motion.names), 3))
    for j, p in enumerate(motion.parents):
        rest[j] = motion.offsets[j] if p < 0 else rest[p] + motion.offsets[j]
    extent = float(np.ptp(rest, axis=0).max()) if len(rest) > 1 else 0.0
    if extent <= 0:
        return 1.0
    return min(_UNITS.values(), key=lambda s: abs(np.log(extent * s / _TYPICAL_SIZE)))


def bvh_joints(
    motion: BVHMotion,
    names: Sequence[str] = JOINT_NAMES,
    scale: float | None = None,
) -> np.ndarray:
    """Forward kinematics of a BVH: the world positions of the 22 SMPL joints per frame.

    Every joint of the file is walked (extra joints such as fingers, toes or a spine4 move
    their children), then the joints in ``names`` are picked out. A joint's rotation is the
    product of its rotation channels in the file's order (``Zrotation Xrotation Yrotation``:
    ``Rz @ Rx @ Ry``, degrees); position channels, on any joint, replace its ``OFFSET`` on the
    axes they give (how Blender and MotionBuilder read them). ``P[j] = P[parent] +
    W[parent] @ t[j]``, ``W[j] = W[parent] @ R[j]``.

    Args:
        motion: a parsed file (:func:`read_bvh`).
        names: the file's name of each SMPL joint, in :data:`~.skeleton.JOINT_NAMES` order
            (default: the SMPL names, as :func:`write_bvh` writes them); matched
            case-insensitively.
        scale: metres per file unit (``0.01`` for a centimetre file, ``1.0`` for the file's
            own numbers); ``None`` guesses it from the skeleton's size
            (:func:`guess_unit_scale`), which reads :func:`write_bvh`'s files as metres.

    Returns:
        (T, 22, 3) float64 positions in metres (axes as in the file: Y up for almost all
        BVHs).

    Raises:
        ValueError: a joint of ``names`` the file does not have (named), names that are
            not 22, or a scale that is not > 0.
    """
    if len(names) != NUM_JOINTS:
        raise ValueError(f"expected {NUM_JOINTS} joint names, got {len(names)}")
    if scale is None:
        scale = guess_unit_scale(motion)
    if not (np.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be > 0 metres per unit, got {scale!r}")
    lookup: dict[str, int] = {}
    for index, name in enumerate(motion.names):
        lookup.setdefault(name.lower(), index)
    missing = [name for name in names if name.lower() not in lookup]
    if missing:
        raise ValueError(
            f"the BVH has no joint {missing[0]!r}"
            + (f" (nor {', '.join(repr(m) for m in missing[1:])})" if len(missing) > 1 else "")
        )
    frames = motion.frames
    world_rot = np.zeros((len(motion.names), frames, 3, 3))
    world_pos = np.zeros((len(motion.names), frames, 3))
    column = 0
    for j, (parent, joint_channels) in enumerate(zip(motion.parents, motion.channels, strict=True)):
        translation = np.broadcast_to(motion.offsets[j], (frames, 3)).copy()
        rotation = np.broadcast_to(np.eye(3), (frames, 3, 3)).copy()
        for channel in joint_channels:
            value = motion.values[:, column]
            column += 1
            axis = channel[0]
            if channel.endswith("position"):
                translation[:, "XYZ".index(axis)] = value
            else:
                rotation = rotation @ _axis_rotations(axis, value)
        if parent < 0:
            world_pos[j], world_rot[j] = translation, rotation
        else:
            world_pos[j] = world_pos[parent] + np.einsum(
                "tab,tb->ta", world_rot[parent], translation
            )
            world_rot[j] = world_rot[parent] @ rotation
    picked = [lookup[name.lower()] for name in names]
    return np.ascontiguousarray(world_pos[picked].transpose(1, 0, 2)) * float(scale)


def resample(joints: np.ndarray, fps_in: float, fps_out: float = FPS) -> np.ndarray:
    """Resample a motion in time by linear interpolation between frames.

    Frame ``k`` of the result is the motion at ``k / fps_out`` seconds, for every such time
    within the input's span ``(T - 1) / fps_in``; so the first frame is kept and the last
    may fall between input frames.

    Args:
        joints: (T, ...) frames (e.g. (T, 22, 3) joints), T >= 1. fps_in, fps_out: > 0.

    Returns:
        (T', ...) float64 frames, ``T' = floor((T - 1) * fps_out / fps_in) + 1``.

    Raises:
        ValueError: no frames or a frame rate that is not > 0.
    """
    joints = np.asarray(joints, dtype=np.float64)
    if joints.ndim < 1 or len(joints) < 1:
        raise ValueError("cannot resample a motion with no frames")
    for what, rate in (("fps_in", fps_in), ("fps_out", fps_out)):
        if not (np.isfinite(rate) and rate > 0):
            raise ValueError(f"{what} must be > 0, got {rate!r}")
    frames = len(joints)
    # The small slack keeps a last frame that lands on an input frame up to float rounding.
    count = int(np.floor((frames - 1) * fps_out / fps_in + 1e-9)) + 1
    position = np.arange(count) * (fps_in / fps_out)  # in input frames
    low = np.clip(np.floor(position).astype(np.int64), 0, frames - 1)
    high = np.minimum(low + 1, frames - 1)
    weight = (position - low).reshape(-1, *([1] * (joints.ndim - 1)))
    return joints[low] * (1.0 - weight) + joints[high] * weight
