"""Behaviour of polydiff.audio.clap: CLAP text and audio embeddings from local files, offline.

Every model here is a tiny one the tests build and save (nothing is downloaded): a
transformers ``ClapModel`` + ``ClapProcessor`` folder, and, where laion-clap is installed, a
LAION ``.pt`` checkpoint of an untrained ``CLAP_Module`` with a tiny local RoBERTa folder.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
import torchaudio

from polydiff.audio.clap import (
    ClapConditioner,
    ClapEmbedder,
    LaionClap,
    TransformersClap,
    build_laion_module,
    clap_scores,
    load_clap,
    rerank,
)
from polydiff.core.modality.conditioning import Conditioner, conditioned_batch

transformers = pytest.importorskip("transformers")

PROMPTS = ["a dog barks", "heavy rain on a tin roof", "a dog barks"]
DIM = 16  # the tiny transformers model's projection width


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def write_byte_level_tokenizer(folder: Path) -> transformers.RobertaTokenizer:
    """A RoBERTa tokenizer whose vocabulary is the 256 byte-level symbols (no merges)."""
    from tokenizers.pre_tokenizers import ByteLevel

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    vocab = {token: i for i, token in enumerate(specials + sorted(ByteLevel.alphabet()))}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return transformers.RobertaTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


def tone(freq: float, seconds: float, rate: int = 16_000) -> torch.Tensor:
    t = torch.arange(int(seconds * rate)) / rate
    return 0.5 * torch.sin(2 * torch.pi * freq * t)


@pytest.fixture(scope="session")
def clap_folder(tmp_path_factory) -> Path:
    """A tiny transformers CLAP (RoBERTa text, HTS-AT audio, 16-d space, 1 s window)."""
    folder = tmp_path_factory.mktemp("tiny_clap")
    tokenizer = write_byte_level_tokenizer(folder)
    features = transformers.ClapFeatureExtractor(
        feature_size=16, sampling_rate=48_000, hop_length=480, max_length_s=1,
        fft_window_size=512, truncation="rand_trunc",
    )  # fmt: skip
    text = transformers.ClapTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=37, max_position_embeddings=80, projection_dim=DIM,
    )  # fmt: skip
    audio = transformers.ClapAudioConfig(
        num_mel_bins=16, spec_size=64, patch_size=4, patch_stride=4, depths=[1, 1],
        num_attention_heads=[2, 2], patch_embeds_hidden_size=16, hidden_size=32,
        window_size=4, mlp_ratio=2.0, projection_dim=DIM,
    )  # fmt: skip
    config = transformers.ClapConfig(
        text_config=text.to_dict(), audio_config=audio.to_dict(), projection_dim=DIM
    )
    torch.manual_seed(0)
    transformers.ClapModel(config).save_pretrained(folder)
    transformers.ClapProcessor(feature_extractor=features, tokenizer=tokenizer).save_pretrained(
        folder
    )
    return folder


@pytest.fixture(scope="session")
def clap(clap_folder) -> ClapEmbedder:
    return load_clap(clap_folder)


# --- the transformers path -----------------------------------------------------------------


def test_a_clap_folder_loads_as_a_transformers_embedder(clap, clap_folder):
    assert isinstance(clap, TransformersClap) and isinstance(clap, ClapEmbedder)
    assert (clap.dim, clap.sample_rate) == (DIM, 48_000)
    assert load_clap(str(clap_folder)) is clap  # loaded once per (path, device)


def test_text_embeddings_are_unit_vectors_one_per_prompt(clap):
    emb = clap.embed_text(PROMPTS)
    assert emb.shape == (3, DIM) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(emb[0], emb[2])  # same prompt, same vector
    assert not torch.allclose(emb[0], emb[1])
    # Batching pads shorter prompts; the embedding of a prompt must not depend on it.
    torch.testing.assert_close(clap.embed_text([PROMPTS[0]])[0], emb[0], atol=1e-5, rtol=0)
    assert clap.embed_text([]).shape == (0, DIM)


def test_audio_embeddings_are_unit_vectors_and_resampled_to_48khz(clap):
    waves = torch.stack([tone(440, 0.5), tone(880, 0.5), 0.3 * torch.randn(8_000)])
    emb = clap.embed_audio(waves, 16_000)
    assert emb.shape == (3, DIM) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    assert not torch.allclose(emb[0], emb[2], atol=1e-3)
    at_48k = torchaudio.functional.resample(waves, 16_000, 48_000)
    torch.testing.assert_close(clap.embed_audio(at_48k, 48_000), emb, atol=1e-5, rtol=0)
    torch.testing.assert_close(clap.embed_audio(waves, 16_000), emb)  # deterministic


def test_waves_of_different_lengths_embed_together(clap):
    short, long = tone(440, 0.25), tone(440, 0.75)
    emb = clap.embed_audio([short, long], 16_000)
    assert emb.shape == (2, DIM)
    torch.testing.assert_close(clap.embed_audio(short[None], 16_000)[0], emb[0])


def test_waves_longer_than_the_window_embed_their_middle(clap):
    # The tiny model's window is 1 s: 3 s of sound embed as its middle second, every time.
    rate = 48_000  # no resampling: its filter would blur the edges of the crop
    noise = 0.3 * torch.randn(rate)
    wave = torch.cat([noise, tone(660, 1.0, rate), noise.flip(0)])
    emb = clap.embed_audio(wave[None], rate)
    torch.testing.assert_close(emb, clap.embed_audio(wave[None, rate : 2 * rate], rate))
    torch.testing.assert_close(emb, clap.embed_audio(wave[None], rate))
    assert not torch.allclose(emb, clap.embed_audio(wave[None, :rate], rate), atol=1e-3)


def test_audio_that_is_not_mono_is_refused(clap):
    with pytest.raises(ValueError, match="mono"):
        clap.embed_audio(torch.zeros(2, 2, 100), 16_000)
    with pytest.raises(ValueError, match="sample_rate"):
        clap.embed_audio(torch.zeros(1, 100), 0)


# --- scores and re-ranking -----------------------------------------------------------------


def test_clap_scores_are_the_cosine_of_each_wave_with_its_prompt(clap):
    waves = torch.stack([tone(440, 0.5), 0.3 * torch.randn(8_000)])
    scores = clap_scores(clap, waves, 16_000, PROMPTS[:2])
    audio, text = clap.embed_audio(waves, 16_000), clap.embed_text(PROMPTS[:2])
    expected = torch.nn.functional.cosine_similarity(audio, text, dim=-1)
    torch.testing.assert_close(scores, expected)
    assert scores.shape == (2,) and bool((scores.abs() <= 1 + 1e-6).all())
    with pytest.raises(ValueError, match="2 waves but 3 prompts"):
        clap_scores(clap, waves, 16_000, PROMPTS)


def test_rerank_lists_candidates_best_first(clap):
    torch.manual_seed(1)
    candidates = [tone(f, 0.5) for f in (220, 440, 880)] + [0.3 * torch.randn(8_000)]
    candidates.append(candidates[1])  # a duplicate scores the same, after the original
    order, scores = rerank(clap, torch.stack(candidates), 16_000, "a dog barks")
    assert sorted(order) == list(range(5)) and scores.shape == (5,)
    assert scores[order].tolist() == sorted(scores.tolist(), reverse=True)
    each = clap_scores(clap, torch.stack(candidates), 16_000, ["a dog barks"] * 5)
    torch.testing.assert_close(scores, each, atol=1e-6, rtol=0)
    assert order.index(1) < order.index(4)


# --- the conditioner -----------------------------------------------------------------------


def test_conditioner_encodes_prompts_as_text_embeddings(clap, clap_folder):
    cond = ClapConditioner(str(clap_folder))
    assert isinstance(cond, Conditioner) and cond.dims == (None, DIM)
    out = cond.encode(PROMPTS[:2], torch.device("cpu"), torch.float64)
    assert set(out) == {"pooled"} and out["pooled"].dtype == torch.float64
    torch.testing.assert_close(out["pooled"].float(), clap.embed_text(PROMPTS[:2]))


def test_conditioner_encodes_16khz_waves_as_audio_embeddings(clap, clap_folder):
    cond = ClapConditioner(str(clap_folder), sample_rate=16_000)
    waves = torch.stack([tone(440, 0.5), tone(550, 0.5), 0.3 * torch.randn(8_000)])
    pooled = cond.encode(waves, torch.device("cpu"), torch.float32)["pooled"]
    torch.testing.assert_close(pooled, clap.embed_audio(waves, 16_000))
    as_list = cond.encode(list(waves), torch.device("cpu"), torch.float32)["pooled"]
    torch.testing.assert_close(as_list, pooled)


def test_conditioner_batches_may_mix_captions_and_sounds(clap, clap_folder):
    cond = ClapConditioner(str(clap_folder))
    wave = tone(440, 0.5)
    pooled = cond.encode(["a dog barks", wave], torch.device("cpu"), torch.float32)["pooled"]
    torch.testing.assert_close(pooled[0], clap.embed_text(["a dog barks"])[0])
    torch.testing.assert_close(pooled[1], clap.embed_audio(wave[None], 16_000)[0])
    with pytest.raises(ValueError, match="captions or waves, got int"):
        cond.encode(["a dog barks", 3], torch.device("cpu"), torch.float32)


def test_conditioner_null_is_the_zero_vector_and_cfg_dropout_uses_it(clap_folder):
    cond = ClapConditioner(str(clap_folder))
    null = cond.null(torch.device("cpu"), torch.float32)
    assert set(null) == {"pooled"} and torch.equal(null["pooled"], torch.zeros(1, DIM))
    generator = torch.Generator().manual_seed(0)
    dropped = conditioned_batch(cond, PROMPTS, 1.0, generator, torch.device("cpu"), torch.float32)
    assert torch.equal(dropped["pooled"], torch.zeros(3, DIM))


# --- what is not a CLAP model --------------------------------------------------------------


def test_a_missing_model_is_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="CLAP model not found: .*nowhere"):
        load_clap(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="CLAP model not found"):
        ClapConditioner(str(tmp_path / "nowhere")).null(torch.device("cpu"), torch.float32)


def test_folders_and_files_that_are_not_clap_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    other = tmp_path / "other"
    transformers.RobertaConfig(num_hidden_layers=1).save_pretrained(other)
    (tmp_path / "sound.wav").write_bytes(b"RIFF")
    for path in (tmp_path / "empty", other, tmp_path / "sound.wav"):
        with pytest.raises(ValueError, match="is not a CLAP model folder .* or a LAION .pt"):
            load_clap(path)


def test_a_broken_clap_folder_is_one_line(tmp_path, clap_folder):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((clap_folder / "config.json").read_text())
    with pytest.raises(ValueError, match="cannot load the CLAP model") as info:
        load_clap(broken)
    assert "\n" not in str(info.value)


class Payload:
    """Unpickling this runs ``os.mkdir(marker)``: a stand-in for a malicious checkpoint."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_a_checkpoint_that_would_run_code_is_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    bomb = tmp_path / "bomb.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": Payload(marker)}, bomb)
    with pytest.raises(ValueError, match=r"bomb.pt: refused .*weights_only=True") as info:
        load_clap(bomb)
    assert "\n" not in str(info.value)
    assert not marker.exists()
    torch.load(bomb, weights_only=False)  # the control: a full unpickle does run it
    assert marker.exists()


def test_a_checkpoint_without_a_state_dict_is_refused(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(ValueError, match="not a LAION CLAP checkpoint"):
        load_clap(tmp_path / "tensor.pt")
    torch.save({"state_dict": {"w": torch.zeros(3)}}, tmp_path / "mlp.ckpt")
    with pytest.raises(ValueError, match="mlp.ckpt: cannot tell its audio model"):
        load_clap(tmp_path / "mlp.ckpt")


# --- the LAION path (laion-clap installed without its stale numpy pin) ---------------------

LAION_PROMPTS = ["a dog barks", "rain"]


@pytest.fixture(scope="session")
def roberta_folder(tmp_path_factory) -> Path:
    """A one-layer RoBERTa config (768 wide: laion-clap's projection expects it) and a
    byte-level tokenizer: what laion-clap's hard-coded "roberta-base" needs offline."""
    folder = tmp_path_factory.mktemp("tiny_roberta")
    tokenizer = write_byte_level_tokenizer(folder)
    tokenizer.save_pretrained(folder)
    transformers.RobertaConfig(
        vocab_size=len(tokenizer), hidden_size=768, num_hidden_layers=1, num_attention_heads=12,
        intermediate_size=32, max_position_embeddings=80, pad_token_id=1, bos_token_id=0,
        eos_token_id=2,
    ).save_pretrained(folder)  # fmt: skip
    return folder


@pytest.fixture(scope="session")
def laion_checkpoint(tmp_path_factory, roberta_folder):
    """An HTSAT-tiny CLAP_Module (random weights) saved like a LAION training checkpoint:
    ``{"epoch", "state_dict"}`` with DataParallel's "module." prefix and the
    ``position_ids`` buffer old transformers saved; and its embeddings, to compare."""
    pytest.importorskip("laion_clap")
    torch.manual_seed(0)
    # Weights rounded to float16 and stored so: half the file, and loading must convert.
    module = build_laion_module(roberta_folder).eval().half().float()
    state = {
        f"module.{k}": v.half() if v.is_floating_point() else v
        for k, v in module.model.state_dict().items()
    }
    state["module.text_branch.embeddings.position_ids"] = torch.arange(80)[None]
    path = tmp_path_factory.mktemp("laion") / "clap.pt"
    torch.save({"epoch": 45, "state_dict": state}, path)
    waves = torch.stack([tone(440, 1.0, 48_000), 0.3 * torch.randn(48_000)])
    with torch.no_grad():
        text = module.get_text_embedding(LAION_PROMPTS, use_tensor=True)
        audio = module.get_audio_embedding_from_data(waves, use_tensor=True)
    return path, waves, text, audio


def test_a_laion_checkpoint_loads_offline_with_a_local_roberta(laion_checkpoint, roberta_folder):
    path, waves, text, audio = laion_checkpoint
    start = time.perf_counter()
    clap = load_clap(path, text_model=roberta_folder)
    assert isinstance(clap, LaionClap) and isinstance(clap, ClapEmbedder)
    assert (clap.amodel, clap.enable_fusion) == ("HTSAT-tiny", False)  # read from the weights
    assert (clap.dim, clap.sample_rate) == (512, 48_000)
    # A fresh build has random weights: equal embeddings mean the checkpoint was loaded.
    emb_text = clap.embed_text(LAION_PROMPTS)
    torch.testing.assert_close(emb_text, text, atol=1e-5, rtol=0)
    torch.testing.assert_close(emb_text.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(clap.embed_audio(waves, 48_000), audio, atol=1e-5, rtol=0)
    at_16k = torchaudio.functional.resample(waves, 48_000, 16_000)
    assert clap.embed_audio(at_16k, 16_000).shape == (2, 512)
    assert load_clap(path, text_model=roberta_folder) is clap
    assert time.perf_counter() - start < 30


def test_a_laion_checkpoint_needs_a_usable_roberta(laion_checkpoint, tmp_path):
    path = laion_checkpoint[0]
    with pytest.raises(FileNotFoundError, match="RoBERTa text model folder not found"):
        LaionClap(path, text_model=tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="needs roberta-base's config.json .*empty lacks") as info:
        LaionClap(path, text_model=tmp_path / "empty")
    assert "\n" not in str(info.value)


def test_laion_weights_that_do_not_fit_are_one_line(laion_checkpoint, roberta_folder, tmp_path):
    state = torch.load(laion_checkpoint[0], weights_only=True)["state_dict"]
    partial = {k: v for k, v in state.items() if k.startswith("module.audio_branch.patch")}
    torch.save({"state_dict": partial}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="do not fit laion-clap amodel='HTSAT-tiny'.* missing"):
        load_clap(tmp_path / "partial.pt", text_model=roberta_folder)
