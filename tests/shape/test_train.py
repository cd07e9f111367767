"""The whole path with real components: the CLI writes shards of real meshes, 2-process CPU
DeepSpeed runs of the tiny presets train a point denoiser, then a point autoencoder and a
latent denoiser carrying it, and their final/ checkpoints generate PLY and GLB files that
trimesh reads back; a killed autoencoder run resumes exactly."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import trimesh

from polydiff.cli.main import main
from polydiff.core.pretrained import from_pretrained

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from tests.core.test_train import kill_after_checkpoint  # noqa: E402
from tests.core.test_train_kit import launched, repeatable  # noqa: E402
from tests.modality_fixtures import made_shards, metric_rows, preset  # noqa: E402


@pytest.fixture(scope="module")
def primitive_shards(tmp_path_factory) -> Path:
    shards = made_shards(
        "shape", "synthetic:primitives:32", tmp_path_factory.mktemp("primitives") / "shards"
    )
    assert len(list(shards.glob("*.tar"))) == 4
    return shards


def test_tiny_point_denoiser_trains_on_two_processes_and_generates_a_ply(
    primitive_shards, tmp_path, monkeypatch
):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny models: threads only contend
    run = tmp_path / "points"
    config = preset("shape", "tiny.yaml", tmp_path, primitive_shards)
    assert main(["train", "--config", str(config), "--out", str(run), "--num-procs", "2"]) == 0
    rows = metric_rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["samples"] == 4 * 2 * 2  # steps x batch x processes
    assert (run / "previews" / "step_000004" / "previews.png").is_file()
    model = from_pretrained(run / "final")
    assert 0.2 < float(model.point_std) < 0.8  # fitted at step 0 (unit-sphere shapes)

    out = tmp_path / "torus.ply"
    assert main(["generate", "shape", "--checkpoint", str(run / "final"), "--prompt", "a torus",
                 "--out", str(out), "--steps", "2", "--points", "100"]) == 0  # fmt: skip
    cloud = trimesh.load(out)
    assert isinstance(cloud, trimesh.PointCloud) and cloud.vertices.shape == (100, 3)


def test_tiny_autoencoder_then_latent_denoiser_train_and_generate_a_glb(
    primitive_shards, tmp_path, monkeypatch
):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    codec_run = tmp_path / "autoencoder"
    config = preset("shape", "tiny-autoencoder.yaml", tmp_path, primitive_shards)
    assert main(["train", "--config", str(config), "--out", str(codec_run),
                 "--num-procs", "2"]) == 0  # fmt: skip
    rows = metric_rows(codec_run)
    assert {"chamfer", "field_bce", "kl"} <= set(rows[0])
    assert rows[0]["field_bce"] > 0  # meshes come with occupancy queries
    assert (codec_run / "previews" / "step_000004" / "reconstructions.png").is_file()

    run = tmp_path / "latent"
    config = preset("shape", "tiny.yaml", tmp_path, primitive_shards,
                     model={"kind": "latent", "codec": str(codec_run / "final")})  # fmt: skip
    assert main(["train", "--config", str(config), "--out", str(run), "--num-procs", "2"]) == 0
    denoiser = from_pretrained(run / "final")
    codec = from_pretrained(codec_run / "final")
    carried = denoiser.autoencoder.state_dict()
    assert all(torch.equal(carried[k], v) for k, v in codec.state_dict().items())

    out = tmp_path / "mug.glb"
    assert main(["generate", "shape", "--checkpoint", str(run / "final"), "--prompt", "a mug",
                 "--out", str(out), "--steps", "2"]) == 0  # fmt: skip
    assert out.read_bytes()[:4] == b"glTF"
    assert len(trimesh.load(out, force="mesh").faces) > 0


def test_killed_autoencoder_run_resumes_exactly(primitive_shards, tmp_path):
    # Enough steps that the kill lands mid-run: a tiny autoencoder step takes milliseconds.
    train = {"max_steps": 24, "decay_steps": 24, "checkpoint_every": 2, "keep_checkpoints": 0,
             "preview_every": 0}  # fmt: skip
    config = preset("shape", "tiny-autoencoder.yaml", tmp_path, primitive_shards, train=train)
    whole = launched(config, tmp_path / "whole", num_procs=1)

    run = tmp_path / "killed"
    saved = kill_after_checkpoint(config, run, num_procs=1, delay=0.0, steps_after=1)
    assert saved < 24
    launched(config, run, num_procs=1, resume=True)
    assert repeatable(run) == repeatable(whole)  # losses and their parts, fresh points alike
    a = from_pretrained(whole / "final").state_dict()
    b = from_pretrained(run / "final").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # latent_std included
