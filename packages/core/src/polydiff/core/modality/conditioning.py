"""Conditioning: what turns a batch's prompts, labels or vectors into model keyword inputs.

One :class:`Conditioner` serves training (with CFG dropout to its null input) and generation
(the null input, or a negative prompt, is the unconditional branch of guidance), so a modality
conditioned on text, a class label or a vector (CLAP audio embeddings) uses the same dropout
and the same guidance:

========================  =============================================  ======================
conditioner               model inputs                                   null input
========================  =============================================  ======================
:class:`TextConditioner`  ``context`` (N, L, D), ``context_mask`` (N, L)  the empty prompt
                          bool, ``pooled`` (N, P)
:class:`LabelConditioner` ``label`` (N,) long                            the extra class
                                                                         ``num_classes``
:class:`VectorConditioner` ``vector`` (N, D)                             zeros
========================  =============================================  ======================

A model embedding labels reserves index ``num_classes`` for "no label" (for instance
``nn.Embedding(num_classes + 1, dim)``), which is what CFG dropout trains and guidance uses.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from ..guidance import drop_conditioning

__all__ = [
    "Conditioner",
    "LabelConditioner",
    "TextConditioner",
    "VectorConditioner",
    "conditioned_batch",
]


@runtime_checkable
class Conditioner(Protocol):
    """``encode(values)`` -> batch-first model inputs; ``null()`` the same keys, batch 1."""

    def encode(
        self, values: Sequence[Any], device: torch.device, dtype: torch.dtype
    ) -> dict[str, Tensor]: ...

    def null(self, device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]: ...


@functools.cache
def _text_encoder(name: str | None, max_length: int, device: str, dtype: torch.dtype) -> Any:
    from ..text import load_text_encoder

    return load_text_encoder(name, max_length=max_length, device=device, dtype=dtype)


@dataclass(frozen=True)
class TextConditioner:
    """Prompts through a frozen text encoder (loaded once per process, per device and dtype;
    it caches prompts, so the captions of a small set are encoded once).

    ``device``/``dtype`` say where the encoder runs (None: the CPU in float32, whose
    encodings are then moved to the model); generation passes the requested ones.
    """

    encoder: str | None = None
    max_length: int = 16
    device: str | None = None
    dtype: torch.dtype | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **where: Any) -> TextConditioner:
        """The encoder a denoising config names (``text_encoder``, ``text_max_length``)."""
        return cls(config["text_encoder"], int(config["text_max_length"]), **where)

    def _encoder(self) -> Any:
        return _text_encoder(
            self.encoder, self.max_length, self.device or "cpu", self.dtype or torch.float32
        )

    @property
    def dims(self) -> tuple[int, int]:
        """(token width D, pooled width P)."""
        encoder = self._encoder()
        return encoder.dim, encoder.pooled_dim

    def encode(
        self, values: Sequence[Any], device: torch.device, dtype: torch.dtype
    ) -> dict[str, Tensor]:
        """Prompts -> ``{"context": (N, L, D), "context_mask": (N, L) bool, "pooled": (N, P)}``."""
        encoding = self._encoder().encode([str(v) for v in values]).to(device=device, dtype=dtype)
        return {
            "context": encoding.tokens,
            "context_mask": encoding.mask,
            "pooled": encoding.pooled,
        }

    def null(self, device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
        return self.encode([""], device, dtype)


@dataclass(frozen=True)
class LabelConditioner:
    """Class labels: ints in [0, num_classes), or class names (``classes``) such as prompts."""

    num_classes: int
    classes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.classes and len(self.classes) != self.num_classes:
            raise ValueError(f"{len(self.classes)} class names for {self.num_classes} classes")

    def index(self, value: Any) -> int:
        """A label or class name -> its index (ValueError naming the valid classes)."""
        if isinstance(value, str):
            if value in self.classes:
                return self.classes.index(value)
            valid = ", ".join(repr(c) for c in self.classes) or "none (labels are integers)"
            raise ValueError(f"unknown class {value!r}; valid: {valid}")
        label = int(value)
        if not 0 <= label < self.num_classes:
            raise ValueError(f"label {label} is not in [0, {self.num_classes})")
        return label

    def encode(
        self, values: Sequence[Any], device: torch.device, dtype: torch.dtype
    ) -> dict[str, Tensor]:
        """Labels or names -> ``{"label": (N,) long}``."""
        if isinstance(values, Tensor):
            values = values.tolist()
        labels = [self.index(v) for v in values]
        return {"label": torch.tensor(labels, dtype=torch.long, device=device)}

    def null(self, device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
        return {"label": torch.full((1,), self.num_classes, dtype=torch.long, device=device)}


@dataclass(frozen=True)
class VectorConditioner:
    """Vectors of width ``dim`` (e.g. CLAP embeddings); the null input is the zero vector."""

    dim: int

    def encode(
        self, values: Sequence[Any] | Tensor, device: torch.device, dtype: torch.dtype
    ) -> dict[str, Tensor]:
        """(N, dim) vectors (a tensor or a list of (dim,) tensors) -> ``{"vector": (N, dim)}``."""
        vectors = (
            values
            if isinstance(values, Tensor)
            else torch.stack([torch.as_tensor(v) for v in values])
        )
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"expected (N, {self.dim}) vectors, got {tuple(vectors.shape)}")
        return {"vector": vectors.to(device=device, dtype=dtype)}

    def null(self, device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
        return {"vector": torch.zeros((1, self.dim), device=device, dtype=dtype)}


def conditioned_batch(
    conditioner: Conditioner,
    values: Sequence[Any] | Tensor,
    drop: float,
    generator: torch.Generator,
    device: torch.device,
    dtype: torch.dtype,
) -> dict[str, Tensor]:
    """Training conditioning of a batch: each sample's input is replaced by the null input
    with probability ``drop`` (classifier-free guidance training)."""
    cond = conditioner.encode(values, device, dtype)
    null = conditioner.null(device, dtype)
    return drop_conditioning(cond, null, float(drop), generator)[0]
