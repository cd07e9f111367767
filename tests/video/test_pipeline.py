"""Generation: MP4/GIF files other tools open, image-to-video that keeps the given frame,
chunked long videos, clear errors before anything is loaded."""

from __future__ import annotations

import io

import av
import decord
import numpy as np
import pytest
import torch
from PIL import Image

from polydiff.cli.main import main
from polydiff.core.modality import bundled_checkpoint, load_trained
from polydiff.core.pretrained import CheckpointError
from polydiff.video.data import read_frames
from polydiff.video.pipeline import generate, sample_videos
from polydiff.video.recipe import VideoRecipe


def _frames_of(path) -> np.ndarray:
    reader = decord.VideoReader(str(path))
    return reader.get_batch(list(range(len(reader)))).asnumpy()


def test_generation_writes_an_h264_mp4_that_decord_and_pyav_open(tiny_checkpoint, tmp_path):
    out = tmp_path / "clip.mp4"
    code = main([
        "generate", "video", "--checkpoint", str(tiny_checkpoint), "--prompt",
        "a red circle moving left", "--out", str(out), "--steps", "2", "--fps", "12",
    ])  # fmt: skip
    assert code == 0
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
        assert float(stream.average_rate) == 12.0
        assert len(list(container.decode(stream))) == 8
    assert _frames_of(out).shape == (8, 32, 32, 3)
    assert out.read_bytes()[4:8] == b"ftyp" and b"moov" in out.read_bytes()[:64]  # faststart


def test_gif_output_and_one_file_per_sample(tiny_checkpoint, tmp_path):
    code = main([
        "generate", "video", "--checkpoint", str(tiny_checkpoint), "--prompt", "a", "--prompt",
        "b", "--num", "2", "--out", str(tmp_path / "v.gif"), "--steps", "1",
    ])  # fmt: skip
    assert code == 0
    names = sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".gif")
    assert names == ["v_0.gif", "v_1.gif", "v_2.gif", "v_3.gif"]
    with Image.open(tmp_path / "v_0.gif") as gif:
        assert gif.n_frames == 8 and gif.info["loop"] == 0


def test_image_to_video_keeps_the_given_first_frame(tiny_checkpoint, tmp_path):
    picture = np.zeros((40, 40, 3), dtype=np.uint8)
    picture[8:24, 12:28] = (230, 30, 30)
    Image.fromarray(picture).save(tmp_path / "start.png")
    videos, _ = generate(
        ["a red square moving right"], checkpoint=tiny_checkpoint, steps=3, num=2,
        first_frame=tmp_path / "start.png",
    )  # fmt: skip
    expected = torch.from_numpy(picture).permute(2, 0, 1).float() / 127.5 - 1
    expected = torch.nn.functional.interpolate(
        expected[None], size=(32, 32), mode="bilinear", antialias=True
    )[0]
    for video in videos:
        torch.testing.assert_close(video[:, 0], expected.clamp(-1, 1), atol=1e-5, rtol=0)
        assert (video[:, 1:] - video[:, :1]).abs().max() > 0  # the rest is generated


def test_longer_videos_are_generated_in_overlapping_chunks(tiny_checkpoint):
    model, bound = load_trained(tiny_checkpoint, VideoRecipe)
    cfg = bound.config
    videos, fps = generate(["a green circle moving up"], checkpoint=tiny_checkpoint, frames=19,
                           overlap=2, steps=2)  # fmt: skip
    assert videos[0].shape == (3, 19, 32, 32) and fps == 8.0
    # A chunk continuing a clip keeps the shared frames exactly (the sampler's mask).
    first = sample_videos(model, cfg, ["x"], steps=2, seed=1)
    init = torch.zeros_like(first)
    init[:, :, :2] = first[:, :, -2:]
    mask = torch.ones(1, 1, 8, 1, 1)
    mask[:, :, :2] = 0
    nxt = sample_videos(model, cfg, ["x"], steps=2, first_frames=first[:, :, -2],
                        known=(init, mask))  # fmt: skip
    torch.testing.assert_close(nxt[:, :, :2], first[:, :, -2:])


def test_same_seed_same_video_other_seed_other_video(tiny_checkpoint):
    a, _ = generate("a", checkpoint=tiny_checkpoint, steps=2, seed=4)
    b, _ = generate("a", checkpoint=tiny_checkpoint, steps=2, seed=4)
    c, _ = generate("a", checkpoint=tiny_checkpoint, steps=2, seed=5)
    torch.testing.assert_close(a[0], b[0])
    assert (a[0] - c[0]).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--frames", "0"], "frames must be in [1, 2048]"),
        (["--frames", "5000"], "frames must be in [1, 2048]"),
        (["--fps", "-3"], "fps must be a number in [0.1, 240.0]"),
        (["--fps", "1e9"], "fps must be a number in [0.1, 240.0]"),
        (["--first-frame", "missing.png"], "first frame image not found"),
        (["--overlap", "8"], "overlap must be in"),
        (["--out", "clip.avi"], "unsupported suffix .avi"),
        (["--sampler", "nope"], "unknown sampler"),
    ],
)
def test_bad_options_are_one_clear_line_and_exit_2(
    tiny_checkpoint, tmp_path, capsys, args, message
):
    base = ["generate", "video", "--checkpoint", str(tiny_checkpoint), "--prompt", "a",
            "--steps", "1", "--out", str(tmp_path / "x.mp4")]  # fmt: skip
    assert main(base + args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_an_image_checkpoint_is_not_a_video_checkpoint(tmp_path):
    from polydiff.image.recipe import ImageRecipe

    with pytest.raises(CheckpointError, match="'image' model, not a video model"):
        load_trained(bundled_checkpoint(ImageRecipe), VideoRecipe)


def test_read_frames_of_generated_file_round_trip(tiny_checkpoint, tmp_path):
    from polydiff.video.export import write_mp4

    videos, _ = generate("a", checkpoint=tiny_checkpoint, steps=1)
    path = write_mp4(videos[0], tmp_path / "a.mp4", 8)
    frames = read_frames(path.read_bytes(), range(8))
    assert frames.shape == (8, 32, 32, 3)
    assert io.BytesIO(path.read_bytes()).getbuffer().nbytes > 0


def test_written_videos_are_readable_by_others(tiny_checkpoint, tmp_path):
    from polydiff.video.export import write_mp4

    videos, _ = generate("a", checkpoint=tiny_checkpoint, steps=1)
    path = write_mp4(videos[0], tmp_path / "shared.mp4", 8)
    assert path.stat().st_mode & 0o044 == 0o044


def test_every_chunk_of_a_long_video_is_sampled_without_autograd(tiny_checkpoint, monkeypatch):
    # Memory must not grow with the length: no step may record a graph.
    from polydiff.video.model import VideoDiT

    seen = []
    forward = VideoDiT.forward

    def spy(self, *args, **kwargs):
        seen.append(torch.is_grad_enabled())
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(VideoDiT, "forward", spy)
    videos, _ = generate("a red circle moving left", checkpoint=tiny_checkpoint, frames=20,
                         overlap=2, steps=2)  # fmt: skip
    assert videos[0].shape[1] == 20 and len(seen) >= 6 and not any(seen)
