"""Private helpers shared by the blocks: even dimension splits and optional checkpointing."""

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint


def split_even(dim: int, parts: int, what: str) -> list[int]:
    """Split ``dim`` channels into ``parts`` even shares that differ by at most 2.

    Sinusoidal and rotary features come in (sin, cos) / (x0, x1) pairs, so every axis needs an
    even number of channels. Earlier axes receive the leftover pairs.
    """
    if parts < 1:
        raise ValueError(f"{what}: number of axes must be >= 1, got {parts}")
    if dim % 2 != 0 or dim < 2 * parts:
        raise ValueError(
            f"{what}: dimension {dim} must be even and at least {2 * parts} "
            f"to give each of {parts} axes an even, non-empty share"
        )
    pairs = dim // 2
    return [2 * (pairs // parts + (1 if i < pairs % parts else 0)) for i in range(parts)]


def maybe_checkpoint(fn: Callable[..., Any], *args: Any, enabled: bool) -> Any:
    """Run ``fn(*args)``, recomputing its activations in backward when ``enabled``.

    Checkpointing is skipped without autograd (e.g. under ``torch.no_grad``) because there would
    be nothing to save memory on.
    """
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)
