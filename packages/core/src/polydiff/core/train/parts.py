"""The parts a run optimises, and the statistics fitted into the model before step 0.

Most recipes train one module with one optimizer. A GAN does not: its generator and its
discriminators take turns, each with its own AdamW, learning-rate schedule and DeepSpeed
engine, and only the generator gets an EMA and becomes ``final/``. So a recipe names the
separately optimised sub-modules in ``Modality.parts(model)`` (default ``{"model": model}``,
the plain one-part run) and the one with the EMA in ``Modality.ema_part``; :func:`model_parts`
checks them and :class:`PartStep` is what each part's engine runs.

The parts are sub-modules with no shared parameter; while one part trains, the others'
parameters have ``requires_grad`` off (parameters outside every part stay frozen), so no
gradient leaks (:func:`set_trainable`). ``recipe.loss`` gets the whole bare model (the engines
hold its parts); ``recipe.preview`` and ``final/`` get the EMA part (:func:`ema_module`) with
EMA weights.

Fitted statistics: when ``recipe.statistics_batches > 0`` and the run starts at step 0, that
many batches of a separately seeded stream go to ``recipe.fit_statistics`` (fp32 weights and
batches on the device, eval mode, no grad, forked RNGs) before the EMA and the engines exist;
:func:`fit_statistics` averages the returned tensors over ranks and copies them into the
model's persistent buffers of those names, so the EMA, every checkpoint and ``final/`` (for
buffers inside the EMA part) carry them. A resumed run takes them from its checkpoint.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from polydiff.core.modality.contract import Modality

from .config import ConfigError, OptimConfig, RunError

__all__ = ["PLAIN", "PartStep", "ema_module", "fit_statistics", "model_parts", "set_trainable"]

PLAIN = "model"  # the one part of a recipe that does not override ``parts``
_PART_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


# --- parts ------------------------------------------------------------------------------------


@dataclass
class _Part:
    """One separately optimised sub-module: its settings, its place in the model, its engine."""

    name: str
    module: nn.Module
    prefix: str  # its name in the model ("" for the model itself)
    params: list[nn.Parameter]
    config: OptimConfig
    engine: Any = None

    def key(self, name: str) -> str:
        """A name inside the part as a name inside the model."""
        return f"{self.prefix}.{name}" if self.prefix else name


def _part_config(t: OptimConfig, name: str) -> OptimConfig:
    for_part = getattr(t, "for_part", None)
    return for_part(name) if for_part is not None else t


def model_parts(recipe: Modality, model: nn.Module, t: OptimConfig) -> dict[str, _Part]:
    """``recipe.parts(model)``, checked: named sub-modules of ``model`` that share no
    parameter, each with something to train, ``recipe.ema_part`` among them, and every
    ``train.parts`` name a part."""
    who = type(recipe).__name__
    found = recipe.parts(model)
    if not isinstance(found, Mapping) or not found:
        raise RunError(f"{who}.parts must return a non-empty dict of name -> sub-module")
    where = {id(m): name for name, m in model.named_modules()}
    owner: dict[int, str] = {}
    parts: dict[str, _Part] = {}
    for name, module in found.items():
        if not isinstance(name, str) or not _PART_NAME.fullmatch(name):
            raise RunError(
                f"{who}.parts: part name {name!r} must be letters, digits, '_' or '-' "
                "(it names metrics and checkpoint folders)"
            )
        if not isinstance(module, nn.Module) or id(module) not in where:
            raise RunError(f"{who}.parts: part {name!r} is not a sub-module of the model")
        params = list(module.parameters())
        for p in params:
            if id(p) in owner:
                raise RunError(
                    f"{who}.parts: parts {owner[id(p)]!r} and {name!r} share parameters; "
                    "every parameter may belong to one part only"
                )
            owner[id(p)] = name
        if not any(p.requires_grad for p in params):
            raise RunError(f"{who}.parts: part {name!r} has no trainable parameters")
        parts[name] = _Part(name, module, where[id(module)], params, _part_config(t, name))
    if recipe.ema_part not in parts:
        raise RunError(
            f"{who}.ema_part is {recipe.ema_part!r}, which is not one of its parts "
            f"({', '.join(parts)})"
        )
    ema = parts[recipe.ema_part].module
    if not isinstance(getattr(ema, "config", None), dict):
        raise RunError(
            f"{who}: the EMA part {recipe.ema_part!r} ({type(ema).__name__}) becomes final/ "
            "and needs a dict `config` of constructor arguments (Configurable)"
        )
    configured = getattr(t, "parts", None) or {}
    unknown = sorted(set(configured) - set(parts))
    if unknown:
        raise ConfigError(
            f"train.parts.{unknown[0]}: {who} has no part {unknown[0]!r}; its parts are "
            + ", ".join(parts)
        )
    return parts


def ema_module(recipe: Modality, model: nn.Module) -> nn.Module:
    """The EMA part of a freshly built ``model`` (previews and final/)."""
    return recipe.parts(model)[recipe.ema_part]


class PartStep(nn.Module):
    """What one part's DeepSpeed engine runs: the recipe's loss of a micro-batch for that part.

    The engine's module holds only the part's parameters (so each engine optimises, clips,
    reduces and checkpoints its own part), while the loss sees the whole model. Going through
    ``engine(...)`` keeps DeepSpeed's forward/backward bookkeeping intact (its backward
    prologue is registered on the forward's output).
    """

    def __init__(self, part: nn.Module, loss: Any, name: str) -> None:
        super().__init__()
        self.part = part
        self._loss = loss  # a plain callable: the full model is not registered here
        self._name = name
        self.extras: dict[str, Any] = {}

    def forward(self, batch: Any, generator: torch.Generator) -> Tensor:
        out = self._loss(batch, generator, self._name)
        extras: Any = {}
        if isinstance(out, tuple):
            if len(out) != 2 or not isinstance(out[1], Mapping):
                raise RunError(
                    f"loss of part {self._name!r} must be a scalar tensor or (scalar, dict of "
                    f"extras), got a tuple of {len(out)}"
                )
            out, extras = out
        if not isinstance(out, Tensor) or out.numel() != 1:
            raise RunError(
                f"loss of part {self._name!r} must be a scalar tensor, got "
                + (f"shape {tuple(out.shape)}" if isinstance(out, Tensor) else type(out).__name__)
            )
        self.extras = dict(extras)
        return out.reshape(())


def set_trainable(parts: Mapping[str, _Part], trainable: Mapping[int, bool], only: str | None):
    """Freeze every part but ``only`` (None: restore every part's own requires_grad), so a
    part's loss puts no gradient into the others."""
    for name, part in parts.items():
        for p in part.params:
            p.requires_grad_(trainable[id(p)] and (only is None or name == only))


# --- fitted statistics ------------------------------------------------------------------------


def fit_statistics(
    recipe: Modality,
    model: nn.Module,
    batches: Iterator[Any],
    *,
    rng: AbstractContextManager[Any],
    persistent: set[str],
    device: torch.device,
    world: int,
    dist: Any,
) -> list[str]:
    """``recipe.fit_statistics`` on ``batches`` (no grad, eval mode, inside ``rng``: the
    trainer's forked RNGs), averaged over processes and copied into the model's buffers of
    those names; returns the names."""
    who = type(recipe).__name__
    was_training = model.training
    try:
        with rng, torch.no_grad():
            model.eval()
            stats = recipe.fit_statistics(model, batches)
    finally:
        model.train(was_training)
        close = getattr(batches, "close", None)
        if close is not None:
            close()  # stops the statistics stream's loader workers
    if not isinstance(stats, Mapping):
        raise RunError(f"{who}.fit_statistics must return a dict of buffer name -> tensor")
    buffers = dict(model.named_buffers())
    unknown = sorted(str(n) for n in stats if n not in buffers)
    if unknown:
        raise RunError(
            f"{who}.fit_statistics returned {', '.join(unknown)}: the model has no buffer of "
            f"that name (its buffers: {', '.join(buffers) or 'none'})"
        )
    transient = sorted(n for n in stats if n not in persistent)
    if transient:
        raise RunError(
            f"{who}.fit_statistics: buffer {', '.join(transient)} is not persistent, so "
            "checkpoints and final/ would not carry it (register_buffer(..., persistent=True))"
        )
    names = sorted(stats)
    values = []
    for name in names:
        value = torch.as_tensor(stats[name]).detach()
        if tuple(value.shape) != tuple(buffers[name].shape):
            raise RunError(
                f"{who}.fit_statistics: {name} has shape {tuple(value.shape)}, the buffer "
                f"{tuple(buffers[name].shape)}"
            )
        values.append(value.to(device, torch.float64).reshape(-1))
    layout = [(n, tuple(buffers[n].shape)) for n in names]
    if world > 1:
        seen: list[Any] = [None] * world
        dist.all_gather_object(seen, layout)
        if any(s != layout for s in seen):
            raise RunError(f"{who}.fit_statistics returned different buffers on different ranks")
    if not names:
        return names
    flat = torch.cat(values)
    dist.all_reduce(flat)
    flat /= world
    with torch.no_grad():
        for name, value in zip(names, flat.split([v.numel() for v in values]), strict=True):
            buffer = buffers[name]
            value = value.reshape(buffer.shape)
            buffer.copy_(value if buffer.is_floating_point() else value.round())
    return names
