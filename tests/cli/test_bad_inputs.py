"""The bad-input sweep: every subcommand and every installed modality answers a bad invocation
with exit 2 and one line naming the problem, before any long work, leaving nothing behind.

Modalities join the sweep by registering: the generate rows run for each entry point.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from polydiff.cli.main import main
from polydiff.core.modality import available_modalities, load_modality

MODALITIES = available_modalities()


def _suffix(modality: str) -> str:
    return load_modality(modality).output_suffixes[0]


def _generate_rows(modality: str, tmp: Path) -> list[tuple[list[str], str]]:
    out = str(tmp / f"out{_suffix(modality)}")
    base = ["generate", modality, "--prompt", "x"]
    (tmp / f"folder{_suffix(modality)}").mkdir()
    (tmp / "a-file").write_text("x")
    return [
        (base + ["--out", str(tmp / f"folder{_suffix(modality)}")], "is an existing folder"),
        (base + ["--out", str(tmp / "a-file" / f"o{_suffix(modality)}")], "--out"),
        (base + ["--out", str(tmp / "x.xyz")], "unsupported suffix .xyz"),
        (base + ["--out", out, "--num", "1000000000"], "--num"),
        (base + ["--out", out, "--num", "99999999999999999999"], "--num"),
        (base + ["--out", out, "--num", "0"], "--num"),
        (base + ["--out", out, "--steps", "1001"], "--steps"),
        (base + ["--out", out, "--steps", "1e7"], "--steps"),
        (base + ["--out", out, "--seed", str(2**70)], "--seed"),
        (base + ["--out", out, "--seed", "-1"], "--seed"),
        (base + ["--out", out, "--guidance", "nan"], "--guidance"),
        (base + ["--out", out, "--guidance", "51"], "--guidance"),
        (base + ["--out", out, "--sampler", "plms"], "unknown sampler"),
        (base + ["--out", out, "--batch-size", "0"], "--batch-size"),
        (base + ["--out", out, "--device", "tpu"], "--device"),
        (base + ["--out", out, "--device", "cuda:7"], "--device"),
        (base + ["--out", out, "--dtype", "float64"], "--dtype"),
        (base + ["--out", out, "--checkpoint", str(tmp / "nope")], "checkpoint folder not found"),
        (base + ["--out", out, "--timesteps", "999,abc"], "--timesteps"),
        (base + ["--out", out, "--timesteps", "100,500"], "--timesteps"),
        (base + ["--out", out, "--timesteps", "999,-1"], "--timesteps"),
        (base + ["--out", out, "--steps", "3", "--timesteps", "999,500"], "--steps"),
        (["generate", modality, "--out", out], "no prompt"),
        (base + ["--out", out, "--no-such-option", "1"], "unrecognized arguments"),
    ]


def _check(args: list[str], message: str, capsys, tmp: Path) -> None:
    before = sorted(p.name for p in tmp.rglob("*"))
    start = time.monotonic()
    assert main(args) == 2, args
    assert time.monotonic() - start < 30, f"{args}: refused only after long work"
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], (args, err)
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp.rglob("*")) == before, f"{args} left files behind"


@pytest.mark.parametrize("modality", MODALITIES)
def test_bad_generate_invocations_are_one_line_and_exit_2(modality, tmp_path, capsys):
    for args, message in _generate_rows(modality, tmp_path):
        _check(args, message, capsys, tmp_path)


def _config(tmp: Path, modality: str) -> Path:
    path = tmp / f"{modality.replace(':', '_')}.yaml"
    path.write_text(
        f"modality: '{modality}'\nmodel: {{}}\n"
        "train: {max_steps: 1, batch_size: 1, lr: 1.0e-4}\n"
        "deepspeed: shared/configs/deepspeed/zero0_fp32.json\n"
    )
    return path


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("os:system", "is not a polydiff modality"),
        ("os:getcwd", "is not a polydiff modality"),
        ("os:nosuch", "is not a polydiff modality"),
        ("nosuchmod:X", "cannot import 'nosuchmod'"),
        ("polydiff.image.model:PixelUNet", "is not a polydiff modality"),
        ("nosuch", "unknown modality 'nosuch'"),
    ],
)
def test_a_config_naming_something_else_than_a_modality_calls_nothing(
    target, message, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    called = []
    monkeypatch.setattr(os, "system", lambda *a: called.append(a))
    _check(["train", "--config", str(_config(tmp_path, target))], message, capsys, tmp_path)
    assert not called


def test_generate_names_what_is_not_a_modality(tmp_path, capsys):
    _check(["generate", "os:getcwd", "--prompt", "x", "--out", "x.png"],
           "is not a polydiff modality", capsys, tmp_path)  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["data", "make-shards", "--modality", "nosuch", "--source", "synthetic:x", "--out", "o"],
         "unknown modality"),
        (["data", "make-shards", "--modality", "image", "--source", "synthetic:nosuch",
          "--out", "o"], "unknown synthetic image set"),
        (["data", "make-shards", "--modality", "image", "--source", "synthetic:digits",
          "--out", "o", "--maxcount", "0"], "--maxcount"),
        (["train", "--config", "/no/such.yaml"], "config file not found"),
        (["nosuch"], "invalid choice"),
        ([], "the following arguments are required"),
    ],
)  # fmt: skip
def test_bad_data_and_train_invocations_are_one_line(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _check(args, message, capsys, tmp_path)


def test_make_shards_skips_bombs_and_unreadable_captions_naming_them(tmp_path, capsys):
    from PIL import Image

    source = tmp_path / "src"
    source.mkdir()
    Image.new("L", (8, 8)).save(source / "good.png")
    (source / "good.txt").write_text("a gray square")
    Image.new("L", (8, 8)).save(source / "latin.png")
    (source / "latin.txt").write_bytes("un carré gris".encode("latin-1"))
    bomb = Image.new("1", (20000, 20000))  # 1-bit: tiny as a PNG, huge decoded
    bomb.save(source / "bomb.png")
    (source / "bomb.txt").write_text("a bomb")
    assert main(["data", "make-shards", "--modality", "image", "--source", str(source),
                 "--out", str(tmp_path / "shards")]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "latin.txt is not UTF-8" in out and "DecompressionBombError" in out


def test_make_shards_overwrites_only_when_asked_and_a_killed_run_is_not_data(tmp_path, capsys):
    from polydiff.core.data import INCOMPLETE_NAME, expand_urls

    out = tmp_path / "shards"
    args = ["data", "make-shards", "--modality", "image", "--source", "synthetic:digits:5",
            "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    capsys.readouterr()
    _check(args, "--overwrite", capsys, tmp_path)
    assert main([*args, "--overwrite"]) == 0
    (out / INCOMPLETE_NAME).write_text("")  # what a killed make-shards leaves
    with pytest.raises(ValueError, match="incomplete"):
        expand_urls(out)


@pytest.fixture(scope="module")
def digits_like(tmp_path_factory) -> Path:
    """An untrained tiny image checkpoint (a `polydiff train` final/ folder)."""
    from polydiff.core.train.trainer import write_final
    from polydiff.image.recipe import ImageRecipe

    bound = ImageRecipe.from_config(ImageRecipe.example_config)
    folder = tmp_path_factory.mktemp("ckpt") / "final"
    write_final(bound.build_model(), folder, "image", bound.config)
    return folder


def test_bad_tune_steps_invocations_are_one_line(digits_like, tmp_path, capsys):
    base = ["tune-steps", "--checkpoint", str(digits_like), "--prompt", "x"]
    rows = [
        (base + ["--sampler", "lcm", "--nfe", "4"], "cannot tune 'lcm'"),
        (base + ["--sampler", "unipc", "--nfe", "0"], "--nfe"),
        (base + ["--sampler", "unipc", "--nfe", "1000"], "--nfe"),
        (base + ["--sampler", "unipc", "--nfe", "5", "--num", "100000"], "--num"),
        (base + ["--sampler", "unipc", "--nfe", "5", "--teacher-steps", "5"], "--teacher-steps"),
        (base + ["--sampler", "unipc", "--nfe", "5", "--guidance", "nan"], "--guidance"),
        (["tune-steps", "--checkpoint", str(digits_like), "--sampler", "unipc", "--nfe", "5"],
         "no prompt"),
        (["tune-steps", "--checkpoint", str(tmp_path / "nope"), "--sampler", "unipc", "--nfe",
          "5", "--prompt", "x"], "not a readable checkpoint config"),
        (["tune-steps", "--sampler", "unipc", "--nfe", "5"], "--checkpoint"),
    ]  # fmt: skip
    before = sorted(p.name for p in digits_like.iterdir())
    for args, message in rows:
        _check(args, message, capsys, tmp_path)
    assert sorted(p.name for p in digits_like.iterdir()) == before


def test_a_corrupt_grids_file_is_refused_before_sampling(digits_like, tmp_path, capsys):
    import shutil

    folder = tmp_path / "ckpt"
    shutil.copytree(digits_like, folder)
    (folder / "grids.json").write_text("{broken")
    out = tmp_path / "out"
    out.mkdir()
    _check(["generate", "image", "--prompt", "x", "--checkpoint", str(folder), "--out",
            str(out / "x.png")], "grids.json: not a readable JSON file", capsys, out)  # fmt: skip
