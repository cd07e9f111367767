"""Motion metrics of polydiff.motion.metrics: the kinematic metrics on constructed motions,
the text-to-motion protocol's statistics against their formulas, and the bundled evaluator
on held-out synthetic motions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from polydiff.motion.features import FPS, joints_to_features
from polydiff.motion.metrics import (
    MotionEvaluator,
    MotionTextEncoder,
    diversity,
    evaluate,
    fid,
    floating,
    foot_skating_ratio,
    ground_penetration,
    jitter,
    kinematic_metrics,
    load_evaluator,
    main,
    matching_score,
    multimodality,
    padded_features,
    r_precision,
    real_motions,
    train_evaluator,
)
from polydiff.motion.skeleton import REST_JOINTS
from polydiff.motion.synthetic import CAPTIONS, render

HELD_OUT_SEED = 1234  # the evaluator trains on seeds 0 and 100 and reports on 1 and 2
BUNDLED = Path(__file__).resolve().parents[2] / "packages/motion/src/polydiff/motion/bundled"


def _standing(frames: int = 40) -> np.ndarray:
    """(frames, 22, 3) the rest pose standing still, its lowest joints (the toes) at y = 0."""
    pose = REST_JOINTS - np.array([0.0, REST_JOINTS[:, 1].min(), 0.0])
    return np.repeat(pose[None], frames, axis=0)


def _moved(joints: np.ndarray, velocity: tuple[float, float, float]) -> np.ndarray:
    """The motion translated at ``velocity`` m/s."""
    time = np.arange(len(joints))[:, None, None] / FPS
    return joints + time * np.array(velocity)


@pytest.fixture(scope="module")
def evaluator() -> MotionEvaluator:
    return load_evaluator()


# --- kinematic metrics -----------------------------------------------------------------------


def test_a_foot_sliding_on_the_floor_skates_every_frame_and_a_planted_one_never():
    assert foot_skating_ratio(_moved(_standing(), (1.0, 0.0, 0.0))) == 1.0
    assert foot_skating_ratio(_standing()) == 0.0


def test_skating_needs_the_foot_near_the_ground_and_faster_than_half_a_metre_per_second():
    lifted = _standing() + np.array([0.0, 0.1, 0.0])  # 10 cm up: above GMD's 5 cm
    assert foot_skating_ratio(_moved(lifted, (1.0, 0.0, 0.0))) == 0.0
    assert foot_skating_ratio(_moved(_standing(), (0.0, 0.0, 0.3))) == 0.0  # slower than 0.5
    assert foot_skating_ratio(_moved(_standing(), (0.0, 0.0, 0.7))) > 0.9


def test_one_sliding_foot_is_enough_for_a_frame_to_skate():
    joints = _standing()
    joints[:, 10, 0] += np.arange(len(joints)) / FPS  # the left toe slides at 1 m/s
    assert foot_skating_ratio(joints) == 1.0


def test_a_batch_is_measured_on_each_motions_valid_frames_only():
    sliding, planted = _moved(_standing(), (1.0, 0.0, 0.0)), _standing(30)
    batch = np.full((2, 40, 22, 3), np.nan)  # padding that would poison any metric
    batch[0], batch[1, :30] = sliding, planted
    assert foot_skating_ratio(batch, lengths=[40, 30]) == 0.5
    assert ground_penetration(torch.from_numpy(batch), torch.tensor([40, 30])) == 0.0
    assert foot_skating_ratio([sliding, planted]) == 0.5  # a list of motions


def test_a_motion_ten_centimetres_under_the_floor_penetrates_by_ten_centimetres():
    sunk = _standing() - np.array([0.0, 0.1, 0.0])
    assert ground_penetration(sunk) == pytest.approx(0.1)
    assert ground_penetration(_standing()) == 0.0
    assert floating(sunk) == 0.0


def test_floating_is_the_lowest_joints_height_beyond_a_small_tolerance():
    assert floating(_standing() + np.array([0.0, 0.3, 0.0])) == pytest.approx(0.3)
    assert floating(_standing() + np.array([0.0, 0.01, 0.0])) == 0.0  # within 2 cm
    half = _standing()
    half[20:] += np.array([0.0, 0.2, 0.0])  # in the air for half the frames
    assert floating(half) == pytest.approx(0.1)


def test_jitter_is_the_mean_jerk_of_the_joints():
    assert jitter(_standing()) == 0.0
    assert jitter(_moved(_standing(), (1.0, 0.0, 0.0))) == pytest.approx(0.0, abs=1e-6)
    cubic = _standing() + ((np.arange(40) / FPS) ** 3)[:, None, None] * np.array([1.0, 0, 0])
    assert jitter(cubic) == pytest.approx(6.0)  # d^3/dt^3 of t^3 m


def test_a_sine_jittered_joint_has_the_expected_jerk():
    # 1 cm at 5 Hz on the right wrist: samples go 0, A, 0, -A, so every third difference is
    # 2 A, a jerk of 2 A fps^3 = 160 m/s^3, shared among the 22 joints.
    amplitude = 0.01
    joints = _standing(80)
    joints[:, 21, 1] += amplitude * np.sin(2 * np.pi * 5.0 * np.arange(80) / FPS)
    assert jitter(joints) == pytest.approx(2 * amplitude * FPS**3 / 22)


def test_synthetic_motions_stay_on_the_floor_and_in_place_ones_do_not_skate():
    rng = np.random.default_rng(HELD_OUT_SEED)
    motions = {c: render(c, rng) for c in CAPTIONS}
    report = kinematic_metrics(list(motions.values()))
    assert set(report) == {"foot_skating_ratio", "jitter", "ground_penetration", "floating"}
    assert report["ground_penetration"] < 1e-9
    in_place = [m for c, m in motions.items() if c.split()[2] in ("squats", "waves", "sits")]
    assert foot_skating_ratio(in_place) == 0.0
    assert floating(in_place) == 0.0
    assert floating([motions["a person jumps"]]) > 0.0  # the flight


def test_kinematic_metrics_refuse_bad_joints():
    with pytest.raises(ValueError, match="22, 3"):
        foot_skating_ratio(np.zeros((10, 21, 3)))
    with pytest.raises(ValueError, match="at least 4 frames"):
        jitter(_standing(3))
    with pytest.raises(ValueError, match="lengths"):
        floating(np.zeros((2, 10, 22, 3)), lengths=[10, 11])


# --- the protocol's statistics ---------------------------------------------------------------


def test_r_precision_is_one_when_every_motion_sits_on_its_text():
    emb = np.random.default_rng(0).normal(size=(96, 16))
    captions = [f"caption {i}" for i in range(96)]
    assert r_precision(emb, emb, captions) == {1: 1.0, 2: 1.0, 3: 1.0}


def test_r_precision_of_random_embeddings_is_chance():
    rng = np.random.default_rng(0)
    motions, texts = rng.normal(size=(3200, 16)), rng.normal(size=(3200, 16))
    captions = [f"caption {i}" for i in range(3200)]
    precision = r_precision(motions, texts, captions, top=(1, 3, 32))
    assert precision[1] == pytest.approx(1 / 32, abs=0.012)
    assert precision[3] == pytest.approx(3 / 32, abs=0.02)
    assert precision[32] == 1.0  # every text of the batch is within the top 32


def test_r_precision_counts_any_text_with_the_motions_caption_as_a_hit():
    # Two captions, each motion next to its caption's embedding: the nearest text is often
    # another motion's copy of the same caption, and that is a hit.
    rng = np.random.default_rng(0)
    centres = {"a person jumps": np.ones(8), "a person kicks": -np.ones(8)}
    captions = [list(centres)[i % 2] for i in range(64)]
    texts = np.stack([centres[c] for c in captions])
    motions = texts + rng.normal(scale=0.1, size=texts.shape)
    assert r_precision(motions, texts, captions)[1] == 1.0
    assert r_precision(motions, texts, captions, ranked_by="text")[1] == 1.0


def test_r_precision_ranks_texts_per_motion_or_motions_per_text():
    # Both texts lie near motion 0: each motion's nearest text is its own, but text 1's
    # nearest motion is motion 0.
    motions, texts = np.array([[0.0], [10.0]]), np.array([[0.1], [0.2]])
    assert r_precision(motions, texts, ["a", "b"], top=(1,)) == {1: 1.0}
    assert r_precision(motions, texts, ["a", "b"], top=(1,), ranked_by="text") == {1: 0.5}


def test_r_precision_drops_an_incomplete_last_batch():
    rng = np.random.default_rng(0)
    motions, texts = rng.normal(size=(40, 4)), rng.normal(size=(40, 4))
    values = r_precision(motions, texts, [str(i) for i in range(40)], top=(1, 2))
    assert all(round(v * 32) == pytest.approx(v * 32) for v in values.values())
    small = r_precision(motions[:10], motions[:10], [str(i) for i in range(10)])
    assert small[1] == 1.0  # fewer than 32: one batch of all


def test_matching_score_is_the_mean_distance_to_the_own_caption():
    texts = np.random.default_rng(0).normal(size=(10, 3))
    offsets = np.zeros((10, 3))
    offsets[:, 0] = np.linspace(0.0, 1.0, 10)
    assert matching_score(texts + offsets, texts) == pytest.approx(0.5)


def test_diversity_is_the_mean_distance_of_random_pairs():
    emb = np.random.default_rng(1).normal(size=(50, 6))
    rng = np.random.default_rng(7)
    first, second = rng.choice(50, 50, replace=False), rng.choice(50, 50, replace=False)
    expected = np.linalg.norm(emb[first] - emb[second], axis=1).mean()
    assert diversity(emb, pairs=300, seed=7) == pytest.approx(expected)  # 300 > 50: 50 pairs
    assert diversity(np.ones((20, 4))) == 0.0


def test_multimodality_is_the_mean_distance_of_pairs_within_each_prompt():
    rng = np.random.default_rng(2)
    groups = rng.normal(size=(3, 12, 5))
    draw = np.random.default_rng(3)
    distances = []
    for group in groups:
        first, second = draw.choice(12, 10, replace=False), draw.choice(12, 10, replace=False)
        distances.append(np.linalg.norm(group[first] - group[second], axis=1))
    expected = np.concatenate(distances).mean()
    assert multimodality(groups, pairs=10, seed=3) == pytest.approx(expected)
    as_dict = {f"prompt {i}": g for i, g in enumerate(groups)}
    assert multimodality(as_dict, seed=3) == multimodality(list(groups), seed=3)
    identical = np.repeat(rng.normal(size=(4, 1, 5)), 6, axis=1)  # each prompt: one motion
    assert multimodality(identical) == 0.0


def test_fid_of_shifted_embeddings_is_the_squared_shift():
    emb = np.random.default_rng(0).normal(size=(200, 4))
    assert fid(emb, emb) == pytest.approx(0.0, abs=1e-9)
    assert fid(emb, emb + np.array([0.3, 0.0, 0.4, 0.0])) == pytest.approx(0.25)


def test_padded_features_accepts_a_list_of_motions_and_zeroes_the_padding():
    motions = [np.ones((5, 263)), 2 * np.ones((3, 263))]
    batch, lengths = padded_features(motions)
    assert batch.shape == (2, 5, 263) and lengths.tolist() == [5, 3]
    assert float(batch[1, 3:].abs().sum()) == 0.0
    with pytest.raises(ValueError, match="263"):
        padded_features(np.zeros((2, 5, 262)))


# --- the bundled evaluator -------------------------------------------------------------------


def test_the_bundled_evaluator_is_small_and_loads(evaluator):
    weights = BUNDLED / "evaluator" / "model.safetensors"
    assert weights.stat().st_size < 3 * 2**20
    assert isinstance(evaluator, MotionEvaluator)
    assert isinstance(evaluator, MotionTextEncoder)
    assert not evaluator.training


def test_the_bundled_evaluator_tells_walking_from_jumping(evaluator):
    rng = np.random.default_rng(HELD_OUT_SEED)
    walk, jump = "a person walks forward", "a person jumps"
    captions = [walk, jump] * 8
    features = [joints_to_features(render(c, rng)) for c in captions]
    motion = evaluator.embed_motion(features)
    text = evaluator.embed_text([walk, jump])
    nearest = torch.cdist(motion, text).argmin(dim=1)
    assert nearest.tolist() == [0, 1] * 8


def test_the_bundled_evaluator_ranks_held_out_captions_well(evaluator):
    features, lengths, captions = real_motions(96, seed=HELD_OUT_SEED)
    motion = evaluator.embed_motion(features, lengths)
    text = evaluator.embed_text(captions)
    precision = r_precision(motion, text, captions)
    assert precision[1] > 0.8 and precision[3] > 0.95
    assert torch.allclose(motion.norm(dim=1), torch.ones(96), atol=1e-5)  # unit vectors


def test_an_embedding_does_not_depend_on_the_batch_around_it(evaluator):
    features, lengths, _ = real_motions(4, seed=HELD_OUT_SEED)
    together = evaluator.embed_motion(features, lengths)
    alone = evaluator.embed_motion(features[1, : int(lengths[1])])
    assert torch.allclose(together[1], alone[0], atol=1e-5)


def test_evaluate_reports_the_whole_protocol(evaluator):
    real, real_lengths, real_captions = real_motions(64, seed=HELD_OUT_SEED)
    generated, lengths, captions = real_motions(64, seed=HELD_OUT_SEED + 1)
    report = evaluate(generated, lengths, captions, real, real_lengths, real_captions, evaluator)
    expected = {"r_precision_top1", "r_precision_top2", "r_precision_top3", "matching_score",
                "fid", "diversity", "multimodality", "foot_skating_ratio", "jitter",
                "ground_penetration", "floating"}  # fmt: skip
    assert expected | {f"real_{k}" for k in expected - {"fid", "multimodality"}} == set(report)
    assert all(np.isfinite(v) for v in report.values())
    # Two draws of the same distribution lie far closer than walks alone do to the real set.
    walks = [i for i, c in enumerate(captions) if "walks" in c]
    only_walks = evaluator.embed_motion(generated[walks], lengths[walks])
    assert 3 * report["fid"] < fid(only_walks, evaluator.embed_motion(real, real_lengths))
    same = evaluate(real, real_lengths, real_captions, real, real_lengths, real_captions,
                    evaluator, kinematic=False)  # fmt: skip
    assert same["fid"] == pytest.approx(0.0, abs=1e-6)
    assert same["r_precision_top1"] == same["real_r_precision_top1"]


def test_training_writes_an_evaluator_that_loads(tmp_path):
    logged: list[str] = []
    train_evaluator(tmp_path / "evaluator", steps=2, count=24, held_out=12, log=logged.append)
    model = load_evaluator(tmp_path / "evaluator")
    assert isinstance(model, MotionEvaluator)
    assert any("r_precision_top1" in line for line in logged)
    assert float(model.std.min()) > 0  # the training set's statistics were kept
    assert main(["--train-evaluator", str(tmp_path / "cli"), "--steps", "1", "--count", "12",
                 "--held-out", "12"]) == 0  # fmt: skip
    assert (tmp_path / "cli" / "model.safetensors").is_file()
