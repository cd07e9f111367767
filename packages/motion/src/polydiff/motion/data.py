"""Motion data: users' folders as shard samples, and shard samples as training tensors.

Three kinds of folder (``polydiff data make-shards --modality motion --source DIR``):

- **HumanML3D's layout**: ``new_joint_vecs/NAME.npy`` (T, 263) features and
  ``texts/NAME.txt`` with lines ``caption#tokens#start#end``. Lines with ``start`` and ``end``
  0 (or NaN) describe the whole clip: they become one sample carrying all of them (a caption
  is drawn per epoch, as HumanML3D's loader does); a line with a time range becomes its own
  sample, the frames ``[start * 20, end * 20)``. When the folder has a ``train.txt`` list only
  the names in it are read (HumanML3D's split: its test motions stay out of training).
- **Joint arrays**: ``.npy`` files of (T, 22, 3) positions (metres, Y up, 20 fps; SMPL joint
  order) or (T, 263) features, captioned as any polydiff folder (sidecar ``.txt``,
  ``captions.csv``, ``captions.jsonl``).
- **BVH files**, captioned the same way: read with :func:`polydiff.motion.bvh.read_bvh`, the
  22 SMPL joints picked by name, resampled to 20 fps and converted to metres (a skeleton whose
  legs are longer than 10 units is taken to be in centimetres).

Shards keep the (T - 1, 263) features as NPY (``npy``), the caption (``txt``) and metadata
(``json``: ``frames``, ``fps``, ``captions`` when there are several). Inputs that cannot be
used are skipped and counted by reason: ``unreadable motion (...)``, ``not finite``, ``wrong
joint count``, ``too short`` (fewer than :data:`MIN_FRAMES` feature frames), ``no caption``.

Training samples are cut to at most ``max_frames`` frames (a random window of a longer
motion), go to the shortest length bucket that holds them and are padded there: ``valid`` is 1
at real frames, 0 at padding (the kit's padding mask, :func:`polydiff.core.sample`'s
``valid``).
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from polydiff.core.data import Skip
from polydiff.core.data.captions import captioned_files, metadata_field, text_field

from .features import FEATURES, FPS, MAX_FRAMES, MIN_FRAMES, joints_to_features
from .skeleton import NUM_JOINTS

__all__ = [
    "MIN_FRAMES",
    "MOTION_SUFFIXES",
    "choose_bucket",
    "decode",
    "folder_source",
    "humanml3d_source",
    "load_features",
    "read_motion",
    "to_features",
]

MOTION_SUFFIXES = (".npy", ".bvh")
_CENTIMETRE_LEGS = 10.0  # hip-to-ankle length above which a BVH is taken to be in cm


class BadMotion(ValueError):
    """A motion that cannot be used; ``reason`` is the fixed phrase it is counted under."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}{f' ({detail})' if detail else ''}")
        self.reason = reason


def _npy(payload: bytes) -> np.ndarray:
    try:
        return np.load(io.BytesIO(payload), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise BadMotion("unreadable motion", f"not an NPY array: {e}") from e


def read_motion(path: str | Path) -> np.ndarray:
    """A motion file as (T, 22, 3) joints at 20 fps or (T, 263) features (float64).

    ``.npy``: joints or features as stored. ``.bvh``: the 22 SMPL joints by name, resampled to
    20 fps, in metres.

    Raises:
        BadMotion (a ValueError): unreadable, not finite, wrong joint count.
    """
    path = Path(path)
    if path.suffix.lower() == ".bvh":
        from .bvh import bvh_joints, read_bvh, resample

        try:
            motion = read_bvh(path.read_bytes())
            joints = bvh_joints(motion)
        except (ValueError, OSError) as e:
            raise BadMotion("unreadable motion", str(e)) from e
        joints = resample(joints, 1.0 / motion.frame_time, FPS)
        legs = np.linalg.norm(joints[:, 1] - joints[:, 7], axis=-1)
        if np.isfinite(legs).all() and np.median(legs) > _CENTIMETRE_LEGS:
            joints = joints / 100.0
        array = np.asarray(joints, dtype=np.float64)
    else:
        try:
            array = _npy(path.read_bytes()).astype(np.float64)
        except OSError as e:
            raise BadMotion("unreadable motion", str(e)) from e
    _check_array(array)
    return array


def _check_array(array: np.ndarray) -> None:
    if array.ndim == 2 and array.shape[1] == FEATURES:
        pass
    elif array.ndim == 3 and array.shape[2] == 3:
        if array.shape[1] != NUM_JOINTS:
            raise BadMotion("wrong joint count", f"{array.shape[1]} joints, expected {NUM_JOINTS}")
    elif array.ndim == 2 and array.shape[1] % 3 == 0 and array.shape[1] // 3 != NUM_JOINTS:
        raise BadMotion("wrong joint count", f"{array.shape[1] // 3} joints x 3 per frame")
    else:
        raise BadMotion(
            "unreadable motion", f"shape {array.shape}: expected (T, 22, 3) joints or (T, 263)"
        )
    if not np.isfinite(array).all():
        raise BadMotion("not finite")


def to_features(array: np.ndarray) -> np.ndarray:
    """(T, 22, 3) joints -> (T - 1, 263) features; (T, 263) features pass through. float32."""
    _check_array(array)
    if array.ndim == 3:
        if len(array) < 2:
            raise BadMotion("too short", f"{len(array)} frame(s)")
        return joints_to_features(array)
    return np.asarray(array, dtype=np.float32)


def load_features(path: str | Path) -> np.ndarray:
    """A motion file (see :func:`read_motion`) as (T, 263) float32 features."""
    return to_features(read_motion(path))


def _sample(key: str, features: np.ndarray, captions: Sequence[str],
            meta: Mapping[str, Any]) -> dict[str, Any] | Skip:  # fmt: skip
    from .synthetic import npy_bytes

    if len(features) < MIN_FRAMES:
        return Skip(key, "too short")
    captions = [c.strip() for c in captions if c.strip()]
    if not captions:
        return Skip(key, "no caption")
    info = {"frames": len(features), "fps": FPS, **meta}
    if len(captions) > 1:
        info["captions"] = captions
    return {"__key__": key, "npy": npy_bytes(features), "txt": captions[0], "json": info}


def folder_source(folder: str | Path) -> Iterator[dict[str, Any] | Skip]:
    """Shard samples of a motion folder: HumanML3D's layout, or captioned joint arrays and
    BVH files (see the module doc).

    Raises:
        FileNotFoundError: ``folder`` is not a folder.
        ValueError: a malformed captions file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"motion source folder not found: {folder}")
    if (folder / "new_joint_vecs").is_dir() and (folder / "texts").is_dir():
        return humanml3d_source(folder)
    return _captioned_motions(folder)


def _captioned_motions(folder: Path) -> Iterator[dict[str, Any] | Skip]:
    for entry in captioned_files(folder, MOTION_SUFFIXES):
        if entry.problem is not None:
            yield Skip(entry.key, entry.problem)
            continue
        try:
            features = to_features(read_motion(entry.path))
        except BadMotion as e:
            yield Skip(entry.key, e.reason)
            continue
        yield _sample(entry.key, features, [entry.caption], {"file": entry.relative.as_posix()})


def _caption_lines(path: Path) -> list[tuple[str, float, float]]:
    """HumanML3D text lines -> (caption, start s, end s); 0/NaN times mean the whole clip."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.strip().split("#")
        if not parts[0].strip():
            continue
        start = end = 0.0
        if len(parts) >= 4:
            try:
                start, end = float(parts[2]), float(parts[3])
            except ValueError:
                start = end = 0.0
        start = 0.0 if math.isnan(start) else start
        end = 0.0 if math.isnan(end) else end
        lines.append((parts[0].strip(), start, end))
    return lines


def humanml3d_source(folder: str | Path) -> Iterator[dict[str, Any] | Skip]:
    """Shard samples of a folder in HumanML3D's layout (see the module doc)."""
    folder = Path(folder)
    vectors, texts = folder / "new_joint_vecs", folder / "texts"
    names = sorted(p.stem for p in vectors.glob("*.npy"))
    split = folder / "train.txt"
    if split.is_file():
        listed = {n.strip() for n in split.read_text(encoding="utf-8").split()}
        names = [n for n in names if n in listed]
    for name in names:
        try:
            features = to_features(_npy((vectors / f"{name}.npy").read_bytes()))
        except BadMotion as e:
            yield Skip(name, e.reason)
            continue
        if features.ndim != 2 or features.shape[1] != FEATURES:
            yield Skip(name, "wrong joint count")
            continue
        text = texts / f"{name}.txt"
        try:
            lines = _caption_lines(text) if text.is_file() else []
        except UnicodeDecodeError:
            lines = []
        whole = [c for c, start, end in lines if start == 0.0 and end == 0.0]
        meta = {"file": f"new_joint_vecs/{name}.npy"}
        if whole or not lines:
            yield _sample(name, features, whole, meta)
        for index, (caption, start, end) in enumerate(lines):
            if start == 0.0 and end == 0.0:
                continue
            clip = features[int(start * FPS) : int(end * FPS)]
            yield _sample(f"{name}_{index}", clip, [caption], {**meta, "start": start, "end": end})


# --- training tensors -----------------------------------------------------------------------
def choose_bucket(frames: int, buckets: Sequence[int]) -> int:
    """The length bucket of a motion of ``frames`` feature frames: the shortest bucket that
    holds it (the longest when it is longer than all: it is cut to that).

    Raises:
        ValueError: fewer frames than the shortest bucket needs (:data:`MIN_FRAMES`).
    """
    if frames < MIN_FRAMES:
        raise ValueError(f"too short: {frames} frames, at least {MIN_FRAMES}")
    ordered = sorted(int(b) for b in buckets)
    return next((b for b in ordered if b >= frames), ordered[-1])


def sample_frames(sample: Mapping[str, Any]) -> int:
    """Feature frames of a raw shard sample, from its metadata (nothing decoded)."""
    meta = metadata_field(sample)
    if "frames" not in meta:
        raise ValueError(f"sample {sample.get('__key__', '?')!r} has no frames in its metadata")
    return int(meta["frames"])


def decode(sample: Mapping[str, Any], buckets: Sequence[int], rng: random.Random) -> dict[str, Any]:
    """A shard sample -> ``{"motion": (263, L) float32, "valid": (L,) float32, "length": int,
    "caption": str}`` with L its bucket: a random window of at most L frames, zero-padded."""
    if "npy" not in sample:
        raise ValueError(f"sample {sample.get('__key__', '?')!r} has no npy field")
    features = np.load(io.BytesIO(bytes(sample["npy"])), allow_pickle=False)
    if features.ndim != 2 or features.shape[1] != FEATURES:
        raise ValueError(f"features of shape {features.shape}, expected (T, {FEATURES})")
    if not np.isfinite(features).all():
        raise ValueError("features are not finite")
    size = choose_bucket(len(features), buckets)
    length = min(len(features), size)
    start = rng.randrange(len(features) - length + 1)
    motion = np.zeros((FEATURES, size), dtype=np.float32)
    motion[:, :length] = features[start : start + length].T
    valid = np.zeros(size, dtype=np.float32)
    valid[:length] = 1.0
    meta = metadata_field(sample)
    captions = meta.get("captions") or [text_field(sample.get("txt", ""))]
    return {
        "motion": torch.from_numpy(motion),
        "valid": torch.from_numpy(valid),
        "length": length,
        "caption": str(rng.choice(list(captions))),
    }


def max_frames_of(buckets: Sequence[int]) -> int:
    """The longest bucket (at most :data:`MAX_FRAMES`)."""
    return min(max(int(b) for b in buckets), MAX_FRAMES)
