"""Writing WebDataset shards and turning shard specs into lists of shard URLs.

A shard is a tar file written by ``webdataset.ShardWriter``: every sample is a group of tar
members ``<key>.<field>`` (``<key>.png``, ``<key>.txt``, ``<key>.json``...). Next to the shards,
``index.json`` records how many samples each shard holds, so readers can plan equal shares per
rank without opening every shard first::

    {"shards": [{"name": "shard-000000.tar", "count": 1000}, ...], "total": 1797, "meta": {...}}
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import braceexpand
import webdataset as wds
from tqdm import tqdm

__all__ = [
    "INCOMPLETE_NAME",
    "INDEX_NAME",
    "ShardSummary",
    "Skip",
    "expand_urls",
    "iter_shard",
    "shard_counts",
    "write_shards",
]

INDEX_NAME = "index.json"
#: Present while write_shards runs: a killed run leaves it, and such a folder is refused.
INCOMPLETE_NAME = ".incomplete"
_SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# Any "scheme://" prefix (http, https, gs, s3, ais, hf...): opened by webdataset's gopen.
_REMOTE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_SHOWN = 10  # how many file names / keys a message or report lists before "... and N more"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Skip:
    """An input a source could not turn into a sample: counted and reported, never dropped
    silently. ``key`` names the input (e.g. its file name), ``reason`` is a short phrase such
    as ``"unreadable image"`` that groups skips in the summary."""

    key: str
    reason: str


@dataclass
class ShardSummary:
    """What :func:`write_shards` did.

    ``shards`` are the paths of the written tar files (in order), ``counts`` the number of
    samples in each, ``skipped`` maps a reason to how many inputs were skipped for it and
    ``skipped_keys`` lists every skipped ``(key, reason)``.
    """

    out_dir: Path
    shards: list[str]
    written: int
    skipped: dict[str, int]
    skipped_keys: list[tuple[str, str]]
    counts: list[int] = field(default_factory=list)

    def report(self) -> str:
        """The human-readable summary a CLI prints (several lines, no trailing newline)."""
        if self.written == 0:
            lines = [f"wrote 0 samples: no shard written to {self.out_dir}"]
        else:
            plural = "shard" if len(self.shards) == 1 else "shards"
            lines = [
                f"wrote {self.written} samples in {len(self.shards)} {plural} to {self.out_dir}"
                f" (counts in {INDEX_NAME})"
            ]
            for path, count in list(zip(self.shards, self.counts, strict=False))[:_SHOWN]:
                lines.append(f"  {Path(path).name}: {count} samples")
            if len(self.shards) > _SHOWN:
                lines.append(f"  ... and {len(self.shards) - _SHOWN} more shards")
        total_skipped = sum(self.skipped.values())
        lines.append(f"skipped {total_skipped} input{'' if total_skipped == 1 else 's'}")
        for reason, count in sorted(self.skipped.items(), key=lambda item: (-item[1], item[0])):
            keys = [key for key, why in self.skipped_keys if why == reason]
            example = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
            lines.append(f"  {reason}: {count} ({example})" if example else f"  {reason}: {count}")
        return "\n".join(lines)


def write_shards(
    samples: Iterable[Mapping[str, Any] | Skip],
    out_dir: str | os.PathLike[str],
    *,
    maxcount: int = 1000,
    maxsize: int = 1_000_000_000,
    prefix: str = "shard",
    meta: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
) -> ShardSummary:
    """Write samples into ``<out_dir>/<prefix>-000000.tar, ...`` with ``webdataset.ShardWriter``.

    Args:
        samples: webdataset sample dicts (``{"__key__": str, "png": bytes, "txt": str,
            "json": dict | bytes, ...}``; fields are encoded by their extension) or
            :class:`Skip` records for inputs that could not be read.
        out_dir: folder for the shards and ``index.json`` (created when needed).
        maxcount: at most this many samples per shard.
        maxsize: start a new shard once the current one holds this many bytes.
        prefix: shard file name prefix.
        meta: JSON-serialisable description stored in ``index.json`` (e.g. the modality).
        overwrite: replace existing ``<prefix>-*.tar`` shards and ``index.json`` in
            ``out_dir``; without it they raise ``FileExistsError`` (mixing old and new shards
            would silently change the data set).
        progress: a tqdm progress bar on stderr counting the inputs, with the samples
            written and skipped so far (total when ``samples`` has a length); ``None`` shows
            it only when stderr is a terminal, ``False`` never.

    Returns:
        The summary; nothing else is printed (``summary.report()`` is the text). With no
        sample written, no shard and no ``index.json`` are written.

    A sample whose ``__key__`` repeats an earlier one, or contains a ``.`` (webdataset splits
    member names at the first dot, so the sample would come apart on reading), is skipped
    and counted like a :class:`Skip`.
    """
    if maxcount < 1:
        raise ValueError(f"maxcount must be >= 1, got {maxcount}")
    if not prefix or "/" in prefix or "." in prefix:
        raise ValueError(f"prefix must be a plain name without '/' or '.', got {prefix!r}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"shard output {out} exists and is not a directory")
    markers = [out / INDEX_NAME, out / INCOMPLETE_NAME]
    existing = sorted(out.glob(f"{prefix}-*.tar")) + [p for p in markers if p.exists()]
    if existing and not overwrite:
        names = ", ".join(p.name for p in existing[:_SHOWN])
        raise FileExistsError(
            f"{out} already holds shards ({names}); choose another folder or overwrite them "
            "(--overwrite)"
        )
    for path in existing:
        path.unlink()

    # '%' in the folder name would be read as a format directive by ShardWriter.
    pattern = str(out).replace("%", "%%") + f"/{prefix}-%06d.tar"
    writer: wds.ShardWriter | None = None
    counts: dict[str, int] = {}
    keys: set[str] = set()
    skipped: Counter[str] = Counter()
    skipped_keys: list[tuple[str, str]] = []

    def skip(key: str, reason: str) -> None:
        skipped[reason] += 1
        skipped_keys.append((key, reason))

    def add(item: Mapping[str, Any] | Skip) -> None:
        nonlocal writer
        if isinstance(item, Skip):
            skip(item.key, item.reason)
            return
        if not isinstance(item, Mapping):
            raise TypeError(
                f"write_shards expects sample dicts or Skip records, got {type(item).__name__}"
            )
        key = item.get("__key__")
        if not isinstance(key, str) or not key:
            raise ValueError(f"sample has no string __key__: fields {sorted(item)}")
        if "." in key:
            skip(key, "key contains '.'")
            return
        if key in keys:
            skip(key, "duplicate key")
            return
        keys.add(key)
        if writer is None:
            # Opened lazily: ShardWriter creates its first tar file immediately, and an
            # empty input must not leave an empty shard behind.
            out.mkdir(parents=True, exist_ok=True)
            (out / INCOMPLETE_NAME).write_text("make-shards is writing this folder\n")
            # mtime=0 makes the tar bytes a function of the samples alone (reproducible).
            writer = wds.ShardWriter(
                pattern, maxcount=maxcount, maxsize=maxsize, verbose=0, mtime=0
            )
        try:
            writer.write(dict(item))
        except ValueError as exc:
            raise ValueError(f"sample {key!r} cannot be written: {exc}") from exc
        counts[writer.fname] = counts.get(writer.fname, 0) + 1

    # On stderr, and only on a terminal by default (tqdm's disable=None), so pipes, logs and
    # the summary a CLI prints stay as they were.
    bar = tqdm(
        total=len(samples) if isinstance(samples, Sized) else None,
        desc="writing shards",
        unit="sample",
        disable=None if progress is None else not progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    try:
        for item in samples:
            add(item)
            if not bar.disable:
                so_far = sum(counts.values())
                bar.set_postfix(written=so_far, skipped=len(skipped_keys), refresh=False)
                bar.update()
    finally:
        bar.close()
        if writer is not None:
            writer.close()

    shards = list(counts)
    written = sum(counts.values())
    if written:
        index = {
            "shards": [{"name": Path(name).name, "count": n} for name, n in counts.items()],
            "total": written,
            "meta": meta,
        }
        # Written last and renamed into place: an index.json means every shard is complete.
        tmp = out / f".{INDEX_NAME}.tmp"
        tmp.write_text(json.dumps(index, indent=1) + "\n")
        os.replace(tmp, out / INDEX_NAME)
    (out / INCOMPLETE_NAME).unlink(missing_ok=True)
    return ShardSummary(
        out_dir=out,
        shards=shards,
        written=written,
        skipped=dict(skipped),
        skipped_keys=skipped_keys,
        counts=list(counts.values()),
    )


# --- shard specs ----------------------------------------------------------------------


def expand_urls(
    spec: str | os.PathLike[str] | Iterable[str | os.PathLike[str]], *, allow_pipe: bool = False
) -> list[str]:
    """Turn a shard spec into the list of shard URLs, in order.

    ``spec`` is one of, or a list of:

    - a directory: the shards listed in its ``index.json``, else its ``*.tar`` files sorted;
    - a local tar file, or a brace pattern ``dir/shard-{000000..000003}.tar``;
    - a remote URL (``http(s)://``, ``gs://``...), passed through unchecked;
    - ``pipe:COMMAND`` (a shell command whose stdout is a tar), refused with ``ValueError``
      unless ``allow_pipe=True`` because it runs arbitrary commands.

    A string may hold several specs separated by commas, whitespace or ``::`` (outside
    braces); a string that names an existing path is taken whole, spaces included.
    Missing local files raise ``FileNotFoundError`` naming them; an empty result raises
    ``ValueError``.
    """
    if isinstance(spec, str | os.PathLike):
        tokens = _split_spec(os.fspath(spec))
    elif isinstance(spec, Iterable):
        tokens = [os.fspath(item).strip() for item in spec]
        tokens = [token for token in tokens if token]
    else:
        raise TypeError(f"shard spec must be a string or a list of strings, got {spec!r}")

    urls: list[str] = []
    missing: list[str] = []
    for token in tokens:
        if token.startswith("pipe:"):
            if not allow_pipe:
                raise ValueError(
                    f"refusing shard URL {token!r}: 'pipe:' runs a shell command; "
                    "pass allow_pipe=True to allow it"
                )
            urls.extend(braceexpand.braceexpand(token))
            continue
        for item in braceexpand.braceexpand(token):
            if item.startswith("file://"):
                item = url2pathname(urlparse(item).path)
            elif _REMOTE.match(item):
                urls.append(item)
                continue
            path = Path(item)
            if path.is_dir():
                urls.extend(_directory_shards(path))
            elif path.is_file():
                urls.append(item)
            else:
                missing.append(item)
    if missing:
        more = f" and {len(missing) - _SHOWN} more" if len(missing) > _SHOWN else ""
        raise FileNotFoundError(f"shard files not found: {', '.join(missing[:_SHOWN])}{more}")
    if not urls:
        raise ValueError(f"no shards in spec {spec!r}")
    return urls


def _split_spec(text: str) -> list[str]:
    """Split a spec string at commas, whitespace and '::' that are not inside braces."""
    text = text.strip()
    if text.startswith("pipe:") or os.path.exists(text):
        return [text]
    tokens: list[str] = []
    current: list[str] = []
    depth = 0
    for char in text.replace("::", ","):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth == 0 and (char == "," or char.isspace()):
            tokens.append("".join(current))
            current = []
        else:
            current.append(char)
    tokens.append("".join(current))
    return [token for token in tokens if token]


def _directory_shards(folder: Path) -> list[str]:
    if (folder / INCOMPLETE_NAME).exists():
        raise ValueError(
            f"the shards in {folder} are incomplete (writing them was stopped); write them "
            "again with make-shards --overwrite"
        )
    index = _read_index(folder)
    if index is not None:
        names = [str(folder / name) for name in index]
        missing = [name for name in names if not os.path.isfile(name)]
        if missing:
            raise FileNotFoundError(
                f"{folder / INDEX_NAME} lists shards that do not exist: "
                + ", ".join(missing[:_SHOWN])
            )
        return names
    found = sorted(
        str(path)
        for path in folder.iterdir()
        if path.is_file() and path.name.endswith(_SHARD_SUFFIXES)
    )
    if not found:
        raise FileNotFoundError(f"no {INDEX_NAME} and no .tar shards in directory {folder}")
    return found


def _read_index(folder: Path) -> dict[str, int] | None:
    """``index.json`` of a folder as {shard name: sample count}; None when there is none."""
    path = folder / INDEX_NAME
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text())
        return {str(entry["name"]): int(entry["count"]) for entry in index["shards"]}
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a valid shard index ({exc!r})") from exc


# --- reading --------------------------------------------------------------------------


def iter_shard(url: str) -> Iterator[dict[str, Any]]:
    """The samples of one shard, in file order, as webdataset dicts (``__key__``, ``__url__``
    and one ``bytes`` value per field: ``png``, ``txt``, ``json``...). Read with webdataset's
    ``url_opener``/``tar_file_expander``/``group_by_keys`` stages; read errors propagate."""
    return wds.tarfile_to_samples()(iter([{"url": url}]))


def shard_counts(urls: list[str]) -> list[int]:
    """Samples per shard: from the ``index.json`` beside a local shard when it lists the shard,
    else by reading the shard once. An unreadable shard is logged and counts what could be
    read before the error (the rest can never be delivered)."""
    indexes: dict[str, dict[str, int] | None] = {}
    counts = []
    for url in urls:
        if not url.startswith("pipe:") and not _REMOTE.match(url):
            folder = os.path.dirname(url) or "."
            if folder not in indexes:
                indexes[folder] = _read_index(Path(folder))
            index = indexes[folder]
            if index is not None and os.path.basename(url) in index:
                counts.append(index[os.path.basename(url)])
                continue
        count = 0
        try:
            for _ in iter_shard(url):
                count += 1
        except Exception as exc:
            # webdataset appends the stream object and URL to the args; log the message only.
            message = exc.args[0] if exc.args else exc
            log.warning("shard %s is unreadable after %d samples: %s", url, count, message)
        counts.append(count)
    return counts
