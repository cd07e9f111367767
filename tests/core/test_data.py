"""Behaviour of polydiff.core.data: writing WebDataset shards, naming them, streaming batches."""

from __future__ import annotations

import io
import itertools
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from polydiff.core.data import (
    DataError,
    ShardStream,
    Skip,
    expand_urls,
    iter_shard,
    write_shards,
)

# --- tiny real samples: PNG payload, caption, JSON metadata ---------------------------------


def png_bytes(value: int, size: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size), value % 256, dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def make_samples(start: int, count: int, corrupt: tuple[int, ...] = (), mixed: bool = False):
    """Samples start..start+count-1: 2x2 images, or with ``mixed`` 3x3 ones at odd indices."""
    for index in range(start, start + count):
        size = 2 + index % 2 if mixed else 2
        payload = png_bytes(index, size)
        yield {
            "__key__": f"s{index:05d}",
            "png": payload[:20] if index in corrupt else payload,  # truncated PNG: undecodable
            "txt": f"sample number {index}",
            "json": {"index": index, "size": size},
        }


def decode(sample: dict) -> dict:
    image = Image.open(io.BytesIO(sample["png"]))
    image.load()
    return {
        "index": json.loads(sample["json"])["index"],
        "pixels": torch.from_numpy(np.asarray(image).copy()),
        "noise": torch.rand(()),  # a random augmentation: must be reproducible on resume
        "pid": os.getpid(),
    }


def collate(samples: list[dict]) -> dict:
    return {
        "index": torch.tensor([s["index"] for s in samples]),
        "pixels": torch.stack([s["pixels"] for s in samples]),  # fails on mixed sizes
        "noise": torch.stack([s["noise"] for s in samples]),
        "pid": [s["pid"] for s in samples],
    }


def image_size(sample: dict) -> int:
    return json.loads(sample["json"])["size"]


def indices(batch: dict) -> list[int]:
    return batch["index"].tolist()


def take(stream: ShardStream, count: int) -> list[dict]:
    return list(itertools.islice(stream, count))


def assert_same_batches(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        for name in ("index", "pixels", "noise"):
            assert torch.equal(a[name], b[name])


def write_uneven_shards(folder, mixed: bool = False) -> list[str]:
    """Four shards of 3, 17, 5 and 1 samples (26 in all), each in its own folder with an
    index.json, except the last, whose count must come from reading it."""
    urls, start = [], 0
    for part, count in enumerate((3, 17, 5, 1)):
        summary = write_shards(make_samples(start, count, mixed=mixed), folder / f"part{part}")
        urls += summary.shards
        start += count
    os.remove(folder / "part3" / "index.json")
    return urls


@pytest.fixture
def uneven_shards(tmp_path) -> list[str]:
    return write_uneven_shards(tmp_path)


def stream(urls, **options) -> ShardStream:
    options.setdefault("shuffle_buffer", 8)
    return ShardStream(urls, decode=decode, collate=collate, **options)


# --- write_shards ---------------------------------------------------------------------------


def test_round_trip_keeps_payload_bytes_caption_and_json_metadata(tmp_path):
    originals = list(make_samples(0, 5))
    summary = write_shards(iter(originals), tmp_path / "out", maxcount=2)
    read = [sample for url in summary.shards for sample in iter_shard(url)]
    assert [s["__key__"] for s in read] == [s["__key__"] for s in originals]
    for got, want in zip(read, originals, strict=True):
        assert got["png"] == want["png"]
        assert got["txt"].decode() == want["txt"]
        assert json.loads(got["json"]) == want["json"]


def test_index_json_records_per_shard_counts_total_and_meta(tmp_path):
    summary = write_shards(make_samples(0, 10), tmp_path, maxcount=4, meta={"modality": "image"})
    index = json.loads((tmp_path / "index.json").read_text())
    assert index == {
        "shards": [
            {"name": "shard-000000.tar", "count": 4},
            {"name": "shard-000001.tar", "count": 4},
            {"name": "shard-000002.tar", "count": 2},
        ],
        "total": 10,
        "meta": {"modality": "image"},
    }
    assert summary.written == 10 and summary.counts == [4, 4, 2]
    assert [os.path.basename(p) for p in summary.shards] == [e["name"] for e in index["shards"]]


def test_skips_are_counted_by_reason_and_reported_never_dropped_silently(tmp_path):
    def source():
        yield from make_samples(0, 3)
        yield Skip("cat.png", "unreadable image")
        yield Skip("dog.png", "unreadable image")
        yield Skip("owl.png", "missing caption")
        yield next(make_samples(1, 1))  # same key as an earlier sample
        yield {"__key__": "v1.2", "txt": "dotted key"}

    summary = write_shards(source(), tmp_path)
    assert summary.written == 3
    assert summary.skipped == {
        "unreadable image": 2,
        "missing caption": 1,
        "duplicate key": 1,
        "key contains '.'": 1,
    }
    assert ("cat.png", "unreadable image") in summary.skipped_keys
    report = summary.report()
    assert "wrote 3 samples in 1 shard" in report
    assert "skipped 5 inputs" in report
    assert "unreadable image: 2 (cat.png, dog.png)" in report
    assert "shard-000000.tar: 3 samples" in report


def test_progress_shows_written_and_skipped_samples_on_stderr(tmp_path, capsys):
    samples = [*make_samples(0, 4), Skip("cat.png", "unreadable image")]
    summary = write_shards(samples, tmp_path / "a", progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    last = captured.err.replace("\r", "\n").strip().splitlines()[-1]
    assert "writing shards" in last and "5/5" in last  # a list: its length is the total
    assert "written=4" in last and "skipped=1" in last
    quiet = write_shards(iter(samples), tmp_path / "b", progress=False)
    assert capsys.readouterr() == ("", "")
    assert quiet.report() == summary.report().replace(str(tmp_path / "a"), str(tmp_path / "b"))


def test_progress_is_hidden_when_stderr_is_not_a_terminal(tmp_path, capsys):
    write_shards(make_samples(0, 3), tmp_path)  # pytest's captured stderr is no terminal
    assert capsys.readouterr() == ("", "")


def test_empty_input_returns_a_summary_and_writes_no_shard(tmp_path):
    summary = write_shards([Skip("a.png", "unreadable image")], tmp_path / "out")
    assert summary.written == 0 and summary.shards == []
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    assert "no shard written" in summary.report()
    assert "unreadable image: 1 (a.png)" in summary.report()


def test_existing_shards_are_not_mixed_with_new_ones_unless_overwriting(tmp_path):
    write_shards(make_samples(0, 5), tmp_path, maxcount=2)
    with pytest.raises(FileExistsError, match="shard-000000.tar"):
        write_shards(make_samples(0, 1), tmp_path)
    summary = write_shards(make_samples(0, 1), tmp_path, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["index.json", "shard-000000.tar"]
    assert summary.written == 1


# --- expand_urls ----------------------------------------------------------------------------


@pytest.fixture
def shard_dir(tmp_path):
    write_shards(make_samples(0, 6), tmp_path / "data", maxcount=2)
    return tmp_path / "data"


def test_a_directory_expands_to_its_index_then_to_its_sorted_tars(shard_dir, tmp_path):
    names = [f"shard-00000{i}.tar" for i in range(3)]
    assert expand_urls(str(shard_dir)) == [str(shard_dir / n) for n in names]
    index = json.loads((shard_dir / "index.json").read_text())
    index["shards"].reverse()  # the index decides the order
    (shard_dir / "index.json").write_text(json.dumps(index))
    assert expand_urls(shard_dir) == [str(shard_dir / n) for n in reversed(names)]
    os.remove(shard_dir / "index.json")
    assert expand_urls(shard_dir) == [str(shard_dir / n) for n in names]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no index.json and no .tar shards"):
        expand_urls(tmp_path / "empty")


def test_brace_patterns_and_comma_space_or_python_lists_expand_in_order(shard_dir):
    a, b, c = (str(shard_dir / f"shard-00000{i}.tar") for i in range(3))
    assert expand_urls(f"{shard_dir}/shard-{{000000..000002}}.tar") == [a, b, c]
    assert expand_urls(f"{c},{a}") == [c, a]
    assert expand_urls(f"{c} {a}  {b}") == [c, a, b]
    assert expand_urls([c, f"{shard_dir}/shard-{{000000,000001}}.tar"]) == [c, a, b]


def test_remote_urls_pass_through_and_pipe_needs_permission():
    assert expand_urls("https://host/d/shard-{0..1}.tar") == [
        "https://host/d/shard-0.tar",
        "https://host/d/shard-1.tar",
    ]
    with pytest.raises(ValueError, match="allow_pipe=True"):
        expand_urls("pipe:curl -s https://host/shard.tar")
    assert expand_urls("pipe:cat a.tar", allow_pipe=True) == ["pipe:cat a.tar"]


def test_missing_local_shards_raise_naming_them(shard_dir):
    with pytest.raises(FileNotFoundError, match=r"shard-000009\.tar"):
        expand_urls(f"{shard_dir}/shard-{{000000..000009}}.tar")
    with pytest.raises(ValueError, match="allow_pipe"):
        ShardStream("pipe:cat x.tar", decode=decode, collate=collate, batch_size=1)


# --- ShardStream: equal batches per rank ----------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_rank_gets_the_same_batch_count_from_uneven_shards(uneven_shards, num_workers):
    streams = [
        stream(uneven_shards, batch_size=4, rank=r, world_size=2, num_workers=num_workers)
        for r in range(2)
    ]
    assert [s.batches_per_epoch for s in streams] == [3, 3]  # 26 // (2 * 4)
    for epoch in range(2):
        seen = []
        for s in streams:
            batches = take(s, 3)
            assert s.state_dict()["epoch"] == epoch + 1 and s.state_dict()["batch"] == 0
            assert all(len(indices(b)) == 4 for b in batches)
            seen += [i for b in batches for i in indices(b)]
        assert len(seen) == len(set(seen)) == 24  # no sample twice in an epoch, across ranks


def test_fewer_shards_than_ranks_times_workers_still_gives_every_rank_its_batches(tmp_path):
    write_shards(make_samples(0, 10), tmp_path)  # one shard
    seen = []
    for rank in range(4):
        s = stream(str(tmp_path), batch_size=2, rank=rank, world_size=4, num_workers=2)
        assert s.batches_per_epoch == 1
        seen += [i for b in take(s, 1) for i in indices(b)]
    assert len(seen) == len(set(seen)) == 8


def test_decoding_runs_in_dataloader_workers(uneven_shards):
    batch = take(stream(uneven_shards, batch_size=2, num_workers=2), 1)[0]
    assert os.getpid() not in batch["pid"]


def test_shuffling_is_a_function_of_seed_and_epoch(uneven_shards):
    def epochs(seed):
        return [indices(b) for b in take(stream(uneven_shards, batch_size=2, seed=seed), 26)]

    first = epochs(seed=0)
    assert first == epochs(seed=0)
    assert first != epochs(seed=1)
    assert first[:13] != first[13:]  # epoch 1 is a new order
    assert sorted(i for b in first[:13] for i in b) == list(range(26))


def test_fewer_samples_than_ranks_times_batch_size_is_refused(uneven_shards):
    with pytest.raises(ValueError, match="26 samples in 4 shards are fewer than"):
        stream(uneven_shards, batch_size=8, world_size=4)


# --- bad samples ----------------------------------------------------------------------------


def test_a_corrupt_sample_is_skipped_counted_per_shard_and_batches_keep_their_size(tmp_path):
    summary = write_shards(make_samples(0, 40, corrupt=(7,)), tmp_path, maxcount=20)
    s = stream(str(tmp_path), batch_size=4, max_bad_fraction=0.05)
    batches = take(s, s.batches_per_epoch)
    assert all(len(indices(b)) == 4 for b in batches)
    assert 7 not in {i for b in batches for i in indices(b)}
    assert s.stats.seen == 40 and s.stats.bad == 1
    assert s.stats.bad_by_shard == {summary.shards[0]: 1}
    assert s.state_dict()["bad"] == 1


def test_a_batch_whose_every_sample_fails_gets_a_decodable_stand_in(tmp_path):
    write_shards(make_samples(0, 40, corrupt=(7,)), tmp_path)
    s = stream(str(tmp_path), batch_size=1)
    batches = take(s, 40)
    assert s.state_dict()["epoch"] == 1 and s.stats.bad == 1
    assert 7 not in {i for b in batches for i in indices(b)}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_too_many_bad_samples_fail_naming_the_shard(tmp_path, num_workers):
    summary = write_shards(make_samples(0, 30, corrupt=tuple(range(0, 30, 3))), tmp_path)
    s = stream(str(tmp_path), batch_size=2, num_workers=num_workers, max_bad_fraction=0.2)
    with pytest.raises(DataError, match="too many bad samples") as error:
        take(s, 15)
    assert summary.shards[0] in str(error.value)
    assert "max_bad_fraction=0.2" in str(error.value)


def test_samples_missing_from_a_truncated_shard_count_as_bad_and_name_it(tmp_path):
    summary = write_shards(make_samples(0, 60), tmp_path, maxcount=30)
    damaged = summary.shards[1]
    with open(damaged, "r+b") as tar:
        tar.truncate(os.path.getsize(damaged) * 2 // 3)  # index.json still says 30
    s = stream(str(tmp_path), batch_size=4)
    with pytest.raises(DataError, match="unexpected end of data") as error:
        take(s, 15)
    assert f"shard {damaged} has" in str(error.value)


# --- exact resume ---------------------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("cut", [7, 8])  # mid-epoch, and exactly at the epoch boundary
def test_resume_yields_exactly_the_uninterrupted_batches(uneven_shards, num_workers, cut):
    options = dict(batch_size=3, rank=1, world_size=2, num_workers=num_workers, seed=5)
    uninterrupted = take(stream(uneven_shards, **options), cut + 5)  # 4 batches per epoch

    first = stream(uneven_shards, **options)
    take(first, cut)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    assert (state["epoch"], state["batch"]) == divmod(cut, 4)

    resumed = stream(uneven_shards, **options)
    resumed.load_state_dict(state)
    assert_same_batches(take(resumed, 5), uninterrupted[cut:])
    assert resumed.state_dict()["samples_seen"] == 3 * (cut + 5)


def test_resume_with_bucketing_and_bad_samples_restores_batches_and_counts(tmp_path):
    write_shards(make_samples(0, 60, corrupt=(4, 31), mixed=True), tmp_path, maxcount=25)
    options = dict(batch_size=3, bucket=image_size, world_size=2, max_bad_fraction=0.1)
    uninterrupted = stream(str(tmp_path), **options)
    want = take(uninterrupted, 20)

    first = stream(str(tmp_path), **options)
    take(first, 9)
    resumed = stream(str(tmp_path), **options)
    resumed.load_state_dict(first.state_dict())
    assert_same_batches(take(resumed, 11), want[9:])
    assert resumed.state_dict() == uninterrupted.state_dict()


def test_each_iteration_continues_where_the_last_one_stopped(uneven_shards):
    options = dict(batch_size=2, num_workers=2)
    s = stream(uneven_shards, **options)
    in_pieces = take(s, 3) + take(s, 4)
    assert_same_batches(in_pieces, take(stream(uneven_shards, **options), 7))


def test_decoding_leaves_the_callers_random_generators_untouched(uneven_shards):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    take(stream(uneven_shards, batch_size=2), 2)
    assert torch.equal(torch.rand(3), expected)


def test_a_state_outside_the_epoch_is_refused(uneven_shards):
    s = stream(uneven_shards, batch_size=2)
    with pytest.raises(ValueError, match="outside the 13 batches per epoch"):
        s.load_state_dict({"epoch": 0, "batch": 13, "samples_seen": 0, "bad": 0})


# --- bucketing ------------------------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bucketed_batches_share_a_bucket_and_ranks_stay_equal(tmp_path, num_workers):
    urls = write_uneven_shards(tmp_path, mixed=True)
    for rank in range(2):
        s = stream(
            urls,
            batch_size=3,
            bucket=image_size,
            rank=rank,
            world_size=2,
            num_workers=num_workers,
        )
        assert s.batches_per_epoch == 4
        batches = take(s, 8)  # two epochs
        assert s.state_dict()["epoch"] == 2 and s.state_dict()["batch"] == 0
        for batch in batches:
            assert len({i % 2 for i in indices(batch)}) == 1  # one image size per batch


@pytest.mark.parametrize("num_workers", [0, 1])
def test_an_all_bad_shard_fails_in_one_line_with_or_without_workers(tmp_path, num_workers):
    write_shards(make_samples(0, 30, corrupt=tuple(range(30))), tmp_path)
    s = stream(str(tmp_path), batch_size=2, num_workers=num_workers)
    with pytest.raises(DataError) as error:
        take(s, 5)
    assert "\n" not in str(error.value) and "Traceback" not in str(error.value)
