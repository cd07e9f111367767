"""Save / load a model as a local folder: ``model.safetensors`` + ``config.json``.

A model class only needs a JSON-serialisable dict attribute ``config`` holding its
constructor keyword arguments; the :class:`Configurable` mixin records it automatically::

    class Denoiser(Configurable, nn.Module):
        def __init__(self, dim: int = 64, depth: int = 2):
            super().__init__()
            ...

    save_pretrained(Denoiser(dim=32), "ckpt/denoiser")
    model = from_pretrained("ckpt/denoiser")         # == Denoiser(dim=32, depth=2) + weights

``config.json`` is ``{"class": "module.path:ClassName", "config": {...},
"polydiff_version": "...", "checkpoint_id": "..."}``. With ``cls=None`` the class is imported
from the recorded path, but only from modules under ``polydiff.`` (a checkpoint file must not
be able to import arbitrary code). Every failure raises :class:`CheckpointError` naming the
problem and the path.

Writes are atomic: a new checkpoint is written into a temporary folder next to the target
and renamed into place. When the target folder already exists (it may hold other files),
each file is written to a temporary name and ``os.replace``-d, weights first; both files
carry the same random ``checkpoint_id``, so a crash between the two renames is detected at
load time instead of silently pairing new weights with an old config.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import os
import shutil
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any, TypeVar

import safetensors
import safetensors.torch
import torch
from torch import nn

from polydiff.core.ema import unwrap_model
from polydiff.core.provenance import polydiff_version

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "CheckpointError",
    "Configurable",
    "class_path",
    "from_pretrained",
    "import_class",
    "save_pretrained",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_ALLOWED_PREFIX = "polydiff."
_ID_KEY = "polydiff_checkpoint_id"  # in the safetensors metadata

M = TypeVar("M", bound=nn.Module)


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete, corrupt, or does not match the model."""


class Configurable:
    """Mixin that records the constructor's arguments as ``self.config`` (a dict).

    Every subclass ``__init__`` is wrapped; the arguments of the most-derived constructor
    win, with defaults filled in and ``**kwargs`` flattened. ``*args`` cannot be recorded
    and raise ``TypeError`` when non-empty. Values must be JSON-serialisable to be saved
    (tuples come back as lists).
    """

    config: dict[str, Any]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None or getattr(init, "_records_config", False):
            return
        sig = inspect.signature(init)

        @functools.wraps(init)
        def recording_init(self: Any, *args: Any, **kw: Any) -> None:
            bound = sig.bind(self, *args, **kw)
            bound.apply_defaults()
            config: dict[str, Any] = {}
            for name, value in list(bound.arguments.items())[1:]:
                kind = sig.parameters[name].kind
                if kind is inspect.Parameter.VAR_POSITIONAL:
                    if value:
                        raise TypeError(
                            f"{cls.__qualname__}: *args cannot be recorded in the config; "
                            "pass them by keyword"
                        )
                elif kind is inspect.Parameter.VAR_KEYWORD:
                    config.update(value)
                else:
                    config[name] = value
            init(self, *args, **kw)
            # Parent constructors called via super() finish first, so the outermost
            # (most-derived) constructor's arguments are the ones left in place.
            self.config = config

        recording_init._records_config = True  # type: ignore[attr-defined]
        cls.__init__ = recording_init  # type: ignore[method-assign]


def class_path(cls: type) -> str:
    """``"module:QualName"``: how checkpoints record a model class."""
    return f"{cls.__module__}:{cls.__qualname__}"


def fsync_path(path: Path) -> None:
    """Flush a file or folder to disk (best effort: some platforms cannot sync folders)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # directories cannot be fsync-ed on some platforms (Windows)
    finally:
        os.close(fd)


def _write_pair(
    model: nn.Module, config_text: str, weights: Path, config: Path, ckpt_id: str
) -> None:
    safetensors.torch.save_model(model, str(weights), metadata={_ID_KEY: ckpt_id})
    config.write_text(config_text, encoding="utf-8")
    # safetensors creates its file 0o600; open() gave config.json the user's normal
    # permissions (0o666 less the umask), and the weights get the same.
    os.chmod(weights, config.stat().st_mode & 0o777)
    fsync_path(weights)
    fsync_path(config)


def save_pretrained(
    model: nn.Module, folder: str | os.PathLike[str], config: dict[str, Any] | None = None
) -> Path:
    """Atomically save ``model`` as ``folder/model.safetensors`` + ``folder/config.json``.

    Args:
        model: the model (bare or wrapped by DDP / DeepSpeed / ``torch.compile``). Its
            class is recorded as ``"module:QualName"``.
        folder: target folder; created if missing (parents too). Other files in an existing
            folder are left alone; the two checkpoint files are replaced.
        config: constructor kwargs to record; default ``model.config`` (a dict).

    Returns:
        The folder path.

    Raises:
        CheckpointError: no config dict, or the config is not JSON-serialisable. Nothing is
            written in that case.
    """
    model = unwrap_model(model)
    folder = Path(folder)
    if config is None:
        config = getattr(model, "config", None)
        if not isinstance(config, dict):
            raise CheckpointError(
                f"cannot save {type(model).__qualname__} to {folder}: the model has no dict "
                "attribute `config`; pass config= or inherit from Configurable"
            )
    ckpt_id = uuid.uuid4().hex
    record = {
        "class": class_path(type(model)),
        "config": config,
        "polydiff_version": polydiff_version(),
        "checkpoint_id": ckpt_id,
    }
    try:
        config_text = json.dumps(record, indent=2, sort_keys=True, allow_nan=False) + "\n"
    except (TypeError, ValueError) as e:
        raise CheckpointError(
            f"cannot save {type(model).__qualname__} to {folder}: config is not "
            f"JSON-serialisable ({e})"
        ) from e

    folder.parent.mkdir(parents=True, exist_ok=True)
    if not folder.exists():
        # New checkpoint: build it in a sibling temp folder, then one atomic rename.
        # mkdir applies the umask (drwxr-xr-x under 022), unlike mkdtemp's private 0o700.
        tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex}"
        tmp.mkdir(mode=0o777)
        try:
            _write_pair(model, config_text, tmp / WEIGHTS_NAME, tmp / CONFIG_NAME, ckpt_id)
            os.rename(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    else:
        if not folder.is_dir():
            raise CheckpointError(f"cannot save to {folder}: it exists and is not a folder")
        tmp_w = folder / f".{WEIGHTS_NAME}.tmp-{ckpt_id}"
        tmp_c = folder / f".{CONFIG_NAME}.tmp-{ckpt_id}"
        try:
            _write_pair(model, config_text, tmp_w, tmp_c, ckpt_id)
            os.replace(tmp_w, folder / WEIGHTS_NAME)
            os.replace(tmp_c, folder / CONFIG_NAME)
        except BaseException:
            tmp_w.unlink(missing_ok=True)
            tmp_c.unlink(missing_ok=True)
            raise
    fsync_path(folder)
    fsync_path(folder.parent)
    return folder


def _read_record(folder: Path) -> dict[str, Any]:
    if not folder.exists():
        raise CheckpointError(f"checkpoint folder not found: {folder}")
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint path is not a folder: {folder}")
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"checkpoint config missing: {path}")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint config is not valid JSON: {path} ({e})") from e
    if (
        not isinstance(record, dict)
        or not isinstance(record.get("class"), str)
        or not isinstance(record.get("config"), dict)
    ):
        raise CheckpointError(
            f"checkpoint config must be an object with a string 'class' and an object "
            f"'config': {path}"
        )
    return record


def import_class(path: str, where: Path | str = "a checkpoint") -> type[nn.Module]:
    """The ``nn.Module`` class recorded as ``"module:QualName"`` (only ``polydiff.*`` modules
    are imported); CheckpointError otherwise."""
    module_name, sep, qualname = path.partition(":")
    if not sep or not module_name or not qualname:
        raise CheckpointError(f"invalid class path {path!r} in {where}; expected 'module:Class'")
    if not module_name.startswith(_ALLOWED_PREFIX):
        raise CheckpointError(
            f"refusing to import {path!r} recorded in {where}: only classes under "
            f"'{_ALLOWED_PREFIX}*' are imported automatically; pass cls= explicitly"
        )
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise CheckpointError(f"cannot import {path!r} recorded in {where}: {e}") from e
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise CheckpointError(f"{path!r} recorded in {where} is not an nn.Module class")
    # Following attributes can reach other packages' classes (polydiff.x.model:nn.Linear).
    if not obj.__module__.startswith(_ALLOWED_PREFIX):
        raise CheckpointError(
            f"refusing {path!r} recorded in {where}: it names {obj.__module__}.{obj.__name__}, "
            f"not a class defined in a '{_ALLOWED_PREFIX}*' module"
        )
    return obj


def _read_header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Tensor shapes and metadata from a safetensors header (no tensor data is read)."""
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (not iterable)
            metadata = f.metadata() or {}
    except (safetensors.SafetensorError, OSError) as e:
        raise CheckpointError(f"checkpoint weights are corrupt: {path} ({e})") from e
    return shapes, metadata


def _check_keys(model: nn.Module, shapes: dict[str, tuple[int, ...]], path: Path) -> None:
    """Compare the file's names and shapes with the model's state dict."""
    expected = model.state_dict()
    # Tied tensors are stored once under one of their names (safetensors.save_model).
    groups: dict[tuple[Any, ...], list[str]] = defaultdict(list)
    for name, t in expected.items():
        if t.device.type == "meta":
            groups[("name", name)].append(name)
        else:
            storage = t.untyped_storage()
            groups[(t.device, storage.data_ptr(), storage.nbytes())].append(name)
    missing = [g for g in groups.values() if not any(n in shapes for n in g)]
    unexpected = sorted(set(shapes) - set(expected))
    misshaped = [
        f"{k}: file {shapes[k]} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(shapes) & set(expected))
        if shapes[k] != tuple(expected[k].shape)
    ]
    if missing or unexpected or misshaped:
        lines = [f"checkpoint weights do not match {type(model).__qualname__}: {path}"]
        if missing:
            lines.append("  missing keys: " + ", ".join(sorted(" = ".join(g) for g in missing)))
        if unexpected:
            lines.append("  unexpected keys: " + ", ".join(unexpected))
        if misshaped:
            lines.append("  mis-shaped keys: " + "; ".join(misshaped))
        raise CheckpointError("\n".join(lines))


def from_pretrained(
    folder: str | os.PathLike[str],
    cls: type[M] | None = None,
    map_location: str | torch.device = "cpu",
) -> M:
    """Rebuild a model saved by :func:`save_pretrained` and load its weights strictly.

    Args:
        folder: the checkpoint folder.
        cls: the model class. ``None`` imports the recorded class (only from ``polydiff.*``
            modules). When given, it must be the recorded class.
        map_location: device on which the model is built and the weights are loaded.

    Returns:
        ``cls(**config)`` with the saved weights, in eval mode. Parameters keep the dtype
        the constructor gives them (saved tensors are cast on load).

    Raises:
        CheckpointError: folder / config / weights missing, invalid JSON, corrupt or
            truncated weights, class mismatch, constructor rejecting the config,
            missing / unexpected / mis-shaped keys, or a torn (half-replaced) checkpoint.
    """
    folder = Path(folder)
    record = _read_record(folder)
    config_path = folder / CONFIG_NAME
    recorded = record["class"]
    if cls is None:
        cls = import_class(recorded, config_path)  # type: ignore[assignment]
    elif class_path(cls) != recorded:
        raise CheckpointError(
            f"class mismatch: {config_path} records {recorded!r} but cls is {class_path(cls)!r}"
        )
    assert cls is not None
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"checkpoint weights missing: {weights}")

    shapes, metadata = _read_header(weights)
    file_id, ckpt_id = metadata.get(_ID_KEY), record.get("checkpoint_id")
    if file_id is not None and ckpt_id is not None and file_id != ckpt_id:
        raise CheckpointError(
            f"checkpoint in {folder} is torn: {WEIGHTS_NAME} and {CONFIG_NAME} come from "
            "different saves (a save was interrupted); re-save it"
        )

    try:
        with torch.device(map_location):
            model = cls(**record["config"])
    except TypeError as e:
        raise CheckpointError(
            f"config in {config_path} does not fit {cls.__qualname__}'s constructor: {e}"
        ) from e
    _check_keys(model, shapes, weights)
    try:
        safetensors.torch.load_model(model, weights, strict=True, device=str(map_location))
    except (safetensors.SafetensorError, OSError, RuntimeError) as e:
        # e.g. truncated tensor data, which the header check cannot see
        raise CheckpointError(f"cannot load checkpoint weights {weights}: {e}") from e
    return model.eval()
