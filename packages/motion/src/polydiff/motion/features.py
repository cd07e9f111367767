"""HumanML3D's 263-d motion features (Guo et al., CVPR 2022) <-> joint positions, at 20 fps.

A motion of T joint frames (T, 22, 3) becomes T - 1 feature frames (T - 1, 263), laid out as
:data:`LAYOUT`:

============  ====  ==========================================================================
slice         size  per frame t
============  ====  ==========================================================================
root_angular     1  half the root's turn about +Y from t to t + 1 (radians), as HumanML3D
root_linear      2  the root's XZ velocity from t to t + 1 in the body's frame at t + 1 (m/frame)
root_height      1  the pelvis height above the floor (m)
positions       63  joints 1-21 relative to the root's XZ, in the body's frame at t (m)
rotations      126  joints 1-21 local rotations (:func:`~.skeleton.fit_skeleton`) in 6D: the
                    first two columns of each rotation matrix
velocities      66  all 22 joints' displacement from t to t + 1 in the body's frame at t (m)
contacts         4  left ankle, left foot, right ankle, right foot: 1 when the joint moved
                    less than sqrt(0.002) m (squared displacement < 0.002), else 0
============  ====  ==========================================================================

The *body's frame* turns the world about +Y so that the body faces +Z; the facing is the
normal of the hips' and shoulders' across vector, smoothed over time (Gaussian, sigma 20
frames). Before that a motion is put in HumanML3D's canonical place: its lowest joint on the
floor (y = 0), its first root at the XZ origin, its first frame facing +Z.

:func:`features_to_joints` is HumanML3D's ``recover_from_ric``: it integrates the root's turns
and velocities and places the 21 relative positions around it, so a round trip
``features_to_joints(joints_to_features(j))`` returns the canonical ``j`` (all but its last
frame) exactly (to float rounding). It is differentiable (torch), which the geometric losses
need. The rotation channels are derived from the positions; recovery does not read them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.ndimage import gaussian_filter1d
from torch import Tensor

from .skeleton import FEET, NUM_JOINTS, fit_skeleton

__all__ = [
    "CONTACT_THRESHOLD",
    "FEATURES",
    "FPS",
    "LAYOUT",
    "MAX_FRAMES",
    "MIN_FRAMES",
    "canonical_joints",
    "canonical_transform",
    "facing_angles",
    "features_to_joints",
    "joint_mask",
    "joints_to_features",
    "root_trajectory",
]

FPS = 20.0
#: The longest motion HumanML3D (and the models here) handle: 9.8 s.
MAX_FRAMES = 196
#: Feature frames a training motion needs (2 s; HumanML3D drops shorter ones too).
MIN_FRAMES = 40
FEATURES = 263
#: Squared per-frame displacement below which a foot joint is in contact (HumanML3D's 0.002).
CONTACT_THRESHOLD = 0.002
_FACING_SMOOTHING = 20.0  # frames (HumanML3D's sigma)
_ACROSS = (2, 1, 17, 16)  # right hip, left hip, right shoulder, left shoulder

LAYOUT: dict[str, slice] = {
    "root_angular": slice(0, 1),
    "root_linear": slice(1, 3),
    "root_height": slice(3, 4),
    "positions": slice(4, 67),
    "rotations": slice(67, 193),
    "velocities": slice(193, 259),
    "contacts": slice(259, 263),
}
_CONTACT_JOINTS = (*FEET["left"], *FEET["right"])


def _yaw(angle: np.ndarray) -> np.ndarray:
    """(...,) angles -> (..., 3, 3) rotations about +Y."""
    c, s = np.cos(angle), np.sin(angle)
    rot = np.zeros((*np.shape(angle), 3, 3))
    rot[..., 0, 0], rot[..., 0, 2], rot[..., 1, 1] = c, s, 1.0
    rot[..., 2, 0], rot[..., 2, 2] = -s, c
    return rot


def facing_angles(joints: np.ndarray, smooth: bool = True) -> np.ndarray:
    """(T, 22, 3) -> (T,) the body's heading: the angle about +Y from +Z to where it faces
    (the hips' and shoulders' across vector turned by 90 degrees, smoothed over time)."""
    r_hip, l_hip, r_sh, l_sh = _ACROSS
    across = (joints[:, r_hip] - joints[:, l_hip]) + (joints[:, r_sh] - joints[:, l_sh])
    forward = np.cross([0.0, 1.0, 0.0], across)
    forward[:, 1] = 0.0
    if smooth and len(forward) > 1:
        forward = gaussian_filter1d(forward, _FACING_SMOOTHING, axis=0, mode="nearest")
    return np.arctan2(forward[:, 0], forward[:, 2])


def canonical_transform(joints: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rigid map back from HumanML3D's canonical place to ``joints``' own: (rotation
    (3, 3), offset (3,)) with ``joints = canonical @ rotation.T + offset``."""
    joints = np.asarray(joints, dtype=np.float64)
    offset = joints[0, 0] * np.array([1.0, 0.0, 1.0])
    offset[1] = joints[..., 1].min()
    heading = facing_angles(joints - offset)[0]
    return _yaw(heading), offset


def canonical_joints(joints: np.ndarray) -> np.ndarray:
    """HumanML3D's canonical place: lowest joint on the floor, first root at the XZ origin,
    first frame facing +Z. (T, 22, 3) -> (T, 22, 3) float64."""
    rotation, offset = canonical_transform(joints)
    return (np.asarray(joints, dtype=np.float64) - offset) @ rotation


def joints_to_features(joints: np.ndarray) -> np.ndarray:
    """(T, 22, 3) joint positions (metres, Y up, 20 fps; T >= 2) -> (T - 1, 263) float32
    HumanML3D features of the motion in its canonical place (see the module doc)."""
    joints = np.asarray(joints, dtype=np.float64)
    if joints.ndim != 3 or joints.shape[1:] != (NUM_JOINTS, 3) or len(joints) < 2:
        raise ValueError(f"expected (T >= 2, {NUM_JOINTS}, 3) joints, got {joints.shape}")
    if not np.isfinite(joints).all():
        raise ValueError("joints are not finite")
    pos = canonical_joints(joints)
    heading = facing_angles(pos)
    heading = heading - heading[0]  # exactly 0 at frame 0: the recovery starts there
    to_body = _yaw(-heading)  # (T, 3, 3) world -> the body's frame
    turn = np.angle(np.exp(1j * (heading[1:] - heading[:-1])))  # wrapped to (-pi, pi]
    root_angular = -0.5 * turn  # HumanML3D stores half the turn of world -> body
    root_velocity = np.einsum("tab,tb->ta", to_body[1:], pos[1:, 0] - pos[:-1, 0])
    relative = pos - pos[:, :1] * np.array([1.0, 0.0, 1.0])
    positions = np.einsum("tab,tjb->tja", to_body, relative)[:, 1:]
    local = fit_skeleton(pos).local[:, 1:]  # (T, 21, 3, 3)
    rotations = np.concatenate([local[..., :, 0], local[..., :, 1]], axis=-1)
    velocities = np.einsum("tab,tjb->tja", to_body[:-1], pos[1:] - pos[:-1])
    step = np.sum((pos[1:, _CONTACT_JOINTS] - pos[:-1, _CONTACT_JOINTS]) ** 2, axis=-1)
    contacts = (step < CONTACT_THRESHOLD).astype(np.float64)
    frames = len(pos) - 1
    out = np.concatenate(
        [
            root_angular[:, None],
            root_velocity[:, [0, 2]],
            pos[:-1, 0, 1:2],
            positions[:-1].reshape(frames, -1),
            rotations[:-1].reshape(frames, -1),
            velocities.reshape(frames, -1),
            contacts,
        ],
        axis=-1,
    )
    return out.astype(np.float32)


def root_trajectory(features: Tensor) -> tuple[Tensor, Tensor]:
    """Integrate the root channels of (..., T, 263) features from frame 0 (heading 0, XZ
    origin).

    Returns:
        ``to_body`` (..., T): the angle of the world -> body turn about +Y at each frame
        (minus the heading), and ``root`` (..., T, 3): the pelvis positions.
    """
    angular = features[..., 0]
    # The turn into frame t: twice the half turns stored before it.
    to_body = 2.0 * (torch.cumsum(angular, dim=-1) - angular)
    c, s = torch.cos(to_body), torch.sin(to_body)
    # The velocity stored at t - 1 moves the root into frame t, in frame t's body frame;
    # body -> world turns by -to_body about +Y.
    vx = torch.nn.functional.pad(features[..., :-1, 1], (1, 0))
    vz = torch.nn.functional.pad(features[..., :-1, 2], (1, 0))
    x = torch.cumsum(c * vx - s * vz, dim=-1)
    z = torch.cumsum(s * vx + c * vz, dim=-1)
    return to_body, torch.stack([x, features[..., 3], z], dim=-1)


def features_to_joints(features: Tensor | np.ndarray) -> Tensor:
    """(..., T, 263) features -> (..., T, 22, 3) joint positions (HumanML3D's
    ``recover_from_ric``; differentiable). A NumPy array comes back as a float64 tensor."""
    if isinstance(features, np.ndarray):
        features = torch.from_numpy(np.asarray(features, dtype=np.float64))
    if features.shape[-1] != FEATURES:
        raise ValueError(f"expected (..., T, {FEATURES}) features, got {tuple(features.shape)}")
    to_body, root = root_trajectory(features)
    c, s = torch.cos(to_body)[..., None], torch.sin(to_body)[..., None]
    rel = features[..., LAYOUT["positions"]].unflatten(-1, (NUM_JOINTS - 1, 3))
    x = root[..., 0, None] + c * rel[..., 0] - s * rel[..., 2]
    z = root[..., 2, None] + s * rel[..., 0] + c * rel[..., 2]
    joints = torch.stack([x, rel[..., 1], z], dim=-1)
    return torch.cat([root[..., None, :], joints], dim=-2)


def joint_mask(joints: Sequence[int]) -> np.ndarray:
    """(263,) bool: the feature channels that describe ``joints`` (indices): the root
    channels for the pelvis, each joint's position, rotation, velocity and contact."""
    mask = np.zeros(FEATURES, dtype=bool)
    for j in joints:
        if not 0 <= j < NUM_JOINTS:
            raise ValueError(f"joint index {j} is not in [0, {NUM_JOINTS})")
        if j == 0:
            mask[0:4] = True
        else:
            mask[4 + 3 * (j - 1) : 7 + 3 * (j - 1)] = True
            mask[67 + 6 * (j - 1) : 73 + 6 * (j - 1)] = True
        mask[193 + 3 * j : 196 + 3 * j] = True
        if j in _CONTACT_JOINTS:
            mask[259 + _CONTACT_JOINTS.index(j)] = True
    return mask
