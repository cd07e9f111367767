"""The training loop every modality shares; it runs inside each DeepSpeed process.

One optimizer step = ``train.grad_accum`` micro-batches of ``train.batch_size`` samples on
every process. The loop is :func:`train`; the helpers around it do one job each:

- :func:`lr_at`: linear warm-up, then cosine / linear / constant decay to ``min_lr``.
- :class:`Checkpoints`: atomic DeepSpeed checkpoints. All ranks write ``checkpoints/tmp-<tag>/``;
  after a barrier rank 0 adds ``checkpoint.json`` (step, world size, every file's size), renames
  the folder to ``checkpoints/<tag>/`` and replaces ``checkpoints/latest`` (temp file +
  ``os.replace``). A folder is complete iff it has no ``tmp-`` prefix and its manifest matches
  the files, so a kill -9 at any moment leaves the previous checkpoint (or the new one) usable.
- :class:`Metrics`: ``<out>/metrics.jsonl``, one JSON object per ``log_every`` steps.

Exact resume: the checkpoint holds the model, optimizer, EMA, step, every rank's data position
and its Python / NumPy / torch / loss-noise generator states, and previews run on forked RNGs,
so on CPU a resumed run's losses equal an uninterrupted run's bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from polydiff.core.ema import EMA
from polydiff.core.pretrained import CONFIG_NAME, fsync_path, save_pretrained

from .config import OptimConfig, TrainConfig
from .recipe import ConfigError, load_recipe

__all__ = [
    "MANIFEST_NAME",
    "Checkpoints",
    "Metrics",
    "RunError",
    "existing_run",
    "lr_at",
    "train",
    "write_final",
]

MANIFEST_NAME = "checkpoint.json"
_TMP_PREFIX = "tmp-"
_TRASH_PREFIX = "trash-"


class RunError(ValueError):
    """The run cannot start or continue as asked (e.g. the output folder holds another run);
    a ValueError, like ConfigError, so a CLI reports it as a usage error."""


# --- learning rate ----------------------------------------------------------------------------


def lr_at(step: int, t: OptimConfig, decay_steps: int | None = None) -> float:
    """Learning rate of optimizer step ``step`` (1-based).

    Linear warm-up from ``lr / warmup_steps`` to ``lr`` over ``warmup_steps`` steps, then the
    ``lr_decay`` shape from ``lr`` to ``min_lr`` at ``decay_steps`` (default ``max_steps``),
    flat at ``min_lr`` afterwards.
    """
    if t.warmup_steps > 0 and step <= t.warmup_steps:
        return t.lr * step / t.warmup_steps
    if t.lr_decay == "constant":
        return t.lr
    end = decay_steps or t.decay_steps or t.max_steps
    progress = min(1.0, max(0.0, (step - t.warmup_steps) / max(1, end - t.warmup_steps)))
    if t.lr_decay == "cosine":
        return t.min_lr + (t.lr - t.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return t.lr + (t.min_lr - t.lr) * progress


# --- random state -----------------------------------------------------------------------------


def _seed(*parts: int) -> int:
    """A 32-bit seed per (seed, rank, purpose), independent streams via NumPy's SeedSequence."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
    }
    if torch.cuda.is_available():  # this rank's GPU only: touching the others costs memory
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: Mapping[str, Any], generator: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@contextlib.contextmanager
def _forked_rng(seed: int) -> Iterator[None]:
    """Run a block on freshly seeded RNGs and put the training RNGs back afterwards, so a
    preview neither perturbs training (resume stays exact) nor varies from step to step."""
    py, npy = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        _seed_all(seed)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


# --- batches ----------------------------------------------------------------------------------


class _WithModelConfig:
    """``recipe.decode`` or ``recipe.bucket`` with the model config bound (picklable for
    DataLoader workers)."""

    def __init__(self, method: Any, model_cfg: Mapping[str, Any]) -> None:
        self.method, self.model_cfg = method, dict(model_cfg)

    def __call__(self, sample: dict[str, Any]) -> Any:
        return self.method(sample, self.model_cfg)


def _batches(stream: Iterable[Any]) -> Iterator[Any]:
    """The stream's batches. Its start runs on forked RNGs: a DataLoader draws its workers'
    base seed from torch's global generator when it starts, which after a resume would happen
    at a different point of the training RNG sequence and change every later dropout draw."""
    iterator = iter(stream)
    with torch.random.fork_rng(devices=[]):
        first = next(iterator)
    yield first
    yield from iterator


def _to_device(batch: Any, device: torch.device, dtype: torch.dtype | None) -> Any:
    """Move tensors (in dicts / lists / tuples) to ``device``; cast floating ones to ``dtype``
    (the engine's bf16/fp16 weights would reject fp32 inputs)."""
    if isinstance(batch, torch.Tensor):
        if dtype is not None and batch.is_floating_point():
            return batch.to(device, dtype, non_blocking=True)
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device, dtype) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device, dtype) for v in batch)
    return batch


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay matrices and kernels; never biases, norms or embeddings' scales."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


# --- checkpoints ------------------------------------------------------------------------------


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


class Checkpoints:
    """The ``<out>/checkpoints`` folder: atomic saves, finding the newest complete one, pruning.

    Every rank calls :meth:`save` and :meth:`load_newest` (they run collectives); the folder
    operations happen on rank 0, so the folder must be shared by all nodes.
    """

    def __init__(self, folder: Path, rank: int, world_size: int, keep: int) -> None:
        self.folder, self.rank, self.world_size, self.keep = folder, rank, world_size, keep

    @staticmethod
    def tag(step: int) -> str:
        return f"step_{step:06d}"

    def complete(self) -> list[tuple[int, Path]]:
        """``(step, folder)`` of every complete checkpoint, newest first. Leftover ``tmp-*``
        folders (a save that was killed) and folders whose files do not match their manifest
        (truncated or missing files) are skipped with a warning."""
        found = []
        if not self.folder.is_dir():
            return found
        for path in self.folder.iterdir():
            if not path.is_dir() or path.name.startswith((_TMP_PREFIX, _TRASH_PREFIX)):
                continue
            problem = self._check(path)
            if problem is None:
                manifest = json.loads((path / MANIFEST_NAME).read_text(encoding="utf-8"))
                found.append((int(manifest["step"]), path))
            elif self.rank == 0:
                print(f"[polydiff] skipping checkpoint {path}: {problem}", file=sys.stderr)
        return sorted(found, key=lambda item: item[0], reverse=True)

    @staticmethod
    def _check(path: Path) -> str | None:
        try:
            manifest = json.loads((path / MANIFEST_NAME).read_text(encoding="utf-8"))
            files = manifest["files"]
            int(manifest["step"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f"no valid {MANIFEST_NAME} ({e})"
        for name, size in files.items():
            file = path / name
            if not file.is_file():
                return f"{name} is missing"
            if file.stat().st_size != size:
                return f"{name} has {file.stat().st_size} bytes, the manifest says {size}"
        return None

    def save(self, engine: Any, step: int, client_state: dict[str, Any]) -> Path:
        """Write checkpoint ``step`` atomically (all ranks call this)."""
        from deepspeed import comm as dist

        tag = self.tag(step)
        tmp = self.folder / f"{_TMP_PREFIX}{tag}"
        if self.rank == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # from a save that was killed
        dist.barrier()
        # save_latest=False: `latest` must only ever name a renamed, complete folder.
        engine.save_checkpoint(
            str(self.folder), tag=tmp.name, client_state=client_state, save_latest=False
        )
        dist.barrier()  # every rank's files are written
        final = self.folder / tag
        if self.rank == 0:
            files = {}
            for file in sorted(p for p in tmp.rglob("*") if p.is_file()):
                fsync_path(file)
                files[file.relative_to(tmp).as_posix()] = file.stat().st_size
            manifest = {"step": step, "world_size": self.world_size, "files": files}
            _write_atomic(tmp / MANIFEST_NAME, json.dumps(manifest, indent=1))
            if final.exists():  # re-saving a step (a resumed run that had saved it)
                self._discard(final)
            os.rename(tmp, final)
            fsync_path(self.folder)
            _write_atomic(self.folder / "latest", tag)
            if self.keep:
                for _, old in self.complete()[self.keep :]:
                    self._discard(old)
        dist.barrier()
        return final

    def _discard(self, path: Path) -> None:
        # Rename first: a kill during rmtree leaves a trash-* folder, never a damaged checkpoint.
        trash = path.with_name(f"{_TRASH_PREFIX}{path.name}")
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def clean_leftovers(self) -> None:
        """Remove ``tmp-*`` and ``trash-*`` folders of killed saves (rank 0)."""
        if self.rank == 0 and self.folder.is_dir():
            for path in self.folder.iterdir():
                if path.is_dir() and path.name.startswith((_TMP_PREFIX, _TRASH_PREFIX)):
                    shutil.rmtree(path, ignore_errors=True)

    def load_newest(self, engine: Any) -> tuple[int, dict[str, Any]] | None:
        """Load the newest complete checkpoint into ``engine`` (all ranks call this).

        Falls back to the previous complete checkpoint when one cannot be loaded. Returns
        ``(step, client_state)`` or None when there is none.

        Raises:
            RunError: the newest checkpoint was written by a different number of processes.
        """
        from deepspeed import comm as dist

        candidates: list[Any] = [None]
        if self.rank == 0:
            candidates = [[(step, path.name) for step, path in self.complete()]]
        dist.broadcast_object_list(candidates, src=0)
        for step, name in candidates[0]:
            manifest = json.loads((self.folder / name / MANIFEST_NAME).read_text("utf-8"))
            if manifest["world_size"] != self.world_size:
                raise RunError(
                    f"checkpoint {self.folder / name} was written by {manifest['world_size']} "
                    f"processes; resume it with the same number (this run has "
                    f"{self.world_size}) so that every rank's data position and RNG carry over"
                )
            error = ""
            try:
                path, client_state = engine.load_checkpoint(str(self.folder), tag=name)
                ok = path is not None and isinstance(client_state, dict)
            except Exception as e:  # a corrupt file: try the previous checkpoint
                ok, error = False, f"{type(e).__name__}: {e}"
            flag = torch.tensor([1.0 if ok else 0.0])
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            if flag.item() == 1.0:
                return step, client_state
            print(
                f"[polydiff] rank {self.rank}: cannot load checkpoint {name} {error}; "
                "trying the previous one",
                file=sys.stderr,
            )
        return None


# --- metrics ----------------------------------------------------------------------------------


class Metrics:
    """``<out>/metrics.jsonl`` (rank 0): one JSON object per line, appended and flushed."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def truncate_after(self, step: int) -> None:
        """Drop lines of steps after ``step`` (steps a killed run did that the resumed run
        redoes), so each step appears once."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a kill
        _write_atomic(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


class _Window:
    """What happened since the last metrics line: losses, data wait, time, bad samples."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.micro_batches = 0
        self.steps = 0
        self.wait = 0.0
        self.housekeeping = 0.0  # previews and checkpoints: not training time
        self.start = time.perf_counter()


# --- final model ------------------------------------------------------------------------------


def write_final(model: nn.Module, folder: Path, modality: str, model_cfg: dict[str, Any]) -> Path:
    """``save_pretrained(model)`` into ``folder``, with ``modality`` and ``model`` (the recipe's
    model config) added to ``config.json`` so ``polydiff generate`` can rebuild it via the
    recipe. Built next to ``folder`` and renamed into place: the old or new one is complete."""
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(model, tmp)
    record = json.loads((tmp / CONFIG_NAME).read_text(encoding="utf-8"))
    record.update({"modality": modality, "model": model_cfg})
    _write_atomic(tmp / CONFIG_NAME, json.dumps(record, indent=2, sort_keys=True) + "\n")
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        os.rename(folder, old)
        os.rename(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, folder)
    fsync_path(folder.parent)
    return folder


# --- the loop ---------------------------------------------------------------------------------


def train(cfg: TrainConfig, out: Path, *, resume: bool = False) -> Path:
    """Train ``cfg`` in this process (one of the DeepSpeed ranks) and return ``<out>/final``.

    Args:
        cfg: a checked config (``load_config``); ``cfg.data.shards`` must be set.
        out: the run folder (metrics.jsonl, previews/, checkpoints/, final/).
        resume: continue from the newest complete checkpoint in ``out`` (from step 0 when
            there is none). Without it, a folder that already holds a run is refused.
    """
    import deepspeed
    from deepspeed import comm as dist
    from tqdm import tqdm

    from polydiff.core.data import ShardStream, expand_urls

    t = cfg.train
    if cfg.data.shards is None:
        raise ConfigError("data.shards: no training shards; set data.shards or pass --data")
    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    main = rank == 0
    checkpoints = Checkpoints(out / "checkpoints", rank, world, t.keep_checkpoints)
    metrics = Metrics(out / "metrics.jsonl")
    _refuse_other_run(out, resume, main)

    recipe = load_recipe(cfg.modality)
    _seed_all(t.seed)  # the same initial weights on every rank
    model = recipe.build_model(cfg.model)
    optimizer = torch.optim.AdamW(
        _param_groups(model, t.weight_decay), lr=lr_at(1, t), betas=t.betas, eps=t.adam_eps
    )
    # Before initialize: ZeRO-3 partitions the parameters, and bf16 casts them.
    ema = EMA(model, decay=t.ema_decay, warmup_steps=t.ema_warmup_steps)
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=cfg.deepspeed_config()
    )
    ema.to(engine.device)
    zero3 = engine.zero_optimization_stage() == 3
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)

    _seed_all(_seed(t.seed, rank, 0))  # dropout etc. differ between ranks
    noise = torch.Generator(engine.device).manual_seed(_seed(t.seed, rank, 1))
    stream = ShardStream(
        expand_urls(cfg.data.shards, allow_pipe=cfg.data.allow_pipe),
        decode=_WithModelConfig(recipe.decode, cfg.model),
        collate=recipe.collate,
        bucket=_WithModelConfig(recipe.bucket, cfg.model),
        batch_size=t.batch_size,
        rank=rank,
        world_size=world,
        num_workers=cfg.data.num_workers,
        seed=t.seed,
        shuffle_buffer=cfg.data.shuffle_buffer,
        max_bad_fraction=cfg.data.max_bad_fraction,
        allow_pipe=cfg.data.allow_pipe,
    )

    step = 0
    if resume and (loaded := checkpoints.load_newest(engine)) is not None:
        step, state = loaded
        ema.load_state_dict(state["ema"])
        stream.load_state_dict(state["ranks"][rank]["stream"])
        _set_rng_state(state["ranks"][rank]["rng"], noise)
    if main:
        print(
            f"[polydiff] {'resuming at' if step else 'starting'} step {step}/{t.max_steps}; "
            f"{world} process(es), {cfg.precision}, ZeRO {engine.zero_optimization_stage()}",
            file=sys.stderr,
        )
        checkpoints.clean_leftovers()
        metrics.truncate_after(step)
        _write_atomic(out / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
    dist.barrier()

    preview_model: nn.Module | None = None

    def preview(at: int) -> None:
        nonlocal preview_model
        folder = out / "previews" / f"step_{at:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        with _forked_rng(t.seed), torch.no_grad():
            if preview_model is None:  # built on forked RNGs too: init draws random numbers
                preview_model = recipe.build_model(cfg.model).to(engine.device).eval()
            ema.copy_to(preview_model)
            recipe.preview(preview_model, folder, at, cfg.model)

    def client_state() -> dict[str, Any]:
        mine = {"stream": stream.state_dict(), "rng": _rng_state(noise)}
        ranks: list[Any] = [None] * world
        dist.all_gather_object(ranks, mine)
        return {"step": step, "ema": ema.state_dict(), "ranks": ranks, "world_size": world}

    batches = _batches(stream)
    bar = tqdm(total=t.max_steps, initial=step, disable=None if main else True, unit="step")
    window = _Window(engine.device)
    while step < t.max_steps:
        lr = lr_at(step + 1, t, cfg.decay_steps)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        for _ in range(t.grad_accum):
            waited = time.perf_counter()
            batch = _to_device(next(batches), engine.device, dtype)
            window.wait += time.perf_counter() - waited
            loss = recipe.loss(engine, batch, noise, cfg.model)
            engine.backward(loss)
            engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary
            window.loss_sum += loss.detach().to(torch.float64)
            window.micro_batches += 1
        step += 1
        window.steps += 1
        params = list(engine.module.parameters()) if zero3 else []
        with deepspeed.zero.GatheredParameters(params, enabled=zero3):
            ema.update(engine)
        bar.update(1)

        if step % t.log_every == 0 or step == t.max_steps:
            record = _log_record(window, step, lr, stream.stats.bad, world, t, dist)
            if main:
                metrics.write(record)
                bar.set_postfix(loss=f"{record['loss']:.4g}", lr=f"{lr:.3g}")
                if bar.disable:
                    print(
                        f"[polydiff] step {step}/{t.max_steps} loss {record['loss']:.5g} "
                        f"lr {lr:.3g} {record['samples_per_s']:.1f} samples/s "
                        f"data wait {record['data_wait_fraction']:.0%}",
                        file=sys.stderr,
                    )
            window.reset()
        busy = time.perf_counter()
        is_last = step == t.max_steps
        # Checkpoint first: a preview that fails (a bad prompt, a bug in a recipe's sampler)
        # must not cost the steps since the last checkpoint.
        if (t.checkpoint_every and step % t.checkpoint_every == 0) or is_last:
            checkpoints.save(engine, step, client_state())
        if main and ((t.preview_every and step % t.preview_every == 0) or is_last):
            preview(step)
        window.housekeeping += time.perf_counter() - busy
    bar.close()

    final = out / "final"
    if main:
        final_model = recipe.build_model(cfg.model)
        ema.copy_to(final_model)
        write_final(final_model, final, cfg.modality, cfg.model)
        print(f"[polydiff] done: EMA weights in {final}", file=sys.stderr)
    dist.barrier()
    return final


def _log_record(
    window: _Window, step: int, lr: float, bad: int, world: int, t: OptimConfig, dist: Any
) -> dict[str, Any]:
    """The metrics line for the window ending at ``step``; losses and bad samples summed
    over ranks (one all-reduce), timings from this rank."""
    totals = torch.stack(
        [
            window.loss_sum,
            torch.tensor(float(window.micro_batches), dtype=torch.float64),
            torch.tensor(float(bad), dtype=torch.float64),
        ]
    ).to(window.device)
    dist.all_reduce(totals)
    loss = (totals[0] / totals[1]).item()
    if not math.isfinite(loss):
        raise FloatingPointError(f"loss is {loss} at step {step}; lower train.lr?")
    seconds = max(time.perf_counter() - window.start - window.housekeeping, 1e-9)
    samples = window.steps * t.grad_accum * t.batch_size * world
    return {
        "step": step,
        "loss": loss,
        "lr": lr,
        "samples_per_s": samples / seconds,
        "data_wait_fraction": min(1.0, window.wait / seconds),
        "bad_samples": int(totals[2].item()),
        "samples": step * t.grad_accum * t.batch_size * world,
        "time": time.time(),
    }


def existing_run(out: Path) -> str | None:
    """Why ``out`` already holds a run (its checkpoints or metrics), or None when it does not."""
    folder = out / "checkpoints"
    if folder.is_dir() and any(
        p.is_dir() and not p.name.startswith((_TMP_PREFIX, _TRASH_PREFIX)) for p in folder.iterdir()
    ):
        return f"{folder} already holds checkpoints"
    if (out / "metrics.jsonl").exists():
        return f"{out / 'metrics.jsonl'} already exists"
    return None


def _refuse_other_run(out: Path, resume: bool, main: bool) -> None:
    """Without --resume, never write over another run's metrics or checkpoints."""
    from deepspeed import comm as dist

    problem: list[Any] = [existing_run(out) if main and not resume else None]
    if main:
        out.mkdir(parents=True, exist_ok=True)
    dist.broadcast_object_list(problem, src=0)
    if problem[0] is not None:
        raise RunError(f"{problem[0]}: pass --resume to continue that run, or choose --out")
