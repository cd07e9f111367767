"""The trainer's modality kit: several parts (optimizers), fitted statistics, loss extras, plots
and file permissions.

Real runs go through ``launch`` (DeepSpeed, gloo, CPU) with the tiny modalities of
``tests/core/train_fixtures.py``; they are shared through module fixtures (each launch costs
~20 s of process start-up). The checks that need no process call the trainer's helpers.
"""

from __future__ import annotations

import itertools
import json
import os
import pickle
import shutil
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn

from polydiff.core.pretrained import from_pretrained, save_pretrained
from polydiff.core.train import RunError, launch, load_config, plot_metrics
from polydiff.core.train.checkpoints import MANIFEST_NAME
from polydiff.core.train.parts import fit_statistics, model_parts
from polydiff.core.train.trainer import _forked_rng, lr_at

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # the processes import the recipes as tests.core.train_fixtures
    sys.path.insert(0, str(REPO))
from tests.core.test_train import kill_after_checkpoint, logged_so_far  # noqa: E402
from tests.core.train_fixtures import (  # noqa: E402
    TinyGANRecipe,
    TinyGenerator,
    TinyNormDenoiser,
    TinyRecipe,
    TinyStatsRecipe,
)

DEEPSPEED_CONFIGS = REPO / "shared" / "configs" / "deepspeed"
GAN = "tests.core.train_fixtures:TinyGANRecipe"
STATS = "tests.core.train_fixtures:TinyStatsRecipe"
ENV = {
    "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
    "OMP_NUM_THREADS": "1",
}
GAN_TRAIN = {
    "max_steps": 6,
    "batch_size": 4,
    "lr": 1e-3,
    "warmup_steps": 2,
    "decay_steps": 6,  # fixed, so a run stopped early has the same schedule
    "ema_decay": 0.9,
    "log_every": 1,
    "preview_every": 3,
    "checkpoint_every": 3,
    "keep_checkpoints": 0,
    "seed": 5,
}
# Each part its own learning rate: the discriminator faster, constant, without warm-up.
GAN_PARTS = {
    "discriminator": {"lr": 4e-3, "warmup_steps": 0, "lr_decay": "constant", "grad_clip": 0.5},
    "generator": {"lr": 5e-4},
}
# What must repeat exactly in a resumed run (timings and wall-clock time do not).
TIMING = {"samples_per_s", "data_wait_fraction", "time"}


def write_config(folder: Path, shards: Path, modality: str, deepspeed: str = "zero0_fp32", **train):
    """A config YAML in ``folder``; ``train`` keys replace those of ``GAN_TRAIN``."""
    parts = {"parts": GAN_PARTS} if modality == GAN else {}
    config = {
        "modality": modality,
        "model": {},
        "data": {"shards": str(shards), "num_workers": 1},
        "train": {**GAN_TRAIN, **parts, **train},
        "deepspeed": str(DEEPSPEED_CONFIGS / f"{deepspeed}.json"),
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def repeatable(run: Path) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in metrics(run)]


def model_states(folder: Path) -> dict[str, Any]:
    return torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)


def launched(config: Path, out: Path, **kwargs: Any) -> Path:
    old = os.umask(0o022)  # the permission checks assume a usual umask
    try:
        assert launch(config, out=out, extra_env=ENV, **kwargs) == 0
    finally:
        os.umask(old)
    return out


def resumed(run: Path, dest: Path, **kwargs: Any) -> Path:
    shutil.copytree(run, dest)
    return launched(run.parent / "config.yaml", dest, resume=True, **kwargs)


@pytest.fixture(scope="module")
def gan_run(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two parts, 6 steps, 1 process."""
    folder = tmp_path_factory.mktemp("gan")
    return launched(write_config(folder, shards, GAN), folder / "run")


@pytest.fixture(scope="module")
def gan_stopped(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same run stopped after step 3 (its checkpoint)."""
    folder = tmp_path_factory.mktemp("gan-stopped")
    return launched(write_config(folder, shards, GAN), folder / "run", max_steps=3)


# --- two parts ---------------------------------------------------------------------------------


def test_each_part_has_its_own_optimizer_and_learning_rate_schedule(gan_run):
    rows = metrics(gan_run)
    assert [r["step"] for r in rows] == list(range(1, 7))
    t = load_config(gan_run.parent / "config.yaml").train
    for row in rows:
        for part in ("discriminator", "generator"):
            assert row[f"lr/{part}"] == pytest.approx(lr_at(row["step"], t.for_part(part)))
        assert row["lr"] == row["lr/generator"] and row["loss"] == row["loss/generator"]
    assert all(row["lr/discriminator"] == 4e-3 for row in rows)  # constant, no warm-up
    assert rows[0]["lr/generator"] == pytest.approx(2.5e-4)  # warm-up step 1 of 2

    # One DeepSpeed checkpoint per part in the step's folder, listed in one manifest.
    step3 = gan_run / "checkpoints" / "step_000003"
    manifest = json.loads((step3 / MANIFEST_NAME).read_text())
    assert manifest["parts"] == ["discriminator", "generator"]
    assert {
        "discriminator/mp_rank_00_model_states.pt",
        "generator/mp_rank_00_model_states.pt",
    } <= set(manifest["files"])
    for part in ("discriminator", "generator"):
        state = model_states(step3 / part)
        groups = state["optimizer"]["param_groups"]
        assert all(g["lr"] == pytest.approx(rows[2][f"lr/{part}"]) for g in groups)
        assert state["global_steps"] == 3  # one optimizer step per training step
        clip = t.for_part(part).grad_clip
        assert state["ds_config"]["gradient_clipping"] == clip == (0.5 if part[0] == "d" else 1.0)
    # Each engine holds its own part only (the discriminator's last layer is net.3).
    assert "part.net.3.weight" in model_states(step3 / "discriminator")["module"]
    assert "part.net.3.weight" not in model_states(step3 / "generator")["module"]


def test_a_parts_step_leaves_the_other_part_alone_and_leaks_no_gradient(gan_run):
    rows = metrics(gan_run)
    for row, after in itertools.pairwise(rows):
        # The discriminator steps first: its update shows in the generator's loss of the same
        # step; the generator's update shows in the discriminator's loss of the next step.
        assert row["discriminator/d_sum"] != row["generator/d_sum"]
        assert row["generator/d_sum"] == after["discriminator/d_sum"]  # unchanged by G's step
        assert row["discriminator/g_sum"] == row["generator/g_sum"]  # unchanged by D's step
        assert row["generator/g_sum"] != after["discriminator/g_sum"]
    for row in rows:  # no backward left a gradient in any parameter (grad_accum 1)
        assert row["discriminator/stale_grad"] == row["generator/stale_grad"] == 0.0
        # named extras beside each loss, averaged like it
        assert {"discriminator/real", "discriminator/fake"} <= set(row)
        assert "generator/real" not in row


def test_ema_covers_only_the_generator_and_final_is_the_generator_with_ema_weights(gan_run):
    state = model_states(gan_run / "checkpoints" / "step_000006" / "generator")
    shadow = state["ema"]["shadow"]
    generator = from_pretrained(gan_run / "final", TinyGenerator)
    assert set(shadow) == {n for n, _ in generator.named_parameters()}
    for name, p in generator.named_parameters():
        assert torch.equal(p, shadow[name])
    record = json.loads((gan_run / "final" / "config.json").read_text())
    assert record["class"] == "tests.core.train_fixtures:TinyGenerator"
    assert record["modality"] == GAN and record["model"] == {
        "latent": 4,
        "hidden": 16,
        "dropout": 0.1,
    }
    live = {k.removeprefix("part."): v for k, v in state["module"].items()}
    assert any(not torch.equal(live[n], shadow[n]) for n in shadow)  # EMA, not the live weights
    assert (gan_run / "previews" / "step_000003" / "samples.npy").is_file()


def test_run_writes_a_loss_plot_and_files_with_the_users_normal_permissions(gan_run):
    assert (gan_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    readable = stat.S_IRGRP | stat.S_IROTH
    final = gan_run / "final"
    assert stat.S_IMODE(final.stat().st_mode) == 0o755  # mkdtemp would give 0o700
    for path in [*final.iterdir(), gan_run / "loss.png", gan_run / "metrics.jsonl"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    for path in (gan_run / "checkpoints").rglob("*"):
        assert path.stat().st_mode & readable == readable, path


def test_two_part_run_resumes_exactly(gan_run, gan_stopped, tmp_path):
    assert max(r["step"] for r in metrics(gan_stopped)) == 3
    run = resumed(gan_stopped, tmp_path / "run")
    assert repeatable(run) == repeatable(gan_run)  # losses, lrs and extras, bit for bit
    a = from_pretrained(gan_run / "final", TinyGenerator).state_dict()
    b = from_pretrained(run / "final", TinyGenerator).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_killed_two_process_zero2_two_part_run_resumes_exactly(shards, tmp_path):
    changes = {"max_steps": 5, "decay_steps": 5, "grad_accum": 2, "checkpoint_every": 2}
    config = write_config(tmp_path, shards, GAN, deepspeed="zero2_fp32", **changes)
    whole = launched(config, tmp_path / "whole", num_procs=2)

    run = tmp_path / "killed"
    saved = kill_after_checkpoint(config, run, num_procs=2, delay=0.1, steps_after=1)
    assert saved < max(logged_so_far(run)) < 5

    launched(config, run, num_procs=2, resume=True)
    assert repeatable(run) == repeatable(whole)  # the redone steps too
    assert metrics(run)[-1]["samples"] == 5 * 2 * 4 * 2  # steps x accum x batch x processes


def test_zero3_refuses_a_multi_part_recipe_in_one_line(shards, tmp_path, capfd):
    config = write_config(tmp_path, shards, GAN, deepspeed="zero3_fp32")
    assert launch(config, out=tmp_path / "run", extra_env=ENV) == 2
    err = capfd.readouterr().err
    assert "error: deepspeed.zero_optimization.stage 3 cannot train the parts" in err


# --- fitted statistics -------------------------------------------------------------------------


def test_statistics_are_fitted_at_step_0_averaged_over_ranks_and_never_refitted(shards, tmp_path):
    log = tmp_path / "fits.jsonl"
    env = {**ENV, "TINY_STATS_LOG": str(log)}
    config = write_config(tmp_path, shards, STATS, max_steps=4, decay_steps=4, checkpoint_every=2)
    run = tmp_path / "run"
    assert launch(config, out=run, num_procs=2, max_steps=2, extra_env=env) == 0
    fits = [json.loads(line) for line in log.read_text().splitlines()]
    assert sorted(f["rank"] for f in fits) == [0, 1] and all(f["samples"] == 12 for f in fits)
    assert launch(config, out=run, num_procs=2, resume=True, extra_env=env) == 0
    assert len(log.read_text().splitlines()) == 2  # the resumed run did not fit again

    weights = load_file(run / "final" / "model.safetensors")
    for name in ("feature_mean", "feature_std"):
        expected = (torch.tensor(fits[0][name]) + torch.tensor(fits[1][name])) / 2
        torch.testing.assert_close(weights[name], expected)
    assert not torch.equal(weights["feature_std"], torch.ones(8))
    model = from_pretrained(run / "final", TinyNormDenoiser)
    assert torch.equal(model.feature_mean, weights["feature_mean"])


class _OneProcess:
    """The two collectives ``fit_statistics`` uses, for one process."""

    def all_reduce(self, tensor: torch.Tensor) -> None:
        pass

    def all_gather_object(self, out: list[Any], obj: Any) -> None:
        out[0] = obj


def _fit(recipe: Any, model: nn.Module) -> list[str]:
    batches = iter([{"x": torch.arange(16.0).reshape(2, 8)}])
    return fit_statistics(
        recipe,
        model,
        batches,
        rng=_forked_rng(0),
        persistent=set(model.state_dict()),
        device=torch.device("cpu"),
        world=1,
        dist=_OneProcess(),
    )


def test_fitted_statistics_must_name_persistent_buffers_of_the_right_shape():
    recipe = TinyStatsRecipe(TinyStatsRecipe.validate({}))
    model = recipe.build_model()
    assert _fit(recipe, model) == ["feature_mean", "feature_std"]
    assert torch.equal(model.feature_mean, torch.arange(4.0, 12.0))
    assert model.training  # put back in training mode

    class Wrong(TinyStatsRecipe):
        def fit_statistics(self, model, batches):
            return {"feature_mean": torch.zeros(8), "mean": torch.zeros(8), "std": 1.0}

    with pytest.raises(RunError, match=r"returned mean, std: the model has no buffer"):
        _fit(Wrong(recipe.config), model)

    class Misshaped(TinyStatsRecipe):
        def fit_statistics(self, model, batches):
            return {"feature_std": torch.ones(3)}

    with pytest.raises(RunError, match=r"feature_std has shape \(3,\), the buffer \(8,\)"):
        _fit(Misshaped(recipe.config), model)
    model.register_buffer("scratch", torch.zeros(8), persistent=False)

    class Transient(TinyStatsRecipe):
        def fit_statistics(self, model, batches):
            return {"scratch": torch.ones(8)}

    with pytest.raises(RunError, match=r"scratch is not persistent"):
        _fit(Transient(recipe.config), model)


# --- parts, checked before any engine ----------------------------------------------------------


def test_parts_must_be_disjoint_sub_modules_and_name_the_ema_part(shards, tmp_path):
    t = load_config(write_config(tmp_path, shards, GAN)).train
    recipe = TinyGANRecipe(TinyGANRecipe.validate({}))
    model = recipe.build_model()
    parts = model_parts(recipe, model, t)
    assert list(parts) == ["discriminator", "generator"]
    assert parts["generator"].prefix == "generator" and parts["generator"].config.lr == 5e-4

    class Shared(TinyGANRecipe):
        def parts(self, model):
            return {"a": model.generator, "b": model.generator.net}

    with pytest.raises(RunError, match=r"parts 'a' and 'b' share parameters"):
        model_parts(Shared(recipe.config), model, t)

    class Foreign(TinyGANRecipe):
        def parts(self, model):
            return {"discriminator": nn.Linear(2, 2), "generator": model.generator}

    with pytest.raises(RunError, match=r"part 'discriminator' is not a sub-module"):
        model_parts(Foreign(recipe.config), model, t)

    class NoEMA(TinyGANRecipe):
        ema_part = "decoder"

    with pytest.raises(RunError, match=r"ema_part is 'decoder'"):
        model_parts(NoEMA(recipe.config), model, t)
    plain = TinyRecipe(TinyRecipe.validate({}))
    with pytest.raises(ValueError, match=r"train\.parts\.discriminator: .* no part"):
        model_parts(plain, plain.build_model(), t)


def test_bound_recipe_survives_pickling_into_loader_workers(shards):
    recipe = TinyRecipe(TinyRecipe.validate({"hidden": 8}))
    copy = pickle.loads(pickle.dumps(recipe))
    assert (
        copy.config
        == recipe.config
        == {"hidden": 8, "dropout": 0.1, "gradient_checkpointing": False}
    )
    sample = next(iter(TinyRecipe.synthetic("gauss", 1)))
    assert torch.equal(
        pickle.loads(pickle.dumps(recipe.decode))(sample)["x"], recipe.decode(sample)["x"]
    )


# --- plots and permissions ---------------------------------------------------------------------


def test_loss_plot_shows_every_part(tmp_path):
    rows = [
        {
            "step": s,
            "loss": 1 / s,
            "loss/d": 2 / s,
            "loss/g": 1 / s,
            "lr": 0.1,
            "lr/d": 0.2,
            "lr/g": 0.1,
        }
        for s in range(1, 6)
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"st')
    png = plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "loss.png")
    assert png is not None and png.read_bytes()[:4] == b"\x89PNG"
    assert plot_metrics(tmp_path / "none.jsonl", tmp_path / "none.png") is None


def test_save_pretrained_gives_the_users_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        folder = save_pretrained(TinyGenerator(), tmp_path / "new")
        save_pretrained(TinyGenerator(), folder)  # over an existing folder
    finally:
        os.umask(old)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {
        "config.json": 0o644,
        "model.safetensors": 0o644,
    }


def test_tensorboard_scalars_when_installed(tmp_path):
    pytest.importorskip("tensorboard")
    from polydiff.core.train.metrics import TensorBoard

    board = TensorBoard(tmp_path / "tb", 0)
    board.write({"step": 1, "loss": 0.5, "loss/d": 0.7, "time": 1.0})
    board.close()
    assert any((tmp_path / "tb").iterdir())


def test_ema_takes_buffers_written_after_it_was_made_without_counting_an_update():
    from polydiff.core.ema import EMA

    model = TinyNormDenoiser(hidden=8)
    ema = EMA(model, decay=0.9)
    model.feature_mean.fill_(3.0)  # e.g. statistics fitted after the EMA exists
    ema.copy_buffers_from(model)
    assert ema.num_updates == 0 and torch.equal(ema.copied["feature_mean"], model.feature_mean)
    fresh = TinyNormDenoiser(hidden=8)
    ema.copy_to(fresh)
    assert torch.equal(fresh.feature_mean, torch.full((8,), 3.0))
