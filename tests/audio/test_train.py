"""The whole path with real components: the CLI writes FLAC shards, 2-process CPU DeepSpeed runs
of the tiny presets train the neural vocoder and then a mel DiT carrying it, and its final/
checkpoint generates a WAV that soundfile reads back; a killed vocoder run (two parts, two
optimizers) resumes exactly."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import soundfile as sf
import torch

from polydiff.cli.main import main
from polydiff.core.pretrained import from_pretrained

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from tests.core.test_train import kill_after_checkpoint  # noqa: E402
from tests.core.test_train_kit import launched, repeatable  # noqa: E402
from tests.modality_fixtures import made_shards, metric_rows, preset  # noqa: E402

TIMING = {"samples_per_s", "data_wait_fraction", "time"}


@pytest.fixture(scope="module")
def sound_shards(tmp_path_factory) -> Path:
    shards = made_shards(
        "audio", "synthetic:sounds:32", tmp_path_factory.mktemp("sounds") / "shards"
    )
    assert len(list(shards.glob("*.tar"))) == 4
    return shards


def test_tiny_presets_train_vocoder_then_denoiser_on_two_processes_and_generate_wav(
    sound_shards, tmp_path, monkeypatch
):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny models: threads only contend
    vocoder_run = tmp_path / "vocoder"
    config = preset("audio", "tiny-vocoder.yaml", tmp_path, sound_shards)
    assert main(["train", "--config", str(config), "--out", str(vocoder_run),
                 "--num-procs", "2"]) == 0  # fmt: skip
    rows = metric_rows(vocoder_run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # two parts, each with its named loss terms
    assert {"discriminator/disc_mpd", "generator/mel", "generator/adversarial"} <= set(rows[0])
    # adversarial_start 2: the discriminators idle for two steps, then the GAN phase begins
    assert [r["discriminator/disc_mpd"] > 0 for r in rows] == [False, False, True, True]
    assert [r["generator/adversarial"] > 0 for r in rows] == [False, False, True, True]
    assert (vocoder_run / "previews" / "step_000004" / "reconstructions.wav").is_file()
    final = json.loads((vocoder_run / "final" / "config.json").read_text())
    assert final["class"] == "polydiff.audio.vocoder:NeuralVocoder"  # final/ is the generator

    run = tmp_path / "denoiser"
    config = preset("audio", "tiny.yaml", tmp_path, sound_shards,
                     model={"vocoder": str(vocoder_run / "final")})  # fmt: skip
    assert main(["train", "--config", str(config), "--out", str(run), "--num-procs", "2"]) == 0
    rows = metric_rows(run)
    assert rows[-1]["samples"] == 4 * 2 * 2  # steps x batch x processes
    assert (run / "previews" / "step_000004" / "previews.wav").is_file()
    weights = from_pretrained(run / "final")
    assert not torch.equal(weights.mel_mean, torch.full((64,), -5.0))  # fitted at step 0
    vocoder = from_pretrained(vocoder_run / "final")
    carried = weights.vocoder.state_dict()
    assert all(torch.equal(carried[k], v) for k, v in vocoder.state_dict().items())

    out = tmp_path / "chirp.wav"
    assert main([
        "generate", "audio", "--checkpoint", str(run / "final"), "--prompt", "a rising chirp",
        "--out", str(out), "--steps", "2", "--seconds", "0.75",
    ]) == 0  # fmt: skip
    info = sf.info(str(out))
    assert (info.samplerate, info.channels, info.frames, info.subtype) == (
        16000,
        1,
        12000,
        "PCM_16",
    )
    record = json.loads(Path(f"{out}.json").read_text())
    assert record["prompt"] == "a rising chirp" and record["vocoder"] == "neural"


def test_killed_vocoder_run_resumes_exactly_with_both_optimizers(sound_shards, tmp_path):
    train = {"max_steps": 8, "decay_steps": 8, "checkpoint_every": 2, "keep_checkpoints": 0,
             "preview_every": 0}  # fmt: skip
    config = preset("audio", "tiny-vocoder.yaml", tmp_path, sound_shards, train=train)
    whole = launched(config, tmp_path / "whole", num_procs=1)

    run = tmp_path / "killed"
    saved = kill_after_checkpoint(config, run, num_procs=1, delay=0.0, steps_after=1)
    assert saved < 8
    launched(config, run, num_procs=1, resume=True)
    assert repeatable(run) == repeatable(whole)  # both parts' losses, lrs and extras
    a = from_pretrained(whole / "final").state_dict()
    b = from_pretrained(run / "final").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
