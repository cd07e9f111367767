"""Batches streamed from WebDataset shards: equal per rank, deterministic and resumable.

How an epoch is planned (every rank computes the same plan from the shard counts, so no
communication is needed):

1. The shard list is shuffled with a generator seeded by ``(seed, epoch)`` and read as one
   virtual stream of ``N`` samples (counts come from ``index.json`` or one scan).
2. ``batches_per_epoch = B = N // (world_size * batch_size)``. Rank ``r`` owns the samples at
   stream positions ``[r * B * batch_size, (r + 1) * B * batch_size)``; the last
   ``N - world_size * B * batch_size`` positions are dropped this epoch (a different tail in
   every epoch, because the shard order changes). Ranks split *samples*, not shards, so shards
   of uneven size or fewer shards than ranks never give ranks different batch counts (the
   hang of webdataset #188 / #225); a rank may start or stop in the middle of a shard and
   skips the samples before its start without decoding them.
3. A rank's batches are dealt round-robin to ``L = max(1, num_workers)`` *lanes*: lane ``l``
   builds batches ``t = l, l + L, ...`` of the epoch from its own contiguous piece of the
   rank's range (shuffled within a buffer of ``shuffle_buffer`` samples), so every lane has a
   fixed quota and the rank yields exactly ``B`` batches. With ``num_workers > 0`` each lane
   runs (reads, decodes, collates) in a DataLoader worker process.
4. Batches are planned from *raw* samples: ``bucket(raw_sample)`` puts a sample in its bucket
   and a batch is the first ``batch_size`` samples to fill a bucket. When a lane runs out of
   samples before its quota (partly filled buckets left over, or unreadable samples), it reads
   its piece again in a new order (the left-over samples stay in their buckets) until the quota
   is met. So without bucketing and without bad samples every sample is used at most once per
   epoch; with bucketing a rank may revisit its own samples, never another rank's.
5. Only then is a planned batch decoded. A sample whose ``decode`` raises is skipped and
   counted, and its slot is filled with a copy of a good sample of the same batch (same
   bucket, so ``collate`` still works), keeping batch sizes fixed; if all of them fail the
   first decodable sample of the same bucket in the lane's piece stands in.

Because the plan never depends on decoding, the position is just ``(epoch, batch)``: resuming
re-plans the epoch and skips the batches already delivered without decoding them (reading
their bytes only), and then yields exactly the batches an uninterrupted run would have. The
same ``(epoch, batch)`` is valid on every rank, so one rank's saved state resumes all of them
(only the ``samples_seen``/``bad`` counters are that rank's).
Resuming with the same shards, ``batch_size``, ``world_size``, ``num_workers``, ``seed`` and
``shuffle_buffer`` reproduces the uninterrupted run; changing ``num_workers`` or
``world_size`` keeps the position but plans the rest of that epoch differently. Random
augmentations inside ``decode`` are reproducible too: Python's, NumPy's and torch's CPU
generators are seeded per batch from ``(seed, epoch, batch, rank)`` and restored afterwards.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import random
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .shards import expand_urls, iter_shard, shard_counts

__all__ = ["MIN_SAMPLES_FOR_BAD_FRACTION", "DataError", "ShardStream", "StreamStats"]

# The bad-sample fraction is only judged after this many samples: one corrupt file among the
# first few must not stop a run.
MIN_SAMPLES_FOR_BAD_FRACTION = 20

log = logging.getLogger("polydiff.core.data")

Sample = dict[str, Any]
Segment = tuple[str, int, int]  # (shard url, first sample, end sample) in the shard's order


class DataError(RuntimeError):
    """The data cannot be streamed: too many bad samples, or none usable (names the shard)."""


@dataclass(frozen=True)
class StreamStats:
    """Counts over all batches this rank delivered (restored by ``load_state_dict``).

    ``seen``: samples read for those batches (decoded, or failed before decoding), ``bad``:
    samples skipped because they could not be read, bucketed or decoded, ``bad_by_shard``:
    ``bad`` per shard URL.
    """

    seen: int
    bad: int
    bad_by_shard: dict[str, int] = field(default_factory=dict)


class _Events:
    """Sample counts of one lane since the batch it delivered last."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.seen = 0
        self.bad = 0
        self.bad_by_shard: dict[str, int] = {}
        self.last_error: str | None = None

    def failed(self, url: str, message: str, count: int = 1) -> None:
        self.seen += count
        self.bad += count
        self.bad_by_shard[url] = self.bad_by_shard.get(url, 0) + count
        self.last_error = f"{message} (shard {url})"

    def take(self) -> dict[str, Any]:
        counts = {
            "seen": self.seen,
            "bad": self.bad,
            "bad_by_shard": self.bad_by_shard,
            "last_error": self.last_error,
        }
        self.clear()
        return counts


def _describe(error: Exception) -> str:
    # webdataset appends the stream object and URL to exception args; keep the message only.
    return f"{type(error).__name__}: {error.args[0] if error.args else error}"


def _derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts; stable across processes and Python versions."""
    digest = hashlib.blake2b(repr(("polydiff.data", *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@contextmanager
def _seeded_global_rngs(seed: int) -> Iterator[None]:
    """Seed Python's, NumPy's and torch's CPU generators, then put their states back, so a
    decode's random augmentation is reproducible without disturbing the caller's RNGs."""
    py_state, np_state = random.getstate(), np.random.get_state()
    torch_state = torch.random.default_generator.get_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.random.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.random.default_generator.set_state(torch_state)


@dataclass(frozen=True)
class _Plan:
    """Everything a lane needs; picklable, so it travels to DataLoader workers."""

    urls: tuple[str, ...]
    counts: tuple[int, ...]
    batch_size: int
    batches_per_epoch: int
    rank: int
    world_size: int
    lanes: int
    seed: int
    shuffle_buffer: int
    decode: Callable[[Sample], Sample]
    collate: Callable[[list[Sample]], Any]
    bucket: Callable[[Sample], Hashable | None] | None

    def quota(self, lane: int) -> int:
        """Batches lane ``lane`` builds per epoch (round-robin share of ``B``)."""
        return len(range(lane, self.batches_per_epoch, self.lanes))

    def segments(self, epoch: int, lane: int) -> list[Segment]:
        """The lane's piece of this epoch's shuffled sample stream, as shard slices."""
        order = list(range(len(self.urls)))
        if self.shuffle_buffer > 0:
            random.Random(_derive_seed("shards", self.seed, epoch)).shuffle(order)
        lo = (self.rank * self.batches_per_epoch + sum(map(self.quota, range(lane)))) * (
            self.batch_size
        )
        hi = lo + self.quota(lane) * self.batch_size
        pieces: list[Segment] = []
        offset = 0
        for shard in order:
            count = self.counts[shard]
            start, stop = max(lo, offset), min(hi, offset + count)
            if start < stop:
                pieces.append((self.urls[shard], start - offset, stop - offset))
            offset += count
            if offset >= hi:
                break
        return pieces

    def stream(self, start: int, worker: int) -> Iterator[tuple[int, Any, dict[str, Any]]]:
        """Worker ``worker``'s share of the batches from global batch index ``start`` on:
        ``(index, batch, counts)`` for indices ``start + worker, start + worker + lanes, ...``
        (global index = epoch * B + batch in epoch), forever."""
        per_epoch = self.batches_per_epoch
        epoch, first = divmod(start, per_epoch)
        while True:
            # The lane whose batches t (t = lane mod lanes) have global index = start + worker.
            lane = (start + worker - epoch * per_epoch) % self.lanes
            skip = len(range(lane, first, self.lanes))
            yield from self._lane(epoch, lane, skip)
            epoch, first = epoch + 1, 0

    def _lane(self, epoch: int, lane: int, skip: int) -> Iterator[tuple[int, Any, dict[str, Any]]]:
        """The lane's batches of one epoch after its first ``skip`` ones (planned, not decoded)."""
        quota = self.quota(lane)
        if skip >= quota:
            return
        segments = self.segments(epoch, lane)
        events = _Events()
        buckets: dict[Hashable | None, list[Sample]] = {}
        planned = 0
        for pass_index in itertools.count():
            usable = 0
            samples: Iterator[Sample] = self._read(segments, events)
            if self.shuffle_buffer > 1:
                rng = random.Random(
                    _derive_seed("samples", self.seed, epoch, self.rank, lane, pass_index)
                )
                shuffle = wds.shuffle(
                    bufsize=self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng
                )
                samples = shuffle(samples)
            for sample in samples:
                key = None
                if self.bucket is not None:
                    try:
                        key = self.bucket(sample)
                    except Exception as exc:
                        events.failed(
                            sample.get("__url__", "?"),
                            f"bucket() failed on {sample.get('__key__')!r}: {exc!r}",
                        )
                        continue
                usable += 1
                try:
                    members = buckets.setdefault(key, [])
                except TypeError as exc:
                    raise TypeError(f"bucket() must return a hashable key, got {key!r}") from exc
                members.append(sample)
                if len(members) < self.batch_size:
                    continue
                del buckets[key]
                if planned >= skip:
                    index_in_epoch = lane + planned * self.lanes
                    batch = self._decode(members, key, segments, events, epoch, index_in_epoch)
                    yield epoch * self.batches_per_epoch + index_in_epoch, batch, events.take()
                else:
                    # Delivered before the resume point: its counts are in the restored state.
                    events.clear()
                planned += 1
                if planned == quota:
                    return
            if usable == 0:
                shards = ", ".join(sorted({url for url, _, _ in segments}))
                raise DataError(
                    f"no usable sample in shards {shards} (rank {self.rank}, epoch {epoch}); "
                    f"last error: {events.last_error}"
                )

    def _read(self, segments: list[Segment], events: _Events) -> Iterator[Sample]:
        """Raw samples of the segments in order; samples a shard fails to deliver are counted
        as bad (a truncated or vanished shard) instead of stopping the run."""
        for url, start, stop in segments:
            delivered = 0
            error: Exception | None = None
            try:
                for sample in itertools.islice(iter_shard(url), start, stop):
                    delivered += 1
                    yield sample
            except Exception as exc:
                error = exc
            if delivered < stop - start:
                why = "shard ended early" if error is None else f"read error {_describe(error)}"
                events.failed(
                    url,
                    f"{stop - start - delivered} samples unreadable: {why}",
                    count=stop - start - delivered,
                )

    def _decode(
        self,
        members: list[Sample],
        key: Hashable | None,
        segments: list[Segment],
        events: _Events,
        epoch: int,
        index_in_epoch: int,
    ) -> Any:
        with _seeded_global_rngs(
            _derive_seed("decode", self.seed, epoch, index_in_epoch, self.rank)
        ):
            decoded = []
            for sample in members:
                try:
                    decoded.append(self.decode(dict(sample)))
                    events.seen += 1
                except Exception as exc:
                    events.failed(
                        sample.get("__url__", "?"),
                        f"decode failed on {sample.get('__key__')!r}: {exc!r}",
                    )
            if not decoded:
                decoded = [self._stand_in(key, segments, events)]
            # Copies of good members fill the skipped slots: the batch keeps its size, and
            # the copies share the bucket, so collate sees uniform samples.
            decoded += [decoded[i % len(decoded)] for i in range(len(members) - len(decoded))]
            return self.collate(decoded)

    def _stand_in(self, key: Hashable | None, segments: list[Segment], events: _Events) -> Sample:
        """First decodable sample of bucket ``key`` in the lane's piece (file order)."""
        ignored = _Events()  # these samples are counted when their own batches come
        for sample in self._read(segments, ignored):
            try:
                if self.bucket is not None and self.bucket(sample) != key:
                    continue
                return self.decode(dict(sample))
            except Exception:
                continue
        shards = ", ".join(sorted({url for url, _, _ in segments}))
        raise DataError(
            f"every sample of a batch failed to decode and no sample of bucket {key!r} in "
            f"shards {shards} decodes; last error: {events.last_error}"
        )


def _worker_errors_as_one_line(items: Iterable[Any]) -> Iterator[Any]:
    """A DataError raised in a DataLoader worker arrives with the worker's whole traceback in
    its message; keep the error's own last line (what went wrong), as without workers."""
    try:
        yield from items
    except DataError as e:
        lines = [line for line in str(e).splitlines() if line.strip()]
        if len(lines) > 1 and "Traceback" in str(e):
            last = lines[-1].strip()
            raise DataError(last.removeprefix(f"{__name__}.DataError: ")) from None
        raise


class _WorkerStreams(IterableDataset):
    """One infinite batch stream per DataLoader worker (worker k runs lane stream k)."""

    def __init__(self, plan: _Plan, start: int) -> None:
        super().__init__()
        self.plan = plan
        self.start = start

    def __iter__(self) -> Iterator[tuple[int, Any, dict[str, Any]]]:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        return self.plan.stream(self.start, worker)


def _unchanged(item: Any) -> Any:
    # DataLoader's default per-item conversion turns NumPy arrays into tensors; the batch
    # must be exactly what collate returned, with or without workers.
    return item


class ShardStream:
    """Infinite iterable of batches from WebDataset shards for one rank.

    Args:
        urls: shard spec for :func:`expand_urls` (folder, brace pattern, list, URLs).
        decode: raw webdataset sample (``__key__``, ``__url__``, ``bytes`` per field) ->
            decoded sample; raise on a corrupt sample. Runs in DataLoader workers when
            ``num_workers > 0`` (then it must be picklable under the ``spawn`` start method).
        collate: ``batch_size`` decoded samples of one bucket -> batch (anything).
        batch_size: samples per batch (every batch has exactly this many).
        bucket: raw sample -> hashable bucket key (e.g. ``(frames, h, w)`` read from its
            ``json``), or None to batch everything together. Called on *raw* samples so
            batches are planned without decoding; an exception counts the sample as bad.
        rank, world_size: this process's data-parallel rank and the number of ranks.
        num_workers: DataLoader worker processes (0: everything in this process).
        seed: base of every shuffle; epochs reshuffle from ``(seed, epoch)``.
        shuffle_buffer: samples shuffled together within a lane; 0 turns all shuffling off
            (shards and samples in the given order), 1 shuffles only the shard order.
        max_bad_fraction: fail with :class:`DataError` once more than this fraction of the
            samples seen (after :data:`MIN_SAMPLES_FOR_BAD_FRACTION`) were bad.
        allow_pipe: allow ``pipe:`` shard URLs (shell commands).

    ``batches_per_epoch`` is the same on every rank. ``state_dict()`` is the position after the
    last yielded batch; ``load_state_dict(state)`` makes the next ``iter()`` continue exactly
    there. Each ``iter()`` starts at the current position; iterate one at a time.
    """

    def __init__(
        self,
        urls: str | list[str],
        *,
        decode: Callable[[Sample], Sample],
        collate: Callable[[list[Sample]], Any],
        batch_size: int,
        bucket: Callable[[Sample], Hashable | None] | None = None,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        shuffle_buffer: int = 256,
        max_bad_fraction: float = 0.05,
        allow_pipe: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}"
            )
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        self.urls = expand_urls(urls, allow_pipe=allow_pipe)
        self.counts = shard_counts(self.urls)
        total = sum(self.counts)
        per_epoch = total // (world_size * batch_size)
        if per_epoch == 0:
            raise ValueError(
                f"{total} samples in {len(self.urls)} shards are fewer than world_size "
                f"({world_size}) x batch_size ({batch_size}) = {world_size * batch_size}: "
                "no rank would get a batch"
            )
        self.batches_per_epoch = per_epoch
        self.total_samples = total
        self.num_workers = num_workers
        self.max_bad_fraction = max_bad_fraction
        self._plan = _Plan(
            urls=tuple(self.urls),
            counts=tuple(self.counts),
            batch_size=batch_size,
            batches_per_epoch=per_epoch,
            rank=rank,
            world_size=world_size,
            lanes=max(1, num_workers),
            seed=seed,
            shuffle_buffer=shuffle_buffer,
            decode=decode,
            collate=collate,
            bucket=bucket,
        )
        self._epoch = 0
        self._batch = 0
        self._seen = 0
        self._bad = 0
        self._bad_by_shard: dict[str, int] = {}
        self._last_error: str | None = None

    # --- position -------------------------------------------------------------------

    @property
    def stats(self) -> StreamStats:
        """Sample counts over the batches delivered so far (this rank)."""
        return StreamStats(self._seen, self._bad, dict(self._bad_by_shard))

    def state_dict(self) -> dict[str, Any]:
        """Position after the last yielded batch: ``{"epoch", "batch" (batches already
        yielded in that epoch), "samples_seen", "bad", "bad_by_shard"}``; plain ints, a dict
        of ints, JSON-serialisable."""
        return {
            "epoch": self._epoch,
            "batch": self._batch,
            "samples_seen": self._seen,
            "bad": self._bad,
            "bad_by_shard": dict(self._bad_by_shard),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state`` (from :meth:`state_dict`, of any rank): the next
        ``iter()`` yields the batch after the saved position."""
        for name in ("epoch", "batch"):
            value = state.get(name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"data state needs a non-negative int {name!r}, got {value!r}")
        if state["batch"] >= self.batches_per_epoch:
            raise ValueError(
                f"data state batch {state['batch']} is outside the {self.batches_per_epoch} "
                "batches per epoch of these shards (different shards, batch size or ranks?)"
            )
        self._epoch = state["epoch"]
        self._batch = state["batch"]
        self._seen = int(state.get("samples_seen", 0))
        self._bad = int(state.get("bad", 0))
        self._bad_by_shard = {str(k): int(v) for k, v in state.get("bad_by_shard", {}).items()}

    # --- iteration ------------------------------------------------------------------

    def __iter__(self) -> Iterator[Any]:
        start = self._epoch * self.batches_per_epoch + self._batch
        if self.num_workers == 0:
            source: Iterable[tuple[int, Any, dict[str, Any]]] = self._plan.stream(start, 0)
        else:
            source = DataLoader(
                _WorkerStreams(self._plan, start),
                batch_size=None,
                num_workers=self.num_workers,
                collate_fn=_unchanged,
            )
        iterator = iter(source)
        # DataLoader delivers worker 0, 1, ... in turn, which is already global order; the
        # buffer only makes the order independent of that implementation detail.
        waiting: dict[int, tuple[Any, dict[str, Any]]] = {}
        expected = start
        try:
            for index, batch, counts in _worker_errors_as_one_line(iterator):
                waiting[index] = (batch, counts)
                while expected in waiting:
                    batch, counts = waiting.pop(expected)
                    self._count(counts)
                    expected += 1
                    self._epoch, self._batch = divmod(expected, self.batches_per_epoch)
                    yield batch
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()
            # A DataLoader iterator shuts its workers down when it is released.
            del iterator

    def _count(self, counts: dict[str, Any]) -> None:
        self._seen += counts["seen"]
        if counts["bad"]:
            self._bad += counts["bad"]
            for url, bad in counts["bad_by_shard"].items():
                self._bad_by_shard[url] = self._bad_by_shard.get(url, 0) + bad
            self._last_error = counts["last_error"]
            log.warning(
                "skipped %d bad sample(s), %d of %d so far; last: %s",
                counts["bad"],
                self._bad,
                self._seen,
                self._last_error,
            )
        # Judged after every batch, so early failures are caught once enough samples are seen.
        if (
            self._bad
            and self._seen >= MIN_SAMPLES_FOR_BAD_FRACTION
            and self._bad > self.max_bad_fraction * self._seen
        ):
            worst, worst_bad = max(self._bad_by_shard.items(), key=lambda item: item[1])
            raise DataError(
                f"too many bad samples: {self._bad} of {self._seen} "
                f"({self._bad / self._seen:.1%}) could not be read or decoded, more than "
                f"max_bad_fraction={self.max_bad_fraction:g}; shard {worst} has {worst_bad} "
                f"bad samples; last: {self._last_error}"
            )
