"""Model pixels to file pixels: the one conversion from [-1, 1] floats to 8-bit values."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["to_uint8"]


def to_uint8(pixels: Tensor) -> Tensor:
    """Floats in [-1, 1] (any shape) -> uint8 in [0, 255], rounded; out-of-range values clamp."""
    return ((pixels.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).cpu()
