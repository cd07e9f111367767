"""The mel denoisers: shapes, padding, normalisation, and the audio config they are built from."""

from __future__ import annotations

import pytest
import torch

from polydiff.audio.config import AudioConfig, segment_frames
from polydiff.audio.mel import MelSettings
from polydiff.audio.model import MelDenoiser
from polydiff.core.modality import ConfigError
from polydiff.core.modality.schema import validate_schema

MEL = MelSettings(n_mels=16).to_dict()
DIT = {"patch": 4, "dim": 32, "depth": 1, "heads": 2, "mlp_ratio": 2.0, "qk_norm": True,
       "rope_theta": 10000.0}  # fmt: skip
UNET = {"base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [1],
        "heads": 2, "dropout": 0.0}  # fmt: skip


def _denoiser(network: str, context_dim: int | None = 8) -> MelDenoiser:
    torch.manual_seed(0)
    model = MelDenoiser(mel=MEL, network=network, dit=DIT, unet=UNET, context_dim=context_dim,
                        pooled_dim=6)  # fmt: skip
    for p in model.parameters():  # adaLN-Zero starts at 0: give every layer a say
        torch.nn.init.normal_(p, std=0.05)
    return model.eval()


def _inputs(batch: int = 2, frames: int = 16) -> dict:
    return {
        "x": torch.randn(batch, 1, 16, frames),
        "t": torch.rand(batch) * 999,
        "context": torch.randn(batch, 3, 8),
        "context_mask": torch.ones(batch, 3, dtype=torch.bool),
        "pooled": torch.randn(batch, 6),
    }


@pytest.mark.parametrize("network", ["dit", "unet"])
def test_denoisers_map_a_mel_image_to_its_own_shape(network: str) -> None:
    out = _denoiser(network)(**_inputs())
    assert out.shape == (2, 1, 16, 16)
    assert torch.isfinite(out).all()


def test_dit_real_frames_do_not_depend_on_padding() -> None:
    model = _denoiser("dit")
    inputs = _inputs(batch=1)
    valid = MelDenoiser.frames_mask([8], 16)
    assert valid.shape == (1, 1, 1, 16) and valid[..., :8].all() and not valid[..., 8:].any()
    first = model(**inputs, valid=valid)
    inputs["x"] = inputs["x"].clone()
    inputs["x"][..., 8:] = torch.randn(1, 1, 16, 8) * 10
    second = model(**inputs, valid=valid)
    torch.testing.assert_close(first[..., :8], second[..., :8])
    assert (second[..., 8:] == 0).all()


def test_unet_output_is_zero_at_padding() -> None:
    valid = MelDenoiser.frames_mask([12, 16], 16)
    out = _denoiser("unet")(**_inputs(), valid=valid)
    assert (out[0, ..., 12:] == 0).all() and (out[1] != 0).any()


def test_clap_conditioned_denoiser_needs_no_text_tokens() -> None:
    inputs = _inputs()
    del inputs["context"], inputs["context_mask"]
    assert _denoiser("dit", context_dim=None)(**inputs).shape == (2, 1, 16, 16)


def test_frames_must_fit_the_network() -> None:
    with pytest.raises(ValueError, match="multiple of 4"):
        _denoiser("dit")(**_inputs(frames=14))


def test_normalize_and_denormalize_are_inverse() -> None:
    model = _denoiser("dit")
    model.mel_mean.copy_(torch.linspace(-8, -2, 16))
    model.mel_std.copy_(torch.linspace(1, 3, 16))
    log_mel = torch.randn(3, 16, 10) * 3 - 5
    x = model.normalize(log_mel)
    assert x.shape == (3, 1, 16, 10)
    torch.testing.assert_close(model.denormalize(x), log_mel)


def test_statistics_buffers_are_saved_with_the_weights() -> None:
    state = _denoiser("dit").state_dict()
    assert state["mel_mean"].shape == (16,) and state["mel_std"].shape == (16,)


def test_segment_frames_round_up_to_the_network_multiple() -> None:
    dit = validate_schema(AudioConfig, {"seconds": 2.0, "dit": {"patch": 4}})
    assert segment_frames(dit) == 128  # 2 s = 126 frames at hop 256, rounded up to 4
    unet = validate_schema(AudioConfig, {"kind": "unet", "seconds": 1.0,
                                         "unet": {"channel_mult": [1, 2, 2, 2]}})  # fmt: skip
    assert segment_frames(unet) % 8 == 0 and segment_frames(unet) >= 63
    vocoder = validate_schema(AudioConfig, {"kind": "vocoder", "gan": {"segment_seconds": 0.5}})
    assert segment_frames(vocoder) == 33  # (33 - 1) * 256 samples cover 8000


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"kind": "dit", "unet": {}}, "model.unet"),
        ({"kind": "vocoder", "vocoder": "runs/v/final"}, "model.vocoder"),
        ({"conditioning": "clap"}, "model.clap"),
        ({"mel": {"hop_length": 2048}}, "model.mel"),
        ({"dit": {"dim": 30, "heads": 4}}, "model.dit.heads"),
        ({"kind": "unet", "mel": {"n_mels": 66}}, "model.unet"),
        ({"mel": {"n_fft": 1024, "bands": 3}}, "model.mel"),
    ],
)
def test_bad_audio_configs_name_their_key(raw: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_schema(AudioConfig, raw)
