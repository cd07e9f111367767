"""The SMPL 22-joint body skeleton: joint names, parents, rest offsets, forward kinematics and
the skeleton fit (inverse kinematics) that BVH export and the rotation features use.

Coordinates are metres, Y up, the body facing +Z in its rest pose (a T-pose), its left side
at +X — SMPL's and HumanML3D's conventions. :data:`REST_JOINTS` are the 22 joint locations of
a neutral SMPL body in that T-pose (rounded to the millimetre); a joint's rest offset is its
location minus its parent's.

Rotations are (..., 3, 3) matrices acting on column vectors. A joint's *world* rotation
``W[j]`` turns its rest frame into the world; its *local* rotation is relative to its parent,
``L[j] = W[parent]^T W[j]``, and the root's local rotation is its world rotation. Forward
kinematics places every child at ``P[child] = P[j] + W[j] @ offset[child]``.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "FEET",
    "JOINT_NAMES",
    "LOWER_BODY",
    "NUM_JOINTS",
    "PARENTS",
    "REST_JOINTS",
    "REST_OFFSETS",
    "SkeletonFit",
    "bone_lengths",
    "children",
    "fit_skeleton",
    "forward_kinematics",
    "joint_index",
    "rotation_between",
]

JOINT_NAMES: tuple[str, ...] = (
    "pelvis", "left_hip", "right_hip", "spine1", "left_knee", "right_knee", "spine2",
    "left_ankle", "right_ankle", "spine3", "left_foot", "right_foot", "neck", "left_collar",
    "right_collar", "head", "left_shoulder", "right_shoulder", "left_elbow", "right_elbow",
    "left_wrist", "right_wrist",
)  # fmt: skip
NUM_JOINTS = len(JOINT_NAMES)
#: Parent of each joint (-1: the root). Parents come before their children.
PARENTS: tuple[int, ...] = (
    -1,
    0,
    0,
    0,
    1,
    2,
    3,
    4,
    5,
    6,
    7,
    8,
    9,
    9,
    9,
    12,
    13,
    14,
    16,
    17,
    18,
    19,
)

#: The neutral SMPL body's joints in its T-pose (metres; Y up, facing +Z, left at +X).
REST_JOINTS = np.array(
    [
        [-0.002, -0.223, 0.028],  # pelvis
        [0.068, -0.313, 0.022],  # left_hip
        [-0.068, -0.313, 0.022],  # right_hip
        [-0.003, -0.114, 0.002],  # spine1
        [0.102, -0.700, 0.016],  # left_knee
        [-0.102, -0.700, 0.016],  # right_knee
        [0.005, 0.020, 0.004],  # spine2
        [0.087, -1.100, -0.027],  # left_ankle
        [-0.087, -1.100, -0.027],  # right_ankle
        [0.004, 0.074, 0.028],  # spine3
        [0.120, -1.156, 0.102],  # left_foot
        [-0.120, -1.156, 0.102],  # right_foot
        [-0.010, 0.287, -0.013],  # neck
        [0.073, 0.197, 0.001],  # left_collar
        [-0.081, 0.194, -0.007],  # right_collar
        [0.011, 0.352, 0.036],  # head
        [0.170, 0.228, -0.013],  # left_shoulder
        [-0.163, 0.225, -0.011],  # right_shoulder
        [0.422, 0.211, -0.040],  # left_elbow
        [-0.422, 0.209, -0.035],  # right_elbow
        [0.668, 0.216, -0.046],  # left_wrist
        [-0.668, 0.217, -0.046],  # right_wrist
    ]
)
REST_OFFSETS = REST_JOINTS - REST_JOINTS[[max(p, 0) for p in PARENTS]]
REST_OFFSETS[0] = 0.0

#: (ankle, foot) of each side: the joints that touch the ground.
FEET: dict[str, tuple[int, int]] = {"left": (7, 10), "right": (8, 11)}
#: The pelvis and legs: what body-part editing keeps when it regenerates the upper body.
LOWER_BODY: tuple[int, ...] = (0, 1, 2, 4, 5, 7, 8, 10, 11)


def joint_index(name: str) -> int:
    """The index of a joint by its SMPL name (ValueError listing the names)."""
    try:
        return JOINT_NAMES.index(name)
    except ValueError:
        raise ValueError(f"unknown joint {name!r}; joints: {', '.join(JOINT_NAMES)}") from None


def children(joint: int) -> list[int]:
    """The joints whose parent is ``joint``."""
    return [c for c, p in enumerate(PARENTS) if p == joint]


def forward_kinematics(
    local: np.ndarray, root: np.ndarray, offsets: np.ndarray = REST_OFFSETS
) -> np.ndarray:
    """Joint positions from local rotations.

    Args:
        local: (..., 22, 3, 3) local rotations (the root's is its world rotation).
        root: (..., 3) the pelvis position. offsets: (22, 3) or (..., 22, 3) rest offsets.

    Returns:
        (..., 22, 3) joint positions.
    """
    offsets = np.broadcast_to(offsets, (*local.shape[:-3], NUM_JOINTS, 3))
    world = [local[..., 0, :, :]]
    positions = [np.asarray(root, dtype=np.float64)]
    for j in range(1, NUM_JOINTS):
        p = PARENTS[j]
        positions.append(positions[p] + np.einsum("...ab,...b->...a", world[p], offsets[..., j, :]))
        world.append(world[p] @ local[..., j, :, :])
    return np.stack(positions, axis=-2)


def rotation_between(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The smallest rotation taking direction ``a`` to direction ``b``: (..., 3) -> (..., 3, 3).

    Opposite directions turn by pi about an axis perpendicular to ``a``; a zero vector gives
    the identity.
    """
    a_norm = np.linalg.norm(a, axis=-1, keepdims=True)
    b_norm = np.linalg.norm(b, axis=-1, keepdims=True)
    # A zero-length bone (joints on top of each other) has no direction: no turn.
    degenerate = (a_norm[..., 0] < 1e-12) | (b_norm[..., 0] < 1e-12)
    a = np.where(degenerate[..., None], [0.0, 1.0, 0.0], a / np.maximum(a_norm, 1e-12))
    b = np.where(degenerate[..., None], [0.0, 1.0, 0.0], b / np.maximum(b_norm, 1e-12))
    axis = np.cross(a, b)
    cos = np.sum(a * b, axis=-1)
    # Opposite: any perpendicular axis (a x X, or a x Y when a is along X).
    opposite = cos < -1 + 1e-9
    if np.any(opposite):
        helper = np.where(np.abs(a[..., :1]) < 0.9, [1.0, 0.0, 0.0], [0.0, 1.0, 0.0])
        perp = np.cross(a, helper)
        perp /= np.linalg.norm(perp, axis=-1, keepdims=True)
        axis = np.where(opposite[..., None], perp * 1.0, axis)
        cos = np.where(opposite, -1.0, cos)
    # Rodrigues with the unnormalised axis: R = I + [k] + [k]^2 / (1 + cos), |k| = sin.
    k = np.zeros((*axis.shape[:-1], 3, 3))
    k[..., 0, 1], k[..., 0, 2] = -axis[..., 2], axis[..., 1]
    k[..., 1, 0], k[..., 1, 2] = axis[..., 2], -axis[..., 0]
    k[..., 2, 0], k[..., 2, 1] = -axis[..., 1], axis[..., 0]
    eye = np.broadcast_to(np.eye(3), k.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(opposite, 0.0, 1.0 / (1.0 + cos))[..., None, None]
    rot = eye + k + (k @ k) * scale
    if np.any(opposite):  # pi about the perpendicular axis: 2 n n^T - I
        flip = 2.0 * axis[..., :, None] * axis[..., None, :] - eye
        rot = np.where(opposite[..., None, None], flip, rot)
    return rot


def _kabsch(rest: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(..., K, 3) rest directions, (..., K, 3) target directions -> (..., 3, 3) the rotation
    that best maps one onto the other (least squares, det +1)."""
    h = np.einsum("...ka,...kb->...ab", target, rest)
    u, _, vt = np.linalg.svd(h)
    d = np.sign(np.linalg.det(u @ vt))
    fix = np.ones((*d.shape, 3))
    fix[..., 2] = d
    return (u * fix[..., None, :]) @ vt


def bone_lengths(joints: np.ndarray) -> np.ndarray:
    """(..., T, 22, 3) -> (..., 22) the median length of each bone (joint to parent) over
    time; 0 for the root."""
    parents = np.array([max(p, 0) for p in PARENTS])
    lengths = np.linalg.norm(joints - joints[..., parents, :], axis=-1)
    return np.median(lengths, axis=-2)


class SkeletonFit:
    """A motion fitted to the skeleton: local rotations, root positions and the offsets
    (rest directions at the motion's own bone lengths) that reproduce it.

    Attributes:
        local: (T, 22, 3, 3) local rotations. root: (T, 3) pelvis positions.
        offsets: (22, 3) rest offsets scaled to the motion's median bone lengths.
    """

    def __init__(self, local: np.ndarray, root: np.ndarray, offsets: np.ndarray) -> None:
        self.local, self.root, self.offsets = local, root, offsets

    def joints(self) -> np.ndarray:
        """(T, 22, 3) the fitted positions (forward kinematics of the fit)."""
        return forward_kinematics(self.local, self.root, self.offsets)


def fit_skeleton(joints: np.ndarray, lengths: np.ndarray | None = None) -> SkeletonFit:
    """Fit local rotations to joint positions (swing inverse kinematics).

    Each joint with one child turns its parent's frame by the smallest rotation that points
    the bone at the child; the pelvis and spine3, with three children each, take the rotation
    that best aligns all three (Kabsch); a joint without children keeps its parent's frame.
    Forward kinematics of the fit reproduces ``joints`` exactly when the motion is rigid
    (constant bone lengths and a rigid pelvis and chest, as any motion made by forward
    kinematics); otherwise it is the nearest rigid motion in bone directions.

    Args:
        joints: (T, 22, 3) positions. lengths: (22,) bone lengths of the fitted skeleton
            (default: the motion's median lengths, :func:`bone_lengths`).
    """
    joints = np.asarray(joints, dtype=np.float64)
    if joints.ndim != 3 or joints.shape[1:] != (NUM_JOINTS, 3):
        raise ValueError(f"expected (T, {NUM_JOINTS}, 3) joints, got {joints.shape}")
    frames = joints.shape[0]
    rest_lengths = np.linalg.norm(REST_OFFSETS, axis=-1)
    lengths = bone_lengths(joints) if lengths is None else np.asarray(lengths, dtype=np.float64)
    scale = np.divide(lengths, rest_lengths, out=np.zeros_like(lengths), where=rest_lengths > 0)
    offsets = REST_OFFSETS * scale[:, None]
    world = np.zeros((frames, NUM_JOINTS, 3, 3))
    for j in range(NUM_JOINTS):
        kids = children(j)
        parent_world = (
            np.broadcast_to(np.eye(3), (frames, 3, 3)) if j == 0 else world[:, PARENTS[j]]
        )
        if not kids:
            world[:, j] = parent_world
        elif len(kids) == 1:
            c = kids[0]
            current = np.einsum("tab,b->ta", parent_world, REST_OFFSETS[c])
            world[:, j] = rotation_between(current, joints[:, c] - joints[:, j]) @ parent_world
        else:
            rest = REST_OFFSETS[kids] / rest_lengths[kids, None]
            bones = joints[:, kids] - joints[:, j : j + 1]
            bones = bones / np.maximum(np.linalg.norm(bones, axis=-1, keepdims=True), 1e-12)
            world[:, j] = _kabsch(np.broadcast_to(rest, bones.shape), bones)
    local = world.copy()
    for j in range(1, NUM_JOINTS):
        local[:, j] = np.swapaxes(world[:, PARENTS[j]], -1, -2) @ world[:, j]
    return SkeletonFit(local, joints[:, 0].copy(), offsets)
