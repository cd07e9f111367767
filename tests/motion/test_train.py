"""The whole path with real components: the CLI writes shards of synthetic motions, a
2-process CPU DeepSpeed run of the tiny preset trains the denoiser with its geometric losses,
its final/ checkpoint generates a BVH that the `bvh` parser reads back, and a killed run
resumes exactly."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from polydiff.cli.main import main
from polydiff.core.pretrained import from_pretrained
from polydiff.motion.bvh import bvh_joints, read_bvh
from polydiff.motion.skeleton import JOINT_NAMES

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from tests.core.test_train import kill_after_checkpoint  # noqa: E402
from tests.core.test_train_kit import launched, repeatable  # noqa: E402
from tests.modality_fixtures import made_shards, metric_rows, preset  # noqa: E402


@pytest.fixture(scope="module")
def motion_shards(tmp_path_factory) -> Path:
    shards = made_shards("motion", "synthetic:motions:24", tmp_path_factory.mktemp("m") / "shards")
    assert len(list(shards.glob("*.tar"))) == 3
    return shards


def test_tiny_denoiser_trains_on_two_processes_and_generates_a_bvh(
    motion_shards, tmp_path, monkeypatch
):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny models: threads only contend
    run = tmp_path / "run"
    config = preset("motion", "tiny.yaml", tmp_path, motion_shards)
    assert main(["train", "--config", str(config), "--out", str(run), "--num-procs", "2"]) == 0
    rows = metric_rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["samples"] == 4 * 2 * 2  # steps x batch x processes
    assert {"diffusion", "positions", "velocities", "foot_contact"} <= set(rows[0])
    assert rows[0]["positions"] > 0  # the geometric losses are on by default
    assert (run / "previews" / "step_000004" / "previews.png").is_file()
    model = from_pretrained(run / "final")
    assert float(model.feature_std.max()) > 0.1  # fitted at step 0, not the identity
    assert float(model.feature_mean.abs().max()) > 0.1

    out = tmp_path / "walk.bvh"
    assert main(["generate", "motion", "--checkpoint", str(run / "final"), "--prompt",
                 "a person walks forward", "--out", str(out), "--seconds", "3"]) == 0  # fmt: skip
    parsed = read_bvh(out.read_text())
    assert parsed.names == JOINT_NAMES or set(parsed.names) == set(JOINT_NAMES)
    joints = bvh_joints(parsed)
    assert joints.shape == (60, 22, 3) and np.isfinite(joints).all()


def test_killed_run_resumes_exactly(motion_shards, tmp_path):
    # Enough steps that the kill lands mid-run: a tiny step takes milliseconds.
    train = {"max_steps": 24, "decay_steps": 24, "checkpoint_every": 2, "keep_checkpoints": 0,
             "preview_every": 0}  # fmt: skip
    config = preset("motion", "tiny.yaml", tmp_path, motion_shards, train=train)
    whole = launched(config, tmp_path / "whole", num_procs=1)
    run = tmp_path / "killed"
    saved = kill_after_checkpoint(config, run, num_procs=1, delay=0.0, steps_after=1)
    assert saved < 24
    launched(config, run, num_procs=1, resume=True)
    assert repeatable(run) == repeatable(whole)  # losses and their geometric parts alike
    a = from_pretrained(whole / "final").state_dict()
    b = from_pretrained(run / "final").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the fitted statistics included
