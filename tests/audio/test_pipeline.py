"""Generation from a trained audio checkpoint: lengths, vocoders, provenance, same seed same
sound, inpainting and continuation, CLAP conditioning and re-ranking, one-line refusals."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import soundfile as sf
import torch

from polydiff.audio.data import decode
from polydiff.audio.pipeline import generate, keep_mask, parse_keep
from polydiff.audio.recipe import AudioRecipe
from polydiff.audio.synthetic import sounds
from polydiff.core.modality import GenerationRequest, RequestError, generate_files
from polydiff.core.pretrained import CheckpointError
from tests.audio.conftest import TINY
from tests.audio.test_clap import clap_folder  # noqa: F401 (fixture)


def _make(checkpoint, prompts="a rising chirp", **options):
    return generate(prompts, checkpoint=checkpoint, steps=2, **options)


def test_a_sound_lasts_the_seconds_asked_at_the_model_rate(tiny_checkpoint):
    (short,) = _make(tiny_checkpoint, seconds=0.3)
    (long,) = _make(tiny_checkpoint, seconds=1.7)  # longer than the trained 0.5 s
    assert short.sample_rate == 16_000
    assert short.wave.shape == (4800,) and long.wave.shape == (27_200,)
    assert short.log_mel.shape[0] == 64 and short.wave.abs().max() <= 1.0


def test_same_seed_same_sound_and_another_seed_another(tiny_checkpoint):
    (a,), (b,) = _make(tiny_checkpoint, seed=3), _make(tiny_checkpoint, seed=3)
    (c,) = _make(tiny_checkpoint, seed=4)
    assert torch.equal(a.wave, b.wave) and not torch.equal(a.wave, c.wave)


def test_both_vocoders_voice_the_same_mel(tiny_checkpoint):
    (neural,) = _make(tiny_checkpoint, vocoder="neural")
    (griffin,) = _make(tiny_checkpoint, vocoder="griffin-lim")
    assert torch.equal(neural.log_mel, griffin.log_mel)
    assert neural.wave.shape == griffin.wave.shape and not torch.equal(neural.wave, griffin.wave)


def test_files_record_how_they_were_made_and_mel_pngs_come_along(tiny_checkpoint, tmp_path):
    options = {"steps": 2, "seed": 9, "mel_png": True, "vocoder": "griffin-lim"}
    request = GenerationRequest.of(["white noise", "a fast beat"], checkpoint=tiny_checkpoint,
                                   **options)  # fmt: skip
    written = generate_files("audio", request, tmp_path / "out.flac")
    names = sorted(p.name for p in written)
    assert names == ["out_0.flac", "out_0.mel.png", "out_1.flac", "out_1.mel.png"]
    wave, rate = sf.read(tmp_path / "out_1.flac")
    assert rate == 16_000 and wave.shape == (8000,)
    record = json.loads((tmp_path / "out_1.flac.json").read_text())
    assert record["prompt"] == "a fast beat" and record["seed"] == 9
    assert record["vocoder"] == "griffin-lim" and record["steps"] == 2
    assert record["sample_rate"] == 16_000 and record["mel"]["hop_length"] == 256
    assert (tmp_path / "out_0.mel.png").read_bytes()[:4] == b"\x89PNG"


def test_continuation_keeps_the_kept_seconds_of_the_init_sound_exactly(tiny_checkpoint, tmp_path):
    rng = np.random.default_rng(0)
    init = (0.5 * np.sin(2 * np.pi * 440 * np.arange(16_000) / 16_000)).astype(np.float32)
    init += 0.01 * rng.standard_normal(16_000).astype(np.float32)
    sf.write(tmp_path / "init.wav", init, 16_000, subtype="FLOAT")
    (sound,) = _make(tiny_checkpoint, init=tmp_path / "init.wav", keep="0:0.5", seconds=1.5)
    assert sound.wave.shape == (24_000,)
    torch.testing.assert_close(sound.wave[:8000], torch.from_numpy(init[:8000]))
    assert not torch.allclose(sound.wave[9000:16_000], torch.from_numpy(init[9000:16_000]))
    # the kept mel frames are the init sound's own (the sampler never touches them)
    kept = keep_mask(parse_keep("0:0.5"), AudioRecipe.from_config(TINY).mel, 40) == 0
    assert kept[:31].all() and not kept[32:].any()


def test_inpainting_a_middle_gap_keeps_both_sides(tiny_checkpoint, tmp_path):
    init = (0.3 * np.sin(2 * np.pi * 300 * np.arange(16_000) / 16_000)).astype(np.float32)
    sf.write(tmp_path / "init.wav", init, 16_000, subtype="FLOAT")
    (sound,) = _make(tiny_checkpoint, init=tmp_path / "init.wav", keep="0:0.25,0.75:1")
    assert sound.wave.shape == (16_000,)
    torch.testing.assert_close(sound.wave[:4000], torch.from_numpy(init[:4000]))
    torch.testing.assert_close(sound.wave[12_000:], torch.from_numpy(init[12_000:]))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"seconds": 0}, "seconds must be in"),
        ({"seconds": 1e9}, "seconds must be in"),
        ({"vocoder": "wavenet"}, "vocoder must be one of"),
        ({"rerank": 0}, "rerank must be an integer"),
        ({"keep": "0:1"}, "keep needs init"),
        ({"init": "missing.wav", "keep": "0:1"}, "init not found"),
        ({"rerank": 2}, "rerank needs a CLAP model"),
        ({"mel_png": "yes"}, "mel_png must be True or False"),
        ({"num": 1000, "seconds": 60}, "more than 3600 s of sound in one call"),
    ],
)
def test_bad_audio_options_are_one_line_refusals(tiny_checkpoint, options, message):
    with pytest.raises(ValueError, match=message) as caught:
        _make(tiny_checkpoint, **options)
    assert "\n" not in str(caught.value)


def test_keep_ranges_are_parsed_or_refused():
    assert parse_keep("0:1.5, 3:4") == [(0.0, 1.5), (3.0, 4.0)]
    for bad in ("1.5", "2:1", "a:b", "-1:2", "0:inf"):
        with pytest.raises(RequestError, match="START:STOP"):
            parse_keep(bad)


def test_a_vocoder_checkpoint_does_not_generate(tiny_vocoder_checkpoint):
    with pytest.raises(CheckpointError, match="is a vocoder"):
        _make(tiny_vocoder_checkpoint)


def test_neural_vocoder_is_refused_when_none_is_carried(tmp_path):
    from polydiff.core.train.trainer import write_final

    recipe = AudioRecipe.from_config(copy.deepcopy(TINY))
    write_final(recipe.build_model(), tmp_path / "final", "audio", recipe.config)
    with pytest.raises(ValueError, match="carries no neural vocoder"):
        _make(tmp_path / "final", vocoder="neural")
    (sound,) = _make(tmp_path / "final")  # Griffin-Lim by default
    assert sound.wave.shape == (8000,)


def test_rerank_keeps_the_candidate_clap_likes_best(tiny_checkpoint, clap_folder):  # noqa: F811
    (best,) = _make(tiny_checkpoint, rerank=3, clap=clap_folder, seed=1)
    candidates = [_make(tiny_checkpoint, seed=1, num=3)]  # the same three draws, unranked
    assert any(torch.equal(best.wave, c.wave) for c in candidates[0])


def test_clap_conditioning_trains_on_uncaptioned_sounds_and_samples_from_text(
    clap_folder,  # noqa: F811
    tmp_path,
):
    from polydiff.core.train.trainer import write_final

    recipe = AudioRecipe.from_config({**TINY, "conditioning": "clap", "clap": str(clap_folder)})
    model = recipe.build_model()
    uncaptioned = [{**s, "txt": ""} for s in sounds(2)]
    batch = recipe.collate([recipe.decode(s) for s in uncaptioned])
    assert batch["caption"] == ["", ""] and batch["wave"].shape == (2, 8960)  # 36 frames
    loss = recipe.loss(model, batch, torch.Generator().manual_seed(0), "model")
    loss.backward()
    assert torch.isfinite(loss)
    pooled = recipe.conditioner().encode(batch["wave"], torch.device("cpu"), torch.float32)
    assert pooled["pooled"].shape == (2, 16) and not torch.equal(*pooled["pooled"])
    write_final(model, tmp_path / "final", "audio", recipe.config)
    (sound,) = _make(tmp_path / "final", prompts="a dog barking")
    assert sound.wave.shape == (8000,)


def test_text_conditioning_skips_uncaptioned_sounds():
    recipe = AudioRecipe.from_config(TINY)
    with pytest.raises(ValueError, match="no caption"):
        recipe.decode({**next(iter(sounds(1))), "txt": ""})
    assert decode(next(iter(sounds(1))), recipe.mel, 32, None)["mel"].shape == (64, 32)
