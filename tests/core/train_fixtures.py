"""A tiny recipe for the trainer tests: an MLP denoiser on 8-D Gaussian-mixture vectors.

Loaded by the training processes as ``modality: "tests.core.train_fixtures:TinyRecipe"`` (the
repository root must be on ``PYTHONPATH``). Samples are stored in shards as a ``.npy`` payload
plus ``.json`` metadata; a sample whose ``npy`` bytes do not parse is a corrupt sample.

``TINY_STEP_DELAY`` (seconds, environment) slows every forward pass, so a test can kill a run
in the middle.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Hashable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from polydiff.core import sample, schedules
from polydiff.core.blocks import TimestepEmbedder
from polydiff.core.data import Skip
from polydiff.core.objectives import diffusion_loss
from polydiff.core.pretrained import Configurable
from polydiff.core.train import ConfigError

DIM = 8
MODEL_DEFAULTS: dict[str, Any] = {"hidden": 32, "dropout": 0.1, "gradient_checkpointing": False}


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
        delay = float(os.environ.get("TINY_STEP_DELAY", "0"))
        if delay and self.training:
            time.sleep(delay)
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


class TinyRecipe:
    """Implements ``polydiff.core.train.Recipe`` for 8-D vectors."""

    name = "tiny"

    def validate(self, model_cfg: Mapping[str, Any]) -> dict[str, Any]:
        for key in model_cfg:
            if key not in MODEL_DEFAULTS:
                raise ConfigError(f"unknown config key model.{key}")
        return {**MODEL_DEFAULTS, **model_cfg}

    def build_model(self, model_cfg: Mapping[str, Any]) -> nn.Module:
        return TinyDenoiser(**model_cfg)

    def decode(self, sample: Mapping[str, Any], model_cfg: Mapping[str, Any]) -> dict[str, Any]:
        x = np.load(io.BytesIO(sample["npy"]), allow_pickle=False)
        if x.shape != (DIM,):
            raise ValueError(f"expected a vector of {DIM} values, got shape {x.shape}")
        return {"x": torch.from_numpy(x.astype(np.float32))}

    def bucket(self, sample: Mapping[str, Any], model_cfg: Mapping[str, Any]) -> Hashable | None:
        return None

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return {"x": torch.stack([s["x"] for s in samples])}

    def loss(
        self,
        model: nn.Module,
        batch: Mapping[str, Any],
        generator: torch.Generator,
        model_cfg: Mapping[str, Any],
    ) -> Tensor:
        return diffusion_loss(model, batch["x"], schedules.linear(), generator=generator)

    def preview(
        self, model: nn.Module, out_dir: Path, step: int, model_cfg: Mapping[str, Any]
    ) -> list[Path]:
        device = next(model.parameters()).device
        noise = torch.randn(4, DIM, device=device)
        x = sample(model, noise, schedule=schedules.linear(), sampler="ddim", steps=5)
        array, text = out_dir / "samples.npy", out_dir / "samples.txt"
        np.save(array, x.float().cpu().numpy())
        text.write_text(f"step {step}\n{x.float().cpu().numpy().round(3)}\n", encoding="utf-8")
        return [array, text]

    def synthetic(self, name: str, count: int | None) -> Iterator[dict[str, Any]]:
        """``gauss``: a 2-component Gaussian mixture in 8-D (deterministic, seed 0)."""
        if name != "gauss":
            raise ValueError(f"unknown synthetic set {name!r}; available: gauss")
        rng = np.random.default_rng(0)
        for i in range(count or 64):
            center = 2.0 if i % 2 else -2.0
            x = center + 0.3 * rng.standard_normal(DIM)
            yield {"__key__": f"{i:06d}", "npy": _npy_bytes(x), "json": {"component": i % 2}}

    def source(self, folder: Path) -> Iterator[dict[str, Any]]:
        for path in sorted(Path(folder).glob("*.npy")):
            try:
                x = np.load(path, allow_pickle=False)
            except (OSError, ValueError):
                yield Skip(path.name, "unreadable npy")
                continue
            yield {"__key__": path.stem, "npy": _npy_bytes(x), "json": {"file": path.name}}


def corrupt_sample(key: str) -> dict[str, Any]:
    """A sample whose payload is not a .npy file (decode raises)."""
    return {"__key__": key, "npy": b"not a numpy file", "json": json.dumps({"bad": True})}
