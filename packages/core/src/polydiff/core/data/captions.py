"""A user's folder of captioned files, as every modality's ``source`` reads it.

Captions are given by any of (first match wins):

1. a sidecar text file next to the file: ``cat.png`` + ``cat.txt``;
2. ``captions.csv`` in the folder, with a header row and the columns ``file,caption``;
3. ``captions.jsonl`` in the folder, one ``{"file": ..., "caption": ...}`` object per line.

``file`` is the path relative to the folder.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .shards import Skip

__all__ = [
    "CaptionedFile",
    "captioned_files",
    "captioned_source",
    "metadata_field",
    "payload_field",
    "read_captions",
    "sample_key",
    "text_field",
]


def read_captions(folder: Path) -> dict[str, str]:
    """Captions from ``captions.csv`` and ``captions.jsonl`` in ``folder``: {relative file: text}.

    Raises:
        ValueError: a captions file without the required columns/fields, naming the file and
            the line.
    """
    try:
        return _read_captions(folder)
    except UnicodeDecodeError as e:
        raise ValueError(f"a captions file in {folder} is not UTF-8 text ({e.reason})") from e


def _read_captions(folder: Path) -> dict[str, str]:
    captions: dict[str, str] = {}
    jsonl = folder / "captions.jsonl"
    if jsonl.is_file():
        for number, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                captions[str(row["file"])] = str(row["caption"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(
                    f'{jsonl}:{number}: expected {{"file": ..., "caption": ...}}, got {line!r}'
                ) from e
    table = folder / "captions.csv"
    if table.is_file():
        with table.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if not {"file", "caption"} <= set(reader.fieldnames or ()):
                raise ValueError(f"{table}: needs a header row with columns file,caption")
            for row in reader:
                captions[row["file"]] = row["caption"]  # csv wins over jsonl
    return captions


def sample_key(relative: Path) -> str:
    """The shard key of a file: its relative path without suffix, dots replaced by ``_``.

    WebDataset splits a member name at its first dot into key and field, so the key must not
    contain one; slashes (sub-folders) are fine.
    """
    return relative.with_suffix("").as_posix().replace(".", "_")


@dataclass(frozen=True)
class CaptionedFile:
    """A file of a source folder: its path, path relative to the folder, shard key and
    caption ("" when it has none; ``problem`` says why when its sidecar is unreadable)."""

    path: Path
    relative: Path
    key: str
    caption: str
    problem: str | None = None  # why the caption could not be read


def captioned_files(folder: str | Path, suffixes: Iterable[str]) -> Iterator[CaptionedFile]:
    """The files of ``folder`` (recursively, sorted by path) whose lower-cased suffix is one
    of ``suffixes``, each with its caption.

    Raises:
        FileNotFoundError: ``folder`` is not a folder.
        ValueError: a malformed captions file (see :func:`read_captions`).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"source folder not found: {folder}")
    wanted = {s.lower() for s in suffixes}
    captions = read_captions(folder)
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in wanted):
        relative = file.relative_to(folder)
        sidecar = file.with_suffix(".txt")
        problem = None
        if sidecar.is_file():
            try:
                caption = sidecar.read_text(encoding="utf-8").strip()
            except UnicodeDecodeError:
                caption, problem = "", f"caption {sidecar.name} is not UTF-8 text"
        else:
            caption = captions.get(relative.as_posix(), "").strip()
        yield CaptionedFile(file, relative, sample_key(relative), caption, problem)


def captioned_source(
    folder: str | Path,
    suffixes: Mapping[str, str],
    probe: Callable[[bytes], dict[str, Any]],
    what: str,
    *,
    require_caption: bool = True,
) -> Iterator[dict[str, Any] | Skip]:
    """Shard samples of the captioned files of ``folder`` (recursively, sorted by path): the
    skeleton of every modality's ``source``.

    Args:
        suffixes: file suffix -> shard field (``{".jpeg": "jpg", ...}``).
        probe: encoded bytes -> metadata (sizes, rates) read from the content itself; raises
            ``ValueError`` (its message says why) for a file that cannot be read.
        what: the kind of file, for skip reasons ("image", "video").
        require_caption: skip files without a caption (``"no caption"``); when False they
            are yielded with the caption ``""`` (audio can train on uncaptioned sounds).

    Yields:
        ``{"__key__", <field>: encoded bytes, "txt": caption, "json": {"file", **probe}}`` per
        readable file, and ``Skip(key, "unreadable <what> (<why>)")`` or
        ``Skip(key, "no caption")`` (only with ``require_caption``).

    Raises:
        FileNotFoundError: ``folder`` is not a folder.
    """
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"{what} source folder not found: {folder}")
    for entry in captioned_files(folder, suffixes):
        if entry.problem is not None:
            yield Skip(entry.key, entry.problem)
            continue
        payload = entry.path.read_bytes()
        try:
            meta = probe(payload)
        except ValueError as e:
            yield Skip(entry.key, f"unreadable {what} ({e})")
            continue
        if not entry.caption and require_caption:
            yield Skip(entry.key, "no caption")
            continue
        yield {
            "__key__": entry.key,
            suffixes[entry.path.suffix.lower()]: payload,
            "txt": entry.caption,
            "json": {"file": entry.relative.as_posix(), **meta},
        }


def text_field(value: Any) -> str:
    """A shard's text field (``bytes`` as read back, or ``str`` as written) as ``str``."""
    return value.decode("utf-8") if isinstance(value, bytes | bytearray) else str(value)


def metadata_field(sample: Mapping[str, Any]) -> dict[str, Any]:
    """A sample's ``json`` field as a dict (empty when absent)."""
    meta = sample.get("json", {})
    if isinstance(meta, bytes | bytearray | str):
        meta = json.loads(meta)
    return dict(meta)


def payload_field(
    sample: Mapping[str, Any], fields: Iterable[str], what: str = "payload"
) -> tuple[str, bytes]:
    """The first of ``fields`` a sample has, and its bytes (ValueError naming the key)."""
    fields = tuple(fields)
    field = next((f for f in fields if f in sample), None)
    if field is None:
        key = sample.get("__key__", "?")
        raise ValueError(f"sample {key!r} has no {what} field (expected one of {fields})")
    return field, bytes(sample[field])
