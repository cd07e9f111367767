"""Videos into shards and back: real MP4 bytes in the shards, decoding in the loader with
decord (PyAV as fallback), clip sampling by frame count and fps, buckets, corrupt files."""

from __future__ import annotations

import random

import av
import numpy as np
import pytest
import torch

from polydiff.core.data import Skip, iter_shard, write_shards
from polydiff.video import data
from polydiff.video.export import encode_mp4
from polydiff.video.synthetic import render_clip


def _write_with_pyav(path, clip: np.ndarray, codec: str, fps: int = 8) -> None:
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = clip.shape[2], clip.shape[1], "yuv420p"
        for frame in clip:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())


def test_shards_round_trip_real_mp4s_to_clips(tmp_path, clips, recipe):
    summary = write_shards(iter(clips), tmp_path / "shards", maxcount=8)
    assert summary.written == 21 and summary.counts == [8, 8, 5]
    stored = [
        s for shard in sorted((tmp_path / "shards").glob("*.tar")) for s in iter_shard(str(shard))
    ]
    assert [s["mp4"] for s in stored] == [c["mp4"] for c in clips]  # encoded bytes, not frames
    cfg = recipe.validate({})
    decoded = recipe(cfg).decode(stored[0])
    assert decoded["video"].shape == (3, 16, 32, 32) and decoded["caption"] == clips[0]["txt"]
    assert decoded["video"].min() >= -1 and decoded["video"].max() <= 1
    assert recipe(cfg).bucket(stored[0]) == (16, 32, 32)
    batch = recipe(cfg).collate([recipe(cfg).decode(s) for s in stored[:4]])
    assert batch["video"].shape == (4, 3, 16, 32, 32) and len(batch["caption"]) == 4


def test_decoded_frames_match_what_was_encoded():
    clip = render_clip("circle", "red", "moving right", rng=random.Random(0))
    payload = encode_mp4(clip, fps=8)
    for decoder in ("decord", "pyav"):
        frames = data.read_frames(payload, range(16), decoder=decoder)
        assert frames.shape == (16, 32, 32, 3)
        assert np.abs(frames.astype(int) - clip.astype(int)).mean() < 3  # H.264 at crf 17


def test_decord_and_pyav_agree_on_any_order_and_repeats():
    payload = encode_mp4(render_clip("square", "white", "moving up", rng=random.Random(2)), 8)
    picks = [5, 0, 5, 15]
    a = data.read_frames(payload, picks, decoder="decord")
    b = data.read_frames(payload, picks, decoder="pyav")
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 2
    assert np.array_equal(a[0], a[2])


def test_frames_past_the_real_count_are_refused_not_hung_on():
    payload = encode_mp4(render_clip("circle", "blue", "static"), fps=8)
    assert data.count_frames(payload) == 16
    with pytest.raises(ValueError, match="16 frames"):
        data.read_frames(payload, [20])
    # A container (or metadata) that claims more frames than it has: refused, never hung on.
    with pytest.raises(ValueError, match="decord sees 16 frames|ended before"):
        data.read_frames(payload, [0, 30], real_count=40)


def test_clip_sampling_converts_frame_rates():
    assert data.clip_indices(48, 24.0, 4, 8.0, None) == [0, 3, 6, 9]
    rng = random.Random(0)
    picks = data.clip_indices(48, 24.0, 8, 8.0, rng)
    assert np.all(np.diff(picks) == 3) and picks[0] >= 0 and picks[-1] < 48
    with pytest.raises(ValueError, match="too short"):
        data.clip_indices(10, 8.0, 16, 8.0, rng)


def test_buckets_by_duration_and_aspect_ratio():
    buckets = [[16, 32, 32], [8, 32, 32], [8, 32, 64]]
    square_long = {"fps": 8, "frames": 20, "width": 64, "height": 64}
    wide_short = {"fps": 8, "frames": 10, "width": 128, "height": 64}
    square_short = {"fps": 8, "frames": 10, "width": 50, "height": 50}
    assert data.choose_bucket(square_long, buckets, 8) == (16, 32, 32)
    assert data.choose_bucket(wide_short, buckets, 8) == (8, 32, 64)
    assert data.choose_bucket(square_short, buckets, 8) == (8, 32, 32)
    with pytest.raises(ValueError, match="too short"):
        data.choose_bucket({"fps": 8, "frames": 4, "width": 8, "height": 8}, buckets, 8)


def test_resize_covers_then_centre_crops():
    frames = np.zeros((2, 40, 80, 3), dtype=np.uint8)
    frames[:, :, 16:64] = 255  # the middle 60 % is white, black bars left and right
    video = data.resize_crop(frames, 16, 16)
    assert video.shape == (3, 2, 16, 16)
    assert torch.allclose(video, torch.ones_like(video), atol=1e-4)  # the bars are cropped


def test_folder_source_reads_mp4_webm_avi_and_mov_with_captions(tmp_path):
    clip = render_clip("triangle", "yellow", "moving down", rng=random.Random(1))
    _write_with_pyav(tmp_path / "a.mp4", clip, "libx264")
    _write_with_pyav(tmp_path / "b.webm", clip, "libvpx-vp9")
    _write_with_pyav(tmp_path / "c.avi", clip, "mpeg4")
    (tmp_path / "sub").mkdir()
    _write_with_pyav(tmp_path / "sub" / "d.mov", clip, "libx264")
    (tmp_path / "a.txt").write_text("a yellow triangle moving down\n")
    (tmp_path / "captions.csv").write_text(
        "file,caption\nb.webm,a webm clip\nc.avi,an avi clip\nsub/d.mov,a mov clip\n"
    )
    samples = list(data.folder_source(tmp_path))
    assert [s["__key__"] for s in samples] == ["a", "b", "c", "sub/d"]
    assert [next(f for f in data.VIDEO_FIELDS if f in s) for s in samples] == [
        "mp4", "webm", "avi", "mov"
    ]  # fmt: skip
    assert samples[1]["txt"] == "a webm clip"
    assert all(s["json"]["frames"] == 16 and s["json"]["fps"] == 8 for s in samples)
    cfg = {"frames": 8, "height": 16, "width": 16, "fps": 8, "channels": 3, "buckets": None}
    for sample in samples:
        video = data.decode(sample, {**cfg, "decoder": "auto"})["video"]
        assert video.shape == (3, 8, 16, 16)


def test_corrupt_or_uncaptioned_videos_are_skipped_and_counted(tmp_path):
    good = encode_mp4(render_clip("circle", "red", "static"), fps=8)
    (tmp_path / "good.mp4").write_bytes(good)
    (tmp_path / "good.txt").write_text("a red circle static")
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50)
    (tmp_path / "broken.txt").write_text("never decodes")
    (tmp_path / "truncated.mp4").write_bytes(good[:200])
    (tmp_path / "truncated.txt").write_text("cut short")
    (tmp_path / "silent.mp4").write_bytes(good)  # no caption anywhere
    samples = list(data.folder_source(tmp_path))
    skips = {s.key: s.reason for s in samples if isinstance(s, Skip)}
    assert set(skips) == {"broken", "truncated", "silent"}
    assert skips["silent"] == "no caption" and skips["broken"].startswith("unreadable video")
    summary = write_shards(iter(samples), tmp_path / "shards")
    assert summary.written == 1 and sum(summary.skipped.values()) == 3


def test_a_corrupt_video_inside_a_shard_fails_decode_naming_its_key(recipe, clips):
    cfg = recipe.validate({})
    broken = {**clips[0], "__key__": "clip_bad", "mp4": clips[0]["mp4"][:300]}
    with pytest.raises(ValueError, match="clip_bad"):
        recipe(cfg).decode(broken)


def test_grey_models_get_one_channel(recipe, clips):
    cfg = recipe.validate({"channels": 1})
    assert recipe(cfg).decode(clips[0])["video"].shape == (1, 16, 32, 32)
