"""polydiff generate motion: options, one-line refusals, the same seed the same motion, and
editing — in-betweening keeps its keyframes exactly, body-part editing keeps the legs."""

import json
import math

import numpy as np
import pytest

from polydiff.core.modality import GenerationRequest, RequestError, generate, generate_files
from polydiff.motion import synthetic
from polydiff.motion.features import FPS, LAYOUT, joint_mask, joints_to_features
from polydiff.motion.pipeline import BODY_PARTS, land_on_keyframes, read_keyframes
from polydiff.motion.skeleton import LOWER_BODY


def _request(checkpoint, prompts=("a person walks forward",), **options):
    return GenerationRequest.of(list(prompts), checkpoint=checkpoint, **options)


def test_a_motion_is_seconds_long_with_joints_recovered_from_its_features(motion_checkpoint):
    made = generate("motion", _request(motion_checkpoint, seconds=3.0))
    (motion,) = made.outputs
    assert motion.features.shape == (60, 263) and motion.joints.shape == (60, 22, 3)
    from polydiff.motion.features import features_to_joints

    np.testing.assert_allclose(
        motion.joints, features_to_joints(motion.features.astype(np.float64)).numpy(), atol=1e-5
    )
    record = made.metadata[0]
    assert record["seconds"] == 3.0 and record["frames"] == 60 and record["fps"] == FPS
    assert record["prompt"] == "a person walks forward"


def test_the_default_length_is_the_checkpoints_sample_seconds(motion_checkpoint):
    (motion,) = generate("motion", _request(motion_checkpoint)).outputs
    assert len(motion.features) == 40  # sample_seconds 2.0 at 20 fps


def test_same_seed_same_motion_whatever_the_batch_size(motion_checkpoint):
    prompts = ("a person jumps", "a person kicks", "a person sits down")
    one = generate("motion", _request(motion_checkpoint, prompts, seed=5, batch_size=1)).outputs
    all_ = generate("motion", _request(motion_checkpoint, prompts, seed=5, batch_size=3)).outputs
    other = generate("motion", _request(motion_checkpoint, prompts, seed=6)).outputs
    for a, b in zip(one, all_, strict=True):
        np.testing.assert_allclose(a.features, b.features, atol=1e-5)
    assert not np.allclose(one[0].features, other[0].features)


def test_every_format_is_written_with_its_provenance(motion_checkpoint, tmp_path):
    for suffix in (".bvh", ".mp4", ".npy"):
        (path,) = generate_files(
            "motion", _request(motion_checkpoint, seed=1), tmp_path / f"m{suffix}"
        )
        assert path.stat().st_size > 0
        record = json.loads(path.with_name(path.name + ".json").read_text())
        assert record["seed"] == 1 and record["sampler"] and record["checkpoint"]
    assert np.load(tmp_path / "m.npy").shape == (40, 22, 3)
    generate_files("motion", _request(motion_checkpoint, npy="features"), tmp_path / "f.npy")
    assert np.load(tmp_path / "f.npy").shape == (40, 263)


@pytest.mark.parametrize(
    ("options", "option"),
    [
        ({"seconds": 0.2}, "seconds"),
        ({"seconds": 30.0}, "seconds"),
        ({"seconds": math.nan}, "seconds"),
        ({"npy": "pickle"}, "npy"),
        ({"keep": "0:1"}, "keep"),
        ({"regenerate": "upper_body"}, "regenerate"),
        ({"keyframes": "missing.npy"}, "keyframes"),
        ({"keyframes": "motion.txt"}, "keyframes"),
    ],
)
def test_bad_options_are_refused_in_one_line_before_sampling(motion_checkpoint, options, option):
    with pytest.raises(RequestError) as error:
        generate("motion", _request(motion_checkpoint, **options))
    assert error.value.option == option and "\n" not in str(error.value)


def test_too_many_frames_in_one_call_are_refused(motion_checkpoint):
    with pytest.raises(RequestError, match="split the request"):
        generate("motion", _request(motion_checkpoint, num=10_000, seconds=9.8))


def _keyframe_file(tmp_path, frames=60, missing=slice(15, 45)):
    joints = synthetic.render("a person walks forward", np.random.default_rng(4))[: frames + 1]
    holes = joints.copy()
    holes[missing] = np.nan
    path = tmp_path / "keys.npy"
    np.save(path, holes)
    return path, joints


def test_in_betweening_keeps_its_keyframes_exactly_in_the_files_own_coordinates(
    motion_checkpoint, tmp_path
):
    path, joints = _keyframe_file(tmp_path)
    (motion,) = generate("motion", _request(motion_checkpoint, keyframes=path, seed=2)).outputs
    assert len(motion.joints) == 60
    kept = np.r_[0:15, 45:60]
    np.testing.assert_allclose(motion.joints[kept], joints[kept], atol=2e-4)
    # The gap is generated: not the file's motion.
    assert np.abs(motion.joints[20:40] - joints[20:40]).max() > 0.01


def test_keep_selects_the_kept_times(motion_checkpoint, tmp_path):
    joints = synthetic.render("a person walks backward", np.random.default_rng(1))[:61]
    np.save(tmp_path / "jump.npy", joints)
    request = _request(motion_checkpoint, keyframes=tmp_path / "jump.npy", keep="0:0.5,2.5:3")
    (motion,) = generate("motion", request).outputs
    kept = np.r_[0:10, 50:60]
    np.testing.assert_allclose(motion.joints[kept], joints[kept], atol=2e-4)
    with pytest.raises(RequestError, match="every frame"):
        generate("motion", _request(motion_checkpoint, keyframes=tmp_path / "jump.npy"))


def test_regenerating_the_upper_body_keeps_the_legs_and_the_root_path(motion_checkpoint, tmp_path):
    joints = synthetic.render("a person walks forward", np.random.default_rng(2))[:61]
    np.save(tmp_path / "walk.npy", joints)
    request = _request(motion_checkpoint, keyframes=tmp_path / "walk.npy", regenerate="upper_body")
    (motion,) = generate("motion", request).outputs
    source = joints_to_features(joints)
    keep = joint_mask(LOWER_BODY)
    np.testing.assert_array_equal(motion.features[:, keep], source[:, keep])
    np.testing.assert_allclose(motion.joints[:, list(LOWER_BODY)], joints[:60, list(LOWER_BODY)],
                               atol=2e-4)  # fmt: skip
    upper = list(BODY_PARTS["upper_body"])
    assert np.abs(motion.joints[:, upper] - joints[:60, upper]).max() > 0.01


def test_a_features_file_edits_in_the_canonical_place(motion_checkpoint, tmp_path):
    walk = synthetic.render("a person walks forward", np.random.default_rng(3))
    features = joints_to_features(walk)
    features = features[:50].copy()
    features[20:30] = np.nan
    np.save(tmp_path / "kick.npy", features)
    request = _request(motion_checkpoint, keyframes=tmp_path / "kick.npy")
    (motion,) = generate("motion", request).outputs
    kept = np.r_[0:20, 30:50]
    np.testing.assert_array_equal(motion.features[kept][:, 4:], features[kept][:, 4:])


def test_landing_on_keyframes_corrects_only_the_generated_root_channels():
    rng = np.random.default_rng(0)
    source = joints_to_features(synthetic.render("a person turns left", rng))[:60]
    made = source.copy()
    made[20:40, :4] += rng.normal(size=(20, 4)).astype(np.float32) * 0.02  # a drifting gap
    known = np.ones(60, dtype=bool)
    known[20:40] = False
    fixed = land_on_keyframes(made, source, known)
    np.testing.assert_array_equal(fixed[known], made[known])
    from polydiff.motion.features import features_to_joints

    a = features_to_joints(fixed.astype(np.float64)).numpy()
    b = features_to_joints(source.astype(np.float64)).numpy()
    np.testing.assert_allclose(a[40:], b[40:], atol=1e-4)  # lands on the next keyframe
    assert np.abs(fixed[20:40, LAYOUT["root_linear"]] - made[20:40, 1:3]).max() > 0


def test_a_keyframes_file_must_leave_something_to_generate(tmp_path):
    joints = synthetic.render("a person walks forward", np.random.default_rng(0))
    np.save(tmp_path / "all.npy", joints)
    with pytest.raises(RequestError, match="every frame"):
        read_keyframes(tmp_path / "all.npy", None, None)
    np.save(tmp_path / "none.npy", np.full((50, 22, 3), np.nan))
    with pytest.raises(RequestError, match="no frame"):
        read_keyframes(tmp_path / "none.npy", None, None)
