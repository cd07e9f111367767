"""Guo et al.'s HumanML3D evaluator (polydiff.motion.guo) on tiny fabricated releases: the
networks' state-dict keys match the released checkpoint, the files load safely (a pickle that
names a global is refused before anything runs), captions become word/POS tokens, and the
embeddings plug into the protocol's metrics."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from polydiff.motion.features import joints_to_features
from polydiff.motion.guo import (
    POS_TAGS,
    GuoEvaluator,
    MotionEncoderBiGRUCo,
    MovementConvEncoder,
    TextEncoderBiGRUCo,
    WordVectorizer,
    load_plain_pickle,
    pos_tokens,
)
from polydiff.motion.metrics import diversity, evaluate, fid, r_precision
from polydiff.motion.synthetic import CAPTIONS, render

WORDS = ["sos", "eos", "unk", "person", "walk"]
WORD_DIM = 8


def _gru_keys(prefix: str = "gru") -> set[str]:
    return {f"{prefix}.{kind}_{part}_l0{suffix}" for kind in ("weight", "bias")
            for part in ("ih", "hh") for suffix in ("", "_reverse")}  # fmt: skip


def _release(root: Path, seed: int = 0) -> Path:
    """A Guo evaluator folder with small random networks and a 5-word vocabulary."""
    rng = np.random.default_rng(seed)
    (root / "glove").mkdir(parents=True)
    (root / "meta").mkdir()
    (root / "model").mkdir()
    np.save(root / "glove/our_vab_data.npy", rng.normal(size=(5, WORD_DIM)).astype(np.float32))
    (root / "glove/our_vab_words.pkl").write_bytes(pickle.dumps(WORDS))
    (root / "glove/our_vab_idx.pkl").write_bytes(pickle.dumps({w: i for i, w in enumerate(WORDS)}))
    np.save(root / "meta/mean.npy", rng.normal(scale=0.1, size=263).astype(np.float32))
    np.save(root / "meta/std.npy", rng.uniform(0.5, 1.5, size=263).astype(np.float32))
    torch.manual_seed(seed)
    record = {
        "text_encoder": TextEncoderBiGRUCo(WORD_DIM, 15, 6, 5).state_dict(),
        "movement_encoder": MovementConvEncoder(259, 8, 7).state_dict(),
        "motion_encoder": MotionEncoderBiGRUCo(7, 6, 5).state_dict(),
        "epoch": 3,
    }
    torch.save(record, root / "model/finest.tar")
    return root


@pytest.fixture
def release(tmp_path) -> Path:
    return _release(tmp_path / "t2m")


def _features(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [joints_to_features(render(CAPTIONS[i % 12], rng)) for i in range(count)]


# --- the networks match the released checkpoint ----------------------------------------------


def test_the_networks_have_the_released_checkpoints_keys_and_sizes():
    text = TextEncoderBiGRUCo().state_dict()
    head = {f"output_net.{i}.{p}" for i in (0, 1, 3) for p in ("weight", "bias")}
    expected_text = {"pos_emb.weight", "pos_emb.bias", "input_emb.weight", "input_emb.bias",
                     "hidden"} | _gru_keys() | head  # fmt: skip
    assert set(text) == expected_text
    assert text["pos_emb.weight"].shape == (300, 15)
    assert text["hidden"].shape == (2, 1, 512)
    assert text["output_net.3.weight"].shape == (512, 512)
    movement = MovementConvEncoder().state_dict()
    assert set(movement) == {"main.0.weight", "main.0.bias", "main.3.weight", "main.3.bias",
                             "out_net.weight", "out_net.bias"}  # fmt: skip
    assert movement["main.0.weight"].shape == (512, 259, 4)
    motion = MotionEncoderBiGRUCo().state_dict()
    assert set(motion) == {"input_emb.weight", "input_emb.bias", "hidden"} | _gru_keys() | head
    assert motion["input_emb.weight"].shape == (1024, 512)
    assert motion["output_net.0.weight"].shape == (1024, 2048)


def test_the_part_of_speech_order_is_the_evaluators():
    assert POS_TAGS[:3] == ("VERB", "NOUN", "DET") and POS_TAGS[-1] == "OTHER"
    assert len(POS_TAGS) == 15


# --- loading a release -------------------------------------------------------------------------


def test_a_release_loads_and_embeds_captions_and_motions(release):
    guo = GuoEvaluator.from_folder(release)
    text = guo.embed_text(["a person walks forward", "a person jumps"])
    assert text.shape == (2, 5) and torch.isfinite(text).all()
    assert not torch.allclose(text[0], text[1])
    motion = guo.embed_motion(_features(3))
    assert motion.shape == (3, 5) and torch.isfinite(motion).all()
    assert torch.allclose(guo.embed_text(["a person walks forward"])[0], text[0], atol=1e-6)


def test_the_vectorizer_uses_vip_tags_and_unk_for_unknown_words(release):
    words = WordVectorizer.from_folder(release / "glove")
    vector, tag = words["walk/VERB"]
    assert POS_TAGS[int(tag.argmax())] == "Act_VIP"  # a VIP word takes its list's tag
    assert np.array_equal(vector, words.vectors[WORDS.index("walk")])
    _, tag = words["person/NOUN"]
    assert POS_TAGS[int(tag.argmax())] == "NOUN"
    vector, tag = words["forward/ADV"]  # not in the 5 words
    assert np.array_equal(vector, words.vectors[WORDS.index("unk")])
    assert POS_TAGS[int(tag.argmax())] == "OTHER"
    vectors, tags, length = words.encode(["a/DET", "person/NOUN"])
    assert vectors.shape == (22, WORD_DIM) and tags.shape == (22, 15) and length == 4


def test_text_embeddings_are_the_text_encoder_run_on_sos_tokens_eos(release):
    guo = GuoEvaluator.from_folder(release)
    vectors, tags, length = guo.vectorizer.encode(["a/DET", "person/NOUN", "walk/VERB"])
    by_hand = guo.text_encoder(torch.from_numpy(vectors)[None], torch.from_numpy(tags)[None],
                               torch.tensor([length]))  # fmt: skip
    assert torch.allclose(guo.embed_text(["a person walks"]), by_hand)
    assert torch.allclose(guo.embed_text(["a/DET person/NOUN walk/VERB"]), by_hand)
    assert torch.allclose(guo.embed_text([["a/DET", "person/NOUN", "walk/VERB"]]), by_hand)


def test_motion_embeddings_use_whole_units_of_four_frames(release):
    guo = GuoEvaluator.from_folder(release)
    features = _features(1)[0]
    full = guo.embed_motion([features[:42]])
    assert torch.allclose(full, guo.embed_motion([features[:40]]), atol=1e-6)
    x = torch.zeros(1, 196, 259)  # normalised, then zero-padded to the protocol's 196 frames
    x[0, :40] = ((torch.from_numpy(features[:40]) - guo.mean) / guo.std)[:, :259]
    movements = guo.movement_encoder(x)
    by_hand = guo.motion_encoder(movements, torch.tensor([10]))
    assert torch.allclose(full, by_hand, atol=1e-6)
    with pytest.raises(ValueError, match="at least 4 frames"):
        guo.embed_motion([features[:3]])


def test_embeddings_plug_into_the_protocols_metrics(release):
    guo = GuoEvaluator.from_folder(release)
    captions = [CAPTIONS[i % 12] for i in range(24)]
    motion, text = guo.embed_motion(_features(24)), guo.embed_text(captions)
    assert 0.0 <= r_precision(motion, text, captions)[3] <= 1.0
    assert fid(motion, motion) == pytest.approx(0.0, abs=1e-6)
    assert diversity(motion) > 0.0
    report = evaluate(_features(24), None, captions, _features(24, seed=1), None, captions,
                      guo, kinematic=False)  # fmt: skip
    assert np.isfinite(report["fid"]) and 0.0 <= report["real_r_precision_top1"] <= 1.0


# --- refusing what is not plain data -------------------------------------------------------------


class _Runs:
    """Unpickling this would run a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_naming_a_global_is_refused_in_one_line(release):
    (release / "glove/our_vab_words.pkl").write_bytes(pickle.dumps(os.system))
    with pytest.raises(ValueError, match=r"global .*system") as caught:
        GuoEvaluator.from_folder(release)
    assert "\n" not in str(caught.value)


def test_a_pickle_that_would_run_code_never_runs_it(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "our_vab_idx.pkl"
    path.write_bytes(pickle.dumps({"walk": _Runs(marker)}))
    with pytest.raises(ValueError, match="refusing"):
        load_plain_pickle(path)
    assert not marker.exists()
    path.write_bytes(pickle.dumps({"walk": 1, "words": ["a", "b"], "n": 2.5}))
    assert load_plain_pickle(path) == {"walk": 1, "words": ["a", "b"], "n": 2.5}


def test_a_checkpoint_that_is_not_weights_only_is_refused_in_one_line(release):
    torch.save({"text_encoder": _Runs(release / "ran")}, release / "model/finest.tar")
    with pytest.raises(ValueError, match="weights-only") as caught:
        GuoEvaluator.from_folder(release)
    assert "\n" not in str(caught.value)
    assert not (release / "ran").exists()


def test_missing_or_mismatched_files_are_named(release, tmp_path):
    with pytest.raises(ValueError, match="no finest.tar"):
        GuoEvaluator.from_folder(tmp_path)
    np.save(release / "meta/mean.npy", np.zeros(250, np.float32))
    with pytest.raises(ValueError, match=r"mean/std must be \(263,\)"):
        GuoEvaluator.from_folder(release)
    (release / "glove/our_vab_words.pkl").write_bytes(pickle.dumps(["walk", "person"]))
    with pytest.raises(ValueError, match="special words"):
        GuoEvaluator.from_folder(release)


# --- plain captions as HumanML3D tokens ---------------------------------------------------------


def test_plain_captions_become_lemmatised_word_pos_tokens():
    assert pos_tokens("a person walks forward") == ["a/DET", "person/NOUN", "walk/VERB",
                                                    "forward/ADV"]  # fmt: skip
    assert pos_tokens("A person waves with the right hand.") == [
        "a/DET", "person/NOUN", "wave/VERB", "with/ADP", "the/DET", "right/ADJ", "hand/NOUN"
    ]  # fmt: skip
    assert pos_tokens("someone is running, then sits on two chairs") == [
        "someone/PRON", "is/AUX", "run/VERB", "then/ADV", "sit/VERB", "on/ADP", "two/NUM",
        "chair/NOUN",
    ]  # fmt: skip
    assert pos_tokens("he gives a wave")[2:] == ["a/DET", "wave/NOUN"]  # after a determiner


def test_tokens_that_are_not_word_pos_pairs_are_refused(release):
    guo = GuoEvaluator.from_folder(release)
    with pytest.raises(ValueError, match="word/POS"):
        guo.embed_text([["a", "person"]])
