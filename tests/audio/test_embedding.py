"""Behaviour of polydiff.audio.embedding: FAD under an audio model from a local folder.

The models are tiny ones the tests build and save (random weights, nothing downloaded): a
Wav2Vec2 encoder with its feature extractor, and a transformers CLAP.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from polydiff.audio.clap import load_clap
from polydiff.audio.embedding import (
    AudioEmbeddingModel,
    ClapAudioEmbedding,
    TransformersAudioEmbedding,
    frechet_audio_distance,
    load_audio_embedding_model,
)

transformers = pytest.importorskip("transformers")

RATE = 16_000


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def wav2vec2_folder(tmp_path_factory) -> Path:
    """A one-layer Wav2Vec2 (8-d hidden states, 10 ms frames at 16 kHz)."""
    folder = tmp_path_factory.mktemp("tiny_wav2vec2")
    config = transformers.Wav2Vec2Config(
        hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        conv_dim=(8, 8), conv_stride=(10, 16), conv_kernel=(10, 16),
        num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.Wav2Vec2Model(config).save_pretrained(folder)
    transformers.Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=RATE, padding_value=0.0, do_normalize=True
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def wav2vec2(wav2vec2_folder) -> AudioEmbeddingModel:
    return load_audio_embedding_model(wav2vec2_folder)


def tones(n: int, seed: int, seconds: float = 0.5) -> torch.Tensor:
    """(n, S) sine tones of random pitch (200-2000 Hz, log-uniform), phase and level."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * RATE)) / RATE
    freq = 200 * 10 ** torch.rand(n, 1, generator=g)
    phase = 2 * torch.pi * torch.rand(n, 1, generator=g)
    level = 0.2 + 0.6 * torch.rand(n, 1, generator=g)
    return level * torch.sin(2 * torch.pi * freq * t + phase)


def noise(n: int, seed: int, seconds: float = 0.5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.3 * torch.randn(n, int(seconds * RATE), generator=g)


def test_a_transformers_audio_folder_gives_mean_pooled_hidden_states(wav2vec2, wav2vec2_folder):
    assert isinstance(wav2vec2, TransformersAudioEmbedding)
    assert isinstance(wav2vec2, AudioEmbeddingModel) and wav2vec2.sample_rate == RATE
    waves = tones(3, seed=0)
    emb = wav2vec2.embed(waves, RATE)
    assert emb.shape == (3, 8) and emb.dtype == torch.float32
    model = transformers.Wav2Vec2Model.from_pretrained(wav2vec2_folder).eval()
    normalised = (waves - waves.mean(1, keepdim=True)) / (waves.std(1, keepdim=True) + 1e-7)
    with torch.no_grad():
        expected = model(normalised).last_hidden_state.mean(dim=1)
    torch.testing.assert_close(emb, expected, atol=1e-4, rtol=1e-4)
    assert load_audio_embedding_model(str(wav2vec2_folder)) is wav2vec2


def test_waves_are_resampled_and_may_differ_in_length(wav2vec2):
    waves = tones(2, seed=1)
    at_48k = torch.nn.functional.interpolate(waves[:, None], scale_factor=3, mode="linear")[:, 0]
    # Linear interpolation is not the resampler's filter: close, not equal.
    torch.testing.assert_close(
        wav2vec2.embed(at_48k, 48_000), wav2vec2.embed(waves, RATE), atol=0.05, rtol=0.05
    )
    mixed = wav2vec2.embed([waves[0], waves[1, :2_000]], RATE)
    torch.testing.assert_close(mixed[0], wav2vec2.embed(waves[:1], RATE)[0])
    assert mixed.shape == (2, 8)


def test_fad_is_zero_for_the_same_sounds_and_grows_with_the_difference(wav2vec2):
    # 48 sounds a set for 8-d embeddings: the covariances are estimated well enough that an
    # untrained encoder's features already tell tones from noise.
    a, b, c = tones(48, seed=2), tones(48, seed=3), noise(48, seed=4)
    same = frechet_audio_distance(wav2vec2, a, a, RATE, batch_size=20)
    assert same == pytest.approx(0.0, abs=1e-6)
    other_tones = frechet_audio_distance(wav2vec2, a, b, RATE)
    tones_vs_noise = frechet_audio_distance(wav2vec2, a, c, RATE)
    assert 0 < 2 * other_tones < tones_vs_noise
    # Batching does not change the embeddings.
    assert frechet_audio_distance(wav2vec2, a, c, RATE, batch_size=7) == pytest.approx(
        tones_vs_noise, rel=1e-6
    )


def test_fad_needs_two_sounds_a_set(wav2vec2):
    with pytest.raises(ValueError, match="waves_b: FAD needs at least 2 sounds"):
        frechet_audio_distance(wav2vec2, tones(3, seed=0), tones(1, seed=0), RATE)
    with pytest.raises(ValueError, match="batch_size"):
        frechet_audio_distance(wav2vec2, tones(3, seed=0), tones(3, seed=1), RATE, batch_size=0)


def test_a_clap_folder_embeds_with_its_audio_branch(tmp_path):
    from tokenizers.pre_tokenizers import ByteLevel

    folder = tmp_path / "clap"
    folder.mkdir()
    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])}
    vocab |= {t: i + 5 for i, t in enumerate(sorted(ByteLevel.alphabet()))}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.RobertaTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt")
    )
    config = transformers.ClapConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "intermediate_size": 37,
                     "max_position_embeddings": 80, "projection_dim": 8},
        audio_config={"num_mel_bins": 16, "spec_size": 64, "depths": [1, 1],
                      "num_attention_heads": [2, 2], "patch_embeds_hidden_size": 16,
                      "hidden_size": 32, "window_size": 4, "projection_dim": 8},
        projection_dim=8,
    )  # fmt: skip
    transformers.ClapModel(config).save_pretrained(folder)
    features = transformers.ClapFeatureExtractor(
        feature_size=16, max_length_s=1, fft_window_size=512, truncation="rand_trunc"
    )
    transformers.ClapProcessor(feature_extractor=features, tokenizer=tokenizer).save_pretrained(
        folder
    )
    model = load_audio_embedding_model(folder)
    assert isinstance(model, ClapAudioEmbedding) and model.sample_rate == 48_000
    waves = tones(3, seed=5)
    emb = model.embed(waves, RATE)
    torch.testing.assert_close(emb, load_clap(folder).embed_audio(waves, RATE))
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    assert frechet_audio_distance(model, waves, waves, RATE) == pytest.approx(0.0, abs=1e-6)


def test_missing_and_unusable_models_are_one_line(tmp_path, wav2vec2_folder):
    with pytest.raises(FileNotFoundError, match="audio embedding model not found: .*nowhere"):
        load_audio_embedding_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    no_extractor = tmp_path / "no_extractor"
    no_extractor.mkdir()
    (no_extractor / "config.json").write_text((wav2vec2_folder / "config.json").read_text())
    (tmp_path / "notes.txt").write_text("hello")
    for path in (tmp_path / "empty", no_extractor, tmp_path / "notes.txt"):
        with pytest.raises(ValueError, match="is not an audio embedding model"):
            load_audio_embedding_model(path)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        (no_weights / name).write_text((wav2vec2_folder / name).read_text())
    with pytest.raises(ValueError, match="cannot load the audio model") as info:
        load_audio_embedding_model(no_weights)
    assert "\n" not in str(info.value)
