"""The whole path with real components: the CLI writes MP4 shards, a 2-process CPU DeepSpeed
run of the tiny preset trains on them, and its final/ checkpoint generates a readable MP4."""

from __future__ import annotations

import json
from pathlib import Path

import av
import yaml

from polydiff.cli.main import main

REPO = Path(__file__).resolve().parents[2]


def test_tiny_preset_trains_with_two_deepspeed_processes_and_generates(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny model: threads only contend
    shards = tmp_path / "shards"
    assert main([
        "data", "make-shards", "--modality", "video", "--source",
        "synthetic:moving-shapes:40", "--out", str(shards), "--maxcount", "10",
    ]) == 0  # fmt: skip
    assert len(list(shards.glob("*.tar"))) == 4

    config = yaml.safe_load((REPO / "shared/configs/video/tiny.yaml").read_text())
    config["deepspeed"] = str(REPO / "shared/configs/deepspeed/zero2_fp32.json")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    run = tmp_path / "run"
    code = main([
        "train", "--config", str(path), "--data", str(shards), "--out", str(run),
        "--num-procs", "2",
    ])  # fmt: skip
    assert code == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["samples"] == 4 * 2 * 2  # steps x batch x processes
    assert (run / "previews" / "step_000004" / "previews.mp4").is_file()

    out = tmp_path / "generated.mp4"
    assert main([
        "generate", "video", "--checkpoint", str(run / "final"), "--prompt",
        "a blue triangle moving up", "--out", str(out), "--steps", "2",
    ]) == 0  # fmt: skip
    with av.open(str(out)) as container:
        frames = list(container.decode(video=0))
    assert len(frames) == 8 and (frames[0].width, frames[0].height) == (32, 32)
