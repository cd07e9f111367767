"""The training config: one YAML file, checked strictly before any process starts.

A config has five top-level sections (see ``KEYS`` below for every key and its default)::

    modality: image                      # a modality name (entry point) or "module:Class"
    model: {...}                         # the modality's model config (its schema checks it)
    data: {shards: data/digits, ...}     # where the shards are and how to read them
    train: {max_steps: 2000, batch_size: 32, lr: 3.0e-4, ...}
    deepspeed: shared/configs/deepspeed/zero2_bf16.json   # a JSON file or an inline mapping

and optionally a sixth, ``distill:`` (:class:`DistillConfig`), which makes the run a
consistency distillation of a trained checkpoint of ``modality`` (see
:mod:`polydiff.core.train.distill`)::

    distill: {teacher: bundled, guidance: 3.0, ode_steps: 40, lora_rank: 0}

``model:`` is then optional: the teacher's recorded model config, with the keys given in
``model:`` laid over it (mappings merged key by key), is the student's. The teacher folder is
read here: a missing folder or file, a config.json without a model config, a model of another
modality than ``modality:`` or no denoiser is a ConfigError naming ``distill.teacher``.

A missing required key, an unknown key or a value out of range raises :class:`ConfigError`
naming the key as a dotted path (``train.batch_size``). The YAML is the one source of truth
for the batch: the DeepSpeed JSON must leave ``train_micro_batch_size_per_gpu``,
``gradient_accumulation_steps``, ``gradient_clipping`` and ``train_batch_size`` out (or set
them to ``"auto"``); :meth:`TrainConfig.deepspeed_config` fills them from ``train``.

A modality that trains several parts with their own optimizers (``Modality.parts``) may give
each part its own optimizer settings; the others come from ``train``::

    train:
      lr: 2.0e-4
      parts:
        discriminator: {lr: 1.0e-4, betas: [0.0, 0.99]}   # PART_KEYS; see OptimConfig.for_part

The ``data`` and ``train`` sections are pydantic dataclasses (:class:`DataConfig`,
:class:`OptimConfig`); ``model`` is checked by the modality's own schema.

A problem with the run rather than its config (the output folder holds another run, a recipe
that breaks the contract at run time) raises :class:`RunError`; it is defined here, where every
module of the trainer can import it without importing the loop.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any

import pydantic
import yaml
from pydantic import ConfigDict, Field, PlainValidator, field_validator, model_validator
from pydantic.dataclasses import dataclass

from ..modality.contract import ConfigError, load_modality
from ..modality.schema import Issue, ModelSchema, Problem, describe, known_keys

__all__ = [
    "DECAYS",
    "DISTANCES",
    "KEYS",
    "PART_KEYS",
    "ConfigError",
    "DataConfig",
    "DistillConfig",
    "OptimConfig",
    "RunError",
    "TrainConfig",
    "cli_overrides",
    "load_config",
    "resolve_deepspeed_path",
    "schema_table",
]


class RunError(ValueError):
    """The run cannot start or continue as asked (e.g. the output folder holds another run);
    a ValueError, like ConfigError, so a CLI reports it as a usage error."""


DECAYS: tuple[str, ...] = ("cosine", "linear", "constant")
_REQUIRED = object()  # marks a key without a default (in KEYS)

_TOP_KEYS = ("modality", "model", "data", "train", "deepspeed", "distill")
_REQUIRED_TOP = ("modality", "model", "train", "deepspeed")  # a distillation: model optional
# DeepSpeed keys the YAML owns, with the train key that sets them.
_BATCH_KEYS = {
    "train_micro_batch_size_per_gpu": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "gradient_clipping": "train.grad_clip",
    "train_batch_size": "train.batch_size x train.grad_accum x processes",
}
# The trainer builds AdamW and the LR schedule itself, so these would be silently ignored.
_OWNED_BY_TRAINER = {
    "optimizer": "the trainer builds AdamW from train.lr/betas/weight_decay/adam_eps",
    "scheduler": "the trainer sets the learning rate (train.warmup_steps/lr_decay/min_lr)",
}


# --- value types: what YAML may spell (messages complete "train.lr in <file> ...") ---------
def _integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise Problem(f"must be an integer, got {value!r}")
    return value


def _number(value: Any) -> float:
    # PyYAML reads `1e-4` (no dot) as a string, so numeric strings are accepted.
    if isinstance(value, bool):
        raise Problem(f"must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise Problem(f"must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise Problem(f"must be finite, got {value!r}")
    return number


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise Problem(f"must be true or false, got {value!r}")
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise Problem(f"must be a string, got {value!r}")
    return value


def _betas(value: Any) -> tuple[float, float]:
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise Problem(f"must be a list of two numbers, got {value!r}")
    return _number(value[0]), _number(value[1])


def _shards(value: Any) -> str | list[str]:
    if isinstance(value, str) or (
        isinstance(value, list) and all(isinstance(v, str) for v in value)
    ):
        return value
    raise Problem("must be a string or a list of strings")


Int = Annotated[int, PlainValidator(_integer)]
Float = Annotated[float, PlainValidator(_number)]
Bool = Annotated[bool, PlainValidator(_flag)]
Str = Annotated[str, PlainValidator(_text)]
Betas = Annotated[tuple[float, float], PlainValidator(_betas)]
Shards = Annotated[str | list[str], PlainValidator(_shards)]


def _doc(meaning: str) -> Any:
    """A key's meaning, as documented in ``KEYS`` and :func:`schema_table`."""
    return Field(description=meaning)


# Range checks after the types, in order: key -> (what it must be, test(value, section)).
# ``{lr}`` / ``{warmup_steps}`` name the key that bounds it (the part's own, or train's).
_RULES: dict[str, tuple[str, Callable[[Any, Mapping[str, Any]], bool]]] = {
    "max_steps": (">= 1", lambda v, _: v >= 1),
    "batch_size": (">= 1", lambda v, _: v >= 1),
    "grad_accum": (">= 1", lambda v, _: v >= 1),
    "lr": ("> 0", lambda v, _: v > 0),
    "min_lr": ("in [0, {lr}]", lambda v, t: 0 <= v <= t["lr"]),
    "warmup_steps": (">= 0", lambda v, _: v >= 0),
    "lr_decay": (f"one of {', '.join(DECAYS)}", lambda v, _: v in DECAYS),
    "decay_steps": ("> {warmup_steps}", lambda v, t: v is None or v > t["warmup_steps"]),
    "weight_decay": (">= 0", lambda v, _: v >= 0),
    "betas": ("in [0, 1)", lambda v, _: all(0 <= b < 1 for b in v)),
    "adam_eps": ("> 0", lambda v, _: v > 0),
    "grad_clip": (">= 0 (0: off)", lambda v, _: v >= 0),
    "ema_decay": ("in [0, 1)", lambda v, _: 0 <= v < 1),
    "ema_warmup_steps": (">= 0", lambda v, _: v >= 0),
    "seed": (">= 0", lambda v, _: v >= 0),
    "log_every": (">= 1", lambda v, _: v >= 1),
    "preview_every": (">= 0", lambda v, _: v >= 0),
    "checkpoint_every": (">= 0", lambda v, _: v >= 0),
    "keep_checkpoints": (">= 0", lambda v, _: v >= 0),
    "num_workers": (">= 0", lambda v, _: v >= 0),
    "shuffle_buffer": (">= 0", lambda v, _: v >= 0),
    "max_bad_fraction": ("in [0, 1]", lambda v, _: 0 <= v <= 1),
    "shards": ("non-empty", lambda v, _: v is None or len(v) > 0),
}


def _check_ranges(values: Mapping[str, Any], given: Mapping[str, Any], prefix: str = "") -> None:
    """Apply ``_RULES`` to the keys of ``given`` (with ``values`` their section, ``prefix``
    where ``given`` sits in it: ``parts.<name>.`` for a part)."""

    def owner(key: str) -> str:
        return f"train.{prefix}{key}" if key in given else f"train.{key}"

    names = {"lr": owner("lr"), "warmup_steps": owner("warmup_steps")}
    for key, (what, ok) in _RULES.items():
        if key in given and not ok(values[key], values):
            value = values[key]
            shown = list(value) if isinstance(value, tuple) else value
            raise Problem(f"must be {what.format(**names)}, got {shown!r}", f"{prefix}{key}")


_SECTION_CONFIG = ConfigDict(extra="forbid")


@dataclass(frozen=True, config=_SECTION_CONFIG)
class _Section:
    """Refuses unknown keys of a mapping (as ``UnknownKeys``) and checks value ranges."""

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, Mapping):  # (keyword arguments reach the dataclass as they are)
            known_keys(data, cls.__dataclass_fields__)
        return data

    @model_validator(mode="after")
    def _in_range(self) -> Any:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        _check_ranges(values, values)
        return self


@dataclass(frozen=True, config=_SECTION_CONFIG)
class DataConfig(_Section):
    """The ``data:`` section: which shards to stream and how (see ``KEYS["data"]``)."""

    shards: Annotated[
        Shards | None, _doc("shard spec: folder, brace pattern, list or URL (or --data)")
    ] = None
    num_workers: Annotated[
        Int, _doc("DataLoader worker processes per rank that decode samples")
    ] = 0
    shuffle_buffer: Annotated[Int, _doc("samples in the shuffle buffer")] = 256
    max_bad_fraction: Annotated[
        Float, _doc("fail when more than this fraction of samples is corrupt")
    ] = 0.05
    allow_pipe: Annotated[Bool, _doc("allow `pipe:` shard URLs (they run shell commands)")] = False


class _PartSettings(ModelSchema):
    """One ``train.parts.<name>`` entry: the optimizer settings that part overrides."""

    lr: Float | None = None
    min_lr: Float | None = None
    warmup_steps: Int | None = None
    lr_decay: Str | None = None
    decay_steps: Int | None = None
    weight_decay: Float | None = None
    betas: Betas | None = None
    adam_eps: Float | None = None
    grad_clip: Float | None = None

    @classmethod
    def prepare(cls, data: dict[str, Any]) -> dict[str, Any]:
        for key, value in data.items():
            if value is None and key != "decay_steps":  # null decay_steps: the part's max_steps
                raise Problem(f"must be set (leave it out to use train.{key}), got None", key)
        return data


#: The ``train`` keys a part may override (``train.parts.<name>.<key>``).
PART_KEYS: tuple[str, ...] = tuple(_PartSettings.model_fields)
_PARTS = pydantic.TypeAdapter(dict[str, _PartSettings])


@dataclass(frozen=True, config=_SECTION_CONFIG)
class OptimConfig(_Section):
    """The ``train:`` section: optimisation, schedule, EMA, logging and checkpoint cadence.

    Steps count optimizer steps; one step consumes ``grad_accum`` micro-batches of
    ``batch_size`` samples on every process. ``parts`` maps a part name to the settings it
    overrides (only the keys given, checked as the train keys are); :meth:`for_part` applies
    them.
    """

    max_steps: Annotated[Int, _doc("optimizer steps to train for (--max-steps)")]
    batch_size: Annotated[Int, _doc("micro-batch per process")]
    lr: Annotated[Float, _doc("peak learning rate (AdamW)")]
    grad_accum: Annotated[Int, _doc("micro-batches per optimizer step")] = 1
    min_lr: Annotated[Float, _doc("learning rate at the end of the decay")] = 0.0
    warmup_steps: Annotated[Int, _doc("linear warm-up from 0 to lr over this many steps")] = 0
    lr_decay: Annotated[Str, _doc("decay after the warm-up: cosine, linear or constant")] = "cosine"
    decay_steps: Annotated[
        Int | None, _doc("step at which the decay reaches min_lr (null: max_steps)")
    ] = None
    weight_decay: Annotated[Float, _doc("AdamW weight decay (matrices only, not biases/norms)")] = (
        0.0
    )
    betas: Annotated[Betas, _doc("AdamW betas")] = (0.9, 0.999)
    adam_eps: Annotated[Float, _doc("AdamW epsilon")] = 1e-8
    grad_clip: Annotated[Float, _doc("clip the global gradient norm (0: off)")] = 1.0
    ema_decay: Annotated[Float, _doc("EMA decay after its warm-up")] = 0.999
    ema_warmup_steps: Annotated[Int, _doc("EMA warm-up in updates (0: constant decay)")] = 10
    gradient_checkpointing: Annotated[
        Bool | None, _doc("null: the model config decides; true/false: set it")
    ] = None
    seed: Annotated[Int, _doc("seeds model init, data order, noise")] = 0
    log_every: Annotated[Int, _doc("steps between metrics.jsonl lines")] = 10
    preview_every: Annotated[Int, _doc("steps between previews (0: only at the end)")] = 500
    checkpoint_every: Annotated[Int, _doc("steps between checkpoints (0: only at the end)")] = 500
    keep_checkpoints: Annotated[Int, _doc("complete checkpoints kept (0: keep all)")] = 2
    out: Annotated[Str | None, _doc("output folder (--out; null: runs/<config file name>)")] = None
    parts: Annotated[
        dict[str, dict[str, Any]],
        _doc(f"per-part optimizer overrides: {{part: {{{', '.join(PART_KEYS)}}}}}"),
    ] = dataclasses.field(default_factory=dict, hash=False)

    @field_validator("parts", mode="plain")
    @classmethod
    def _parts(cls, value: Any) -> dict[str, dict[str, Any]]:
        if not isinstance(value, Mapping):
            raise Problem(f"must be a mapping of part names to optimizer settings, got {value!r}")
        for name, settings in value.items():
            if not isinstance(name, str) or not name:
                raise Problem(f"must map part names (strings) to settings, got the name {name!r}")
            if not isinstance(settings, Mapping):
                raise Problem(f"must be a mapping, got {settings!r}", name)
        # Errors inside carry their (name, key) location.
        parsed = _PARTS.validate_python(dict(value))
        return {name: p.model_dump(exclude_unset=True) for name, p in parsed.items()}

    @model_validator(mode="after")
    def _parts_in_range(self) -> OptimConfig:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, settings in self.parts.items():
            merged = {**values, **settings}
            prefix = f"parts.{name}."
            _check_ranges(merged, settings, prefix)
            # A part that moves only lr or warmup_steps can cross train's min_lr / decay_steps.
            if "min_lr" not in settings and merged["min_lr"] > merged["lr"]:
                raise Problem(
                    f"must be >= train.min_lr ({merged['min_lr']}), got {merged['lr']!r}",
                    f"{prefix}lr",
                )
            decay = merged["decay_steps"]
            if (
                "decay_steps" not in settings
                and decay is not None
                and decay <= merged["warmup_steps"]
            ):
                raise Problem(
                    f"must be < train.decay_steps ({decay}), got {merged['warmup_steps']!r}",
                    f"{prefix}warmup_steps",
                )
        return self

    def for_part(self, name: str) -> OptimConfig:
        """The settings of part ``name``: these with its ``parts`` overrides applied (a part
        not listed gets them unchanged). The copy's own ``parts`` is empty."""
        return dataclasses.replace(self, parts={}, **self.parts.get(name, {}))


#: ``distill.distance``: how the student's x0 estimate is compared with its target.
DISTANCES: tuple[str, ...] = ("pseudo_huber", "mse")
#: The model config keys a denoiser teacher records (what ``distill`` needs of it).
_DENOISER_KEYS = ("schedule", "shift", "prediction", "sampler", "sample_steps", "guidance")
_MAX_GUIDANCE = 50.0  # as generation's MAX_GUIDANCE (which the trainer does not import)

_DISTILL_RULES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "guidance": (f"in [0, {_MAX_GUIDANCE:g}]", lambda v: v is None or 0 <= v <= _MAX_GUIDANCE),
    "ode_steps": (">= 1", lambda v: v >= 1),
    "distance": (f"one of {', '.join(DISTANCES)}", lambda v: v in DISTANCES),
    "huber_c": ("> 0", lambda v: v > 0),
    "lora_rank": (">= 0 (0: train every weight)", lambda v: v >= 0),
    "lora_alpha": ("> 0", lambda v: v is None or v > 0),
    "sample_steps": (">= 1", lambda v: v >= 1),
}


@dataclass(frozen=True, config=_SECTION_CONFIG)
class DistillConfig:
    """The ``distill:`` section: consistency distillation of a trained denoiser (LCM).

    After :func:`load_config`, ``teacher`` is the resolved absolute folder and ``guidance``
    the scale actually folded in (the teacher's recorded one when the YAML leaves it out).
    """

    teacher: Annotated[
        Str, _doc("the teacher's final/ folder, or `bundled`: the modality's bundled model")
    ]
    guidance: Annotated[
        Float | None, _doc("CFG scale folded into the student (null: the teacher's)")
    ] = None
    ode_steps: Annotated[
        Int, _doc("teacher ODE intervals over the sampler's grid (40 holds 1/2/4/8 steps)")
    ] = 40
    distance: Annotated[Str, _doc("pseudo_huber or mse between x0 estimates")] = "pseudo_huber"
    huber_c: Annotated[Float, _doc("pseudo-Huber c, per element (iCT's 0.00054)")] = 0.00054
    lora_rank: Annotated[Int, _doc("rank of LoRA adapters on a frozen base (0: full)")] = 0
    lora_alpha: Annotated[Float | None, _doc("LoRA scale alpha / rank (null: rank)")] = None
    sample_steps: Annotated[Int, _doc("the lcm steps final/ records as its default")] = 4

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            known_keys(data, cls.__dataclass_fields__)
        return data

    @model_validator(mode="after")
    def _in_range(self) -> DistillConfig:
        for key, (what, ok) in _DISTILL_RULES.items():
            if not ok(getattr(self, key)):
                raise Problem(f"must be {what}, got {getattr(self, key)!r}", key)
        return self


def _keys(cls: type) -> dict[str, tuple[Any, str]]:
    """Every field of a section dataclass: (default or ``_REQUIRED``, meaning)."""
    out: dict[str, tuple[Any, str]] = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = list(f.default) if isinstance(f.default, tuple) else f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = _REQUIRED
        out[f.name] = (default, cls.__pydantic_fields__[f.name].description or "")
    return out


#: Every key of the ``data`` and ``train`` sections: (default, meaning); ``_REQUIRED`` marks
#: a key without a default. Read off the dataclasses, so the documented table is theirs.
KEYS: dict[str, dict[str, tuple[Any, str]]] = {
    "data": _keys(DataConfig),
    "train": _keys(OptimConfig),
    "distill": _keys(DistillConfig),
}
_SECTIONS = {
    "data": pydantic.TypeAdapter(DataConfig),
    "train": pydantic.TypeAdapter(OptimConfig),
    "distill": pydantic.TypeAdapter(DistillConfig),
}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A checked training config.

    ``model`` is the modality-validated model config (defaults filled in). ``deepspeed`` is
    the DeepSpeed JSON as written (batch fields absent); ``deepspeed_source`` is its path, or
    ``"inline"``. ``path`` is the YAML file this came from (None when built from a dict).
    ``distill`` is set for a distillation run (``model`` is then the student's config: the
    teacher's with the YAML's ``model:`` keys over it).
    """

    modality: str
    model: dict[str, Any]
    data: DataConfig
    train: OptimConfig
    deepspeed: dict[str, Any]
    deepspeed_source: str = "inline"
    path: Path | None = None
    distill: DistillConfig | None = None

    @property
    def out_dir(self) -> Path:
        """``train.out``, or ``runs/<config file stem>`` (relative to the working directory)."""
        if self.train.out is not None:
            return Path(self.train.out)
        return Path("runs") / (self.path.stem if self.path is not None else self.modality)

    @property
    def decay_steps(self) -> int:
        """The step at which the learning rate reaches ``min_lr``."""
        return self.train.decay_steps or self.train.max_steps

    def deepspeed_config(self) -> dict[str, Any]:
        """The DeepSpeed config with the batch fields filled from ``train``.

        DeepSpeed derives ``train_batch_size`` (= batch_size x grad_accum x processes) itself.
        """
        ds = copy.deepcopy(self.deepspeed)
        ds.pop("train_batch_size", None)  # only ever "auto" here (checked at load time)
        ds["train_micro_batch_size_per_gpu"] = self.train.batch_size
        ds["gradient_accumulation_steps"] = self.train.grad_accum
        ds["gradient_clipping"] = float(self.train.grad_clip)
        # The trainer writes its own metrics; DeepSpeed's periodic step prints are noise.
        ds.setdefault("steps_per_print", 2**31 - 1)
        return ds

    @property
    def precision(self) -> str:
        """``"bf16"``, ``"fp16"`` or ``"fp32"``: the engine's compute dtype per the JSON."""
        for name in ("bf16", "fp16"):
            section = self.deepspeed.get(name)
            if isinstance(section, Mapping) and section.get("enabled") is True:
                return name
        return "fp32"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable record of the resolved config (written to <out>/config.json)."""
        train = dataclasses.asdict(self.train)
        train["betas"] = list(self.train.betas)
        train["parts"] = {
            name: {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}
            for name, settings in self.train.parts.items()
        }
        record = {
            "modality": self.modality,
            "model": self.model,
            "data": dataclasses.asdict(self.data),
            "train": train,
            "deepspeed": self.deepspeed_config(),
            "deepspeed_source": self.deepspeed_source,
        }
        if self.distill is not None:
            record["distill"] = dataclasses.asdict(self.distill)
        return record


def load_config(
    path: str | Path | Mapping[str, Any],
    overrides: Mapping[str, Any] | None = None,
    *,
    validate_model: bool = True,
) -> TrainConfig:
    """Read and check a training config.

    Args:
        path: a YAML file (or an already-parsed mapping, for tests and tools).
        overrides: values that replace the file's, by dotted key (``{"train.max_steps": 5,
            "data.shards": "data/x"}``) or as nested mappings. ``None`` values are ignored, so
            a CLI can pass every option it has. Unknown keys are errors, as in the file.
        validate_model: ask the modality to validate ``model`` (imports the modality).

    Returns:
        The checked :class:`TrainConfig`.

    Raises:
        ConfigError: naming the key (``train.lr``) for a missing or unknown key, a wrong type
            or an out-of-range value; naming the file when it is missing or not valid YAML.
    """
    source: Path | None = None
    if isinstance(path, Mapping):
        raw: Any = copy.deepcopy(dict(path))
    else:
        source = Path(path)
        if not source.is_file():
            raise ConfigError(f"config file not found: {source}")
        try:
            raw = yaml.safe_load(source.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"config file is not valid YAML: {source} ({e})") from e
    where = f" in {source}" if source else ""
    if not isinstance(raw, dict):
        raise ConfigError(f"config{where} must be a mapping of sections {', '.join(_TOP_KEYS)}")
    for key, value in (overrides or {}).items():
        if value is not None:
            _apply_override(raw, key, value, where)

    distilling = raw.get("distill") is not None
    required = tuple(k for k in _REQUIRED_TOP if not (distilling and k == "model"))
    _check_keys(raw, _TOP_KEYS, required, "", where)
    modality = raw["modality"]
    if not isinstance(modality, str) or not modality:
        raise ConfigError(f"modality{where} must be a recipe name or 'module:Class'")
    data = _section(raw, "data", where)
    train = _section(raw, "train", where)

    model = raw.get("model") if raw.get("model") is not None else {}
    if not isinstance(model, dict):
        raise ConfigError(f"model{where} must be a mapping (the recipe's model config)")
    distill: DistillConfig | None = None
    if distilling:
        distill = _section(raw, "distill", where)
        distill, teacher_model = _read_teacher(distill, modality, source, where)
        model = _merged(teacher_model, model)
    if train.gradient_checkpointing is not None:
        model = {**model, "gradient_checkpointing": train.gradient_checkpointing}
    if validate_model:
        model = _validate_model(modality, model, train.gradient_checkpointing is not None, where)

    ds_source, ds = _load_deepspeed(raw["deepspeed"], source, where)
    _check_deepspeed(ds, train, where)
    return TrainConfig(
        modality=modality,
        model=model,
        data=data,
        train=train,
        deepspeed=ds,
        deepspeed_source=ds_source,
        path=source,
        distill=distill,
    )


def cli_overrides(
    *,
    data: str | None = None,
    out: str | Path | None = None,
    max_steps: int | None = None,
    checkpoint_every: int | None = None,
) -> dict[str, Any]:
    """Command-line options as ``load_config`` overrides (None: keep the file's value)."""
    return {
        "data.shards": data,
        "train.out": None if out is None else str(out),
        "train.max_steps": max_steps,
        "train.checkpoint_every": checkpoint_every,
    }


def _apply_override(raw: dict[str, Any], key: str, value: Any, where: str) -> None:
    if isinstance(value, Mapping) and "." not in key:
        for sub, v in value.items():
            if v is not None:
                _apply_override(raw, f"{key}.{sub}", v, where)
        return
    *parents, leaf = key.split(".")
    node = raw
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {'.'.join(parents[: i + 1])}{where} is no mapping")
        node = child
    node[leaf] = value


def _check_keys(
    section: Mapping[str, Any],
    known: tuple[str, ...],
    required: tuple[str, ...],
    prefix: str,
    where: str,
) -> None:
    for key in section:
        if key not in known:
            raise ConfigError(
                f"unknown config key {prefix}{key}{where}; valid keys: "
                + ", ".join(prefix + k for k in known)
            )
    for key in required:
        if key not in section:
            raise ConfigError(f"missing config key {prefix}{key}{where}")


def _section(raw: dict[str, Any], name: str, where: str) -> Any:
    section = raw.get(name)
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise ConfigError(f"{name}{where} must be a mapping")
    try:
        return _SECTIONS[name].validate_python(section)
    except pydantic.ValidationError as e:
        raise ConfigError(_line(describe(e, name), where)) from None


def _line(issue: Issue, where: str) -> str:
    """An issue of the data / train sections as today's one line (``<key><where> ...``)."""
    if issue.unknown:
        names = ", ".join(f"{issue.key}.{k}" for k in issue.unknown)
        valid = ", ".join(f"{issue.key}.{k}" for k in issue.valid)
        keys = "keys" if len(issue.unknown) > 1 else "key"
        return f"unknown config {keys} {names}{where}; valid keys: {valid}"
    if issue.missing:
        return f"missing config key {issue.key}{where}"
    return f"{issue.key}{where} {issue.problem}"


def _merged(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` laid onto ``base``: mappings merged key by key, anything else replaced."""
    out = copy.deepcopy(dict(base))
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _teacher_folder(spec: str, modality: str, config_path: Path | None, where: str) -> Path:
    """``bundled`` (the modality's bundled checkpoint) or a folder: absolute, relative to the
    YAML's folder or one of its parents, or to the working directory."""
    if spec == "bundled":
        from ..modality.checkpoint import bundled_checkpoint

        try:
            return bundled_checkpoint(load_modality(modality)).resolve()
        except (ValueError, TypeError, ImportError, AttributeError) as e:
            raise ConfigError(f"modality{where}: {e}") from e
        except FileNotFoundError as e:
            raise ConfigError(f"distill.teacher{where}: {e}") from e
    given = Path(spec).expanduser()
    candidates = [given] if given.is_absolute() else [Path.cwd() / given]
    if not given.is_absolute() and config_path is not None:
        folder = config_path.resolve().parent
        candidates += [base / given for base in (folder, *folder.parents)]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    raise ConfigError(
        f"distill.teacher{where}: no checkpoint folder {spec!r} (looked at "
        + ", ".join(str(c) for c in candidates[:3])
        + (" ..." if len(candidates) > 3 else "")
        + "); give a `polydiff train` final/ folder or `bundled`"
    )


def _read_teacher(
    distill: DistillConfig, modality: str, config_path: Path | None, where: str
) -> tuple[DistillConfig, dict[str, Any]]:
    """The section with the teacher folder resolved and its guidance filled in, and the
    teacher's recorded model config; ConfigError naming distill.teacher for anything that
    is not a trained denoiser of ``modality``."""
    from ..pretrained import CONFIG_NAME, WEIGHTS_NAME

    folder = _teacher_folder(distill.teacher, modality, config_path, where)
    key = f"distill.teacher{where}"
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise ConfigError(f"{key}: {folder} has no {name} (is it a final/ folder?)")
    try:
        record = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{key}: {folder / CONFIG_NAME} is not valid JSON ({e})") from e
    if not isinstance(record, dict) or not isinstance(record.get("model"), dict):
        raise ConfigError(
            f"{key}: {folder / CONFIG_NAME} records no model config (a `polydiff train` "
            "final/ folder has one)"
        )
    if record.get("modality") != modality:
        raise ConfigError(
            f"{key}: {folder} holds a {record.get('modality')!r} model, but modality is "
            f"{modality!r}"
        )
    teacher_model = record["model"]
    absent = [k for k in _DENOISER_KEYS if k not in teacher_model]
    if absent:
        raise ConfigError(
            f"{key}: {folder} is no denoiser (its model config lacks {', '.join(absent)})"
        )
    guidance = teacher_model["guidance"] if distill.guidance is None else distill.guidance
    resolved = dataclasses.replace(distill, teacher=str(folder), guidance=float(guidance))
    return resolved, teacher_model


def _validate_model(modality: str, model: dict[str, Any], gc_set: bool, where: str) -> dict:
    try:
        cls = load_modality(modality)
    except (ValueError, TypeError, ImportError, AttributeError) as e:
        raise ConfigError(f"modality{where}: {e}") from e
    try:
        validated = cls.validate(model)
    except ConfigError as e:
        if gc_set and "gradient_checkpointing" in str(e):
            raise ConfigError(
                f"train.gradient_checkpointing{where}: the {modality!r} recipe has no "
                f"activation checkpointing option ({e})"
            ) from e
        raise
    return dict(validated)


def resolve_deepspeed_path(spec: str, config_path: Path | None) -> Path:
    """Find a DeepSpeed JSON named in a config.

    Tried in order: an absolute path; relative to the YAML's folder and then to each of its
    parent folders (so ``shared/configs/deepspeed/zero2_bf16.json`` written in
    ``shared/configs/image/x.yaml`` finds the repository's copy); relative to the working
    directory.

    Raises:
        ConfigError: naming ``deepspeed`` and the places looked in.
    """
    given = Path(spec).expanduser()
    candidates = [given] if given.is_absolute() else []
    if not given.is_absolute():
        if config_path is not None:
            folder = config_path.resolve().parent
            candidates += [base / given for base in (folder, *folder.parents)]
        candidates.append(Path.cwd() / given)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    shown = ", ".join(str(c) for c in candidates[:4]) + (" ..." if len(candidates) > 4 else "")
    raise ConfigError(f"deepspeed: config file {spec!r} not found (looked at {shown})")


def _load_deepspeed(spec: Any, config_path: Path | None, where: str) -> tuple[str, dict[str, Any]]:
    if isinstance(spec, dict):
        return "inline", copy.deepcopy(spec)
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"deepspeed{where} must be a path to a JSON file or a mapping")
    path = resolve_deepspeed_path(spec, config_path)
    try:
        ds = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"deepspeed: {path} is not valid JSON ({e})") from e
    if not isinstance(ds, dict):
        raise ConfigError(f"deepspeed: {path} must hold a JSON object")
    return str(path), ds


def _check_deepspeed(ds: dict[str, Any], train: OptimConfig, where: str) -> None:
    for key, why in _OWNED_BY_TRAINER.items():
        if key in ds:
            raise ConfigError(f"deepspeed.{key}{where}: remove it; {why}")
    wanted = {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": train.grad_clip,
    }
    for key, owner in _BATCH_KEYS.items():
        value = ds.get(key, "auto")
        if value == "auto" or (key in wanted and value == wanted[key]):
            continue
        raise ConfigError(
            f'deepspeed.{key}{where} is {value!r}: leave it out or set it to "auto"; '
            f"the YAML sets it ({owner})"
        )
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.zero_optimization.stage{where} must be 0-3, got {stage!r}")


def schema_table() -> str:
    """The ``data``/``train`` keys as a markdown table (for docs): key, default, meaning."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    rows.append("| `modality` | required | recipe name (entry point) or `module:Class` |")
    rows.append(
        "| `model` | required (a distillation: the teacher's) | the recipe's model config "
        "(the recipe validates it) |"
    )
    for section, spec in KEYS.items():
        for key, (default, meaning) in spec.items():
            shown = "required" if default is _REQUIRED else f"`{json.dumps(default)}`"
            rows.append(f"| `{section}.{key}` | {shown} | {meaning} |")
    rows.append("| `deepspeed` | required | path to a DeepSpeed JSON, or an inline mapping |")
    return "\n".join(rows)
