"""How a generated file was made, and writing generated files safely.

Every modality's export embeds one JSON record per output file where the format allows (PNG
text chunks, the MP4 ``comment`` tag, the GIF comment) and writes it beside the file as a
sidecar (:func:`write_sidecar`). The shared generation path uses, in this order:

1. :func:`check_output` -- the ``--out FILE --num N`` paths, checked *before* any sampling;
2. :func:`provenance` -- the record of each output (after sampling, with the values used);
3. the modality's export, which writes each file through :func:`atomic_output` and calls
   :func:`write_sidecar`.

A record, as :func:`provenance` builds it::

    {
      "format": "polydiff-provenance/1",
      "modality": "video",
      "prompt": "a red circle moving left",
      "negative_prompt": null,
      "index": 0,
      "seed": 0,
      "sampler": "unipc",
      "steps": 30,
      "guidance": 3.0,
      "checkpoint": "/abs/path/runs/shapes/final",
      "checkpoint_id": "9f2c4e01a7b3d865",
      "polydiff_version": "0.1.0",
      "created": "2025-01-31T12:00:00Z",
      "frames": 16,
      "fps": 8.0
    }

==================== ==========================================================================
field                meaning
==================== ==========================================================================
``format``           this layout and its version; a reader checks it before trusting the rest
``modality``         the modality that made the file (``image``, ``video``, ...)
``prompt``           the prompt of this file
``negative_prompt``  the negative prompt; ``null`` when none was given
``index``            which of the ``--num`` samples of that prompt this file is (0-based)
``seed``             the run's ``--seed`` (with the prompts and ``index`` it fixes the noise)
``sampler``          the sampler actually used (the checkpoint's default filled in)
``steps``            sampling steps actually used
``guidance``         classifier-free guidance scale actually used (1.0: none)
``checkpoint``       the model folder, as an absolute path
``checkpoint_id``    :func:`checkpoint_id` of that folder: which weights, wherever they are
``polydiff_version`` the installed polydiff-core version (:func:`polydiff_version`)
``created``          when the record was made: UTC, ISO 8601, whole seconds, ``Z`` suffix
*extras*             the modality's own settings by name, after the fields above (video:
                     ``frames``, ``fps``, ``first_frame``...; also ``device``, ``dtype``)
==================== ==========================================================================

The checkpoint id is content based, so it names the weights wherever the folder is copied:
the first 16 hex digits of SHA-256 over the byte size of ``model.safetensors``, its first MiB
and its last MiB. Reading at most 2 MiB keeps it cheap for any model size, and it changes
whenever the weights are saved again (the safetensors header at the front carries a fresh
random id per save) or the tensors at either end change. It is computed once per folder and
file version (size, modification time, inode).

Sidecar naming: the output's whole file name plus ``.json`` (``out.png`` -> ``out.png.json``,
``out.mp4`` -> ``out.mp4.json``), so outputs that differ only by suffix never share a sidecar,
and a sidecar can never be mistaken for an output (no modality writes ``.json`` outputs).

Written files (outputs and sidecars) appear whole or not at all: they are written to a hidden
temporary file in the target's folder and ``os.replace``-d onto the target. They get the
permissions a plain ``open(path, "w")`` gives (``0o666`` less the umask: ``-rw-r--r--`` under
umask 022), never ``mkstemp``'s private ``0o600``.

Cheap to import: only the standard library and :mod:`polydiff.core.files`.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import importlib.metadata
import json
import math
import os
import secrets
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from polydiff.core.files import output_paths

__all__ = [
    "FORMAT",
    "atomic_output",
    "check_output",
    "checkpoint_id",
    "output_targets",
    "parameters_text",
    "polydiff_version",
    "provenance",
    "record_json",
    "sidecar_path",
    "write_sidecar",
]

#: The ``format`` field of every record.
FORMAT = "polydiff-provenance/1"

# = polydiff.core.pretrained.WEIGHTS_NAME (not imported from there: that module pulls in torch).
_WEIGHTS_NAME = "model.safetensors"
_MIB = 1 << 20
_ID_DIGITS = 16
_FIELDS = (
    "format",
    "modality",
    "prompt",
    "negative_prompt",
    "index",
    "seed",
    "sampler",
    "steps",
    "guidance",
    "checkpoint",
    "checkpoint_id",
    "polydiff_version",
    "created",
)


# --- versions and ids -------------------------------------------------------------------


@functools.cache
def polydiff_version() -> str:
    """The installed ``polydiff-core`` distribution's version; ``"unknown"`` when it is not
    installed (e.g. a source tree on ``sys.path``)."""
    try:
        return importlib.metadata.version("polydiff-core")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def checkpoint_id(folder: str | os.PathLike[str]) -> str:
    """A short content id of a checkpoint folder's ``model.safetensors`` (16 hex digits; see
    the module doc), cached while the file stays the same.

    Raises:
        FileNotFoundError: the folder has no ``model.safetensors``.
    """
    weights = Path(folder) / _WEIGHTS_NAME
    try:
        stat = weights.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {folder} has no {_WEIGHTS_NAME}") from None
    real = os.path.realpath(weights)
    return _content_id(real, stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_dev)


@functools.lru_cache(maxsize=64)
def _content_id(path: str, size: int, *_file_version: int) -> str:
    digest = hashlib.sha256(size.to_bytes(8, "little"))
    with open(path, "rb") as handle:
        digest.update(handle.read(_MIB))
        if size > _MIB:
            handle.seek(max(_MIB, size - _MIB))
            digest.update(handle.read(_MIB))
    return digest.hexdigest()[:_ID_DIGITS]


# --- records ----------------------------------------------------------------------------


def provenance(
    *,
    modality: str,
    prompt: str,
    index: int,
    seed: int,
    sampler: str,
    steps: int,
    guidance: float,
    checkpoint: str | os.PathLike[str],
    negative_prompt: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The record of one output file (fields in the module doc), ready for ``json.dumps``.

    Pass the values actually used (the checkpoint's defaults filled in) and the checkpoint
    *folder*; ``extra`` holds the modality's own settings (``Path`` values become strings,
    tuples lists). The checkpoint id is cached, so building a record per output is cheap.

    Raises:
        ValueError: an extra reuses a field name, or a value is not JSON (NaN included).
        FileNotFoundError: the checkpoint folder has no ``model.safetensors``.
    """
    clash = sorted(set(extra) & set(_FIELDS))
    if clash:
        raise ValueError(f"provenance extras may not reuse the fields {', '.join(clash)}")
    guidance = float(guidance)
    if not math.isfinite(guidance):
        raise ValueError(f"guidance must be finite, got {guidance}")
    folder = Path(checkpoint)
    record: dict[str, Any] = {
        "format": FORMAT,
        "modality": str(modality),
        "prompt": str(prompt),
        "negative_prompt": None if negative_prompt is None else str(negative_prompt),
        "index": int(index),
        "seed": int(seed),
        "sampler": str(sampler),
        "steps": int(steps),
        "guidance": guidance,
        "checkpoint": str(folder.resolve()),
        "checkpoint_id": checkpoint_id(folder),
        "polydiff_version": polydiff_version(),
        "created": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
    }
    for name, value in extra.items():
        value = _plain(value)
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"provenance extra {name}={value!r} is not JSON ({exc})") from None
        record[name] = value
    return record


def _plain(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def record_json(record: Mapping[str, Any]) -> str:
    """A record as one line of JSON (what PNG chunks and MP4 / GIF comments carry).

    Raises:
        ValueError: the record is not JSON-serialisable (NaN included).
    """
    try:
        return json.dumps(dict(record), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"provenance record is not JSON ({exc})") from None


def parameters_text(record: Mapping[str, Any]) -> str:
    """A record for people, laid out as image tools show a PNG's ``parameters`` text: the
    prompt; ``Negative prompt: ...`` when there is one; then one line of ``Key: value`` pairs
    (steps, sampler, guidance as ``CFG scale``, seed, index, the checkpoint folder's name and
    id as ``Model`` / ``Model hash``, version, then the extras)."""
    lines = [str(record.get("prompt", ""))]
    if record.get("negative_prompt"):
        lines.append(f"Negative prompt: {record['negative_prompt']}")
    checkpoint = record.get("checkpoint")
    pairs: list[tuple[str, Any]] = [
        ("Steps", record.get("steps")),
        ("Sampler", record.get("sampler")),
        ("CFG scale", record.get("guidance")),
        ("Seed", record.get("seed")),
        ("Index", record.get("index")),
        ("Model", Path(str(checkpoint)).name if checkpoint else None),
        ("Model hash", record.get("checkpoint_id")),
        ("Version", f"polydiff {record.get('polydiff_version', 'unknown')}"),
    ]
    for name, value in record.items():
        if name not in _FIELDS:
            pairs.append((name.replace("_", " ").capitalize(), value))
    lines.append(", ".join(f"{key}: {value}" for key, value in pairs if value is not None))
    return "\n".join(lines)


# --- files ------------------------------------------------------------------------------


def check_output(out: str | Path, suffixes: Sequence[str], num: int) -> list[Path]:
    """The files ``--out FILE --num N`` writes (:func:`polydiff.core.files.output_paths`),
    checked before anything is sampled.

    Args:
        out: the ``--out`` value. suffixes: the modality's file suffixes (``(".png",)``,
            ``(".mp4", ".gif")``); the first is added when ``out`` has none; compared
            case-insensitively. num: how many files (every prompt times ``--num``).

    Returns:
        The paths, in output order. Their folder exists afterwards (created, parents too,
        when missing); nothing else is left behind.

    Raises:
        ValueError: one line starting ``--out OUT:``: a suffix the modality cannot write
            (``--out x.xyz: unsupported suffix .xyz; use .png``), ``out`` or a target that is
            an existing folder, a parent that is a file or cannot be created, a folder this
            process cannot write in; or ``num`` < 1.
    """
    allowed = [s.lower() for s in suffixes]
    if not allowed or any(not s.startswith(".") or len(s) < 2 for s in allowed):
        raise ValueError(f"suffixes must look like '.png', got {list(suffixes)!r}")
    where = f"--out {out}"
    paths = output_paths(out, num, allowed[0])
    if Path(out).is_dir():
        raise ValueError(f"{where}: is an existing folder; name a file inside it")
    suffix = paths[0].suffix
    if suffix.lower() not in allowed:
        raise ValueError(f"{where}: unsupported suffix {suffix}; use {' or '.join(allowed)}")
    for path in paths:
        if path.is_dir():
            raise ValueError(f"{where}: {path} is an existing folder")
    folder = paths[0].parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ValueError(f"{where}: {folder} exists and is not a folder") from None
    except OSError as exc:
        raise ValueError(f"{where}: cannot create folder {folder} ({_reason(exc)})") from None
    try:  # a real probe: os.access misjudges root, ACLs and read-only file systems
        probe, _ = _create_beside(folder / ".polydiff-write-check")
    except OSError as exc:
        raise ValueError(f"{where}: cannot write in folder {folder} ({_reason(exc)})") from None
    probe.unlink()
    return paths


def output_targets(
    count: int,
    paths: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    metadata: Sequence[Mapping[str, Any]] | None,
    suffixes: Sequence[str],
    what: str,
) -> list[tuple[Path, Mapping[str, Any] | None]]:
    """Where each of ``count`` outputs of a modality's ``save_*`` goes, with its record;
    checked before any file is written.

    Args:
        paths: one path per output, or a single ``--out`` FILE expanded by the ``--num``
            naming rule (:func:`check_output`: folders exist and are writable).
        metadata: one provenance record per output, or None (bare files, no sidecars).
        suffixes: the suffixes the modality writes. what: the outputs in words ("videos").

    Raises:
        ValueError: counts that do not match or a suffix the modality cannot write.
    """
    records = [None] * count if metadata is None else list(metadata)
    if len(records) != count:
        raise ValueError(f"got {len(records)} metadata records for {count} {what}")
    single = isinstance(paths, str | os.PathLike)
    targets = output_paths(paths, count, suffixes[0]) if single else [Path(p) for p in paths]
    if len(targets) != count:
        raise ValueError(f"got {len(targets)} paths for {count} {what}")
    for target in targets:
        if target.suffix.lower() not in suffixes:
            raise ValueError(
                f"cannot write {target.suffix!r} {what}; use one of {', '.join(suffixes)}"
            )
    if single:
        check_output(paths, suffixes, count)
    return list(zip(targets, records, strict=True))


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Write ``path`` whole or not at all: ``with atomic_output(p) as tmp: write_to(tmp)``.

    Yields a new empty file in ``path``'s folder (created when missing), hidden and with the
    same suffix so writers that choose the format by suffix still work
    (``.out.1a2b3c4d.png``). When the block ends normally the file gets the permissions a
    plain ``open(path, "w")`` would give (``0o666`` less the umask, applied by the kernel, so
    the umask is never read or changed), is flushed to disk and ``os.replace``-d onto
    ``path``; readers see the old file or the complete new one. On an exception it is
    deleted and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, mode = _create_beside(path.with_name(f".{path.stem}"), path.suffix)
    try:
        yield tmp
        if os.stat(tmp).st_mode & 0o7777 != mode:  # a writer that recreated the file
            os.chmod(tmp, mode)
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    """Where the sidecar of output ``path`` goes: its file name plus ``.json``
    (``out.png`` -> ``out.png.json``)."""
    path = Path(path)
    return path.with_name(f"{path.name}.json")


def write_sidecar(path: str | os.PathLike[str], record: Mapping[str, Any]) -> Path:
    """Write ``record`` as indented UTF-8 JSON to :func:`sidecar_path` of output ``path``,
    through :func:`atomic_output`; -> the sidecar's path.

    Raises:
        ValueError: the record is not JSON-serialisable (nothing is written then).
    """
    try:
        text = json.dumps(dict(record), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    except (TypeError, ValueError) as exc:
        raise ValueError(f"provenance record for {path} is not JSON ({exc})") from None
    target = sidecar_path(path)
    with atomic_output(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return target


def _create_beside(stem: Path, suffix: str = "") -> tuple[Path, int]:
    """Create a new empty file ``<stem>.<random hex><suffix>`` with mode ``0o666`` less the
    umask; -> (its path, its permission bits)."""
    for _ in range(100):
        tmp = stem.with_name(f"{stem.name}.{secrets.token_hex(4)}{suffix}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        try:
            mode = os.fstat(fd).st_mode & 0o7777
        finally:
            os.close(fd)
        return tmp, mode
    raise FileExistsError(errno.EEXIST, "no free temporary file name", str(stem))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__
