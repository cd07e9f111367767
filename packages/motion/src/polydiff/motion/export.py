"""Writing motions: BVH (animation tools), stick-figure MP4 (a look) and NPY (the numbers).

* ``.bvh``: the SMPL skeleton and its rotations (:func:`~.bvh.write_bvh`: metres, Y up,
  ZYX Euler angles in degrees) for Blender, Maya, MotionBuilder and three.js.
* ``.mp4``: the motion drawn as a stick figure (:func:`~.render.write_stick_figure_mp4`),
  H.264 at the motion's frame rate.
* ``.npy``: ``np.load``-able float32 numbers: the (T, 22, 3) joint positions in metres
  (``npy="joints"``, what other motion code reads) or the (T, 263) HumanML3D features
  (``npy="features"``, what HumanML3D-trained evaluators read).

Given a provenance record (:mod:`polydiff.core.provenance`), every file gets the sidecar
``<name>.<suffix>.json``; an MP4 also carries it in its container ``comment`` tag. BVH and
NPY have no place for it inside the file that every reader tolerates, so they keep only the
sidecar. :func:`read_provenance` reads either back. Every file is written beside its target
and renamed into place (:func:`polydiff.core.provenance.atomic_output`), with the user's normal
permissions.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from polydiff.core.files import output_paths as core_output_paths
from polydiff.core.provenance import atomic_output, output_targets, sidecar_path, write_sidecar

from .bvh import write_bvh
from .features import FEATURES, FPS
from .render import write_stick_figure_mp4
from .skeleton import NUM_JOINTS

__all__ = [
    "MOTION_OUTPUT_SUFFIXES",
    "NPY_CONTENTS",
    "Motion",
    "output_paths",
    "read_provenance",
    "save_motions",
]

MOTION_OUTPUT_SUFFIXES = (".bvh", ".mp4", ".npy")
#: What a ``.npy`` output can hold (``save_motions(..., npy=...)``).
NPY_CONTENTS = ("joints", "features")


@dataclass
class Motion:
    """A generated motion.

    Attributes:
        features: (T, 263) float32 HumanML3D features (:mod:`~.features`).
        joints: (T, 22, 3) float32 joint positions in metres, Y up, floor at y = 0.
        fps: frames per second (20 for HumanML3D). caption: the prompt it was made from.
    """

    features: np.ndarray
    joints: np.ndarray
    fps: float = FPS
    caption: str = ""


def output_paths(out: str | Path, num: int) -> list[Path]:
    """The files ``--out FILE --num N`` writes (``.bvh`` when ``out`` has no suffix); see
    :func:`polydiff.core.files.output_paths`."""
    return core_output_paths(out, num, MOTION_OUTPUT_SUFFIXES[0])


def _checked(motion: Motion, target: Path, npy: str) -> np.ndarray | None:
    """Validate one motion for ``target``; -> the array an ``.npy`` target gets, else None."""
    joints = np.asarray(motion.joints)
    if joints.ndim != 3 or joints.shape[1:] != (NUM_JOINTS, 3) or len(joints) < 1:
        raise ValueError(
            f"{target.name}: expected (T, {NUM_JOINTS}, 3) joints, got shape {joints.shape}"
        )
    if not np.isfinite(joints).all():
        raise ValueError(f"{target.name}: the motion has NaN or infinite joint positions")
    if not (np.isfinite(motion.fps) and motion.fps > 0):
        raise ValueError(f"{target.name}: fps must be > 0, got {motion.fps!r}")
    if target.suffix.lower() != ".npy":
        return None
    if npy == "joints":
        return np.ascontiguousarray(joints, dtype=np.float32)
    features = np.asarray(motion.features)
    if features.ndim != 2 or features.shape[1] != FEATURES:
        raise ValueError(
            f"{target.name}: expected (T, {FEATURES}) features, got shape {features.shape}"
        )
    if not np.isfinite(features).all():
        raise ValueError(f"{target.name}: the features have NaN or infinite values")
    return np.ascontiguousarray(features, dtype=np.float32)


def save_motions(
    motions: Sequence[Motion],
    paths: Sequence[str | Path] | str | Path,
    metadata: Sequence[Mapping[str, Any]] | None = None,
    npy: str = "joints",
) -> list[Path]:
    """Save motions as BVH, stick-figure MP4 or NPY (by each path's suffix; see the module
    doc), each with its provenance record.

    Args:
        motions: the motions, in output order.
        paths: one path per motion (what :func:`polydiff.core.provenance.check_output`
            returns), or a single ``--out`` FILE, expanded by the ``--num`` naming rule
            (``FILE_0.bvh`` ...) to ``len(motions)`` files.
        metadata: one provenance record per motion (written as the sidecar
            ``<name>.<suffix>.json``, and into an MP4's comment); an empty record ``{}`` or
            ``None`` for all stores nothing and writes no sidecar.
        npy: what ``.npy`` files hold: ``"joints"`` ((T, 22, 3) float32 metres) or
            ``"features"`` ((T, 263) float32).

    Returns:
        The written paths. Nothing is left beside a file whose writing fails.

    Raises:
        ValueError: no motions, counts that do not match, a suffix other than .bvh / .mp4 /
            .npy, an unknown ``npy``, or a motion of the wrong shape; all raised before any
            file is written.
    """
    if not motions:
        raise ValueError("no motions to save")
    if npy not in NPY_CONTENTS:
        raise ValueError(f"npy must be one of {', '.join(NPY_CONTENTS)}, got {npy!r}")
    targets = output_targets(len(motions), paths, metadata, MOTION_OUTPUT_SUFFIXES, "motions")
    arrays = [
        _checked(motion, target, npy) for motion, (target, _) in zip(motions, targets, strict=True)
    ]
    written = []
    for motion, (target, record), array in zip(motions, targets, arrays, strict=True):
        record = record or None
        suffix = target.suffix.lower()
        if suffix == ".bvh":
            write_bvh(motion.joints, target, fps=float(motion.fps), metadata=record)
        elif suffix == ".mp4":
            write_stick_figure_mp4(motion.joints, target, fps=float(motion.fps), metadata=record)
        else:
            with atomic_output(target) as tmp:
                # np.save adds ".npy" to names without it; the temporary keeps the suffix.
                np.save(tmp, array, allow_pickle=False)
            if record is not None:
                write_sidecar(target, record)
        written.append(target)
    return written


def read_provenance(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The provenance record of a file written by :func:`save_motions`: an MP4's container
    ``comment`` tag, else (BVH, NPY, or an MP4 without one) the sidecar
    ``<name>.<suffix>.json``; ``None`` when there is neither.

    Raises:
        ValueError: an MP4 that cannot be opened, or a sidecar that is not JSON (an MP4
            comment that is not JSON is someone else's and is passed over).
    """
    path = Path(path)
    if path.suffix.lower() == ".mp4":
        import av

        try:
            with av.open(str(path)) as container:
                comment = container.metadata.get("comment")
        except av.error.FFmpegError as exc:
            raise ValueError(f"{path.name} is not a readable MP4 ({exc})") from None
        if comment:
            try:
                return json.loads(comment)
            except json.JSONDecodeError:
                pass  # someone else's comment; the sidecar may still be ours
    sidecar = sidecar_path(path)
    if not sidecar.is_file():
        return None
    try:
        return json.loads(sidecar.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{sidecar.name} is not JSON ({exc})") from None
