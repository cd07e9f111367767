"""Writing sounds: 16-bit WAV and FLAC at the right rate and length, clipped to full scale,
the provenance record embedded and beside the file, atomic writes, mel spectrogram PNGs."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from polydiff.audio.export import (
    AUDIO_OUTPUT_SUFFIXES,
    WAV_STRING_BYTES,
    mel_png,
    save_sounds,
    write_audio,
)
from polydiff.audio.mel import MelSettings

RECORD = {
    "format": "polydiff-provenance/1",
    "modality": "audio",
    "prompt": "a low sine tone, leise – 低い",
    "seed": 0,
    "polydiff_version": "0.1.0",
    "created": "2025-01-31T12:00:00Z",
}


def _wave(seconds: float = 0.25, rate: int = 16_000) -> torch.Tensor:
    t = torch.arange(round(seconds * rate)) / rate
    return 0.5 * torch.sin(2 * torch.pi * 220 * t)


@pytest.mark.parametrize("suffix,container", [(".wav", "WAV"), (".flac", "FLAC")])
def test_wav_and_flac_are_16_bit_at_the_right_rate_with_provenance(tmp_path, suffix, container):
    wave = _wave(rate=22_050)
    path = write_audio(wave, tmp_path / f"out{suffix}", 22_050, metadata=RECORD)
    assert path == tmp_path / f"out{suffix}"
    info = sf.info(path)
    assert (info.format, info.subtype, info.samplerate, info.channels) == (
        container, "PCM_16", 22_050, 1
    )  # fmt: skip
    back, _ = sf.read(path, dtype="float32")
    assert back.shape == (wave.shape[0],) and np.abs(back - wave.numpy()).max() < 1e-4
    with sf.SoundFile(path) as sound:
        assert json.loads(sound.comment) == RECORD
        assert sound.title == RECORD["prompt"] and sound.software.startswith("polydiff 0.1.0")
    assert json.loads((tmp_path / f"out{suffix}.json").read_text(encoding="utf-8")) == RECORD
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"out{suffix}", f"out{suffix}.json"]


def test_samples_beyond_full_scale_are_clipped_not_wrapped(tmp_path):
    path = write_audio(np.array([1.7, -3.0, 0.5, 0.0] * 100), tmp_path / "loud.wav", 8_000)
    back, _ = sf.read(path, dtype="int16")
    assert back[:4].tolist() == [32767, -32768, 16384, 0]
    assert not (tmp_path / "loud.wav.json").exists()  # no record, no sidecar


def test_a_record_too_long_for_wav_info_points_at_the_sidecar(tmp_path):
    record = {**RECORD, "prompt": "a very long prompt " * 200}
    wav = write_audio(_wave(), tmp_path / "long.wav", 16_000, metadata=record)
    flac = write_audio(_wave(), tmp_path / "long.flac", 16_000, metadata=record)
    with sf.SoundFile(wav) as sound:
        assert sound.comment == "polydiff provenance: see long.wav.json"
        assert record["prompt"].startswith(sound.title) and len(sound.title) <= WAV_STRING_BYTES
    with sf.SoundFile(flac) as sound:
        assert json.loads(sound.comment) == record
    assert json.loads((tmp_path / "long.wav.json").read_text()) == record


def test_failed_writes_leave_nothing_behind(tmp_path):
    with pytest.raises(ValueError, match=r"cannot write '\.mp3' audio; use one of \.wav, \.flac"):
        write_audio(_wave(), tmp_path / "out.mp3", 16_000)
    with pytest.raises(ValueError, match="NaN"):
        write_audio(torch.tensor([0.0, float("nan")]), tmp_path / "nan.wav", 16_000)
    (tmp_path / "keep.wav").write_bytes(b"old")
    with pytest.raises(ValueError, match="sample_rate"):
        write_audio(_wave(), tmp_path / "keep.wav", 0)
    (tmp_path / "taken.flac").mkdir()  # fails at the rename, after the samples are written
    with pytest.raises(OSError):
        write_audio(_wave(), tmp_path / "taken.flac", 16_000, metadata=RECORD)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.wav", "taken.flac"]
    assert (tmp_path / "keep.wav").read_bytes() == b"old"
    assert list((tmp_path / "taken.flac").iterdir()) == []


def test_an_unwritable_folder_is_refused_and_left_empty(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores permissions
            pytest.skip("cannot make an unwritable folder as this user")
        with pytest.raises(PermissionError):
            write_audio(_wave(), locked / "out.flac", 16_000, metadata=RECORD)
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


def test_save_sounds_writes_one_file_per_wave(tmp_path):
    waves = [_wave(0.1), _wave(0.2)]
    records = [{**RECORD, "index": i} for i in range(2)]
    paths = save_sounds(waves, tmp_path / "take.flac", 16_000, records)
    assert [p.name for p in paths] == ["take_0.flac", "take_1.flac"]
    assert [sf.info(p).frames for p in paths] == [1_600, 3_200]
    assert json.loads((tmp_path / "take_1.flac.json").read_text())["index"] == 1
    mixed = save_sounds(waves, [tmp_path / "a.wav", tmp_path / "b.flac"], 16_000)
    assert [sf.info(p).format for p in mixed] == ["WAV", "FLAC"]
    with pytest.raises(ValueError, match="2 paths for 1 sounds"):
        save_sounds(waves[:1], [tmp_path / "c.wav", tmp_path / "d.wav"], 16_000)
    with pytest.raises(ValueError, match="cannot write '.ogg'"):
        save_sounds(waves, [tmp_path / "e.wav", tmp_path / "f.ogg"], 16_000)
    assert not (tmp_path / "e.wav").exists()  # checked before anything is written
    assert AUDIO_OUTPUT_SUFFIXES == (".wav", ".flac")


def test_mel_png_draws_low_frequencies_at_the_bottom(tmp_path):
    mel = MelSettings()
    log_mel = torch.full((mel.n_mels, 80), mel.silence)
    log_mel[2] = 0.0  # one loud low band
    path = mel_png(log_mel, tmp_path / "spec.png", mel, title="a low sine tone")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 200 and image.height > 150
        pixels = np.asarray(image.convert("RGB")).astype(int)
    yellow = (pixels[..., 0] > 200) & (pixels[..., 2] < 220)  # magma's loudest, not white
    rows = np.nonzero(yellow.sum(axis=1) > 0.3 * pixels.shape[1])[0]  # the loud band
    assert len(rows) and rows.mean() > 0.6 * pixels.shape[0]  # in the lower part
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.png"]
    with pytest.raises(ValueError, match=r"\(64, F\)"):
        mel_png(torch.zeros(10, 5), tmp_path / "bad.png", mel)
    with pytest.raises(ValueError, match=".png"):
        mel_png(log_mel, tmp_path / "spec.jpg", mel)
