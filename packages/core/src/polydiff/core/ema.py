"""Exponential moving average (EMA) of a model's weights, with warm-up.

The EMA keeps an fp32 *shadow* copy of every floating-point parameter and, after each
optimiser step, moves it towards the live weights::

    shadow <- d_n * shadow + (1 - d_n) * param

where ``n`` is the number of updates applied before this one (0 for the first) and the
effective decay ``d_n`` warms up from 0 towards ``decay``::

    d_n = min(decay, n / (n + warmup_steps))        (d_n = decay when warmup_steps == 0)

So the first update copies the weights, ``d_n`` reaches 1/2 after ``warmup_steps``
updates, and with ``warmup_steps=1`` the shadow is the plain running mean of all weights
seen so far (until the ``decay`` cap is reached). Without a warm-up, an EMA with
``decay=0.9999`` would remember the random initialisation for ~10k steps.

Buffers (e.g. BatchNorm running statistics) and non-floating parameters are not averaged:
they are copied as-is on every update.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["EMA", "unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the bare module inside DDP / DataParallel / DeepSpeed / ``torch.compile`` wrappers.

    Args:
        model: a module, possibly wrapped (repeatedly).

    Returns:
        The innermost wrapped module; ``model`` itself when it is not a wrapper.
    """
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            # torch.compile's OptimizedModule keeps the original module here.
            model = model._orig_mod
        elif any(c.__name__ == "DeepSpeedEngine" for c in type(model).__mro__) and isinstance(
            getattr(model, "module", None), nn.Module
        ):
            # Matched by name so that deepspeed does not have to be importable.
            model = model.module
        else:
            return model


def _averaged(t: torch.Tensor) -> bool:
    return t.is_floating_point()


class EMA:
    """An exponential moving average of a model's floating-point parameters.

    Args:
        model: the model to track (bare or wrapped, see :func:`unwrap_model`). The shadow
            weights start as an fp32 copy of its current parameters.
        decay: the decay reached after the warm-up, in [0, 1).
        warmup_steps: warm-up length in updates (>= 0); see the module docstring for
            ``d_n = min(decay, n / (n + warmup_steps))``. 0 disables the warm-up.
        device: where to keep the shadow copies (default: next to each parameter). Use
            ``"cpu"`` to save accelerator memory at the cost of slower updates.

    Example::

        ema = EMA(model, decay=0.999, warmup_steps=10)
        for batch in loader:
            loss(model, batch).backward(); opt.step(); opt.zero_grad()
            ema.update(model)
        with ema.swapped_into(model):
            evaluate(model)
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.9999,
        warmup_steps: int = 10,
        device: torch.device | str | None = None,
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        if warmup_steps < 0:
            raise ValueError(f"EMA warmup_steps must be >= 0, got {warmup_steps}")
        self.decay = float(decay)
        self.warmup_steps = int(warmup_steps)
        self.num_updates = 0
        self.device = None if device is None else torch.device(device)
        model = unwrap_model(model)
        # Tied parameters appear once in named_parameters(), so each is averaged once.
        self.shadow: dict[str, torch.Tensor] = {}
        self.copied: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, p in model.named_parameters():
                if _averaged(p):
                    self.shadow[name] = p.detach().to(self._dev(p), torch.float32, copy=True)
                else:
                    self.copied[name] = p.detach().to(self._dev(p), copy=True)
            for name, b in model.named_buffers():
                self.copied[name] = b.detach().to(self._dev(b), copy=True)

    def _dev(self, t: torch.Tensor) -> torch.device:
        return t.device if self.device is None else self.device

    def decay_at(self, n: int) -> float:
        """The effective decay used by the update applied after ``n`` earlier updates."""
        if self.warmup_steps == 0:
            return self.decay
        return min(self.decay, n / (n + self.warmup_steps))

    @property
    def current_decay(self) -> float:
        """The effective decay that the next :meth:`update` will use."""
        return self.decay_at(self.num_updates)

    def _tensors(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(averaged, copied) tensors of ``model``, checked against the tracked names."""
        model = unwrap_model(model)
        averaged: dict[str, torch.Tensor] = {}
        copied: dict[str, torch.Tensor] = {}
        for name, p in model.named_parameters():
            (averaged if _averaged(p) else copied)[name] = p
        copied.update(model.named_buffers())
        if averaged.keys() != self.shadow.keys() or copied.keys() != self.copied.keys():
            ours = set(self.shadow) | set(self.copied)
            theirs = set(averaged) | set(copied)
            raise ValueError(
                "model does not match the EMA: "
                f"missing from model {sorted(ours - theirs)[:10]}, "
                f"not tracked by EMA {sorted(theirs - ours)[:10]}"
            )
        return averaged, copied

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the shadow weights one step towards ``model``'s weights and count the step.

        Args:
            model: the trained model (bare or wrapped) with the same parameter names.
        """
        averaged, copied = self._tensors(model)
        d = self.current_decay
        for name, p in averaged.items():
            s = self.shadow[name]
            src = p.detach().to(s.device, torch.float32)
            if d == 0.0:
                s.copy_(src)
            else:
                s.lerp_(src, 1.0 - d)
        for name, b in copied.items():
            self.copied[name].copy_(b.detach())
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite ``model``'s weights and buffers with the EMA ones (cast to their dtype)."""
        averaged, copied = self._tensors(model)
        for name, p in averaged.items():
            p.copy_(self.shadow[name])
        for name, b in copied.items():
            b.copy_(self.copied[name])

    @torch.no_grad()
    def copy_buffers_from(self, model: nn.Module) -> None:
        """Take ``model``'s buffers (and non-floating parameters) as they are now, without
        averaging or counting an update: e.g. statistics written into buffers after the EMA
        was made."""
        _, copied = self._tensors(model)
        for name, b in copied.items():
            self.copied[name].copy_(b.detach())

    @contextlib.contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """Context manager: the EMA weights live in ``model`` inside the block.

        The training weights and buffers are backed up (one extra copy of the model, on its
        own device and dtype) and restored bit-exactly on exit, also when the block raises.

        Yields:
            The bare (unwrapped) model.
        """
        averaged, copied = self._tensors(model)
        with torch.no_grad():
            backup = {n: t.detach().clone() for n, t in {**averaged, **copied}.items()}
            self.copy_to(model)
        try:
            yield unwrap_model(model)
        finally:
            with torch.no_grad():
                for n, t in {**averaged, **copied}.items():
                    t.copy_(backup[n])

    def to(self, device: torch.device | str) -> EMA:
        """Move the shadow copies to ``device`` (in place); returns ``self``."""
        self.device = torch.device(device)
        self.shadow = {n: t.to(self.device) for n, t in self.shadow.items()}
        self.copied = {n: t.to(self.device) for n, t in self.copied.items()}
        return self

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: shadow weights, copied buffers, step counter, settings.

        Returns:
            ``{"decay": float, "warmup_steps": int, "num_updates": int,
            "shadow": {name: fp32 tensor}, "copied": {name: tensor}}`` (saveable with
            ``torch.save``; the tensors are the live ones, not copies).
        """
        return {
            "decay": self.decay,
            "warmup_steps": self.warmup_steps,
            "num_updates": self.num_updates,
            "shadow": dict(self.shadow),
            "copied": dict(self.copied),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`, including the step counter and decay settings.

        Raises:
            ValueError: when names or shapes differ from the tracked model.
        """
        for key, ours in (("shadow", self.shadow), ("copied", self.copied)):
            theirs = state[key]
            if theirs.keys() != ours.keys():
                raise ValueError(
                    f"EMA state {key!r} names differ: missing {sorted(ours.keys() - theirs.keys())}"
                    f", unexpected {sorted(theirs.keys() - ours.keys())}"
                )
            for name, t in theirs.items():
                if t.shape != ours[name].shape:
                    raise ValueError(
                        f"EMA state {key}[{name!r}] has shape {tuple(t.shape)}, "
                        f"expected {tuple(ours[name].shape)}"
                    )
        with torch.no_grad():
            for name, t in state["shadow"].items():
                self.shadow[name].copy_(t)
            for name, t in state["copied"].items():
                self.copied[name].copy_(t)
        self.decay = float(state["decay"])
        self.warmup_steps = int(state["warmup_steps"])
        self.num_updates = int(state["num_updates"])
