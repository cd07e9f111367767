"""HumanML3D's 263-d features: joints -> features -> joints is exact, and each channel means
what the layout says."""

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from polydiff.motion import features as F
from polydiff.motion.skeleton import (
    FEET,
    JOINT_NAMES,
    LOWER_BODY,
    NUM_JOINTS,
    PARENTS,
    REST_JOINTS,
    fit_skeleton,
    forward_kinematics,
)


def _motion(frames: int = 50, seed: int = 0) -> np.ndarray:
    """A rigid motion by forward kinematics: random joint angles, a turning, moving root."""
    rng = np.random.default_rng(seed)
    local = Rotation.from_rotvec(rng.normal(size=(frames, NUM_JOINTS, 3)) * 0.25).as_matrix()
    yaw = np.cumsum(rng.normal(size=frames) * 0.08) + rng.uniform(0, 6)
    heading = Rotation.from_rotvec(np.stack([0 * yaw, yaw, 0 * yaw], axis=1)).as_matrix()
    local[:, 0] = heading @ local[:, 0]
    root = np.cumsum(rng.normal(size=(frames, 3)) * 0.03, axis=0) + [2.0, 1.0, -3.0]
    return forward_kinematics(local, root)


def test_the_skeleton_is_smpl_with_22_named_joints():
    assert NUM_JOINTS == 22 and len(PARENTS) == 22
    assert JOINT_NAMES[:4] == ("pelvis", "left_hip", "right_hip", "spine1")
    assert JOINT_NAMES[-2:] == ("left_wrist", "right_wrist")
    assert all(p < j for j, p in enumerate(PARENTS))  # parents first
    # Y up, facing +Z, left at +X: the head is above the feet, the left hip at +X.
    assert REST_JOINTS[15, 1] > REST_JOINTS[10, 1] + 1.4
    assert REST_JOINTS[1, 0] > 0 > REST_JOINTS[2, 0]
    assert REST_JOINTS[10, 2] > REST_JOINTS[7, 2]  # toes in front of the ankle


def test_forward_kinematics_of_the_rest_pose_is_the_rest_skeleton():
    eye = np.broadcast_to(np.eye(3), (1, NUM_JOINTS, 3, 3))
    joints = forward_kinematics(eye, REST_JOINTS[:1, :])
    np.testing.assert_allclose(joints[0], REST_JOINTS, atol=1e-12)


def test_the_skeleton_fit_reproduces_a_rigid_motion_exactly():
    joints = _motion()
    fit = fit_skeleton(joints)
    np.testing.assert_allclose(fit.joints(), joints, atol=1e-9)
    np.testing.assert_allclose(np.linalg.det(fit.local), 1.0, atol=1e-9)


def test_features_have_263_channels_one_frame_fewer_than_the_joints():
    feats = F.joints_to_features(_motion(30))
    assert feats.shape == (29, 263) and feats.dtype == np.float32
    assert sum(s.stop - s.start for s in F.LAYOUT.values()) == 263


def test_joints_to_features_to_joints_is_exact():
    joints = _motion(60)
    back = F.features_to_joints(F.joints_to_features(joints).astype(np.float64)).numpy()
    canonical = F.canonical_joints(joints)
    np.testing.assert_allclose(back, canonical[:-1], atol=1e-5)


def test_the_canonical_place_is_humanml3ds():
    canonical = F.canonical_joints(_motion())
    assert canonical[..., 1].min() == pytest.approx(0.0, abs=1e-12)  # on the floor
    np.testing.assert_allclose(canonical[0, 0, [0, 2]], 0.0, atol=1e-12)  # at the origin
    assert F.facing_angles(canonical)[0] == pytest.approx(0.0, abs=1e-9)  # facing +Z


def test_canonical_transform_maps_back_to_the_motions_own_place():
    joints = _motion(seed=3)
    rotation, offset = F.canonical_transform(joints)
    np.testing.assert_allclose(F.canonical_joints(joints) @ rotation.T + offset, joints, atol=1e-9)


def test_the_channels_mean_what_the_layout_says():
    # A body walking straight along its facing direction at 1 m/s, standing still otherwise.
    frames = 40
    eye = np.broadcast_to(np.eye(3), (frames, NUM_JOINTS, 3, 3)).copy()
    root = np.zeros((frames, 3))
    root[:, 1] = 1.2
    root[:, 2] = np.arange(frames) / F.FPS
    feats = F.joints_to_features(forward_kinematics(eye, root))
    np.testing.assert_allclose(feats[:, F.LAYOUT["root_angular"]], 0.0, atol=1e-6)
    # Forward, in metres a frame (the rest skeleton's facing is a few mrad off +Z).
    np.testing.assert_allclose(np.hypot(feats[:, 1], feats[:, 2]), 1.0 / F.FPS, atol=1e-6)
    np.testing.assert_allclose(feats[:, 1], 0.0, atol=5e-4)
    pelvis_height = REST_JOINTS[0, 1] - REST_JOINTS[:, 1].min()  # above the toes (the floor)
    np.testing.assert_allclose(feats[:, 3], pelvis_height, atol=1e-6)
    # Identity rotations in 6D: the first two columns of I.
    sixd = feats[:, F.LAYOUT["rotations"]].reshape(frames - 1, 21, 6)
    np.testing.assert_allclose(sixd, np.tile([1, 0, 0, 0, 1, 0], (frames - 1, 21, 1)), atol=1e-6)
    # Every joint moves 5 cm a frame: feet too, above the contact threshold (sqrt 0.002).
    np.testing.assert_allclose(feats[:, F.LAYOUT["contacts"]], 0.0)


def test_a_planted_foot_is_in_contact_and_a_turn_shows_in_the_angular_channel():
    frames = 200  # the facing is smoothed over ~20 frames: look well inside the motion
    eye = np.broadcast_to(np.eye(3), (frames, NUM_JOINTS, 3, 3)).copy()
    turn = np.radians(2.0) * np.arange(frames)  # 2 degrees a frame to the left
    eye[:, 0] = Rotation.from_rotvec(np.stack([0 * turn, turn, 0 * turn], 1)).as_matrix()
    feats = F.joints_to_features(forward_kinematics(eye, np.tile([0, 1.0, 0], (frames, 1))))
    # HumanML3D stores half the turn, with the sign of the world -> body rotation.
    np.testing.assert_allclose(feats[70:130, 0], -np.radians(1.0), atol=2e-4)
    contacts = feats[:, F.LAYOUT["contacts"]]
    assert contacts.min() == 1.0  # turning on the spot: the feet barely move


def test_features_to_joints_is_differentiable_and_batched():
    feats = torch.from_numpy(np.stack([F.joints_to_features(_motion(20, s)) for s in (1, 2)]))
    feats.requires_grad_(True)
    joints = F.features_to_joints(feats)
    assert joints.shape == (2, 19, 22, 3)
    joints[:, -1, 0, 0].sum().backward()  # the last root x depends on every earlier velocity
    assert feats.grad[:, :-1, 1:3].abs().sum() > 0


def test_joint_mask_selects_each_joints_channels():
    lower = F.joint_mask(LOWER_BODY)
    assert lower[:4].all()  # the root channels go with the pelvis
    assert lower[F.LAYOUT["contacts"]].all()  # the feet's contacts go with the legs
    upper = F.joint_mask([j for j in range(NUM_JOINTS) if j not in LOWER_BODY])
    assert not (lower & upper).any() and (lower | upper).all()
    ankle = F.joint_mask([FEET["left"][0]])
    assert ankle.sum() == 3 + 6 + 3 + 1


def test_bad_joints_are_refused():
    with pytest.raises(ValueError, match="joints"):
        F.joints_to_features(np.zeros((10, 21, 3)))
    bad = _motion(10)
    bad[3, 4, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        F.joints_to_features(bad)
