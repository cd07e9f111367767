"""synthetic:motions: every caption's motion does what the caption says, on the ground."""

import io

import numpy as np
import pytest

from polydiff.motion import synthetic
from polydiff.motion.features import FPS, canonical_joints, facing_angles
from polydiff.motion.skeleton import FEET, joint_index

FOOT_JOINTS = [*FEET["left"], *FEET["right"]]
PELVIS, HEAD = joint_index("pelvis"), joint_index("head")


def canonical(caption: str, seed: int = 0) -> np.ndarray:
    return canonical_joints(synthetic.render(caption, np.random.default_rng(seed)))


@pytest.mark.parametrize("caption", synthetic.CAPTIONS)
def test_every_motion_is_2_to_9_8_seconds_of_features_and_stands_on_the_floor(caption):
    for seed in range(3):
        joints = synthetic.render(caption, np.random.default_rng(seed))
        assert joints.shape[1:] == (22, 3) and 41 <= len(joints) <= 197  # 40-196 feature frames
        lowest = joints[..., 1].min(axis=1)
        if caption != "a person jumps":
            np.testing.assert_allclose(lowest, 0.0, atol=1e-9)


@pytest.mark.parametrize("caption", synthetic.CAPTIONS)
def test_the_supporting_foot_never_slides(caption):
    joints = canonical(caption, seed=1)
    feet = joints[:, FOOT_JOINTS]
    support = feet[1:, :, 1].argmin(axis=1)
    frames = np.arange(1, len(joints))
    on_floor = feet[frames, support, 1] < 1e-6  # not in a jump's flight
    slide = feet[frames, support][:, [0, 2]] - feet[frames - 1, support][:, [0, 2]]
    assert np.abs(slide[on_floor]).max() < 1e-9


def test_walking_travels_forward_and_walking_backward_goes_back():
    for seed in range(3):
        forward = canonical("a person walks forward", seed)
        backward = canonical("a person walks backward", seed)
        run = canonical("a person runs forward", seed)
        seconds = len(forward) / FPS
        assert forward[-1, PELVIS, 2] > 0.3 * seconds  # > 0.3 m/s along its facing (+Z)
        assert backward[-1, PELVIS, 2] < -0.3 * len(backward) / FPS
        assert run[-1, PELVIS, 2] / (len(run) / FPS) > forward[-1, PELVIS, 2] / seconds


def test_turning_left_and_right_turn_the_facing_that_way():
    for seed in range(3):
        left = facing_angles(canonical("a person turns left", seed))
        right = facing_angles(canonical("a person turns right", seed))
        assert left[-1] - left[0] > np.radians(45)  # toward +X, the body's left
        assert right[-1] - right[0] < -np.radians(45)


def test_a_jump_leaves_the_ground_and_a_squat_or_sit_drops_the_pelvis():
    for seed in range(3):
        jump = canonical("a person jumps", seed)
        assert jump[..., 1].min(axis=1).max() > 0.05  # every joint 5 cm above the floor
        for caption in ("a person squats down", "a person sits down"):
            pelvis = canonical(caption, seed)[:, PELVIS, 1]
            assert pelvis.min() < pelvis[0] - 0.25


def test_waving_raises_that_hand_above_the_head():
    for seed in range(3):
        for side in ("left", "right"):
            other = "right" if side == "left" else "left"
            joints = canonical(f"a person waves with the {side} hand", seed)
            wrist, rest = joint_index(f"{side}_wrist"), joint_index(f"{other}_wrist")
            assert (joints[:, wrist, 1] - joints[:, HEAD, 1]).max() > 0.1
            assert (joints[:, rest, 1] - joints[:, HEAD, 1]).max() < 0.0
        both = canonical("a person raises both arms", seed)
        for side in ("left", "right"):
            assert (both[:, joint_index(f"{side}_wrist"), 1] - both[:, HEAD, 1]).max() > 0.1


def test_same_seed_same_motions_and_no_two_alike():
    a = list(synthetic.motions(4, seed=3))
    b = list(synthetic.motions(4, seed=3))
    assert [s["npy"] for s in a] == [s["npy"] for s in b]
    other = list(synthetic.motions(16, seed=4))
    assert other[0]["npy"] != a[0]["npy"]
    walks = [s for s in synthetic.motions(24) if s["txt"] == "a person walks forward"]
    assert walks[0]["npy"] != walks[1]["npy"]


def test_motions_are_shard_samples_of_features_captions_and_frames():
    samples = list(synthetic.motions(12))
    assert [s["txt"] for s in samples] == list(synthetic.CAPTIONS)
    for sample in samples:
        features = np.load(io.BytesIO(sample["npy"]), allow_pickle=False)
        assert features.dtype == np.float32 and features.shape[1] == 263
        assert sample["json"]["frames"] == len(features) and sample["json"]["fps"] == FPS


def test_an_unknown_caption_is_refused():
    with pytest.raises(ValueError, match="unknown caption"):
        synthetic.render("a person flies", np.random.default_rng(0))
