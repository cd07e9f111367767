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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CaptionedFile", "captioned_files", "read_captions", "sample_key"]


def read_captions(folder: Path) -> dict[str, str]:
    """Captions from ``captions.csv`` and ``captions.jsonl`` in ``folder``: {relative file: text}.

    Raises:
        ValueError: a captions file without the required columns/fields, naming the file and
            the line.
    """
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
    caption ("" when it has none)."""

    path: Path
    relative: Path
    key: str
    caption: str


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
        if sidecar.is_file():
            caption = sidecar.read_text(encoding="utf-8").strip()
        else:
            caption = captions.get(relative.as_posix(), "").strip()
        yield CaptionedFile(file, relative, sample_key(relative), caption)
