"""Writing videos: MP4 / GIF with how they were made (container comment, GIF comment,
sidecar), atomically and readable by others."""

from __future__ import annotations

import json
import os

import av
import numpy as np
import pytest
import torch
from PIL import Image

from polydiff.core.provenance import check_output
from polydiff.video.export import (
    VIDEO_OUTPUT_SUFFIXES,
    encode_mp4,
    save_videos,
    write_gif,
    write_mp4,
)
from tests.provenance_fixtures import records


def _video(seed=0, frames=6, size=16):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((3, frames, size, size), generator=generator) * 2 - 1


def _records(checkpoint, n, prompt="a red circle moving left"):
    return records(checkpoint, n, modality="video", prompt=prompt, steps=3, frames=6, fps=8.0)


def test_an_mp4_carries_its_record_in_the_container_comment(tmp_path, checkpoint):
    record = _records(checkpoint, 1, prompt="ein Kreis — ü")[0]
    path = write_mp4(_video(), tmp_path / "clip.mp4", 8, metadata=record)
    with av.open(str(path)) as container:
        assert json.loads(container.metadata["comment"]) == record
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.format.name == "yuv420p"
        assert sum(1 for _ in container.decode(stream)) == 6
    data = path.read_bytes()
    assert b"\xa9cmt" in data  # the QuickTime comment atom ffprobe / exiftool / players read
    assert data.index(b"moov") < data.index(b"mdat")  # faststart kept
    assert json.loads((tmp_path / "clip.mp4.json").read_text(encoding="utf-8")) == record


def test_a_gif_carries_its_record_in_the_gif_comment(tmp_path, checkpoint):
    record = _records(checkpoint, 1)[0]
    path = write_gif(_video(), tmp_path / "clip.gif", 8, metadata=record)
    image = Image.open(path)
    assert json.loads(image.info["comment"].decode("utf-8")) == record
    assert image.n_frames == 6 and image.info["loop"] == 0
    assert json.loads((tmp_path / "clip.gif.json").read_text()) == record


def test_save_videos_writes_each_path_with_its_record(tmp_path, checkpoint):
    records = _records(checkpoint, 3)
    paths = check_output(tmp_path / "shapes", VIDEO_OUTPUT_SUFFIXES, 2)
    paths.append(tmp_path / "extra.gif")
    videos = [_video(i) for i in range(3)]
    assert save_videos(videos, paths, 8, records) == paths
    for path, record in zip(paths[:2], records[:2], strict=True):
        with av.open(str(path)) as container:
            assert json.loads(container.metadata["comment"])["index"] == record["index"]
    assert json.loads(Image.open(paths[2]).info["comment"])["index"] == 2
    assert sorted(os.listdir(tmp_path)) == [
        "extra.gif",
        "extra.gif.json",
        "shapes_0.mp4",
        "shapes_0.mp4.json",
        "shapes_1.mp4",
        "shapes_1.mp4.json",
    ]


def test_the_num_naming_rule_still_applies_to_one_out_file(tmp_path):
    paths = save_videos([_video(0), _video(1)], tmp_path / "sub" / "left.gif", 8)
    assert [p.name for p in paths] == ["left_0.gif", "left_1.gif"]
    assert sorted(os.listdir(tmp_path / "sub")) == ["left_0.gif", "left_1.gif"]  # no records


def test_videos_and_sidecars_are_readable_by_others(tmp_path, checkpoint, umask_022):
    paths = save_videos(
        [_video(), _video()], [tmp_path / "a.mp4", tmp_path / "b.gif"], 8, _records(checkpoint, 2)
    )
    for path in [*paths, *(p.with_name(p.name + ".json") for p in paths)]:
        assert path.stat().st_mode & 0o777 == 0o644, path  # -rw-r--r--


def test_bad_paths_and_counts_are_refused_before_any_file(tmp_path, checkpoint):
    with pytest.raises(ValueError, match=r"cannot write '.avi' videos; use one of .mp4, .gif"):
        save_videos([_video()], tmp_path / "clip.avi", 8, _records(checkpoint, 1))
    with pytest.raises(ValueError, match="cannot write '.webm' videos"):
        save_videos([_video(), _video()], [tmp_path / "a.mp4", tmp_path / "b.webm"], 8)
    with pytest.raises(ValueError, match="got 1 metadata records for 2 videos"):
        save_videos([_video(), _video()], tmp_path / "c.mp4", 8, _records(checkpoint, 1))
    with pytest.raises(ValueError, match="no videos to save"):
        save_videos([], tmp_path / "c.mp4", 8)
    assert os.listdir(tmp_path) == []


def test_a_failed_encode_leaves_no_file_behind(tmp_path, checkpoint, monkeypatch):
    target = tmp_path / "clip.mp4"
    write_mp4(_video(), target, 8)
    before = target.read_bytes()
    calls = []

    def failing(frame, format):
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("encoder crashed")
        return original(frame, format=format)

    original = av.VideoFrame.from_ndarray
    monkeypatch.setattr(av.VideoFrame, "from_ndarray", failing)
    with pytest.raises(RuntimeError, match="encoder crashed"):
        write_mp4(_video(1), target, 8, metadata=_records(checkpoint, 1)[0])
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["clip.mp4"]  # no temporary, no sidecar


def test_shard_clips_and_bare_files_carry_no_record(tmp_path):
    frames = ((_video().permute(1, 2, 3, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
    data = encode_mp4(np.ascontiguousarray(frames), 8)
    assert b"\xa9cmt" not in data
    write_mp4(_video(), tmp_path / "bare.mp4", 8)
    with av.open(str(tmp_path / "bare.mp4")) as container:
        assert "comment" not in container.metadata
    assert os.listdir(tmp_path) == ["bare.mp4"]
