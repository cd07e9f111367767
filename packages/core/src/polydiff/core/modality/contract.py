"""The modality contract: what a modality package gives the shared trainer, generator and CLI.

A modality is one subclass of :class:`Modality`, registered as ``<name> = <module>:<Class>`` in
the entry-point group ``polydiff.modalities``. The core finds it there and never imports a
modality by name. The class carries what needs no model config (its config schema, its
synthetic sets and folder sources, its generation options and output formats); an instance is
bound once to a validated model config and carries everything else:

=====================  ===========================================================  ==========
hook                   what it is for                                               default
=====================  ===========================================================  ==========
``schema``             the pydantic model of the ``model:`` section                 required
``synthetic``          ``synthetic:NAME[:COUNT]`` samples as shard dicts            none
``source``             a user's folder as shard dicts (``Skip`` for bad files)      required
``decode``             one raw shard sample -> tensors (loader workers)             required
``bucket``             bucket key of a raw sample (variable sizes)                  one bucket
``collate``            decoded samples of one bucket -> a batch                     stack
``build_model``        the network to train (a ``Configurable`` module)             required
``conditioner``        prompts / labels / vectors -> model keyword inputs           text
``parts``              the sub-modules optimised separately (one optimizer each)    the model
``ema_part``           the part that gets an EMA and is saved as ``final/``         ``model``
``fit_statistics``     dataset statistics written into model buffers at step 0      none
``loss``               the loss of one micro-batch for one part (+ named extras)    required
``preview``            a few samples written during training                        required
``check_request``      refuse bad modality options before sampling                  accept
``generate``           samples for a :class:`GenerationRequest`                     required
``output_metadata``    resolved options recorded with every output                  none
``export``             samples -> files in the modality's formats                   required
=====================  ===========================================================  ==========
"""

from __future__ import annotations

import abc
import contextlib
import inspect
import os
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from importlib import import_module
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypedDict

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from .conditioning import Conditioner

__all__ = [
    "DTYPES",
    "ENTRY_POINT_GROUP",
    "ConfigError",
    "GenerateOption",
    "GenerationRequest",
    "Loss",
    "Modality",
    "RequestOptions",
    "available_modalities",
    "default_collate",
    "load_modality",
]

ENTRY_POINT_GROUP = "polydiff.modalities"

#: ``--dtype`` names and what they mean.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

#: What ``Modality.loss`` returns: a scalar, or a scalar and named extras for metrics.jsonl.
Loss = Tensor | tuple[Tensor, Mapping[str, Tensor | float]]


class ConfigError(ValueError):
    """A config is missing a key, has an unknown key, or a value out of range (names it)."""


@dataclass(frozen=True)
class GenerateOption:
    """A modality's own generation option: ``--frames`` on the CLI, ``frames=`` in Python.

    ``type`` parses the command-line string (``int``, ``float``, ``str`` or ``Path``);
    ``bool`` options are switches (``--mel-png``).
    """

    name: str
    type: type
    help: str
    default: Any = None


class RequestOptions(TypedDict, total=False):
    """The keyword options of every modality's Python ``generate`` (see
    :class:`GenerationRequest`); a modality's own options extend it."""

    checkpoint: str | os.PathLike[str] | None
    num: int
    negative_prompt: str | None
    steps: int | None
    sampler: str | None
    guidance: float | None
    seed: int
    batch_size: int | None
    device: str
    dtype: str
    timesteps: Sequence[float] | None
    progress: bool


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate, the same for every modality (CLI and Python API).

    ``None`` sampling options take the checkpoint's defaults (its model config's ``sampler``,
    ``sample_steps``, ``guidance``). ``timesteps`` gives the grid's model times explicitly
    (decreasing; the sampler ends at sigma = 0); without it a grid stored by ``polydiff
    tune-steps`` for the sampler and step count is used, else the schedule's default spacing.
    ``options`` holds the modality's own :class:`GenerateOption` values by name.
    """

    prompts: tuple[str, ...]
    num: int = 1
    negative_prompt: str | None = None
    steps: int | None = None
    sampler: str | None = None
    guidance: float | None = None
    seed: int = 0
    batch_size: int | None = None
    device: str = "cpu"
    dtype: str = "float32"
    checkpoint: str | None = None
    timesteps: tuple[float, ...] | None = None
    progress: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, prompts: str | Sequence[str], **options: Any) -> GenerationRequest:
        """A request from keyword options as the Python APIs take them: a single string is
        one prompt, a checkpoint path may be a ``Path``, options that are no field of the
        request are the modality's own (``frames=40``); ``None`` values are dropped."""
        names = {f.name for f in fields(cls)} - {"prompts", "options"}
        given = {k: v for k, v in options.items() if v is not None}
        own = {k: v for k, v in given.items() if k in names}
        if "checkpoint" in own:
            own["checkpoint"] = str(own["checkpoint"])
        if "timesteps" in own and not isinstance(own["timesteps"], str):
            with contextlib.suppress(TypeError):  # check_request names a bad value
                own["timesteps"] = tuple(own["timesteps"])
        extra = {k: v for k, v in given.items() if k not in names}
        prompt_tuple = (prompts,) if isinstance(prompts, str) else tuple(prompts)
        return cls(prompts=prompt_tuple, options=extra, **own)

    @property
    def repeated(self) -> list[str]:
        """One prompt per output, prompt by prompt: [p0 #0, p0 #1, ..., p1 #0, ...]."""
        return [p for p in self.prompts for _ in range(self.num)]

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def default_collate(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Decoded samples -> a batch: tensors stacked on a new dim 0, anything else listed."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    batch: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        batch[key] = torch.stack(values) if isinstance(values[0], Tensor) else values
    return batch


class Modality(abc.ABC):
    """One modality: its data, network, losses, generation and export (see the module doc).

    Subclasses set ``name``, ``schema`` and ``output_suffixes`` and implement the abstract
    hooks; the others have working defaults. ``self.config`` is the validated model config
    (a plain dict, as recorded in checkpoints).
    """

    name: ClassVar[str]
    #: The pydantic schema of the ``model:`` section (``polydiff.core.modality.schema``).
    schema: ClassVar[type]
    #: File suffixes ``export`` writes; the first is the default for ``--out`` without one.
    output_suffixes: ClassVar[tuple[str, ...]] = ()
    #: The modality's own generation options.
    generate_options: ClassVar[tuple[GenerateOption, ...]] = ()
    #: Batches ``fit_statistics`` sees before step 0 (0: the hook is not called).
    statistics_batches: ClassVar[int] = 0
    #: The part of ``parts`` that gets the EMA and becomes ``final/``.
    ema_part: ClassVar[str] = "model"
    #: The bundled checkpoint folder and the config that reproduces it (None: none ships).
    bundled: ClassVar[tuple[Path, str] | None] = None
    #: A small model config (seconds to build, train a step and sample) that the contract
    #: test runs every registered modality with.
    example_config: ClassVar[Mapping[str, Any]] = {}
    #: Built-in procedural sets: ``synthetic:NAME[:COUNT]`` -> ``synthetic_sets[NAME](COUNT)``.
    synthetic_sets: ClassVar[Mapping[str, Callable[[int | None], Iterator[dict[str, Any]]]]] = {}

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config: dict[str, Any] = dict(config)

    # --- class level: no model config needed ---------------------------------------------
    @classmethod
    def validate(cls, raw: Any) -> dict[str, Any]:
        """The ``model:`` section with defaults filled in; ConfigError naming a bad key."""
        from .schema import validate_schema

        return validate_schema(cls.schema, raw)

    @classmethod
    def from_config(cls, raw: Any) -> Modality:
        """Validate ``raw`` and bind an instance to it."""
        return cls(cls.validate(raw))

    @classmethod
    def synthetic(cls, name: str, count: int | None) -> Iterator[dict[str, Any]]:
        """Samples of a built-in procedural set (``synthetic:NAME[:COUNT]``) as shard dicts."""
        if name not in cls.synthetic_sets:
            available = ", ".join(cls.synthetic_sets) or "none"
            raise ValueError(f"unknown synthetic {cls.name} set {name!r}; available: {available}")
        return cls.synthetic_sets[name](count)

    @classmethod
    @abc.abstractmethod
    def source(cls, folder: Path) -> Iterator[dict[str, Any]]:
        """Samples read from a user's folder as shard dicts; unreadable inputs are yielded as
        ``polydiff.core.data.Skip`` records so they are counted, never silently dropped."""

    # --- data: runs in loader workers (the instance is pickled to them) --------------------
    @abc.abstractmethod
    def decode(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        """One raw WebDataset sample (``__key__`` and encoded fields) -> tensors. Raise on a
        corrupt sample (it is counted and skipped)."""

    def bucket(self, sample: Mapping[str, Any]) -> Hashable | None:
        """Bucket key of a raw (still encoded) sample; None for fixed-size samples. Raise for
        a sample that fits no bucket (it is counted as bad and skipped)."""
        return None

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """Decoded samples of one bucket -> a batch (default: :func:`default_collate`)."""
        return default_collate(samples)

    # --- model and training --------------------------------------------------------------
    @abc.abstractmethod
    def build_model(self) -> nn.Module:
        """The network to train, freshly initialised (a ``Configurable`` module)."""

    def conditioner(
        self, device: str | None = None, dtype: torch.dtype | None = None
    ) -> Conditioner:
        """What turns prompts (and training captions) into model inputs; by default the text
        encoder the config names (``text_encoder``, ``text_max_length``). ``device`` and
        ``dtype`` say where its own network runs (None: the CPU in float32)."""
        from .conditioning import TextConditioner

        return TextConditioner.from_config(self.config, device=device, dtype=dtype)

    def parts(self, model: nn.Module) -> dict[str, nn.Module]:
        """The sub-modules trained with their own optimizer, in update order (a GAN:
        ``{"discriminator": ..., "generator": ...}``): disjoint, one of them ``ema_part`` (a
        ``Configurable`` module: it becomes ``final/``); parameters outside every part stay
        frozen. Each part's settings may be overridden in ``train.parts.<name>``. Default:
        the whole model, one optimizer."""
        return {"model": model}

    def fit_statistics(
        self, model: nn.Module, batches: Iterable[dict[str, Any]]
    ) -> dict[str, Tensor]:
        """Dataset statistics fitted before step 0 from ``statistics_batches`` batches (one
        pass, fp32, on the device, eval mode, no grad), returned by the name of the persistent
        model buffer they fill (``{"feature_mean": ...}``). The trainer averages them over
        processes (so return means or moments), writes them into the buffers (checkpoints and
        ``final/`` carry them) and never calls this on resume. Buffers stay fp32 in bf16 runs:
        cast where the loss uses them."""
        return {}

    @abc.abstractmethod
    def loss(
        self, model: nn.Module, batch: Mapping[str, Any], generator: torch.Generator, part: str
    ) -> Loss:
        """The scalar loss of one micro-batch that trains ``part`` (see :meth:`parts`; a
        one-part recipe sees ``"model"``); extras returned beside it (scalars, the same names
        every call) are averaged into ``metrics.jsonl``. ``model`` is the whole bare model
        (not a DeepSpeed engine), the other parts frozen."""

    @abc.abstractmethod
    def preview(self, model: nn.Module, out_dir: Path, step: int) -> list[Path]:
        """Write a few samples from ``model`` (the EMA part with EMA weights, eval mode, under
        no_grad) into ``out_dir``."""

    # --- generation ----------------------------------------------------------------------
    def check_request(self, request: GenerationRequest) -> None:  # noqa: B027 (optional hook)
        """Refuse bad modality options (ValueError, one line) before any sampling."""

    @abc.abstractmethod
    def generate(self, model: nn.Module, request: GenerationRequest) -> list[Any]:
        """One output per ``request.repeated`` prompt, in that order (runs under inference
        mode on ``request.device``)."""

    def output_metadata(self, request: GenerationRequest) -> dict[str, Any]:
        """Resolved modality options recorded with every output (``{"fps": 8.0, ...}``)."""
        return {}

    @abc.abstractmethod
    def export(
        self, outputs: Sequence[Any], paths: Sequence[Path], metadata: Sequence[Mapping[str, Any]]
    ) -> list[Path]:
        """Write ``outputs[i]`` to ``paths[i]`` (atomically) with ``metadata[i]`` embedded
        where the format allows; return the files written."""


def available_modalities() -> list[str]:
    """Names of the installed modalities (entry points in ``polydiff.modalities``)."""
    return sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))


def load_modality(name: str) -> type[Modality]:
    """The modality class registered as ``name``, or named ``module:Class`` (a user's own
    modality that is not installed as a package: this imports ``module``, i.e. runs its code).

    Nothing is called: the named object must be a class deriving from :class:`Modality`.

    Raises:
        ValueError: an unknown name (listing the installed ones), a module that does not
            import, or an object that is not a Modality class.
    """
    if ":" in name:
        module_name, _, attr = name.partition(":")
        target = name
        try:
            module = import_module(module_name)
        except ImportError as e:
            raise ValueError(f"modality {name!r}: cannot import {module_name!r} ({e})") from e
        found = inspect.getattr_static(module, attr, None)
    else:
        points = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
        if not points:
            names = ", ".join(available_modalities()) or "none installed"
            raise ValueError(f"unknown modality {name!r}; installed: {names}")
        target, found = points[0].value, points[0].load()
    if not (inspect.isclass(found) and issubclass(found, Modality)):
        raise ValueError(
            f"{target} is not a polydiff modality (a polydiff.core.modality.Modality class)"
        )
    if inspect.isabstract(found):
        missing = ", ".join(sorted(found.__abstractmethods__))
        raise ValueError(f"{target} does not implement {missing}")
    return found
