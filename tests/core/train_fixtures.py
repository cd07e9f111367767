"""Tiny modalities for the trainer tests, on 8-D Gaussian-mixture vectors.

Loaded by the training processes as ``modality: "tests.core.train_fixtures:<Class>"`` (the
repository root must be on ``PYTHONPATH``). Samples are stored in shards as a ``.npy`` payload
plus ``.json`` metadata; a sample whose ``npy`` bytes do not parse is a corrupt sample.

- :class:`TinyRecipe`: an MLP denoiser (one part, the whole model).
- :class:`TinyGANRecipe`: a generator and a discriminator trained in turn (two parts, the
  generator gets the EMA and becomes ``final/``); its losses return extras that let a test see
  each part's parameters and stray gradients from outside the run.
- :class:`TinyStatsRecipe`: the denoiser on data normalised by a per-feature mean and std that
  the trainer fits before step 0 into the model's buffers.

``TINY_STEP_DELAY`` (seconds, environment) slows every forward pass, so a test can kill a run
in the middle; ``TINY_STATS_LOG`` (a file) gets one JSON line per ``fit_statistics`` call.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from polydiff.core import sample, schedules
from polydiff.core.blocks import TimestepEmbedder
from polydiff.core.data import Skip
from polydiff.core.modality.contract import GenerationRequest, Modality
from polydiff.core.objectives import diffusion_loss
from polydiff.core.pretrained import Configurable

DIM = 8


def _delay(module: nn.Module) -> None:
    delay = float(os.environ.get("TINY_STEP_DELAY", "0"))
    if delay and module.training:
        time.sleep(delay)


class TinyDenoiser(Configurable, nn.Module):
    """eps-prediction MLP: (B, 8) noisy vectors + (B,) model times -> (B, 8)."""

    def __init__(
        self, hidden: int = 32, dropout: float = 0.1, gradient_checkpointing: bool = False
    ):
        super().__init__()
        self.time = TimestepEmbedder(hidden)
        self.inp = nn.Linear(DIM, hidden)
        # Dropout draws from torch's global RNG: exact resume must restore it.
        self.body = nn.Sequential(nn.SiLU(), nn.Dropout(dropout), nn.Linear(hidden, hidden))
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, DIM))
        self.gradient_checkpointing = gradient_checkpointing

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        _delay(self)
        h = self.inp(x) + self.time(t)
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            h = checkpoint(self.body, h, use_reentrant=False)
        else:
            h = self.body(h)
        return self.out(h)


def _npy_bytes(x: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, x.astype(np.float32))
    return buffer.getvalue()


class TinyConfig(pydantic.BaseModel):
    """The ``model:`` section of :class:`TinyRecipe`."""

    model_config = pydantic.ConfigDict(extra="forbid")

    hidden: int = 32
    dropout: float = 0.1
    gradient_checkpointing: bool = False


class _Vectors(Modality):
    """What the tiny modalities share: 8-D vectors in ``.npy`` shards, ``.npy`` outputs."""

    output_suffixes = (".npy",)

    @classmethod
    def synthetic(cls, name: str, count: int | None) -> Iterator[dict[str, Any]]:
        """``gauss``: a 2-component Gaussian mixture in 8-D (deterministic, seed 0)."""
        if name != "gauss":
            raise ValueError(f"unknown synthetic set {name!r}; available: gauss")
        rng = np.random.default_rng(0)
        for i in range(count or 64):
            center = 2.0 if i % 2 else -2.0
            x = center + 0.3 * rng.standard_normal(DIM)
            yield {"__key__": f"{i:06d}", "npy": _npy_bytes(x), "json": {"component": i % 2}}

    @classmethod
    def source(cls, folder: Path) -> Iterator[dict[str, Any]]:
        for path in sorted(Path(folder).glob("*.npy")):
            try:
                x = np.load(path, allow_pickle=False)
            except (OSError, ValueError):
                yield Skip(path.name, "unreadable npy")
                continue
            yield {"__key__": path.stem, "npy": _npy_bytes(x), "json": {"file": path.name}}

    def decode(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        x = np.load(io.BytesIO(sample["npy"]), allow_pickle=False)
        if x.shape != (DIM,):
            raise ValueError(f"expected a vector of {DIM} values, got shape {x.shape}")
        return {"x": torch.from_numpy(x.astype(np.float32))}

    def export(
        self, outputs: Sequence[Any], paths: Sequence[Path], metadata: Sequence[Mapping[str, Any]]
    ) -> list[Path]:
        for x, path in zip(outputs, paths, strict=True):
            np.save(path, np.asarray(x, dtype=np.float32))
        return list(paths)

    @staticmethod
    def _save_preview(x: Tensor, out_dir: Path, step: int) -> list[Path]:
        array, text = out_dir / "samples.npy", out_dir / "samples.txt"
        np.save(array, x.float().cpu().numpy())
        text.write_text(f"step {step}\n{x.float().cpu().numpy().round(3)}\n", encoding="utf-8")
        return [array, text]


class TinyRecipe(_Vectors):
    """A ``Modality`` for 8-D vectors: an MLP denoiser, eps prediction, linear schedule."""

    name = "tiny"
    schema = TinyConfig

    def build_model(self) -> nn.Module:
        return TinyDenoiser(**self.config)

    def loss(
        self, model: nn.Module, batch: Mapping[str, Any], generator: torch.Generator, part: str
    ) -> Any:
        return diffusion_loss(model, batch["x"], schedules.linear(), generator=generator)

    def preview(self, model: nn.Module, out_dir: Path, step: int) -> list[Path]:
        device = next(model.parameters()).device
        noise = torch.randn(4, DIM, device=device)
        x = sample(model, noise, schedule=schedules.linear(), sampler="ddim", steps=5)
        return self._save_preview(x, out_dir, step)

    def generate(self, model: nn.Module, request: GenerationRequest) -> list[Any]:
        g = torch.Generator().manual_seed(request.seed)
        noise = torch.randn(len(request.repeated), DIM, generator=g).to(request.device)
        steps = request.steps or 5
        x = sample(model, noise, schedule=schedules.linear(), sampler="ddim", steps=steps)
        return list(x.float().cpu().numpy())


# --- statistics -----------------------------------------------------------------------------


class TinyNormDenoiser(TinyDenoiser):
    """:class:`TinyDenoiser` with the data's per-feature mean and std as (persistent) buffers."""

    def __init__(
        self, hidden: int = 32, dropout: float = 0.1, gradient_checkpointing: bool = False
    ):
        super().__init__(hidden, dropout, gradient_checkpointing)
        self.register_buffer("feature_mean", torch.zeros(DIM))
        self.register_buffer("feature_std", torch.ones(DIM))


class TinyStatsRecipe(TinyRecipe):
    """The denoiser trained on ``(x - feature_mean) / feature_std``, fitted before step 0."""

    statistics_batches = 3

    def build_model(self) -> nn.Module:
        return TinyNormDenoiser(**self.config)

    def fit_statistics(self, model: nn.Module, batches: Iterable[dict[str, Any]]) -> dict:
        x = torch.cat([b["x"] for b in batches])
        stats = {"feature_mean": x.mean(0), "feature_std": x.std(0)}
        if log := os.environ.get("TINY_STATS_LOG"):
            line = {"rank": int(os.environ.get("RANK", "0")), "samples": len(x)}
            line.update({k: v.tolist() for k, v in stats.items()})
            with open(log, "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")
        return stats

    def loss(
        self, model: nn.Module, batch: Mapping[str, Any], generator: torch.Generator, part: str
    ) -> Any:
        # Buffers stay fp32 in a bf16 engine (DeepSpeed casts parameters only).
        x = ((batch["x"] - model.feature_mean) / model.feature_std).to(batch["x"].dtype)
        return diffusion_loss(model, x, schedules.linear(), generator=generator)


# --- two parts ------------------------------------------------------------------------------


class TinyGenerator(Configurable, nn.Module):
    """(B, latent) noise -> (B, 8) vectors."""

    def __init__(self, latent: int = 4, hidden: int = 16):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(latent, hidden), nn.SiLU(), nn.Linear(hidden, DIM))

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


class TinyDiscriminator(nn.Module):
    """(B, 8) vectors -> (B,) realness scores (with dropout: resume must restore its RNG)."""

    def __init__(self, hidden: int = 16, dropout: float = 0.1):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(DIM, hidden), nn.SiLU(), nn.Dropout(dropout), nn.Linear(hidden, 1)
        )

    def forward(self, x: Tensor) -> Tensor:
        _delay(self)
        return self.net(x).squeeze(-1)


class TinyGAN(Configurable, nn.Module):
    def __init__(self, latent: int = 4, hidden: int = 16, dropout: float = 0.1):
        super().__init__()
        self.latent = latent
        self.generator = TinyGenerator(latent, hidden)
        self.discriminator = TinyDiscriminator(hidden, dropout)


class TinyGANConfig(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    latent: int = 4
    hidden: int = 16
    dropout: float = 0.1


def _param_sum(module: nn.Module) -> float:
    return sum(float(p.detach().double().sum()) for p in module.parameters())


def _grad_sum(module: nn.Module) -> float:
    return sum(
        float(p.grad.double().abs().sum()) for p in module.parameters() if p.grad is not None
    )


class TinyGANRecipe(_Vectors):
    """A least-squares GAN: the discriminator steps first, then the generator (EMA).

    Extras of both losses: ``d_sum`` / ``g_sum``, the sums of the discriminator's / generator's
    parameters when the loss is computed, and ``stale_grad``, the sum of |grad| over the whole
    model at that moment (0 when no earlier backward left a gradient anywhere, with
    ``train.grad_accum: 1``). The discriminator's loss also reports ``real`` and ``fake``.
    """

    name = "tiny-gan"
    schema = TinyGANConfig
    ema_part = "generator"

    def build_model(self) -> nn.Module:
        return TinyGAN(**self.config)

    def parts(self, model: nn.Module) -> dict[str, nn.Module]:
        return {"discriminator": model.discriminator, "generator": model.generator}

    def loss(
        self, model: nn.Module, batch: Mapping[str, Any], generator: torch.Generator, part: str
    ) -> Any:
        real = batch["x"]
        watch = {
            "d_sum": _param_sum(model.discriminator),
            "g_sum": _param_sum(model.generator),
            "stale_grad": _grad_sum(model),
        }
        z = torch.randn(
            real.shape[0], model.latent, generator=generator, device=real.device, dtype=real.dtype
        )
        fake = model.generator(z)
        if part == "discriminator":
            d_real, d_fake = model.discriminator(real), model.discriminator(fake)
            loss = ((d_real - 1) ** 2).mean() + (d_fake**2).mean()
            return loss, {**watch, "real": d_real.mean(), "fake": d_fake.mean()}
        return ((model.discriminator(fake) - 1) ** 2).mean(), watch

    def preview(self, model: nn.Module, out_dir: Path, step: int) -> list[Path]:
        latent = model.net[0].in_features
        z = torch.randn(4, latent, device=next(model.parameters()).device)
        return self._save_preview(model(z), out_dir, step)

    def generate(self, model: nn.Module, request: GenerationRequest) -> list[Any]:
        g = torch.Generator().manual_seed(request.seed)
        z = torch.randn(len(request.repeated), model.net[0].in_features, generator=g)
        return list(model(z.to(request.device)).float().cpu().numpy())


def corrupt_sample(key: str) -> dict[str, Any]:
    """A sample whose payload is not a .npy file (decode raises)."""
    return {"__key__": key, "npy": b"not a numpy file", "json": json.dumps({"bad": True})}
