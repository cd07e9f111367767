"""The training config: one YAML file, checked strictly before any process starts.

A config has five top-level sections (see ``KEYS`` below for every key and its default)::

    modality: image                      # a recipe name (entry point) or "module:Class"
    model: {...}                         # the recipe's model config (the recipe validates it)
    data: {shards: data/digits, ...}     # where the shards are and how to read them
    train: {max_steps: 2000, batch_size: 32, lr: 3.0e-4, ...}
    deepspeed: shared/configs/deepspeed/zero2_bf16.json   # a JSON file or an inline mapping

A missing required key, an unknown key or a value out of range raises :class:`ConfigError`
naming the key as a dotted path (``train.batch_size``). The YAML is the one source of truth
for the batch: the DeepSpeed JSON must leave ``train_micro_batch_size_per_gpu``,
``gradient_accumulation_steps``, ``gradient_clipping`` and ``train_batch_size`` out (or set
them to ``"auto"``); :meth:`TrainConfig.deepspeed_config` fills them from ``train``.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from .recipe import ConfigError, load_recipe

__all__ = [
    "DECAYS",
    "KEYS",
    "ConfigError",
    "DataConfig",
    "OptimConfig",
    "TrainConfig",
    "cli_overrides",
    "load_config",
    "resolve_deepspeed_path",
]

DECAYS: tuple[str, ...] = ("cosine", "linear", "constant")
_REQUIRED = object()  # marks a key without a default

# Every key of the ``data`` and ``train`` sections: (default, meaning). Kept next to the
# dataclasses below (a test checks they agree) so the documented table is generated from here.
KEYS: dict[str, dict[str, tuple[Any, str]]] = {
    "data": {
        "shards": (None, "shard spec: folder, brace pattern, list or URL (or --data)"),
        "num_workers": (0, "DataLoader worker processes per rank that decode samples"),
        "shuffle_buffer": (256, "samples in the shuffle buffer"),
        "max_bad_fraction": (0.05, "fail when more than this fraction of samples is corrupt"),
        "allow_pipe": (False, "allow `pipe:` shard URLs (they run shell commands)"),
    },
    "train": {
        "max_steps": (_REQUIRED, "optimizer steps to train for (--max-steps)"),
        "batch_size": (_REQUIRED, "micro-batch per process"),
        "lr": (_REQUIRED, "peak learning rate (AdamW)"),
        "grad_accum": (1, "micro-batches per optimizer step"),
        "min_lr": (0.0, "learning rate at the end of the decay"),
        "warmup_steps": (0, "linear warm-up from 0 to lr over this many steps"),
        "lr_decay": ("cosine", "decay after the warm-up: cosine, linear or constant"),
        "decay_steps": (None, "step at which the decay reaches min_lr (null: max_steps)"),
        "weight_decay": (0.0, "AdamW weight decay (matrices only, not biases/norms)"),
        "betas": ([0.9, 0.999], "AdamW betas"),
        "adam_eps": (1e-8, "AdamW epsilon"),
        "grad_clip": (1.0, "clip the global gradient norm (0: off)"),
        "ema_decay": (0.999, "EMA decay after its warm-up"),
        "ema_warmup_steps": (10, "EMA warm-up in updates (0: constant decay)"),
        "gradient_checkpointing": (None, "null: the model config decides; true/false: set it"),
        "seed": (0, "seeds model init, data order, noise"),
        "log_every": (10, "steps between metrics.jsonl lines"),
        "preview_every": (500, "steps between previews (0: only at the end)"),
        "checkpoint_every": (500, "steps between checkpoints (0: only at the end)"),
        "keep_checkpoints": (2, "complete checkpoints kept (0: keep all)"),
        "out": (None, "output folder (--out; null: runs/<config file name>)"),
    },
}
_TOP_KEYS = ("modality", "model", "data", "train", "deepspeed")
_REQUIRED_TOP = ("modality", "model", "train", "deepspeed")
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


@dataclass(frozen=True)
class DataConfig:
    """The ``data:`` section: which shards to stream and how (see ``KEYS["data"]``)."""

    shards: str | list[str] | None = None
    num_workers: int = 0
    shuffle_buffer: int = 256
    max_bad_fraction: float = 0.05
    allow_pipe: bool = False


@dataclass(frozen=True)
class OptimConfig:
    """The ``train:`` section: optimisation, schedule, EMA, logging and checkpoint cadence.

    Steps count optimizer steps; one step consumes ``grad_accum`` micro-batches of
    ``batch_size`` samples on every process.
    """

    max_steps: int
    batch_size: int
    lr: float
    grad_accum: int = 1
    min_lr: float = 0.0
    warmup_steps: int = 0
    lr_decay: str = "cosine"
    decay_steps: int | None = None
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ema_warmup_steps: int = 10
    gradient_checkpointing: bool | None = None
    seed: int = 0
    log_every: int = 10
    preview_every: int = 500
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    out: str | None = None


@dataclass(frozen=True)
class TrainConfig:
    """A checked training config.

    ``model`` is the recipe-validated model config (defaults filled in). ``deepspeed`` is the
    DeepSpeed JSON as written (batch fields absent); ``deepspeed_source`` is its path, or
    ``"inline"``. ``path`` is the YAML file this came from (None when built from a dict).
    """

    modality: str
    model: dict[str, Any]
    data: DataConfig
    train: OptimConfig
    deepspeed: dict[str, Any]
    deepspeed_source: str = "inline"
    path: Path | None = None

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
        train = asdict(self.train)
        train["betas"] = list(self.train.betas)
        return {
            "modality": self.modality,
            "model": self.model,
            "data": asdict(self.data),
            "train": train,
            "deepspeed": self.deepspeed_config(),
            "deepspeed_source": self.deepspeed_source,
        }


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
        validate_model: ask the modality's recipe to validate ``model`` (imports the recipe).

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

    _check_keys(raw, _TOP_KEYS, _REQUIRED_TOP, "", where)
    modality = raw["modality"]
    if not isinstance(modality, str) or not modality:
        raise ConfigError(f"modality{where} must be a recipe name or 'module:Class'")
    data = _section(raw, "data", DataConfig, where)
    train = _section(raw, "train", OptimConfig, where)
    _check_train(train, where)
    _check_data(data, where)

    model = raw["model"] if raw["model"] is not None else {}
    if not isinstance(model, dict):
        raise ConfigError(f"model{where} must be a mapping (the recipe's model config)")
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


def _section(raw: dict[str, Any], name: str, cls: type, where: str) -> Any:
    section = raw.get(name)
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise ConfigError(f"{name}{where} must be a mapping")
    spec = KEYS[name]
    required = tuple(k for k, (default, _) in spec.items() if default is _REQUIRED)
    _check_keys(section, tuple(spec), required, f"{name}.", where)
    values = {k: _coerce(f"{name}.{k}", section[k], spec[k][0], cls, where) for k in section}
    return cls(**values)


def _coerce(key: str, value: Any, default: Any, cls: type, where: str) -> Any:
    """Check a value's type against the field's annotation; YAML-friendly conversions only."""
    annotation = cls.__dataclass_fields__[key.split(".")[1]].type
    if value is None and ("None" in annotation or default is None):
        return None
    if "bool" in annotation:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}{where} must be true or false, got {value!r}")
        return value
    if annotation.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}{where} must be an integer, got {value!r}")
        return value
    if annotation == "float":
        return _float(key, value, where)
    if annotation.startswith("tuple[float"):
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise ConfigError(f"{key}{where} must be a list of two numbers, got {value!r}")
        return tuple(_float(key, v, where) for v in value)
    if annotation.startswith("str | list"):
        ok = isinstance(value, str) or (
            isinstance(value, list) and all(isinstance(v, str) for v in value)
        )
        if not ok:
            raise ConfigError(f"{key}{where} must be a string or a list of strings")
        return value
    if not isinstance(value, str):
        raise ConfigError(f"{key}{where} must be a string, got {value!r}")
    return value


def _float(key: str, value: Any, where: str) -> float:
    # PyYAML reads `1e-4` (no dot) as a string, so numeric strings are accepted.
    if isinstance(value, bool):
        raise ConfigError(f"{key}{where} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}{where} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ConfigError(f"{key}{where} must be finite, got {value!r}")
    return number


def _require(ok: bool, key: str, what: str, value: Any, where: str) -> None:
    if not ok:
        raise ConfigError(f"{key}{where} must be {what}, got {value!r}")


def _check_train(t: OptimConfig, where: str) -> None:
    _require(t.max_steps >= 1, "train.max_steps", ">= 1", t.max_steps, where)
    _require(t.batch_size >= 1, "train.batch_size", ">= 1", t.batch_size, where)
    _require(t.grad_accum >= 1, "train.grad_accum", ">= 1", t.grad_accum, where)
    _require(t.lr > 0, "train.lr", "> 0", t.lr, where)
    _require(0 <= t.min_lr <= t.lr, "train.min_lr", "in [0, train.lr]", t.min_lr, where)
    _require(t.warmup_steps >= 0, "train.warmup_steps", ">= 0", t.warmup_steps, where)
    _require(
        t.lr_decay in DECAYS, "train.lr_decay", f"one of {', '.join(DECAYS)}", t.lr_decay, where
    )
    if t.decay_steps is not None:
        _require(
            t.decay_steps > t.warmup_steps,
            "train.decay_steps",
            "> train.warmup_steps",
            t.decay_steps,
            where,
        )
    _require(t.weight_decay >= 0, "train.weight_decay", ">= 0", t.weight_decay, where)
    _require(all(0 <= b < 1 for b in t.betas), "train.betas", "in [0, 1)", list(t.betas), where)
    _require(t.adam_eps > 0, "train.adam_eps", "> 0", t.adam_eps, where)
    _require(t.grad_clip >= 0, "train.grad_clip", ">= 0 (0: off)", t.grad_clip, where)
    _require(0 <= t.ema_decay < 1, "train.ema_decay", "in [0, 1)", t.ema_decay, where)
    _require(t.ema_warmup_steps >= 0, "train.ema_warmup_steps", ">= 0", t.ema_warmup_steps, where)
    _require(t.seed >= 0, "train.seed", ">= 0", t.seed, where)
    _require(t.log_every >= 1, "train.log_every", ">= 1", t.log_every, where)
    for key in ("preview_every", "checkpoint_every", "keep_checkpoints"):
        value = getattr(t, key)
        _require(value >= 0, f"train.{key}", ">= 0", value, where)


def _check_data(d: DataConfig, where: str) -> None:
    _require(d.num_workers >= 0, "data.num_workers", ">= 0", d.num_workers, where)
    _require(d.shuffle_buffer >= 0, "data.shuffle_buffer", ">= 0", d.shuffle_buffer, where)
    _require(
        0 <= d.max_bad_fraction <= 1,
        "data.max_bad_fraction",
        "in [0, 1]",
        d.max_bad_fraction,
        where,
    )
    if d.shards is not None:
        _require(len(d.shards) > 0, "data.shards", "non-empty", d.shards, where)


def _validate_model(modality: str, model: dict[str, Any], gc_set: bool, where: str) -> dict:
    try:
        recipe = load_recipe(modality)
    except (ValueError, TypeError, ImportError, AttributeError) as e:
        raise ConfigError(f"modality{where}: {e}") from e
    try:
        validated = recipe.validate(model)
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
    rows.append("| `model` | required | the recipe's model config (the recipe validates it) |")
    for section, spec in KEYS.items():
        for key, (default, meaning) in spec.items():
            shown = "required" if default is _REQUIRED else f"`{json.dumps(default)}`"
            rows.append(f"| `{section}.{key}` | {shown} | {meaning} |")
    rows.append("| `deepspeed` | required | path to a DeepSpeed JSON, or an inline mapping |")
    return "\n".join(rows)
