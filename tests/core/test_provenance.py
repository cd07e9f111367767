"""Behaviour of polydiff.core.provenance: records of how outputs were made, checkpoint ids,
sidecars, atomic writes and the --out check that runs before sampling."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime

import pytest
import torch
from torch import nn

from polydiff.core import pretrained, provenance
from polydiff.core.files import output_paths
from polydiff.core.provenance import (
    FORMAT,
    atomic_output,
    check_output,
    checkpoint_id,
    parameters_text,
    record_json,
    sidecar_path,
    write_sidecar,
)
from tests.provenance_fixtures import records

FIELDS = [
    "format",
    "modality",
    "prompt",
    "negative_prompt",
    "index",
    "seed",
    "sampler",
    "steps",
    "guidance",
    "checkpoint",
    "checkpoint_id",
    "polydiff_version",
    "created",
]


def record(checkpoint, **overrides):
    return records(checkpoint, 2, seed=3, **overrides)[1]


# --- records --------------------------------------------------------------------------


def test_a_record_holds_every_documented_field_then_the_extras(checkpoint):
    made = record(checkpoint, negative_prompt="blurry", frames=16, first_frame=checkpoint / "a.png")
    assert list(made) == [*FIELDS, "frames", "first_frame"]
    assert made["format"] == FORMAT
    assert (made["prompt"], made["negative_prompt"], made["index"], made["seed"]) == (
        "a handwritten digit 7",
        "blurry",
        1,
        3,
    )
    assert (made["sampler"], made["steps"], made["guidance"]) == ("unipc", 30, 3.0)
    assert made["checkpoint"] == str(checkpoint.resolve())
    assert made["checkpoint_id"] == checkpoint_id(checkpoint)
    assert made["polydiff_version"] == importlib.metadata.version("polydiff-core")
    assert made["first_frame"] == str(checkpoint / "a.png")  # a Path extra becomes a string
    created = datetime.fromisoformat(made["created"].replace("Z", "+00:00"))
    assert made["created"].endswith("Z")
    assert abs((datetime.now(UTC) - created).total_seconds()) < 60
    assert json.loads(json.dumps(made)) == made
    assert record(checkpoint)["negative_prompt"] is None


def test_extras_cannot_replace_fields_and_must_be_json(checkpoint):
    with pytest.raises(ValueError, match="may not reuse the fields checkpoint_id, created"):
        record(checkpoint, created="yesterday", checkpoint_id="x")
    with pytest.raises(ValueError, match="provenance extra fps=nan is not JSON"):
        record(checkpoint, fps=float("nan"))
    with pytest.raises(ValueError, match="provenance extra model=.* is not JSON"):
        record(checkpoint, model=object())
    with pytest.raises(ValueError, match="guidance must be finite"):
        record(checkpoint, guidance=float("inf"))
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        record(checkpoint.parent / "nowhere")


def test_the_parameters_text_reads_like_other_image_tools(checkpoint):
    made = record(checkpoint, negative_prompt="blurry", frames=16)
    lines = parameters_text(made).split("\n")
    assert lines[0] == "a handwritten digit 7"
    assert lines[1] == "Negative prompt: blurry"
    assert lines[2].startswith("Steps: 30, Sampler: unipc, CFG scale: 3.0, Seed: 3, Index: 1, ")
    assert f"Model: final, Model hash: {made['checkpoint_id']}, " in lines[2]
    assert lines[2].endswith(f"Version: polydiff {made['polydiff_version']}, Frames: 16")
    assert len(parameters_text(record(checkpoint)).split("\n")) == 2  # no negative prompt
    assert json.loads(record_json(made)) == made and "\n" not in record_json(made)


def test_the_version_has_one_home_and_checkpoints_record_it():
    assert pretrained.polydiff_version is provenance.polydiff_version
    assert provenance._WEIGHTS_NAME == pretrained.WEIGHTS_NAME
    assert provenance.polydiff_version() == importlib.metadata.version("polydiff-core")


def test_importing_it_loads_no_trainer_and_no_deepspeed():
    code = (
        "import sys, polydiff.core.provenance\n"
        "bad = [m for m in sys.modules if m == 'deepspeed' or m.startswith('deepspeed.')"
        " or m.startswith('polydiff.core.train')]\n"
        "print(bad)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


# --- checkpoint ids -------------------------------------------------------------------


def test_the_checkpoint_id_is_short_stable_and_follows_the_weights_not_the_folder(checkpoint):
    ident = checkpoint_id(checkpoint)
    assert len(ident) == 16 and int(ident, 16) >= 0
    assert checkpoint_id(checkpoint) == ident == checkpoint_id(str(checkpoint))
    copy = shutil.copytree(checkpoint, checkpoint.parent / "copied")
    assert checkpoint_id(copy) == ident  # names the weights wherever they are
    (copy / "config.json").write_text('{"other": 1}')
    assert checkpoint_id(copy) == ident


def test_the_checkpoint_id_changes_when_the_weights_change(checkpoint):
    weights = checkpoint / "model.safetensors"
    before = checkpoint_id(checkpoint)
    data = bytearray(weights.read_bytes())
    data[100] ^= 1  # same size, one bit
    weights.write_bytes(bytes(data))
    assert checkpoint_id(checkpoint) != before  # the cache notices the new file version


def test_a_change_at_the_end_of_a_large_weights_file_changes_the_id(tmp_path):
    folder = tmp_path / "big"
    folder.mkdir()
    data = bytearray(os.urandom(3 << 20))
    (folder / "model.safetensors").write_bytes(bytes(data))
    before = checkpoint_id(folder)
    data[-10] ^= 1
    (folder / "model.safetensors").write_bytes(bytes(data))
    assert checkpoint_id(folder) != before


class Tiny(pretrained.Configurable, nn.Module):
    def __init__(self, dim: int = 4) -> None:
        super().__init__()
        self.layer = nn.Linear(dim, dim)


def test_saving_the_same_model_again_gives_a_new_checkpoint_id(tmp_path):
    torch.manual_seed(0)
    model = Tiny()
    first = checkpoint_id(pretrained.save_pretrained(model, tmp_path / "a"))
    second = checkpoint_id(pretrained.save_pretrained(model, tmp_path / "b"))
    assert first != second  # each save is its own checkpoint


# --- sidecars and atomic writes -------------------------------------------------------


def test_sidecars_are_named_after_the_whole_file_name(tmp_path):
    assert sidecar_path(tmp_path / "out.png") == tmp_path / "out.png.json"
    assert sidecar_path(tmp_path / "out.mp4") == tmp_path / "out.mp4.json"
    assert sidecar_path("out.png") != sidecar_path("out.gif")


def test_a_sidecar_is_written_atomically_with_normal_permissions(tmp_path, checkpoint, umask_022):
    made = record(checkpoint, prompt="ein Bild — ü")
    out = tmp_path / "out.png"
    path = write_sidecar(out, made)
    assert path == tmp_path / "out.png.json"
    assert json.loads(path.read_text(encoding="utf-8")) == made
    assert "ein Bild — ü" in path.read_text(encoding="utf-8")  # readable, not \u-escaped
    assert path.stat().st_mode & 0o777 == 0o644
    assert sorted(os.listdir(tmp_path)) == ["out.png.json"]  # no temporary left
    with pytest.raises(ValueError, match="is not JSON"):
        write_sidecar(out, {**made, "bad": float("nan")})
    assert json.loads(path.read_text(encoding="utf-8")) == made  # the old one is untouched
    assert sorted(os.listdir(tmp_path)) == ["out.png.json"]


def test_atomic_output_replaces_the_target_only_when_the_writing_succeeds(tmp_path, umask_022):
    target = tmp_path / "sub" / "clip.mp4"
    with atomic_output(target) as tmp:
        assert tmp.parent == target.parent and tmp.suffix == ".mp4" and tmp.name.startswith(".")
        assert not target.exists()
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert target.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0o600
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.write_bytes(b"half")
        assert target.read_bytes() == b"new"  # readers still see the old file
        raise RuntimeError("crash while writing")
    assert target.read_bytes() == b"new"
    assert os.listdir(target.parent) == ["clip.mp4"]


def test_atomic_output_follows_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        with atomic_output(tmp_path / "private.png") as tmp:
            tmp.write_bytes(b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "private.png").stat().st_mode & 0o777 == 0o600


def test_atomic_output_restores_the_mode_when_a_writer_recreates_the_file(tmp_path, umask_022):
    with atomic_output(tmp_path / "a.gif") as tmp:
        tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)
    assert (tmp_path / "a.gif").stat().st_mode & 0o777 == 0o644


# --- check_output: before anything is sampled -----------------------------------------


def test_check_output_names_the_files_like_output_paths(tmp_path):
    assert check_output(tmp_path / "seven.png", [".png"], 1) == [tmp_path / "seven.png"]
    assert check_output(tmp_path / "seven", [".png"], 2) == output_paths(
        tmp_path / "seven", 2, ".png"
    )
    assert [p.name for p in check_output(tmp_path / "s.GIF", (".mp4", ".gif"), 2)] == [
        "s_0.GIF",
        "s_1.GIF",
    ]
    assert check_output(tmp_path / "v", (".mp4", ".gif"), 1) == [tmp_path / "v.mp4"]
    assert sorted(os.listdir(tmp_path)) == []  # the write probe is gone


def test_a_bad_suffix_is_one_line_naming_the_good_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as caught:
        check_output("x.xyz", [".png"], 1)
    assert str(caught.value) == "--out x.xyz: unsupported suffix .xyz; use .png"
    with pytest.raises(
        ValueError, match=r"^--out new/c.avi: unsupported suffix .avi; use .mp4 or .gif$"
    ):
        check_output("new/c.avi", (".mp4", ".gif"), 3)
    assert os.listdir(tmp_path) == []  # refused before anything was created


def test_an_existing_folder_is_not_an_output_file(tmp_path):
    (tmp_path / "outputs").mkdir()
    with pytest.raises(ValueError, match="outputs: is an existing folder; name a file inside it"):
        check_output(tmp_path / "outputs", [".png"], 1)
    (tmp_path / "digit_1.png").mkdir()
    with pytest.raises(ValueError, match=r"digit_1.png is an existing folder$"):
        check_output(tmp_path / "digit.png", [".png"], 3)


def test_a_missing_folder_is_created_and_a_file_in_the_way_is_refused(tmp_path):
    paths = check_output(tmp_path / "a" / "b" / "out.png", [".png"], 1)
    assert paths[0].parent.is_dir() and os.listdir(paths[0].parent) == []
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="file exists and is not a folder"):
        check_output(tmp_path / "file" / "out.png", [".png"], 1)
    with pytest.raises(ValueError, match="cannot create folder"):
        check_output(tmp_path / "file" / "deeper" / "out.png", [".png"], 1)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_folder_without_write_permission_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        with pytest.raises(ValueError, match="cannot write in folder"):
            check_output(locked / "out.png", [".png"], 1)
    finally:
        locked.chmod(0o755)


def test_a_bad_count_or_suffix_list_is_refused(tmp_path):
    with pytest.raises(ValueError, match="num must be an integer >= 1"):
        check_output(tmp_path / "o.png", [".png"], 0)
    with pytest.raises(ValueError, match="suffixes must look like"):
        check_output(tmp_path / "o.png", ["png"], 1)
