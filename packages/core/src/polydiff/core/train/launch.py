"""Start a training run: build the ``deepspeed`` launcher command and run it.

The config is loaded and checked here first (and the shards listed), so a bad key or a missing
shard fails in a second with a message naming it, before any process starts. The launcher then
runs ``python -m polydiff.core.train.worker`` once per process:

- one machine: ``--num_gpus N`` processes (GPUs with NCCL; on a CPU-only machine DeepSpeed's
  CPU accelerator runs N processes over gloo);
- several machines: ``--hostfile FILE`` is passed through (DeepSpeed's format, one
  ``host slots=N`` line per node); the run folder must be on a filesystem all nodes share.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from .config import ConfigError, RunError, TrainConfig, cli_overrides, load_config
from .trainer import existing_run

__all__ = ["build_command", "free_port", "launch", "prepare"]

_REMOTE_PREFIXES = ("pipe:", "http://", "https://", "gs://", "s3://", "ais://", "hf://")


def free_port() -> int:
    """A TCP port that is free on this machine right now (for the rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _absolute(spec: str | list[str]) -> str | list[str]:
    """Local shard paths made absolute, so every process (and node) reads the same files."""
    if isinstance(spec, list):
        return [str(_absolute(s)) for s in spec]
    if "://" in spec or spec.startswith(_REMOTE_PREFIXES):
        return spec
    return os.path.abspath(spec)


def prepare(
    config_path: str | Path,
    *,
    data: str | None = None,
    out: str | Path | None = None,
    max_steps: int | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
) -> TrainConfig:
    """Load and check the config with the overrides, check that the shards exist and (without
    ``resume``) that the run folder holds no other run: all ``launch`` verifies before
    starting processes.

    Raises:
        ConfigError: a missing / unknown / out-of-range key (named), or no shards given.
        FileNotFoundError, ValueError: from ``expand_urls`` when the shards are missing.
        RunError: the run folder holds another run and ``resume`` is false.
    """
    from polydiff.core.data import expand_urls

    cfg = load_config(
        config_path,
        cli_overrides(data=data, out=out, max_steps=max_steps, checkpoint_every=checkpoint_every),
    )
    if cfg.data.shards is None:
        raise ConfigError("data.shards: no training shards; set data.shards or pass --data")
    expand_urls(cfg.data.shards, allow_pipe=cfg.data.allow_pipe)
    if not resume and (problem := existing_run(cfg.out_dir)) is not None:
        raise RunError(f"{problem}: pass --resume to continue that run, or choose --out")
    return cfg


def _check_batch_fits(cfg: TrainConfig, processes: int) -> None:
    """Refuse a data set too small for one step's batches (it would fail in the processes)."""
    from polydiff.core.data import expand_urls, shard_counts

    urls = expand_urls(cfg.data.shards, allow_pipe=cfg.data.allow_pipe)
    if any(url.startswith(_REMOTE_PREFIXES) for url in urls):
        return  # counting remote shards would download them
    total, needed = sum(shard_counts(urls)), cfg.train.batch_size * processes
    if total < needed:
        raise RunError(
            f"data.shards holds {total} sample(s), fewer than one batch on every process "
            f"(train.batch_size {cfg.train.batch_size} x {processes} process(es) = {needed})"
        )


def _check_resume_world(out: Path, processes: int) -> None:
    """Refuse to resume a checkpoint written by another number of processes."""
    from .checkpoints import MANIFEST_NAME, Checkpoints

    complete = Checkpoints(out / "checkpoints", 0, processes, 0).complete()
    if not complete:
        return
    path = complete[0][1]
    written = json.loads((path / MANIFEST_NAME).read_text("utf-8")).get("world_size")
    if written != processes:
        raise RunError(
            f"checkpoint {path} was written by {written} processes; resume it with "
            f"--num-procs {written} so that every rank's data position and RNG carry over"
        )


def build_command(
    config_path: str | Path,
    out: str | Path,
    *,
    data: str | list[str] | None = None,
    max_steps: int | None = None,
    checkpoint_every: int | None = None,
    num_procs: int = 1,
    resume: bool = False,
    hostfile: str | Path | None = None,
    master_port: int | None = None,
) -> list[str]:
    """The ``deepspeed`` launcher command line (as argv) for a run.

    With a hostfile its slots decide the processes per node; ``num_procs > 1`` then caps them
    per node. Without one, ``num_procs`` processes run on this machine.
    """
    cmd = [sys.executable, "-u", "-m", "deepspeed.launcher.runner", "--log_level", "warning"]
    cmd += ["--master_port", str(master_port or free_port())]
    if hostfile is not None:
        cmd += ["--hostfile", str(Path(hostfile).resolve())]
        if num_procs > 1:
            cmd += ["--num_gpus", str(num_procs)]
    else:
        cmd += ["--num_gpus", str(num_procs)]
    cmd += ["--module", "polydiff.core.train.worker"]
    cmd += ["--config", str(Path(config_path).resolve()), "--out", str(Path(out).resolve())]
    if isinstance(data, list):
        raise ValueError("pass a list of shards in the config's data.shards, not --data")
    if data is not None:
        cmd += ["--data", data]
    if max_steps is not None:
        cmd += ["--max-steps", str(max_steps)]
    if checkpoint_every is not None:
        cmd += ["--checkpoint-every", str(checkpoint_every)]
    if resume:
        cmd.append("--resume")
    return cmd


def launch(
    config_path: str | Path,
    *,
    data: str | None = None,
    out: str | Path | None = None,
    max_steps: int | None = None,
    checkpoint_every: int | None = None,
    num_procs: int = 1,
    resume: bool = False,
    hostfile: str | Path | None = None,
    extra_env: Mapping[str, str] | None = None,
) -> int:
    """Check the config, then run the training processes through ``deepspeed``; blocks.

    Args:
        config_path: the YAML training config.
        data, out, max_steps, checkpoint_every: replace ``data.shards``, ``train.out``,
            ``train.max_steps``, ``train.checkpoint_every`` (None: keep the config's).
        num_procs: processes on this machine (per node with a hostfile), >= 1.
        resume: continue from the newest complete checkpoint in the run folder.
        hostfile: a DeepSpeed hostfile for a multi-node run (passed through).
        extra_env: variables added to the processes' environment (e.g. ``PYTHONPATH``).

    Returns:
        The launcher's exit status: 0 when every process finished, non-zero otherwise (2 for
        a config / data / run-folder problem found inside the processes).

    Raises:
        ConfigError: before any process starts, naming the bad key.
        FileNotFoundError, ValueError: before any process starts, when shards are missing.
        RunError: before any process starts, when ``out`` holds another run and not ``resume``.
    """
    if isinstance(num_procs, bool) or not isinstance(num_procs, int) or num_procs < 1:
        raise ConfigError(f"num_procs must be an integer >= 1, got {num_procs!r}")
    cfg = prepare(
        config_path,
        data=data,
        out=out,
        max_steps=max_steps,
        checkpoint_every=checkpoint_every,
        resume=resume,
    )
    assert cfg.data.shards is not None
    if hostfile is not None and not Path(hostfile).is_file():
        raise ConfigError(f"--hostfile {hostfile}: no such file (DeepSpeed's `host slots=N` lines)")
    if hostfile is None:  # the number of processes is known here: check what depends on it
        _check_batch_fits(cfg, num_procs)
        if resume:
            _check_resume_world(cfg.out_dir, num_procs)
    shards = _absolute(cfg.data.shards)
    cmd = build_command(
        config_path,
        cfg.out_dir,
        data=shards if isinstance(shards, str) else None,
        max_steps=max_steps,
        checkpoint_every=checkpoint_every,
        num_procs=num_procs,
        resume=resume,
        hostfile=hostfile,
    )
    env = {**os.environ, **(extra_env or {})}
    if hostfile is None and "OMP_NUM_THREADS" not in env:
        # On CPU each process should own its share of the cores: oversubscribed intra-op
        # threads made a 1-process run on a busy 2-core machine 10x slower.
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(1, num_procs)))
    # Same process group as the caller: Ctrl-C (or a kill of the group) reaches every worker.
    proc = subprocess.Popen(cmd, env=env)
    try:
        return proc.wait()
    except BaseException:
        proc.terminate()  # DeepSpeed's launcher stops its workers on SIGTERM
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
