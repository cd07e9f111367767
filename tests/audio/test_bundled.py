"""The bundled audio model (trained by `polydiff train` from shared/configs/audio/vocoder.yaml,
then sounds.yaml) ships in the package and makes the asked-for sound: pitch, its direction, the
beat's rate; its neural vocoder beats Griffin-Lim on held-out sounds."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from polydiff.audio.metrics import (
    median_pitch,
    multi_resolution_stft_distance,
    onset_rate,
    pitch_slope,
    prompt_adherence,
)
from polydiff.audio.pipeline import generate
from polydiff.audio.recipe import AudioRecipe
from polydiff.audio.synthetic import SOUND_CAPTIONS, render
from polydiff.audio.vocoder import GriffinLimVocoder
from polydiff.cli.main import main
from polydiff.core.modality import bundled_checkpoint, load_trained


@pytest.fixture(scope="module")
def made() -> dict[str, list[torch.Tensor]]:
    """Three sounds per caption from the bundled model at its defaults."""
    sounds = generate(list(SOUND_CAPTIONS), num=3, seed=5)
    return {c: [s.wave for s in sounds[3 * i : 3 * i + 3]] for i, c in enumerate(SOUND_CAPTIONS)}


def test_low_tones_are_low_and_high_tones_high(made):
    low = [median_pitch(w, 16_000) for w in made["a low sine tone"]]
    high = [median_pitch(w, 16_000) for w in made["a high sine tone"]]
    assert max(low) < 400 < 700 < min(high), (low, high)
    for shape in ("square", "sawtooth"):  # a harmonic can outshine the fundamental: medians
        low = np.median([median_pitch(w, 16_000) for w in made[f"a low {shape} tone"]])
        high = np.median([median_pitch(w, 16_000) for w in made[f"a high {shape} tone"]])
        assert low < 400 < 700 < high, (shape, low, high)


def test_rising_chirps_rise_and_falling_chirps_fall(made):
    assert all(pitch_slope(w, 16_000) > 0.2 for w in made["a rising chirp"])
    assert all(pitch_slope(w, 16_000) < -0.1 for w in made["a falling chirp"])


def test_a_fast_beat_has_more_onsets_than_a_slow_beat(made):
    fast = [onset_rate(w, 16_000) for w in made["a fast beat"]]
    slow = [onset_rate(w, 16_000) for w in made["a slow beat"]]
    assert np.median(fast) > np.median(slow), (fast, slow)


def test_the_evaluator_names_many_sounds_with_their_prompt(made):
    waves = [w for c in SOUND_CAPTIONS for w in made[c]]
    report = prompt_adherence(waves, [c for c in SOUND_CAPTIONS for _ in range(3)])
    assert report["accuracy"] >= 0.3, report  # chance: 1 / 12


def test_the_neural_vocoder_beats_griffin_lim_on_held_out_sounds():
    model, _ = load_trained(bundled_checkpoint(AudioRecipe), AudioRecipe, "cpu", torch.float32)
    rng = np.random.default_rng(2024)  # not a training seed
    waves = torch.from_numpy(np.stack([render(c, rng, 1.0) for c in SOUND_CAPTIONS]))
    log_mel = model.mel.log_mel(waves)
    target = waves[:, : model.mel.samples(log_mel.shape[-1])]
    neural = multi_resolution_stft_distance(model.vocoder.vocode(log_mel), target)
    griffin = multi_resolution_stft_distance(GriffinLimVocoder(model.mel).vocode(log_mel), target)
    assert neural < griffin, (float(neural), float(griffin))


def test_cli_writes_a_wav_from_the_bundled_model(tmp_path):
    out = tmp_path / "beep.wav"
    code = main(["generate", "audio", "--prompt", "silence then a beep", "--out", str(out),
                 "--steps", "4", "--seconds", "1.5"])  # fmt: skip
    assert code == 0
    wave, rate = sf.read(out)
    assert rate == 16_000 and wave.shape == (24_000,) and np.abs(wave).max() > 0.01
