"""Motion folders -> shard samples (HumanML3D's layout, joint arrays), bad arrays skipped and
counted by reason, and shard samples -> padded training tensors in length buckets."""

import io
import random
from collections import Counter

import numpy as np
import pytest

from polydiff.core.data import Skip
from polydiff.motion import data, synthetic
from polydiff.motion.features import FPS, joints_to_features


def _joints(caption: str = "a person walks forward", seed: int = 0) -> np.ndarray:
    return synthetic.render(caption, np.random.default_rng(seed))


def _split(items):
    samples = [s for s in items if not isinstance(s, Skip)]
    skips = Counter(s.reason for s in items if isinstance(s, Skip))
    return samples, skips


def test_a_folder_of_joint_arrays_becomes_feature_samples_and_bad_ones_are_counted(tmp_path):
    good = _joints()
    np.save(tmp_path / "walk.npy", good)
    (tmp_path / "walk.txt").write_text("a person walks forward\n")
    nan = good.copy()
    nan[5, 3, 1] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    (tmp_path / "nan.txt").write_text("broken")
    np.save(tmp_path / "joints21.npy", good[:, :21])
    (tmp_path / "joints21.txt").write_text("wrong skeleton")
    np.save(tmp_path / "short.npy", good[:20])
    (tmp_path / "short.txt").write_text("too short")
    np.save(tmp_path / "uncaptioned.npy", good)
    (tmp_path / "garbage.npy").write_bytes(b"not an array")
    (tmp_path / "garbage.txt").write_text("garbage")
    samples, skips = _split(list(data.folder_source(tmp_path)))
    assert [s["__key__"] for s in samples] == ["walk"]
    assert skips == {"not finite": 1, "wrong joint count": 1, "too short": 1, "no caption": 1,
                     "unreadable motion": 1}  # fmt: skip
    features = np.load(io.BytesIO(samples[0]["npy"]))
    np.testing.assert_allclose(features, joints_to_features(good))
    assert samples[0]["json"]["frames"] == len(good) - 1
    assert samples[0]["txt"] == "a person walks forward"


def test_feature_arrays_pass_through(tmp_path):
    features = joints_to_features(_joints())
    np.save(tmp_path / "a.npy", features)
    (tmp_path / "a.txt").write_text("a person walks forward")
    (sample,), _ = _split(list(data.folder_source(tmp_path)))
    np.testing.assert_array_equal(np.load(io.BytesIO(sample["npy"])), features)


def _humanml3d(root, names, lines):
    (root / "new_joint_vecs").mkdir(parents=True)
    (root / "texts").mkdir()
    for index, name in enumerate(names):
        np.save(root / "new_joint_vecs" / f"{name}.npy", joints_to_features(_joints(seed=index)))
        (root / "texts" / f"{name}.txt").write_text("\n".join(lines) + "\n")


def test_humanml3ds_layout_keeps_whole_clip_captions_together_and_cuts_sub_clips(tmp_path):
    lines = [
        "a person walks forward#a/DET person/NOUN walk/VERB forward/ADV#0.0#0.0",
        "someone walks ahead#someone/PRON walk/VERB ahead/ADV#0.0#0.0",
        "a person takes steps#a/DET person/NOUN take/VERB step/NOUN#0.5#3.0",
    ]
    _humanml3d(tmp_path, ["000001", "000002"], lines)
    samples, skips = _split(list(data.folder_source(tmp_path)))
    assert not skips
    keys = [s["__key__"] for s in samples]
    assert keys == ["000001", "000001_2", "000002", "000002_2"]
    whole, clip = samples[0], samples[1]
    assert whole["json"]["captions"] == ["a person walks forward", "someone walks ahead"]
    assert clip["txt"] == "a person takes steps"
    full = np.load(tmp_path / "new_joint_vecs" / "000001.npy")
    np.testing.assert_array_equal(np.load(io.BytesIO(clip["npy"])), full[10:60])


def test_humanml3ds_train_list_keeps_its_test_motions_out(tmp_path):
    _humanml3d(tmp_path, ["000001", "000002"], ["a person walks#x#0.0#0.0"])
    (tmp_path / "train.txt").write_text("000002\n")
    samples, _ = _split(list(data.folder_source(tmp_path)))
    assert [s["__key__"] for s in samples] == ["000002"]


def test_a_short_sub_clip_is_counted_too_short(tmp_path):
    _humanml3d(tmp_path, ["000001"], ["a#x#0.0#0.0", "a blink#x#1.0#1.5"])
    samples, skips = _split(list(data.folder_source(tmp_path)))
    assert len(samples) == 1 and skips == {"too short": 1}


def test_buckets_are_the_shortest_that_hold_a_motion():
    buckets = [40, 64, 96]
    assert data.choose_bucket(40, buckets) == 40
    assert data.choose_bucket(41, buckets) == 64
    assert data.choose_bucket(500, buckets) == 96  # cut to the longest
    with pytest.raises(ValueError, match="too short"):
        data.choose_bucket(39, buckets)


def test_decoding_pads_to_the_bucket_with_a_valid_mask_and_crops_long_motions():
    sample = next(synthetic.motions(1))
    frames = sample["json"]["frames"]
    features = np.load(io.BytesIO(sample["npy"]))
    out = data.decode(sample, [40, 200], random.Random(0))
    assert out["motion"].shape == (263, 200) and out["length"] == frames
    assert out["valid"][:frames].all() and not out["valid"][frames:].any()
    np.testing.assert_array_equal(out["motion"][:, :frames].numpy(), features.T)
    assert not out["motion"][:, frames:].any()
    cut = data.decode(sample, [40], random.Random(0))
    assert cut["motion"].shape == (263, 40) and cut["valid"].all()
    windows = [features[s : s + 40].T for s in range(frames - 39)]
    assert any(np.array_equal(w, cut["motion"].numpy()) for w in windows)


def test_a_caption_is_drawn_from_all_whole_clip_captions():
    sample = next(synthetic.motions(1))
    sample["json"] = {**sample["json"], "captions": ["one", "two"]}
    drawn = {data.decode(sample, [200], random.Random(s))["caption"] for s in range(20)}
    assert drawn == {"one", "two"}


def test_bvh_files_are_read_at_20_fps_in_metres(tmp_path):
    bvh = pytest.importorskip("polydiff.motion.bvh")
    joints = _joints(seed=2)
    bvh.write_bvh(joints * 100.0, tmp_path / "walk.bvh", fps=25.0)  # centimetres, 25 fps
    (tmp_path / "walk.txt").write_text("a person walks forward")
    read = data.read_motion(tmp_path / "walk.bvh")
    assert read.shape == (round((len(joints) - 1) * FPS / 25.0) + 1, 22, 3)
    np.testing.assert_allclose(read[0], joints[0], atol=1e-3)
    (sample,), _ = _split(list(data.folder_source(tmp_path)))
    assert sample["json"]["frames"] == len(read) - 1
