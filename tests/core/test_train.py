"""Behaviour of the shared DeepSpeed trainer (polydiff.core.train).

The run tests start real ``deepspeed`` launcher processes (CPU, gloo) on real shards with the
tiny recipe of ``tests/core/train_fixtures.py``; each launch costs ~20 s of process start-up,
so runs are shared between tests through module fixtures and copied before being resumed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from polydiff.core.data import write_shards
from polydiff.core.pretrained import from_pretrained
from polydiff.core.train import ConfigError, RunError, build_command, launch, load_config
from polydiff.core.train.checkpoints import MANIFEST_NAME
from polydiff.core.train.config import KEYS, DataConfig, OptimConfig, schema_table
from polydiff.core.train.trainer import lr_at

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # the processes import the recipe as tests.core.train_fixtures
    sys.path.insert(0, str(REPO))
from tests.core.train_fixtures import TinyDenoiser, TinyRecipe, corrupt_sample  # noqa: E402

DEEPSPEED_CONFIGS = REPO / "shared" / "configs" / "deepspeed"
RECIPE = "tests.core.train_fixtures:TinyRecipe"
ENV = {
    "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
    "OMP_NUM_THREADS": "1",  # tiny model: threads only contend between processes
}
# One recipe for the 1-process runs; only fields that do not change the losses vary.
TRAIN = {
    "max_steps": 12,
    "batch_size": 4,
    "lr": 1e-3,
    "warmup_steps": 2,
    "decay_steps": 12,  # fixed, so a run stopped at 6 has the same schedule as a 12-step run
    "ema_decay": 0.9,
    "log_every": 1,
    "preview_every": 5,
    "checkpoint_every": 4,
    "seed": 3,
}


def write_config(folder: Path, shards: Path, *, deepspeed: Any = "zero0_fp32", **changes: Any):
    """A config YAML in ``folder``; ``changes`` are ``train`` keys, or sections by name."""
    sections = {k: changes.pop(k) for k in ("model", "data") if k in changes}
    config = {
        "modality": RECIPE,
        "model": sections.get("model", {"hidden": 16}),
        # A DataLoader worker: exact resume must survive its start drawing from torch's RNG.
        "data": {"shards": str(shards), "num_workers": 1, **sections.get("data", {})},
        "train": {**TRAIN, **changes},
        # A bare name is one of the shipped JSONs; a path or a mapping is used as given.
        "deepspeed": (
            str(DEEPSPEED_CONFIGS / f"{deepspeed}.json")
            if isinstance(deepspeed, str) and not deepspeed.endswith(".json")
            else deepspeed
        ),
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(run)}


def logged_so_far(run: Path) -> dict[int, float]:
    """``losses`` of a run still writing (a line may be half written)."""
    found = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        found[row["step"]] = row["loss"]
    return found


def survivors(group: int, wait: float = 10.0) -> list[int]:
    """Processes of process group ``group`` still running (not zombies) after ``wait`` s."""
    deadline = time.monotonic() + wait
    while True:
        alive = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                # "pid (comm) state ppid pgrp ...": comm may hold spaces, split after ")".
                state, _, pgrp = stat.read_text().rpartition(")")[2].split()[:3]
            except (OSError, ValueError):
                continue
            if int(pgrp) == group and state not in ("Z", "X"):
                alive.append(int(stat.parent.name))
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def client_state(checkpoint: Path) -> dict[str, Any]:
    """What the trainer stored in a DeepSpeed checkpoint (DeepSpeed merges it into the file)."""
    files = sorted(checkpoint.glob("*model_states.pt"))
    return torch.load(files[0], map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def uninterrupted(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 steps in one go, 1 process."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    config = write_config(folder, shards, keep_checkpoints=2)
    assert launch(config, out=folder / "run", extra_env=ENV) == 0
    return folder / "run"


@pytest.fixture(scope="module")
def stopped_at_6(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same run stopped after step 6, with checkpoints at steps 2, 4 and 6."""
    folder = tmp_path_factory.mktemp("stopped")
    config = write_config(folder, shards, checkpoint_every=2, keep_checkpoints=0)
    assert launch(config, out=folder / "run", max_steps=6, extra_env=ENV) == 0
    return folder / "run"


def resume_copy(run: Path, dest: Path) -> Path:
    """Copy a stopped run and resume it to step 12; returns the copy."""
    shutil.copytree(run, dest)
    assert launch(run.parent / "config.yaml", out=dest, resume=True, extra_env=ENV) == 0
    return dest


# --- config: fails fast, names the key ---------------------------------------------------------


def test_unknown_config_key_fails_fast_naming_it_and_starts_no_process(tmp_path, shards):
    config = write_config(tmp_path, shards, lr_warmup=10)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"unknown config key train\.lr_warmup"):
        launch(config, out=tmp_path / "run", extra_env=ENV)
    assert time.perf_counter() - start < 10  # no DeepSpeed process was started
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("missing", ["train.batch_size", "train.lr", "modality", "deepspeed"])
def test_missing_config_key_fails_fast_naming_it(tmp_path, shards, missing):
    config = yaml.safe_load(write_config(tmp_path, shards).read_text())
    section, _, key = missing.rpartition(".")
    del (config[section] if section else config)[key]
    path = tmp_path / "missing.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=f"missing config key {re.escape(missing)}"):
        launch(path, out=tmp_path / "run", extra_env=ENV)
    assert not (tmp_path / "run").exists()


def test_unknown_model_key_is_named_by_the_recipe(tmp_path, shards):
    config = write_config(tmp_path, shards, model={"hidden": 16, "widht": 3})
    with pytest.raises(ConfigError, match=r"model\.widht"):
        load_config(config)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"batch_size": 0}, "train.batch_size"),
        ({"lr": "fast"}, "train.lr"),
        ({"lr_decay": "exponential"}, "train.lr_decay"),
        ({"grad_accum": 1.5}, "train.grad_accum"),
        ({"ema_decay": 1.0}, "train.ema_decay"),
    ],
)
def test_out_of_range_or_mistyped_values_name_the_key(tmp_path, shards, change, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(write_config(tmp_path, shards, **change))


def test_yaml_sets_the_batch_and_deepspeed_json_must_not_disagree(tmp_path, shards):
    auto = {"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 1}}
    cfg = load_config(write_config(tmp_path, shards, deepspeed=auto, grad_accum=3, grad_clip=0.5))
    ds = cfg.deepspeed_config()
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["gradient_clipping"] == 0.5
    clash = {"gradient_accumulation_steps": 8}
    with pytest.raises(ConfigError, match=r"deepspeed\.gradient_accumulation_steps"):
        load_config(write_config(tmp_path, shards, deepspeed=clash))
    with pytest.raises(ConfigError, match=r"deepspeed\.optimizer"):
        load_config(write_config(tmp_path, shards, deepspeed={"optimizer": {"type": "Adam"}}))


def test_overrides_replace_file_values_and_unknown_overrides_are_named(tmp_path, shards):
    config = write_config(tmp_path, shards)
    cfg = load_config(config, {"train.max_steps": 99, "data.shards": "elsewhere", "x": None})
    assert cfg.train.max_steps == 99 and cfg.data.shards == "elsewhere"
    assert load_config(config, {"train.lr": "1e-4"}).train.lr == 1e-4  # PyYAML reads 1e-4 as str
    with pytest.raises(ConfigError, match=r"train\.max_stpes"):
        load_config(config, {"train.max_stpes": 5})


def test_deepspeed_json_is_found_relative_to_the_config_or_its_parent_folders(tmp_path, shards):
    ds = tmp_path / "repo" / "shared" / "configs" / "deepspeed" / "z.json"
    ds.parent.mkdir(parents=True)
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    config = write_config(
        tmp_path / "repo" / "shared" / "configs" / "tiny",
        shards,
        deepspeed="shared/configs/deepspeed/z.json",
    )
    assert load_config(config).deepspeed_source == str(ds)
    with pytest.raises(ConfigError, match=r"deepspeed: config file 'nope\.json' not found"):
        load_config(write_config(tmp_path, shards, deepspeed="nope.json"))


def test_documented_defaults_are_the_dataclass_defaults():
    for section, cls in (("data", DataConfig), ("train", OptimConfig)):
        for key, (default, _) in KEYS[section].items():
            field = cls.__dataclass_fields__[key]
            if field.default is not dataclasses.MISSING:
                expected = (
                    list(field.default) if isinstance(field.default, tuple) else field.default
                )
                assert default == expected, f"{section}.{key}"
    assert "| `train.batch_size` | required |" in schema_table()


def test_shipped_deepspeed_configs_cover_zero_0_to_3_in_fp32_and_bf16_and_leave_batch_to_yaml():
    for stage in range(4):
        for precision in ("fp32", "bf16"):
            ds = json.loads((DEEPSPEED_CONFIGS / f"zero{stage}_{precision}.json").read_text())
            assert ds["zero_optimization"]["stage"] == stage
            assert ds["bf16"]["enabled"] is (precision == "bf16")
            assert not {"train_batch_size", "train_micro_batch_size_per_gpu"} & set(ds)


def test_learning_rate_warms_up_linearly_then_decays_to_min_lr():
    t = OptimConfig(max_steps=10, batch_size=1, lr=1.0, warmup_steps=4, min_lr=0.1)
    assert [lr_at(s, t) for s in (1, 2, 4)] == [0.25, 0.5, 1.0]
    assert lr_at(7, t) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(10, t) == pytest.approx(0.1) and lr_at(50, t) == pytest.approx(0.1)
    linear = OptimConfig(max_steps=10, batch_size=1, lr=1.0, lr_decay="linear")
    assert lr_at(5, linear) == pytest.approx(0.5)
    constant = OptimConfig(max_steps=10, batch_size=1, lr=1.0, lr_decay="constant")
    assert lr_at(9, constant) == 1.0


def test_launcher_command_runs_the_worker_module_and_passes_a_hostfile_through(tmp_path):
    cmd = build_command("c.yaml", tmp_path, num_procs=2, max_steps=5, resume=True)
    assert cmd[1:4] == ["-u", "-m", "deepspeed.launcher.runner"]
    assert cmd[cmd.index("--num_gpus") + 1] == "2"
    assert int(cmd[cmd.index("--master_port") + 1]) > 0
    assert cmd[cmd.index("--module") + 1] == "polydiff.core.train.worker"
    assert cmd[-3:] == ["--max-steps", "5", "--resume"]
    multi = build_command("c.yaml", tmp_path, hostfile=tmp_path / "hosts")
    assert multi[multi.index("--hostfile") + 1] == str(tmp_path / "hosts")
    assert "--num_gpus" not in multi  # the hostfile's slots decide


# --- real runs ----------------------------------------------------------------------------------


def test_one_process_run_writes_metrics_previews_checkpoints_and_a_loadable_final(uninterrupted):
    rows = metrics(uninterrupted)
    assert [r["step"] for r in rows] == list(range(1, 13))
    for row in rows:
        assert {"step", "loss", "lr", "samples_per_s", "data_wait_fraction", "bad_samples"} <= set(
            row
        )
        assert math.isfinite(row["loss"]) and row["samples_per_s"] > 0
        assert 0 <= row["data_wait_fraction"] <= 1
    assert rows[0]["lr"] == pytest.approx(5e-4)  # warm-up: step 1 of 2
    assert rows[-1]["lr"] == pytest.approx(0.0)  # cosine to min_lr at decay_steps

    assert (uninterrupted / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    previews = sorted(p.name for p in (uninterrupted / "previews").iterdir())
    assert previews == ["step_000005", "step_000010", "step_000012"]  # and the last step
    assert (uninterrupted / "previews" / "step_000010" / "samples.npy").is_file()

    checkpoints = uninterrupted / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_000012"
    kept = sorted(p.name for p in checkpoints.iterdir() if p.is_dir())
    assert kept == ["step_000008", "step_000012"]  # keep_checkpoints: 2
    assert json.loads((checkpoints / "step_000012" / MANIFEST_NAME).read_text())["step"] == 12

    model = from_pretrained(uninterrupted / "final", TinyDenoiser)
    record = json.loads((uninterrupted / "final" / "config.json").read_text())
    assert record["modality"] == RECIPE
    assert record["model"] == {"hidden": 16, "dropout": 0.1, "gradient_checkpointing": False}
    ema = client_state(checkpoints / "step_000012")["ema"]["shadow"]
    for name, p in model.named_parameters():  # final/ holds the EMA weights, not the live ones
        assert torch.equal(p, ema[name])


def test_resumed_run_losses_equal_an_uninterrupted_run_exactly(
    uninterrupted, stopped_at_6, tmp_path
):
    assert max(losses(stopped_at_6)) == 6
    resumed = resume_copy(stopped_at_6, tmp_path / "run")
    assert losses(resumed) == losses(uninterrupted)  # every step, bit for bit
    final_a = from_pretrained(uninterrupted / "final", TinyDenoiser).state_dict()
    final_b = from_pretrained(resumed / "final", TinyDenoiser).state_dict()
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_resume_skips_half_written_and_corrupt_checkpoints_for_the_previous_complete_one(
    uninterrupted, stopped_at_6, tmp_path, capfd
):
    broken = shutil.copytree(stopped_at_6, tmp_path / "run")
    checkpoints = broken / "checkpoints"
    # A save killed mid-write: a tmp- folder (newer than everything else).
    (checkpoints / "tmp-step_000008").mkdir()
    (checkpoints / "tmp-step_000008" / "mp_rank_00_model_states.pt").write_bytes(b"half")
    # The newest complete one garbled in place (same size), the one before it truncated.
    newest = checkpoints / "step_000006" / "mp_rank_00_model_states.pt"
    newest.write_bytes(b"\0" * newest.stat().st_size)
    older = checkpoints / "step_000004" / "mp_rank_00_model_states.pt"
    older.write_bytes(older.read_bytes()[:100])

    config = stopped_at_6.parent / "config.yaml"
    assert launch(config, out=broken, resume=True, extra_env=ENV) == 0
    log = capfd.readouterr().err
    assert "cannot load checkpoint step_000006" in log  # torch.load failed: previous one
    assert "skipping checkpoint" in log and "step_000004: mp_rank_00_model_states.pt has 100" in log
    assert "resuming at step 2/12" in log
    assert losses(broken) == losses(uninterrupted)  # continued from step 2, exactly
    assert not (checkpoints / "tmp-step_000008").exists()  # the leftover is cleaned up


def kill_after_checkpoint(
    config: Path, run: Path, *, num_procs: int, delay: float, steps_after: int
) -> int:
    """Launch ``config`` into ``run`` with every forward pass slowed by ``delay`` s, kill -9
    its whole process group once ``steps_after`` steps are logged past a checkpoint, check
    that nothing survives, and return the checkpoint's step."""
    code = (
        "import sys; from polydiff.core.train import launch; "
        f"sys.exit(launch({str(config)!r}, out={str(run)!r}, num_procs={num_procs}))"
    )
    env = {**os.environ, **ENV, "TINY_STEP_DELAY": str(delay)}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            latest = run / "checkpoints" / "latest"
            if latest.exists() and (run / "metrics.jsonl").exists():
                saved = int(latest.read_text().removeprefix("step_"))
                if max(logged_so_far(run), default=0) >= saved + steps_after:
                    break
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.05)
        else:
            pytest.fail("no checkpoint within 120 s")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # launcher, DeepSpeed's launchers and workers
        proc.wait()
    assert not survivors(proc.pid)  # nothing of the run survives the kill
    return saved


def test_kill_9_mid_run_loses_only_steps_since_the_checkpoint_and_resume_finishes(
    shards, uninterrupted, tmp_path
):
    config = write_config(tmp_path, shards, checkpoint_every=3, preview_every=0)
    run = tmp_path / "run"
    saved = kill_after_checkpoint(config, run, num_procs=1, delay=0.3, steps_after=2)
    logged = losses(run)
    assert saved < max(logged) < 12

    with pytest.raises(RunError, match="--resume"):  # refused before any process starts
        launch(config, out=run, extra_env=ENV)
    assert launch(config, out=run, resume=True, extra_env=ENV) == 0
    resumed = losses(run)
    assert [m["step"] for m in metrics(run)] == list(range(1, 13))  # each step once
    assert resumed == losses(uninterrupted)
    assert {s: resumed[s] for s in logged} == logged  # the redone steps repeat exactly


def test_two_process_bf16_zero2_run_completes_and_ranks_consume_equal_batches(tmp_path):
    # Every 10th sample corrupt: skipped, counted in the metrics, the run goes on.
    samples = [
        corrupt_sample(s["__key__"]) if i % 10 == 5 else s
        for i, s in enumerate(TinyRecipe.synthetic("gauss", 70))
    ]
    write_shards(samples, tmp_path / "shards", maxcount=20)
    config = write_config(
        tmp_path,
        tmp_path / "shards",
        deepspeed="zero2_bf16",
        data={"num_workers": 1, "max_bad_fraction": 0.3},
        max_steps=6,
        grad_accum=2,
        gradient_checkpointing=True,
        log_every=2,
        preview_every=3,
        checkpoint_every=3,
    )
    run = tmp_path / "run"
    assert launch(config, out=run, num_procs=2, extra_env=ENV) == 0

    rows = metrics(run)
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert rows[-1]["samples"] == 6 * 2 * 4 * 2  # steps x grad_accum x batch x processes
    assert rows[-1]["bad_samples"] > 0
    state = client_state(run / "checkpoints" / "step_000006")
    assert state["world_size"] == 2
    rank0, rank1 = (r["stream"] for r in state["ranks"])
    # 70 samples // (2 ranks x 4) = 8 batches per epoch; 12 batches = epoch 1, batch 4.
    assert (rank0["epoch"], rank0["batch"]) == (rank1["epoch"], rank1["batch"]) == (1, 4)
    assert rank0["samples_seen"] == rank1["samples_seen"] == 12 * 4
    assert from_pretrained(run / "final", TinyDenoiser).config["gradient_checkpointing"] is True


class _TouchesAFile:
    """A pickle that runs code when unpickled: it creates ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_resume_refuses_a_checkpoint_file_that_would_run_code(shards, tmp_path, capfd):
    config = write_config(tmp_path, shards, max_steps=4, checkpoint_every=2, preview_every=0)
    run = tmp_path / "run"
    assert launch(config, out=run, max_steps=2, extra_env=ENV) == 0
    target = run / "checkpoints" / "step_000002" / "mp_rank_00_model_states.pt"
    witness = tmp_path / "pwned"
    state = torch.load(target, map_location="cpu", weights_only=False)
    state["hidden"] = _TouchesAFile(witness)
    torch.save(state, target)
    # Keep the manifest's sizes right: only the content is a lie.
    manifest = json.loads((target.parent / "checkpoint.json").read_text())
    manifest["files"][target.name] = target.stat().st_size
    (target.parent / "checkpoint.json").write_text(json.dumps(manifest))
    capfd.readouterr()
    assert launch(config, out=run, resume=True, extra_env=ENV) == 2
    assert not witness.exists()
    err = capfd.readouterr().err
    assert "mp_rank_00_model_states.pt: refusing to load it: it asks for getattr" in err


def test_what_depends_on_the_process_count_is_checked_before_launching(
    shards, uninterrupted, tmp_path
):
    config = write_config(tmp_path, shards)
    start = time.monotonic()
    with pytest.raises(ConfigError, match="--hostfile .*no such file"):
        launch(config, out=tmp_path / "a", hostfile=tmp_path / "nope", extra_env=ENV)
    big = write_config(tmp_path / "big", shards, batch_size=40)  # 70 samples, 2 x 40 needed
    with pytest.raises(RunError, match=r"holds 70 sample\(s\), fewer than one batch"):
        launch(big, out=tmp_path / "b", num_procs=2, extra_env=ENV)
    with pytest.raises(RunError, match="written by 1 processes; resume it with --num-procs 1"):
        launch(config, out=uninterrupted, resume=True, num_procs=2, extra_env=ENV)
    assert time.monotonic() - start < 20  # no process was started
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_write_final_removes_what_killed_writes_left(tmp_path):
    from polydiff.core.train.trainer import write_final

    for name in (".final.tmp-123", ".final.old-456"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".finally-kept").mkdir()
    write_final(TinyDenoiser(hidden=8), tmp_path / "final", "tiny", {"hidden": 8})
    assert sorted(p.name for p in tmp_path.iterdir()) == [".finally-kept", "final"]
