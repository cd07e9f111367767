"""The modality kit's shared pieces: conditioning beyond text, frozen latent codecs, the shared
sampling path and request checks. Each test fails without the ability it names."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from polydiff.core import schedules
from polydiff.core.blocks import TimestepEmbedder
from polydiff.core.modality import (
    GenerationRequest,
    LabelConditioner,
    Sampling,
    VectorConditioner,
    conditioned_batch,
    denoise,
    denoising_loss,
    frozen_codec,
)
from polydiff.core.modality.generation import RequestError, check_request
from polydiff.core.pretrained import CheckpointError

CONFIG = {
    "schedule": "cosine",
    "shift": 1.0,
    "zero_terminal_snr": False,
    "prediction": "v",
    "time_distribution": "uniform",
    "weighting": "none",
    "snr_gamma": 5.0,
    "sampler": "ddim",
    "sample_steps": 20,
    "guidance": 1.0,
}


class LabelDenoiser(nn.Module):
    """(B, 1) noisy scalars + (B,) labels, index ``classes`` = no label."""

    def __init__(self, classes: int = 2, hidden: int = 64) -> None:
        super().__init__()
        self.time = TimestepEmbedder(hidden)
        self.label = nn.Embedding(classes + 1, hidden)
        self.inp = nn.Linear(1, hidden)
        self.out = nn.Sequential(
            nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1)
        )  # fmt: skip

    def forward(self, x, t, label):
        return self.out(self.inp(x) + self.time(t) + self.label(label))


def _train_label_model(steps: int = 400) -> LabelDenoiser:
    torch.manual_seed(0)
    model = LabelDenoiser()
    conditioner = LabelConditioner(2, ("left", "right"))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        labels = torch.randint(0, 2, (128,), generator=generator)
        x0 = (labels.float() * 4 - 2)[:, None] + 0.1 * torch.randn(128, 1, generator=generator)
        cond = conditioned_batch(conditioner, labels, 0.2, generator, torch.device("cpu"),
                                 torch.float32)  # fmt: skip
        loss = denoising_loss(model, x0, CONFIG, cond, generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def label_model():
    return _train_label_model()


def test_label_conditioning_with_cfg_dropout_learns_each_class(label_model):
    conditioner = LabelConditioner(2, ("left", "right"))
    options = Sampling(steps=20, sampler="ddim", guidance=2.0)
    with torch.no_grad():
        x = denoise(label_model, CONFIG, conditioner, ["left"] * 32 + ["right"] * 32, (1,),
                    options, generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert x[:32].mean() < -1.5 and x[32:].mean() > 1.5


def test_the_null_label_was_trained_and_guides(label_model):
    # The unconditional model (the null label) sees both classes: its mean lies between them.
    null = LabelConditioner(2).null(torch.device("cpu"), torch.float32)["label"]
    assert null.tolist() == [2]
    options = Sampling(steps=20, sampler="ddim", guidance=0.0)  # unconditional only
    with torch.no_grad():
        x = denoise(label_model, CONFIG, LabelConditioner(2), [0] * 64, (1,), options,
                    generator=torch.Generator().manual_seed(2))  # fmt: skip
    assert (x < 0).any() and (x > 0).any()


def test_conditioning_dropout_replaces_labels_and_vectors_by_their_null_input():
    generator = torch.Generator().manual_seed(0)
    cpu, f32 = torch.device("cpu"), torch.float32
    labels = conditioned_batch(LabelConditioner(5), list(range(5)) * 20, 0.5, generator, cpu, f32)
    dropped = labels["label"] == 5
    assert 20 < int(dropped.sum()) < 80
    vectors = conditioned_batch(VectorConditioner(3), torch.ones(100, 3), 1.0, generator, cpu, f32)
    assert torch.equal(vectors["vector"], torch.zeros(100, 3))


def test_label_conditioner_names_bad_classes():
    conditioner = LabelConditioner(2, ("a chair", "a table"))
    with pytest.raises(ValueError, match="a sofa.*'a chair'"):
        conditioner.encode(["a sofa"], torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        conditioner.encode([2], torch.device("cpu"), torch.float32)


def test_vector_conditioner_checks_widths():
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        VectorConditioner(4).encode(torch.zeros(2, 3), torch.device("cpu"), torch.float32)


# --- codecs ------------------------------------------------------------------------------------


def test_the_image_autoencoder_is_a_latent_codec_and_plugs_into_both_latent_denoisers():
    from polydiff.image.model import KLAutoencoder, LatentDiT
    from polydiff.video.model import VideoDiT

    torch.manual_seed(0)
    codec = KLAutoencoder(channels=3, latent_channels=4, base_channels=8)
    assert codec.latent_shape((3, 16, 16)) == (4, 8, 8)
    with torch.no_grad():
        codec.latent_std.fill_(2.0)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    z = codec.encode_latents(images)
    assert torch.allclose(z * 2.0, codec.encode(images)[0])

    latent_dit = LatentDiT(autoencoder=dict(codec.config), dim=24, depth=1, heads=2)
    latent_dit.autoencoder.load_state_dict(codec.state_dict())
    assert torch.allclose(latent_dit.encode(images), z)
    assert not any(p.requires_grad for p in latent_dit.autoencoder.parameters())

    video_dit = VideoDiT(
        channels=4, dim=24, depth=1, heads=4, patch=(1, 2, 2),
        autoencoder_class="polydiff.image.model:KLAutoencoder", autoencoder=dict(codec.config),
    )  # fmt: skip
    video_dit.autoencoder.load_state_dict(codec.state_dict())
    video = torch.rand(1, 3, 4, 16, 16) * 2 - 1
    latents = video_dit.encode_video(video)
    assert latents.shape == (1, 4, 4, 8, 8)
    assert torch.allclose(latents[:, :, 2], codec.encode_latents(video[:, :, 2]), atol=1e-6)
    assert video_dit.model_shape(3, 4, 16, 16) == (4, 4, 8, 8)


def test_a_module_that_is_not_a_codec_is_refused():
    with pytest.raises(CheckpointError, match="not a latent codec"):
        frozen_codec("polydiff.image.model:PixelUNet", {})
    with pytest.raises(CheckpointError, match="only classes under"):
        frozen_codec("torch.nn:Linear", {"in_features": 1, "out_features": 1})


# --- the shared sampling path and requests ------------------------------------------------------


def test_same_seed_same_output_whatever_the_batch_size(label_model):
    conditioner = LabelConditioner(2)
    run = lambda size: denoise(  # noqa: E731
        label_model, CONFIG, conditioner, [0, 1, 0, 1, 1], (1,),
        Sampling(steps=5, sampler="ddim", guidance=1.5, batch_size=size),
        generator=torch.Generator().manual_seed(7),
    )  # fmt: skip
    with torch.no_grad():
        assert torch.allclose(run(5), run(2), atol=1e-6)


def test_a_negative_prompt_replaces_the_null_input(label_model):
    conditioner = LabelConditioner(2, ("left", "right"))
    with torch.no_grad():
        base = denoise(label_model, CONFIG, conditioner, ["right"] * 16, (1,),
                       Sampling(steps=10, sampler="ddim", guidance=3.0),
                       generator=torch.Generator().manual_seed(3))  # fmt: skip
        pushed = denoise(label_model, CONFIG, conditioner, ["right"] * 16, (1,),
                         Sampling(steps=10, sampler="ddim", guidance=3.0, negative_prompt="left"),
                         generator=torch.Generator().manual_seed(3))  # fmt: skip
    assert not torch.allclose(base, pushed)


@pytest.mark.parametrize(
    "change,option",
    [
        ({"prompts": ("  ",)}, "prompt"),
        ({"num": 0}, "num"),
        ({"steps": 0}, "steps"),
        ({"sampler": "plms"}, "sampler"),
        ({"guidance": math.nan}, "guidance"),
        ({"guidance": 51.0}, "guidance"),
        ({"batch_size": 0}, "batch_size"),
        ({"dtype": "float64"}, "dtype"),
        ({"device": "tpu"}, "device"),
        ({"checkpoint": "/no/such/folder"}, "checkpoint"),
        ({"timesteps": ()}, "timesteps"),
        ({"timesteps": (100.0, 500.0)}, "timesteps"),
        ({"timesteps": (999.0, math.inf)}, "timesteps"),
        ({"timesteps": ("999", "1")}, "timesteps"),
        ({"steps": 3, "timesteps": (999.0, 1.0)}, "steps"),
    ],
)
def test_bad_requests_are_refused_naming_the_option(change, option):
    from polydiff.image.recipe import ImageRecipe

    request = GenerationRequest(prompts=("a handwritten digit 3",))
    request = GenerationRequest(**{**request.__dict__, **change})
    with pytest.raises(RequestError) as caught:
        check_request(ImageRecipe, request)
    assert caught.value.option == option and "\n" not in str(caught.value)


def test_unknown_modality_options_are_refused():
    from polydiff.image.recipe import ImageRecipe

    with pytest.raises(ValueError, match="frames"):
        check_request(ImageRecipe, GenerationRequest(prompts=("x",), options={"frames": 3}))


def test_schedules_are_shared():
    from polydiff.core.modality import make_schedule

    assert isinstance(make_schedule({**CONFIG, "schedule": "flow", "shift": 3.0}), schedules.Flow)


def test_explicit_timesteps_are_the_grid_sampled_and_recorded(label_model):
    request = GenerationRequest.of(["x"], timesteps=[900, 500.5, 120])
    options = Sampling.resolve(CONFIG, request)
    assert options.grid == "given" and options.steps == 3
    assert options.record(CONFIG)["timesteps"] == [900.0, 500.5, 120.0]
    conditioner = LabelConditioner(2)
    with torch.no_grad():
        given = denoise(label_model, CONFIG, conditioner, [0, 1], (1,), options,
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
        default = denoise(label_model, CONFIG, conditioner, [0, 1], (1,),
                          Sampling(steps=3, sampler="ddim", guidance=1.0),
                          generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert not torch.allclose(given, default)
    plain = Sampling.resolve(CONFIG, GenerationRequest.of(["x"], steps=3))
    assert plain.record(CONFIG)["grid"] == "default"


def test_timesteps_outside_the_schedule_are_refused_naming_the_option():
    with pytest.raises(RequestError) as caught:
        Sampling.resolve(CONFIG, GenerationRequest.of(["x"], timesteps=[5000.0, 10.0]))
    assert caught.value.option == "timesteps"


def test_capture_stops_generation_after_the_first_sampling_pass(label_model):
    from polydiff.core.modality import capture_sampling

    conditioner = LabelConditioner(2)
    finished = []
    with torch.no_grad(), capture_sampling() as captured:
        denoise(label_model, CONFIG, conditioner, [0, 1, 1], (1,),
                Sampling(steps=4, sampler="ddim", guidance=2.0, batch_size=2),
                generator=torch.Generator().manual_seed(0))  # fmt: skip
        finished.append(True)  # never reached: denoise raised inside the context
    assert not finished
    assert captured.final.shape == (3, 1)
    assert len(captured.states) == len(captured.x0s) == 4
    assert all(s.shape == (3, 1) for s in captured.states)
