"""The `polydiff` command: shards from synthetic and user data, and one-line errors (exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from polydiff.cli.main import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "polydiff.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_list_shows_installed_modalities(capsys):
    assert main(["list"]) == 0
    assert "image" in capsys.readouterr().out.split()


def test_make_shards_from_synthetic_digits_prints_a_summary(tmp_path, capsys):
    out = tmp_path / "digits"
    code = main(
        [
            "data",
            "make-shards",
            "--modality",
            "image",
            "--source",
            "synthetic:digits:50",
            "--out",
            str(out),
            "--maxcount",
            "20",
        ]
    )
    text = capsys.readouterr().out
    assert code == 0
    assert "50" in text and len(list(out.glob("*.tar"))) == 3
    index = json.loads((out / "index.json").read_text())
    assert index["total"] == 50 and [s["count"] for s in index["shards"]] == [20, 20, 10]


def test_make_shards_skips_and_counts_unreadable_user_files(tmp_path, capsys):
    from PIL import Image

    src = tmp_path / "mine"
    src.mkdir()
    for i in range(3):
        Image.new("L", (8, 8), color=i * 40).save(src / f"img{i}.png")
        (src / f"img{i}.txt").write_text(f"a gray square {i}")
    (src / "broken.png").write_bytes(b"not a png")
    (src / "broken.txt").write_text("a broken file")
    code = main(
        [
            "data",
            "make-shards",
            "--modality",
            "image",
            "--source",
            str(src),
            "--out",
            str(tmp_path / "shards"),
        ]
    )
    text = capsys.readouterr().out
    assert code == 0
    assert "3" in text and "broken" in text  # the skip is reported with its key


@pytest.mark.parametrize(
    "args,message",
    [
        (
            [
                "generate",
                "image",
                "--prompt",
                "a handwritten digit 3",
                "--out",
                "x.png",
                "--checkpoint",
                "/no/such/folder",
            ],
            "checkpoint folder not found",
        ),
        (["generate", "sound", "--prompt", "x", "--out", "x.wav"], "unknown modality"),
        (
            ["generate", "image", "--prompt", "x", "--out", "x.png", "--sampler", "plms"],
            "unknown sampler",
        ),
        (["generate", "image", "--out", "x.png"], "no prompt"),
        (["generate", "image", "--prompt", "  ", "--out", "x.png"], "no prompt"),
        (
            ["generate", "image", "--prompt", "x", "--out", "x.png", "--guidance", "-1"],
            "--guidance",
        ),
        (
            ["generate", "image", "--prompt", "x", "--out", "x.png", "--guidance", "nan"],
            "--guidance",
        ),
        (
            [
                "data",
                "make-shards",
                "--modality",
                "image",
                "--source",
                "synthetic:digits:0",
                "--out",
                "x",
            ],
            "COUNT",
        ),
        (
            [
                "data",
                "make-shards",
                "--modality",
                "image",
                "--source",
                "/no/such/dir",
                "--out",
                "x",
            ],
            "neither a folder",
        ),
        (["train", "--config", "/no/such.yaml"], "config file not found"),
    ],
)
def test_bad_input_gets_one_clear_line_and_exit_code_2(args, message, tmp_path):
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr


def test_corrupt_checkpoint_gets_one_clear_line(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    (folder / "model.safetensors").write_bytes(b"garbage")
    result = run_cli(
        "generate",
        "image",
        "--checkpoint",
        str(folder),
        "--prompt",
        "x",
        "--out",
        str(tmp_path / "x.png"),
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
