"""WebDataset shards: writing them, naming them, and streaming batches from them.

- :func:`captioned_files` walks a user's folder of captioned files (sidecar .txt, captions.csv
  or captions.jsonl).
- :func:`write_shards` writes samples (or :class:`Skip` records) with ``webdataset.ShardWriter``
  plus an ``index.json`` of per-shard counts, and returns a :class:`ShardSummary`.
- :func:`expand_urls` turns a folder, brace pattern, list or URLs into shard URLs.
- :class:`ShardStream` yields equal numbers of batches per rank, decodes in DataLoader
  workers, skips and counts bad samples (:class:`DataError` past a limit) and resumes exactly
  from its ``state_dict()``.
"""

from .captions import (
    CaptionedFile,
    captioned_files,
    captioned_source,
    metadata_field,
    payload_field,
    read_captions,
    sample_key,
    text_field,
)
from .shards import (
    INCOMPLETE_NAME,
    INDEX_NAME,
    ShardSummary,
    Skip,
    expand_urls,
    iter_shard,
    shard_counts,
    write_shards,
)
from .stream import MIN_SAMPLES_FOR_BAD_FRACTION, DataError, ShardStream, StreamStats

__all__ = [
    "INCOMPLETE_NAME",
    "INDEX_NAME",
    "MIN_SAMPLES_FOR_BAD_FRACTION",
    "CaptionedFile",
    "DataError",
    "ShardStream",
    "ShardSummary",
    "Skip",
    "StreamStats",
    "captioned_files",
    "captioned_source",
    "expand_urls",
    "iter_shard",
    "metadata_field",
    "payload_field",
    "read_captions",
    "sample_key",
    "shard_counts",
    "text_field",
    "write_shards",
]
