"""What a denoiser predicts, and exact conversions between the four parameterisations.

With ``x = alpha * x0 + sigma * eps`` the model may predict:

- ``eps``: the noise.
- ``x0``: the clean sample.
- ``v``: ``alpha * eps - sigma * x0`` (Salimans & Ho 2022).
- ``flow``: the rectified-flow velocity ``eps - x0`` (d x / d s on the path alpha = 1 - s).

The conversions below are exact for any (alpha, sigma), not only variance-preserving ones.
:func:`model_output` takes the tensor out of whatever a model returns (a tensor, a diffusers
output object or a tuple); the samplers and the training loss both go through it.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

__all__ = [
    "PREDICTIONS",
    "Prediction",
    "check_prediction",
    "model_output",
    "target",
    "to_eps",
    "to_x0",
]

Prediction = Literal["eps", "x0", "v", "flow"]
PREDICTIONS: tuple[str, ...] = ("eps", "x0", "v", "flow")


def check_prediction(prediction: str) -> str:
    """Return ``prediction`` or raise ValueError listing the valid names."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; valid: {', '.join(PREDICTIONS)}")
    return prediction


def model_output(value: Any) -> Tensor:
    """The prediction tensor in what a model returned.

    Accepts a tensor (returned as is), an object with a ``.sample`` tensor attribute
    (diffusers' ``UNet2DOutput`` / ``Transformer2DModelOutput`` and the like) or a tuple / list
    whose first item is the tensor (diffusers' ``return_dict=False``).

    Raises:
        TypeError: anything else, naming the type.
    """
    if isinstance(value, Tensor):
        return value
    inner = getattr(value, "sample", None)
    if isinstance(inner, Tensor):
        return inner
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], Tensor):
        return value[0]
    raise TypeError(
        f"the model returned {type(value).__name__}; expected a tensor, an object with a "
        "`.sample` tensor (diffusers' UNet2DOutput) or a tuple whose first item is the tensor"
    )


def to_x0(output: Tensor, x: Tensor, alpha: float, sigma: float, prediction: str) -> Tensor:
    """The clean-sample estimate implied by a model output.

    Args:
        output: model output, same shape as ``x``.
        x: the noisy input ``alpha * x0 + sigma * eps``.
        alpha, sigma: the noise level of ``x`` (Python floats or broadcastable tensors).
        prediction: what ``output`` is: ``eps``, ``x0``, ``v`` or ``flow``.
    """
    if isinstance(alpha, float) and isinstance(sigma, float):
        return _to_x0_scalar(output, x, alpha, sigma, prediction)
    if prediction == "eps":
        return (x - sigma * output) / alpha
    if prediction == "x0":
        return output
    if prediction == "v":
        return (alpha * x - sigma * output) / (alpha * alpha + sigma * sigma)
    if prediction == "flow":
        return (x - sigma * output) / (alpha + sigma)
    check_prediction(prediction)
    raise AssertionError  # unreachable


def _to_x0_scalar(output: Tensor, x: Tensor, alpha: float, sigma: float, prediction: str) -> Tensor:
    # The sampler's hot path: fused kernels, so the conversion is one or two passes.
    if prediction == "x0":
        return output
    if prediction == "eps":
        out = torch.add(x, output, alpha=-sigma)
        return out if alpha == 1.0 else out.div_(alpha)
    if prediction == "v":
        norm = alpha * alpha + sigma * sigma
        return torch.add(x * (alpha / norm), output, alpha=-sigma / norm)
    if prediction == "flow":
        out = torch.add(x, output, alpha=-sigma)
        # alpha + sigma is 1 on the flow path up to rounding; skip a pass over the tensor then.
        return out if abs(alpha + sigma - 1.0) < 1e-12 else out.div_(alpha + sigma)
    check_prediction(prediction)
    raise AssertionError  # unreachable


def to_eps(x0: Tensor, x: Tensor, alpha: float, sigma: float) -> Tensor:
    """The noise implied by a clean-sample estimate at noise level (alpha, sigma > 0)."""
    return (x - alpha * x0) / sigma


def target(
    x0: Tensor, eps: Tensor, alpha: Tensor | float, sigma: Tensor | float, prediction: str
) -> Tensor:
    """The training target for ``prediction`` given the clean sample and the noise used.

    ``alpha``/``sigma`` broadcast against ``x0`` (e.g. shape (B, 1, 1, 1)).
    """
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        return alpha * eps - sigma * x0
    if prediction == "flow":
        return eps - x0
    check_prediction(prediction)
    raise AssertionError  # unreachable


def x0_error_scale(alpha: Tensor, sigma: Tensor, prediction: str) -> Tensor:
    """How an error in the prediction maps to an error in x0 at fixed x: |d x0 / d output|
    (the magnitude; the derivative itself is negative for eps, v and flow).

    Used to express loss weightings defined on x0 (such as min-SNR) for any prediction type.
    """
    if prediction == "eps":
        return sigma / alpha
    if prediction == "x0":
        return alpha * 0 + 1
    if prediction == "v":
        return sigma / (alpha * alpha + sigma * sigma)
    if prediction == "flow":
        return sigma / (alpha + sigma)
    check_prediction(prediction)
    raise AssertionError  # unreachable
