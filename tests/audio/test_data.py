"""Sounds into shards and back: FLAC bytes in the shards, WAV / OGG / MP3 / FLAC folders with
captions, unusable files skipped and counted by reason, decoding to fixed-size log-mel
segments (mono mix, resampling, random crops, padding with a valid mask)."""

from __future__ import annotations

import io
import random
from collections import Counter

import numpy as np
import pytest
import soundfile as sf
import torch

from polydiff.audio import data
from polydiff.audio.mel import MelSettings
from polydiff.audio.synthetic import sounds
from polydiff.core.data import Skip, iter_shard, write_shards

MEL = MelSettings()


def _tone(hz: float, seconds: float, rate: int, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def _dominant_hz(wave: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.fft.rfftfreq(len(wave), 1 / rate)[spectrum.argmax()])


def _flac_wave(sample: dict) -> torch.Tensor:
    return torch.from_numpy(sf.read(io.BytesIO(sample["flac"]), dtype="float32")[0])


def _sample(wave: np.ndarray, rate: int, caption: str = "a tone", key: str = "x") -> dict:
    buffer = io.BytesIO()
    sf.write(buffer, wave, rate, format="FLAC", subtype="PCM_16")
    return {"__key__": key, "flac": buffer.getvalue(), "txt": caption}


def test_shards_round_trip_flac_bytes_to_log_mel_segments(tmp_path):
    written = list(sounds(12, seed=0))
    summary = write_shards(iter(written), tmp_path / "shards", maxcount=8)
    assert summary.written == 12 and summary.counts == [8, 4]
    stored = [s for path in summary.shards for s in iter_shard(path)]
    assert [s["flac"] for s in stored] == [s["flac"] for s in written]  # encoded, not decoded
    frames = MEL.frames_for_seconds(1.0)  # 63 frames of a 2 s clip: a random crop
    out = data.decode(stored[0], MEL, frames, random.Random(0), with_wave=True)
    assert out["mel"].shape == (64, frames) and out["mel"].dtype == torch.float32
    assert out["valid"].shape == (frames,) and bool(out["valid"].all())
    assert out["wave"].shape == (MEL.samples(frames),)
    assert out["caption"] == written[0]["txt"]
    assert torch.allclose(out["mel"], MEL.log_mel(out["wave"]))
    start = data.decode(stored[0], MEL, frames, None)["mel"]  # no rng: from the start
    assert torch.equal(start, data.decode(stored[0], MEL, frames, None)["mel"])
    assert torch.equal(start, MEL.log_mel(_flac_wave(stored[0])[: MEL.samples(frames)]))
    crops = [data.decode(stored[0], MEL, frames, random.Random(s))["mel"] for s in range(3)]
    assert not any(torch.equal(start, crop) for crop in crops)  # random starts


def test_folder_of_wav_ogg_mp3_and_flac_becomes_16_bit_flac_samples(tmp_path):
    tone = _tone(440, 0.5, 22_050)
    sf.write(tmp_path / "a.wav", tone, 22_050, subtype="PCM_16")
    sf.write(tmp_path / "b.ogg", tone, 22_050, format="OGG", subtype="VORBIS")
    sf.write(tmp_path / "c.mp3", tone, 22_050, format="MP3", subtype="MPEG_LAYER_III")
    sf.write(tmp_path / "d.flac", tone, 22_050, subtype="PCM_16")
    (tmp_path / "sub").mkdir()
    sf.write(tmp_path / "sub" / "e.flac", tone, 22_050, subtype="PCM_24")
    (tmp_path / "a.txt").write_text("a wav tone\n")
    (tmp_path / "captions.csv").write_text(
        "file,caption\nb.ogg,an ogg tone\nc.mp3,an mp3 tone\nd.flac,a flac tone\n"
        "sub/e.flac,a deep flac tone\n"
    )
    samples = list(data.folder_source(tmp_path))
    assert [s["__key__"] for s in samples] == ["a", "b", "c", "d", "sub/e"]
    assert [s["txt"] for s in samples] == [
        "a wav tone", "an ogg tone", "an mp3 tone", "a flac tone", "a deep flac tone"
    ]  # fmt: skip
    for sample in samples:
        assert set(sample) == {"__key__", "flac", "txt", "json"}
        info = sf.info(io.BytesIO(sample["flac"]))
        assert (info.format, info.subtype, info.samplerate) == ("FLAC", "PCM_16", 22_050)
        meta = sample["json"]
        assert (meta["sample_rate"], meta["channels"]) == (22_050, 1)
        assert abs(meta["duration"] - 0.5) < 0.06 and meta["frames"] == info.frames
        wave, _ = sf.read(io.BytesIO(sample["flac"]), dtype="float32")
        assert abs(_dominant_hz(wave, 22_050) - 440) < 5
    assert samples[3]["flac"] == (tmp_path / "d.flac").read_bytes()  # 16-bit FLAC kept as is
    assert samples[0]["json"]["file"] == "a.wav" and samples[4]["json"]["file"] == "sub/e.flac"
    wav_back, _ = sf.read(io.BytesIO(samples[0]["flac"]), dtype="int16")
    assert np.array_equal(wav_back, sf.read(tmp_path / "a.wav", dtype="int16")[0])  # lossless


def test_unusable_sounds_are_skipped_and_counted_by_reason(tmp_path):
    rate = 16_000
    sf.write(tmp_path / "good.wav", _tone(440, 0.5, rate), rate)
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVE" + b"garbage" * 40)
    sf.write(tmp_path / "silent.wav", np.zeros(rate // 2, np.float32), rate)
    broken = _tone(440, 0.5, rate)
    broken[100] = np.nan
    sf.write(tmp_path / "nan.wav", broken, rate, subtype="FLOAT")
    sf.write(tmp_path / "short.wav", _tone(440, 0.05, rate), rate)
    sf.write(tmp_path / "lonely.wav", _tone(440, 0.5, rate), rate)  # no caption
    captions = ["good", "corrupt", "silent", "nan", "short"]
    (tmp_path / "captions.csv").write_text(
        "file,caption\n" + "".join(f"{name}.wav,{name}\n" for name in captions)
    )
    items = list(data.folder_source(tmp_path))
    skips = {s.key: s.reason for s in items if isinstance(s, Skip)}
    assert skips["silent"] == "silent audio"
    assert skips["nan"] == "non-finite samples"
    assert skips["short"] == "too short (0.05 s < 0.10 s)"
    assert skips["corrupt"].startswith("unreadable audio (") and skips["lonely"] == "no caption"
    summary = write_shards(iter(items), tmp_path / "shards")
    assert summary.written == 1
    assert Counter(summary.skipped) == Counter({reason: 1 for reason in skips.values()})

    # The minimum duration is a parameter; uncaptioned sounds can be kept with caption "".
    keys = {s["__key__"]: s["txt"] for s in data.folder_source(
        tmp_path, require_caption=False, min_seconds=0.01
    ) if not isinstance(s, Skip)}  # fmt: skip
    assert keys == {"good": "good", "short": "short", "lonely": ""}


def test_probe_counts_decoded_samples_and_explains_refusals():
    payload = _sample(_tone(300, 0.75, 8_000), 8_000)["flac"]
    assert data.probe(payload) == {
        "sample_rate": 8_000, "channels": 1, "frames": 6_000, "duration": 0.75
    }  # fmt: skip
    with pytest.raises(ValueError, match="too short"):
        data.probe(payload, min_seconds=1.0)
    with pytest.raises(ValueError, match=r"^[^\n]+$"):  # one line
        data.probe(b"not audio at all")


def test_stereo_is_kept_in_the_shard_and_mixed_to_mono_when_decoded(tmp_path):
    left, right = _tone(440, 1.0, 16_000, 0.6), _tone(1000, 1.0, 16_000, 0.2)
    sf.write(tmp_path / "stereo.wav", np.stack([left, right], axis=1), 16_000)
    (tmp_path / "stereo.txt").write_text("two tones")
    (sample,) = data.folder_source(tmp_path)
    assert sample["json"]["channels"] == 2 and sf.info(io.BytesIO(sample["flac"])).channels == 2
    out = data.decode(sample, MEL, MEL.frames(16_000), None, with_wave=True)
    expected = torch.from_numpy((left + right) / 2)[: out["wave"].shape[0]]
    assert torch.allclose(out["wave"], expected, atol=1e-4)  # 16-bit steps


def test_44_1_khz_is_resampled_to_16_khz_and_keeps_its_pitch(tmp_path):
    sf.write(tmp_path / "tone.wav", _tone(1000, 1.0, 44_100), 44_100)
    wave = data.load_wave(tmp_path / "tone.wav", MEL)
    assert wave.shape == (16_000,) and wave.dtype == torch.float32
    assert abs(_dominant_hz(wave.numpy(), 16_000) - 1000) < 2
    sample = {"__key__": "t", "wav": (tmp_path / "tone.wav").read_bytes(), "txt": "a tone"}
    out = data.decode(sample, MEL, 32, None)
    band = int(out["mel"].mean(dim=1).argmax())
    centres = MEL.mel_filters().argmax(dim=0).float() * MEL.sample_rate / MEL.n_fft
    assert abs(float(centres[band]) - 1000) < 100


def test_short_sounds_are_zero_padded_with_a_valid_mask_and_exact_silence():
    sample = _sample(_tone(440, 0.5, 16_000), 16_000)
    frames = MEL.frames_for_seconds(2.0)  # 126 frames: 32000 samples
    out = data.decode(sample, MEL, frames, random.Random(0), with_wave=True)
    real = sum(1 for i in range(frames) if i * MEL.hop_length < 8_000)  # 32 frames
    assert out["valid"].tolist() == [1.0] * real + [0.0] * (frames - real)
    assert bool((out["mel"][:, real:] == MEL.silence).all())
    assert bool((out["mel"][:, : real - 2] > MEL.silence + 1).any())
    assert out["wave"].shape == (32_000,) and bool((out["wave"][8_000:] == 0).all())


def test_corrupt_payloads_and_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="sample 'bad': unreadable audio"):
        data.decode({"__key__": "bad", "flac": b"garbage" * 20}, MEL, 16, None)
    with pytest.raises(ValueError, match="sample 'none' has no audio field"):
        data.decode({"__key__": "none", "txt": "x"}, MEL, 16, None)
    with pytest.raises(FileNotFoundError, match="audio file not found"):
        data.read_audio(tmp_path / "missing.wav")
    (tmp_path / "junk.wav").write_bytes(b"junk" * 10)
    with pytest.raises(ValueError, match="cannot read audio .*junk.wav"):
        data.load_wave(tmp_path / "junk.wav", MEL)
    samples, rate = data.read_audio(_sample(_tone(440, 0.2, 8_000), 8_000)["flac"])
    assert samples.shape == (1, 1_600) and samples.dtype == np.float32 and rate == 8_000
