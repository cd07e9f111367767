"""Config schemas: every modality's ``model:`` section is a pydantic model built from these.

A modality's schema derives from :class:`DenoisingSchema` (the keys every text-conditioned
denoiser shares) or from :class:`ModelSchema` (nothing shared), and declares its own keys with
the field types below, so every config error reads the same. :func:`validate_schema` turns a
raw mapping (parsed YAML, or a checkpoint's recorded config) into the plain dict the trainer
records, or raises :class:`~polydiff.core.modality.contract.ConfigError` with one line that
names the dotted key first::

    model.dit.heads: dim / heads must be a multiple of 4 (2D rotary)
    unknown key(s) model.unet.base_chanels; valid: attention_levels, base_channels, ...

The shared keys, with their defaults::

    text_encoder: null      # null = the bundled all-MiniLM-L6-v2; or a local model folder
    text_max_length: 16     # text token positions (prompts are padded / truncated)
    schedule: cosine        # linear | scaled_linear | cosine | flow
    zero_terminal_snr: false
    shift: 1.0              # time shift (training times and flow_shift sampling grids)
    prediction: v           # eps | x0 | v | flow
    time_distribution: uniform   # uniform | logit_normal
    weighting: min_snr      # none | min_snr
    snr_gamma: 5.0
    cond_drop: 0.1          # CFG training: probability of the empty prompt
    sampler: unipc          # defaults of previews and `polydiff generate`
    sample_steps: 30
    guidance: 3.0
    gradient_checkpointing: false

Field types (``Annotated`` metadata; each checks its value completely and says what it
expected): :class:`Number` (ints stay strict, floats also take YAML's ``"1e-4"`` strings),
:class:`OneOf`, :class:`IntList`, :class:`Text` and :data:`Flag`. Cross-field rules go in
pydantic validators that raise :class:`Problem` naming the key; a schema whose fields depend on
another key's value (which sections a ``kind`` reads) overrides :meth:`ModelSchema.prepare`.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, get_args

import pydantic
from pydantic import (
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)
from pydantic_core import CoreSchema, core_schema

from ..objectives import TIME_DISTRIBUTIONS, WEIGHTINGS
from ..predictions import PREDICTIONS
from ..sampling import SAMPLERS
from .contract import ConfigError

__all__ = [
    "SCHEDULES",
    "DenoisingSchema",
    "Flag",
    "IntList",
    "Issue",
    "KindSchema",
    "ModelSchema",
    "Number",
    "OneOf",
    "Probability",
    "Problem",
    "Text",
    "TransformerSchema",
    "UNetSchema",
    "UnknownKeys",
    "defaults",
    "describe",
    "known_keys",
    "validate_schema",
]

SCHEDULES: tuple[str, ...] = ("linear", "scaled_linear", "cosine", "flow")


# --- problems raised inside schemas --------------------------------------------------------
class Problem(ValueError):
    """A config problem raised in a validator: ``key`` (dotted, relative to the model that
    raises it; empty for the model itself) and what is wrong with it."""

    def __init__(self, problem: str, key: str = "") -> None:
        super().__init__(problem)
        self.key = key


class UnknownKeys(Problem):
    """Keys a mapping may not have, and the ones it may (in declaration order)."""

    def __init__(self, unknown: Iterable[Any], valid: Iterable[str]) -> None:
        self.unknown = tuple(sorted(unknown, key=str))
        self.valid = tuple(valid)
        super().__init__(f"unknown key(s) {', '.join(map(str, self.unknown))}")


def known_keys(data: Any, valid: Iterable[str]) -> dict[Any, Any]:
    """``data`` as a dict, refusing a non-mapping or keys outside ``valid``."""
    if not isinstance(data, Mapping):
        raise Problem(f"expected a mapping, got {type(data).__name__}")
    valid = tuple(valid)
    unknown = [key for key in data if key not in valid]
    if unknown:
        raise UnknownKeys(unknown, valid)
    return dict(data)


# --- field types ---------------------------------------------------------------------------
def _wrap(check: Any, schema: CoreSchema) -> CoreSchema:
    """A validator that does all the checking itself; ``schema`` describes the accepted values
    (JSON schema, serialisation)."""
    return core_schema.no_info_wrap_validator_function(lambda value, _: check(value), schema)


# eq=False: typing caches Annotated[...] by its arguments, and Number(1) == Number(1.0).
@dataclass(frozen=True, eq=False)
class Number:
    """An ``int`` or ``float`` in [``low``, ``high``]; ``what`` replaces "float >= low".

    ``Annotated[int, Number(1)]`` takes ints only (no bools, no 1.0). ``Annotated[float,
    Number(0.0)]`` takes ints and floats as given (an int stays an int) and numeric strings,
    which it converts: YAML 1.1 reads ``1e-4`` (no dot) as the string ``"1e-4"``. Not finite
    numbers are refused.
    """

    low: float
    high: float | None = None
    what: str | None = None

    def check(self, value: Any, integer: bool = False, key: str = "") -> Any:
        """``value`` if it is such a number (a numeric string as a float), else Problem."""
        if not integer and isinstance(value, str):
            with contextlib.suppress(ValueError):  # a non-number is reported below
                value = float(value)
        ok = isinstance(value, int) if integer else isinstance(value, int | float)
        if (
            not ok
            or isinstance(value, bool)
            or not math.isfinite(value)
            or value < self.low
            or (self.high is not None and value > self.high)
        ):
            kind = "int" if integer else "float"
            expected = self.what or (
                f"{kind} >= {self.low}"
                if self.high is None
                else f"{kind} in [{self.low}, {self.high}]"
            )
            raise Problem(f"expected {expected}, got {value!r}", key)
        return value

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        integer = source is int
        bounds: dict[str, Any] = {"ge": self.low, "le": self.high}
        inner = (
            core_schema.int_schema(**bounds)
            if integer
            else core_schema.float_schema(allow_inf_nan=False, **bounds)
        )
        return _wrap(lambda value: self.check(value, integer), inner)


@dataclass(frozen=True, eq=False)
class OneOf:
    """One of ``choices`` (of the same type: ``True`` is not ``1``); ``expected`` words the
    message ("expected 1 (grey) or 3 (RGB), got 4"), else "'x' is not one of a, b, c"."""

    choices: tuple[Any, ...]
    expected: str | None = None

    def check(self, value: Any, key: str = "") -> Any:
        """``value`` if it is one of the choices, else Problem (naming ``key``)."""
        if any(value == c and type(value) is type(c) for c in self.choices):
            return value
        if self.expected:
            raise Problem(f"expected {self.expected}, got {value!r}", key)
        raise Problem(f"{value!r} is not one of {', '.join(map(str, self.choices))}", key)

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        return _wrap(self.check, core_schema.literal_schema(list(self.choices)))


@dataclass(frozen=True, eq=False)
class IntList:
    """A list of ints >= ``low`` (of ``length`` items when given); tuples become lists."""

    low: int
    length: int | None = None

    def check(self, value: Any, key: str = "") -> list[int]:
        """``value`` as a list if it is such a list, else Problem (naming ``key``)."""
        ok = isinstance(value, list | tuple) and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= self.low for v in value
        )
        if not ok or (self.length is not None and len(value) != self.length):
            items = "a list of" if self.length is None else f"a list of {self.length}"
            raise Problem(f"expected {items} integers >= {self.low}, got {value!r}", key)
        return list(value)

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        inner = core_schema.list_schema(
            core_schema.int_schema(ge=self.low), min_length=self.length, max_length=self.length
        )
        return _wrap(self.check, inner)


@dataclass(frozen=True, eq=False)
class Text:
    """A string (``empty=False``: a non-empty one); ``expected`` words the message. For an
    optional one write ``Annotated[str, Text(...)] | None``."""

    expected: str
    empty: bool = True

    def check(self, value: Any, key: str = "") -> str:
        """``value`` if it is such a string, else Problem (naming ``key``)."""
        if not isinstance(value, str) or not (self.empty or value):
            raise Problem(f"expected {self.expected}, got {value!r}", key)
        return value

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        return _wrap(self.check, core_schema.str_schema(min_length=None if self.empty else 1))


@dataclass(frozen=True, eq=False)
class _Flag:
    def check(self, value: Any, key: str = "") -> bool:
        if not isinstance(value, bool):
            raise Problem(f"expected true/false, got {value!r}", key)
        return value

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        return _wrap(self.check, core_schema.bool_schema())


#: ``true`` or ``false`` (not 0 / 1).
Flag = Annotated[bool, _Flag()]
#: A float in [0, 1].
Probability = Annotated[float, Number(0.0, 1.0, what="a probability in [0, 1]")]


# --- schemas -------------------------------------------------------------------------------
class ModelSchema(pydantic.BaseModel):
    """Base of every modality's ``model:`` schema: unknown keys are refused at every level
    (nested sections derive from this too), defaults are validated, instances are frozen."""

    model_config = ConfigDict(extra="forbid", validate_default=True, frozen=True, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, cls):
            return data
        return cls.prepare(known_keys(data, cls.model_fields))

    @classmethod
    def prepare(cls, data: dict[str, Any]) -> dict[str, Any]:
        """Adjust the given mapping (known keys only) before its fields are validated, e.g.
        fill in the sections another key selects. Raise :class:`Problem` naming the key."""
        return data


class TransformerSchema(ModelSchema):
    """The sizes every DiT section shares (``polydiff.core.blocks.DiT``); a modality's section
    adds its patch and positions."""

    dim: Annotated[int, Number(1)] = 192
    depth: Annotated[int, Number(1)] = 6
    heads: Annotated[int, Number(1)] = 6
    mlp_ratio: Annotated[float, Number(1e-6)] = 4.0
    qk_norm: Flag = True

    def rotary_head_dim(self, axes: int) -> None:
        """Refuse a head width that ``axes``-D rotary positions cannot split evenly."""
        head_dim, rest = divmod(self.dim, self.heads)
        if axes == 2 and (rest or head_dim % 4):
            raise Problem("dim / heads must be a multiple of 4 (2D rotary)", "heads")
        if axes == 3 and (rest or head_dim % 2 or head_dim < 6):
            raise Problem("dim / heads must be an even number >= 6 (3D rotary)", "heads")


class UNetSchema(ModelSchema):
    """The sizes of a ``polydiff.core.blocks.UNet`` section; a modality's section may change
    the defaults."""

    base_channels: Annotated[int, Number(1)] = 32
    channel_mult: Annotated[list[int], IntList(1)] = Field(default_factory=lambda: [1, 2])
    num_res_blocks: Annotated[int, Number(1)] = 2
    attention_levels: Annotated[list[int], IntList(0)] = Field(default_factory=lambda: [1])
    heads: Annotated[int, Number(1)] = 4
    dropout: Annotated[float, Number(0.0)] = 0.0

    @model_validator(mode="after")
    def _levels_fit(self) -> UNetSchema:
        if not self.channel_mult:
            raise Problem("needs at least one level", "channel_mult")
        if any(level >= len(self.channel_mult) for level in self.attention_levels):
            raise Problem("must index channel_mult", "attention_levels")
        if any(self.base_channels * m % self.heads for m in self.channel_mult):
            raise Problem("must divide every level's width", "heads")
        return self

    @property
    def downsample_factor(self) -> int:
        """What every spatial size must be divisible by."""
        return 2 ** (len(self.channel_mult) - 1)


class DenoisingSchema(ModelSchema):
    """The keys every text-conditioned denoiser shares (see the module doc)."""

    text_encoder: Annotated[str, Text("null (bundled MiniLM) or a model folder path")] | None = None
    text_max_length: Annotated[int, Number(2)] = 16
    schedule: Annotated[str, OneOf(SCHEDULES)] = "cosine"
    zero_terminal_snr: Flag = False
    shift: Annotated[float, Number(1e-6)] = 1.0
    prediction: Annotated[str, OneOf(PREDICTIONS)] = "v"
    time_distribution: Annotated[str, OneOf(TIME_DISTRIBUTIONS)] = "uniform"
    weighting: Annotated[str, OneOf(WEIGHTINGS)] = "min_snr"
    snr_gamma: Annotated[float, Number(1e-6)] = 5.0
    cond_drop: Probability = 0.1
    sampler: Annotated[str, OneOf(tuple(SAMPLERS))] = "unipc"
    sample_steps: Annotated[int, Number(1)] = 30
    guidance: Annotated[float, Number(0.0)] = 3.0
    gradient_checkpointing: Flag = False

    @model_validator(mode="after")
    def _terminal_snr_needs_a_clean_target(self) -> DenoisingSchema:
        if self.zero_terminal_snr and self.prediction == "eps":
            raise Problem("eps cannot be used with zero_terminal_snr (use v or x0)", "prediction")
        return self


class KindSchema(DenoisingSchema):
    """A denoising section whose ``kind`` says which sub-sections it reads (image: ``unet``,
    ``dit``, ``autoencoder``; audio: ``dit``, ``unet``, ``gan``): a sub-section another kind
    reads is refused, the kind's own are filled in with their defaults, and the validated
    config holds exactly the kind's sections. Subclasses set ``kind_sections`` and declare
    ``kind`` and the sections as fields."""

    #: kind -> the sections it reads, the first kind the default.
    kind_sections: ClassVar[Mapping[str, tuple[str, ...]]] = {}

    @classmethod
    def all_sections(cls) -> tuple[str, ...]:
        return tuple(dict.fromkeys(s for sections in cls.kind_sections.values() for s in sections))

    @classmethod
    def prepare(cls, data: dict[str, Any]) -> dict[str, Any]:
        """Check ``kind`` first (the sections depend on it), refuse the sections it does not
        read and fill in those it does (:meth:`prepare_section`)."""
        kinds = tuple(cls.kind_sections)
        kind = OneOf(kinds).check(data.get("kind", kinds[0]), "kind")
        for section in cls.all_sections():
            if section in data and section not in cls.kind_sections[kind]:
                raise Problem(f"is not used by kind {kind!r}; remove it", section)
        for section in cls.kind_sections[kind]:
            data[section] = cls.prepare_section(kind, section, data.get(section, {}))
        return data

    @classmethod
    def prepare_section(cls, kind: str, section: str, given: Any) -> Any:
        """The given value of a section ``kind`` reads (default: a mapping of its keys)."""
        if not isinstance(given, Mapping):
            raise Problem(f"expected a mapping, got {type(given).__name__}", section)
        return given

    @model_serializer(mode="wrap")
    def _kind_sections_only(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        for section in self.all_sections():
            if section not in self.kind_sections[data["kind"]]:
                data.pop(section, None)
        return data


def defaults(schema: type[pydantic.BaseModel]) -> dict[str, Any]:
    """The default of every field of ``schema``, by name (copies)."""
    return {
        name: copy.deepcopy(field.get_default(call_default_factory=True))
        for name, field in schema.model_fields.items()
    }


# --- errors --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Issue:
    """One problem of a config, in config terms (see :func:`describe`).

    ``key`` is the dotted key with the prefix (``model.dit.heads``, ``model.buckets[0]``); for
    unknown keys it is the mapping that holds them, ``unknown`` names them and ``valid`` lists
    the keys that mapping may have. ``missing`` marks a required key that was not given.
    """

    key: str
    problem: str
    unknown: tuple[str, ...] = ()
    valid: tuple[str, ...] = ()
    missing: bool = False

    def line(self) -> str:
        """The one-line message: ``<key>: <problem>``, ``unknown key(s) ...; valid: ...``."""
        if self.unknown:
            names = ", ".join(_join(self.key, k) for k in self.unknown)
            valid = f"; valid: {', '.join(sorted(self.valid))}" if self.valid else ""
            return f"unknown key(s) {names}{valid}"
        if self.missing:
            return f"missing key {self.key}"
        return f"{self.key}: {self.problem}"


# pydantic's own error types (from schemas that do not use the field types above), in words.
_EXPECTED = {
    "a mapping": ("model_type", "model_attributes_type", "dict_type", "dataclass_type"),
    "a list": ("list_type", "tuple_type"),
    "a string": ("string_type",),
    "an integer": ("int_type", "int_parsing", "int_from_float"),
    "a number": ("float_type", "float_parsing"),
    "a finite number": ("finite_number",),
    "true/false": ("bool_type", "bool_parsing"),
}
_WORDS = {kind: words for words, kinds in _EXPECTED.items() for kind in kinds}
_BOUNDS = {
    "greater_than_equal": ">=",
    "greater_than": ">",
    "less_than_equal": "<=",
    "less_than": "<",
}


def _pydantic_problem(kind: str, message: str, ctx: Mapping[str, Any], value: Any) -> str:
    if kind in _WORDS:
        return f"expected {_WORDS[kind]}, got {value!r}"
    if kind in _BOUNDS:
        bound = next(iter(ctx.values()), "")
        return f"expected a number {_BOUNDS[kind]} {bound}, got {value!r}"
    if kind == "literal_error":
        return f"{value!r} is not one of {ctx.get('expected', '')}"
    if message.startswith("Input should be "):
        return f"expected {message.removeprefix('Input should be ')}, got {value!r}"
    return message


def _join(prefix: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{prefix}[{key}]"
    return f"{prefix}.{key}" if prefix else str(key)


def _dotted(prefix: str, loc: Iterable[Any]) -> str:
    out = prefix
    for part in loc:
        out = _join(out, part)
    return out


def _issue(error: Mapping[str, Any], prefix: str) -> Issue:
    loc, kind, value = tuple(error["loc"]), error["type"], error.get("input")
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, Problem):
        key = _dotted(prefix, (*loc, *(cause.key.split(".") if cause.key else ())))
        if isinstance(cause, UnknownKeys):
            return Issue(key, str(cause), tuple(map(str, cause.unknown)), cause.valid)
        return Issue(key, str(cause))
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        return Issue(_dotted(prefix, loc[:-1]), "unknown key", (str(loc[-1]),))
    if kind in ("missing", "missing_keyword_argument", "missing_argument"):
        return Issue(_dotted(prefix, loc), "missing", missing=True)
    if cause is not None:
        return Issue(_dotted(prefix, loc), str(cause))
    problem = _pydantic_problem(kind, error["msg"], error.get("ctx", {}), value)
    return Issue(_dotted(prefix, loc), problem)


def _fields_at(schema: Any, loc: tuple[Any, ...]) -> tuple[str, ...]:
    """The field names of the model at ``loc`` inside ``schema`` (() when not a plain one)."""
    for part in loc:
        field = getattr(schema, "model_fields", {}).get(part)
        if field is None:
            return ()
        models = [
            t
            for t in (field.annotation, *get_args(field.annotation))
            if isinstance(t, type) and issubclass(t, pydantic.BaseModel)
        ]
        if len(models) != 1:
            return ()
        schema = models[0]
    return tuple(getattr(schema, "model_fields", ()))


def describe(
    error: pydantic.ValidationError,
    prefix: str = "model",
    schema: type[pydantic.BaseModel] | None = None,
) -> Issue:
    """The problem of ``error`` to report: unknown keys first (all those of one mapping
    together), then a missing key, then the first other problem (in field order).

    ``schema`` (the validated model) lets unknown keys that pydantic's own ``extra="forbid"``
    refused list the valid ones too.
    """
    errors = error.errors(include_url=False)
    issues = [_issue(e, prefix) for e in errors]
    unknown = [(i, e) for i, e in zip(issues, errors, strict=True) if i.unknown]
    if unknown:
        first, raw = unknown[0]
        same = [i for i, _ in unknown if i.key == first.key]
        names = tuple(sorted(dict.fromkeys(k for i in same for k in i.unknown)))
        valid = next((i.valid for i in same if i.valid), ())
        if not valid and schema is not None and raw["type"] == "extra_forbidden":
            valid = _fields_at(schema, tuple(raw["loc"][:-1]))
        return Issue(first.key, first.problem, names, valid)
    return next((i for i in issues if i.missing), issues[0])


def validate_schema(
    schema: type[pydantic.BaseModel], raw: Any, prefix: str = "model"
) -> dict[str, Any]:
    """``raw`` checked against ``schema``, as a plain dict with the defaults filled in (nested
    sections as dicts, lists as lists): what a checkpoint records, so validating a recorded
    config gives it back unchanged.

    Raises:
        ConfigError: one line naming the dotted key (``<prefix>.dit.heads: ...``).
    """
    try:
        validated = schema.model_validate(raw)
    except pydantic.ValidationError as e:
        raise ConfigError(describe(e, prefix, schema).line()) from None
    return validated.model_dump()
