"""The training loop every modality shares; it runs inside each DeepSpeed process.

The modality is a :class:`polydiff.core.modality.contract.Modality` bound once to the
validated model config. Its ``parts(model)`` are the sub-modules trained with their own
optimizer (default: ``{"model": model}``); each part gets an AdamW, a learning-rate schedule
(``train`` with ``train.parts.<name>`` laid over it) and a DeepSpeed engine of its own. One
optimizer step (``train.grad_accum`` micro-batches of ``train.batch_size`` samples on every
process) is::

    for part in parts (in order):                  # the other parts' parameters are frozen
        for each of the step's micro-batches:      # drawn once per step, shared by all parts
            loss = recipe.loss(model, batch, noise, part)   # via that part's engine
            engine[part].backward(loss); engine[part].step()
    EMA update of recipe.ema_part

The loop is :func:`train`, its schedule :func:`lr_at` (linear warm-up, then cosine / linear /
constant decay to ``min_lr``). The rest lives beside it, one job per module:

- :mod:`~polydiff.core.train.parts`: the parts (checked, frozen in turn, one engine each) and
  the statistics fitted into the model before step 0;
- :mod:`~polydiff.core.train.checkpoints`: atomic DeepSpeed checkpoints in ``<out>/checkpoints``;
- :mod:`~polydiff.core.train.metrics`: ``<out>/metrics.jsonl``, ``loss.png`` and TensorBoard.

ZeRO-3 needs one engine over the whole model, so it is refused for anything but the lone
``model`` part.

Exact resume: the checkpoint holds every part's weights and optimizer, the EMA, the model state
outside the parts, the step, every rank's data position and its Python / NumPy / torch /
loss-noise generator states, and previews run on forked RNGs, so on CPU a resumed run's losses
equal an uninterrupted run's bit for bit.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import pickle
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
from polydiff.core.modality.contract import Modality, load_modality
from polydiff.core.modality.denoising import make_schedule
from polydiff.core.pretrained import CONFIG_NAME, fsync_path, save_pretrained
from polydiff.core.step_grids import write_grid

from .checkpoints import TMP_PREFIX, TRASH_PREFIX, Checkpoints, write_atomic
from .config import ConfigError, OptimConfig, RunError, TrainConfig
from .distill import Distillation, lcm_grids
from .metrics import Metrics, TensorBoard, Window, log_record, plot
from .parts import PLAIN, PartStep, ema_module, fit_statistics, model_parts, set_trainable

__all__ = ["RunError", "bind_recipe", "existing_run", "lr_at", "train", "write_final"]


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


# --- final model ------------------------------------------------------------------------------


def write_final(
    model: nn.Module,
    folder: Path,
    modality: str,
    model_cfg: dict[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """``save_pretrained(model)`` into ``folder``, with ``modality`` and ``model`` (the recipe's
    model config) added to ``config.json`` so ``polydiff generate`` can rebuild it via the
    recipe, and ``extra`` (top-level keys loading ignores, e.g. how a model was distilled).
    Built next to ``folder`` and renamed into place: the old or new one is complete; what a
    killed earlier write left beside it (``.final.tmp-PID``) is removed."""
    for leftover in folder.parent.glob(f".{folder.name}.*-*"):
        if leftover.name.rpartition("-")[0] in (f".{folder.name}.tmp", f".{folder.name}.old"):
            shutil.rmtree(leftover, ignore_errors=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    save_pretrained(model, tmp)
    record = json.loads((tmp / CONFIG_NAME).read_text(encoding="utf-8"))
    record.update({**(extra or {}), "modality": modality, "model": model_cfg})
    write_atomic(tmp / CONFIG_NAME, json.dumps(record, indent=2, sort_keys=True) + "\n")
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
        out: the run folder (metrics.jsonl, loss.png, previews/, checkpoints/, final/).
        resume: continue from the newest complete checkpoint in ``out`` (from step 0 when
            there is none). Without it, a folder that already holds a run is refused.
    """
    import deepspeed
    from deepspeed import comm as dist
    from deepspeed.accelerator import get_accelerator
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

    recipe = bind_recipe(cfg)
    if cfg.data.num_workers > 0:
        _check_picklable(recipe)
    _seed_all(t.seed)  # the same initial weights on every rank
    model = recipe.build_model()
    parts = model_parts(recipe, model, t)
    names = list(parts)
    plain = names == [PLAIN]
    ema_part = parts[recipe.ema_part]
    whole = len(parts) == 1 and parts[names[0]].module is model
    stage = (cfg.deepspeed.get("zero_optimization") or {}).get("stage", 0)
    if stage == 3 and not whole:
        raise RunError(
            f"deepspeed.zero_optimization.stage 3 cannot train the parts {', '.join(names)} of "
            f"{type(recipe).__name__} (one ZeRO-3 engine must own the whole model); use ZeRO 0-2"
        )
    trainable = {id(p): p.requires_grad for part in parts.values() for p in part.params}
    persistent = set(model.state_dict(keep_vars=True))
    covered = {
        part.key(k) for part in parts.values() for k in part.module.state_dict(keep_vars=True)
    }
    rest = sorted(persistent - covered)  # model state no part's engine saves
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(get_accelerator().device_name(local))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)

    def shard_stream(seed: int) -> ShardStream:
        """This rank's stream of the configured shards, decoded by the recipe."""
        return ShardStream(
            expand_urls(cfg.data.shards, allow_pipe=cfg.data.allow_pipe),
            decode=recipe.decode,
            collate=recipe.collate,
            bucket=recipe.bucket,
            batch_size=t.batch_size,
            rank=rank,
            world_size=world,
            num_workers=cfg.data.num_workers,
            seed=seed,
            shuffle_buffer=cfg.data.shuffle_buffer,
            max_bad_fraction=cfg.data.max_bad_fraction,
            allow_pipe=cfg.data.allow_pipe,
        )

    def statistics_stream(cast: torch.dtype | None) -> Iterator[Any]:
        """``recipe.statistics_batches`` batches of a stream of their own (seeded apart from
        the training stream, whose order stays the same with or without statistics)."""
        iterator = iter(shard_stream(_seed(t.seed, 0x57A75)))
        try:
            for _ in range(recipe.statistics_batches):
                yield _to_device(next(iterator), device, cast)
        finally:
            iterator.close()

    def fit_buffers(cast: torch.dtype | None) -> None:
        fitted = fit_statistics(
            recipe,
            model,
            statistics_stream(cast),
            rng=_forked_rng(_seed(t.seed, rank, 2)),
            persistent=persistent,
            device=device,
            world=world,
            dist=dist,
        )
        if main:
            print(
                f"[polydiff] fitted statistics {', '.join(fitted) or '(none)'} on "
                f"{recipe.statistics_batches} batch(es) per process",
                file=sys.stderr,
            )

    # Statistics are fitted before step 0 only: before the engines exist (fp32 weights, the
    # EMA copies the buffers), unless a checkpoint will be resumed (it carries them).
    fitted = False
    if recipe.statistics_batches > 0:
        has_checkpoint: list[Any] = [bool(checkpoints.complete()) if main and resume else False]
        dist.broadcast_object_list(has_checkpoint, src=0)
        if not has_checkpoint[0]:
            model.to(device)
            fit_buffers(None)  # fp32 weights and batches
            fitted = True

    # Before initialize: ZeRO-3 partitions the parameters, and bf16 casts them.
    ema = EMA(ema_part.module, decay=t.ema_decay, warmup_steps=t.ema_warmup_steps)
    loss_fn = functools.partial(recipe.loss, model)
    for part in parts.values():
        p = part.config
        optimizer = torch.optim.AdamW(
            _param_groups(part.module, p.weight_decay),
            lr=lr_at(1, p),
            betas=p.betas,
            eps=p.adam_eps,
        )
        ds = cfg.deepspeed_config()
        ds["gradient_clipping"] = float(p.grad_clip)
        part.engine, _, _, _ = deepspeed.initialize(
            model=PartStep(part.module, loss_fn, part.name), optimizer=optimizer, config=ds
        )
    engines = {name: part.engine for name, part in parts.items()}
    device = parts[names[0]].engine.device
    if not whole:  # the model outside the parts: frozen, on the device, in the engines' dtype
        in_parts = set(trainable)
        for p in model.parameters():
            if id(p) not in in_parts:
                p.requires_grad_(False)
                if dtype is not None and p.is_floating_point():
                    p.data = p.data.to(dtype)
        model.to(device)
    ema.to(device)
    zero3 = stage == 3

    _seed_all(_seed(t.seed, rank, 0))  # dropout etc. differ between ranks
    noise = torch.Generator(device).manual_seed(_seed(t.seed, rank, 1))
    stream = shard_stream(t.seed)

    step = 0
    if resume and (loaded := checkpoints.load_newest(engines, recipe.ema_part)) is not None:
        step, state = loaded
        ema.load_state_dict(state["ema"])
        if rest:
            with torch.no_grad():
                current = model.state_dict(keep_vars=True)
                for key, value in state["rest"].items():
                    current[key].copy_(value)
        stream.load_state_dict(state["ranks"][rank]["stream"])
        _set_rng_state(state["ranks"][rank]["rng"], noise)
    elif recipe.statistics_batches > 0 and not fitted:  # no checkpoint could be loaded
        params = list(model.parameters()) if zero3 else []
        with deepspeed.zero.GatheredParameters(params, enabled=zero3):
            fit_buffers(dtype)  # the engines' weights: batches cast as in training
        ema.copy_buffers_from(ema_part.module)
    if main:
        print(
            f"[polydiff] {'resuming at' if step else 'starting'} step {step}/{t.max_steps}; "
            f"{world} process(es), {cfg.precision}, ZeRO {stage}"
            + ("" if plain else f", parts {', '.join(names)} (EMA: {recipe.ema_part})"),
            file=sys.stderr,
        )
        checkpoints.clean_leftovers()
        metrics.truncate_after(step)
        write_atomic(out / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
    tensorboard = TensorBoard(out / "tensorboard", step) if main else None
    dist.barrier()

    preview_model: nn.Module | None = None

    def preview(at: int) -> None:
        nonlocal preview_model
        folder = out / "previews" / f"step_{at:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        with _forked_rng(t.seed), torch.no_grad():
            if preview_model is None:  # built on forked RNGs too: init draws random numbers
                preview_model = ema_module(recipe, recipe.build_model()).to(device).eval()
            ema.copy_to(preview_model)
            recipe.preview(preview_model, folder, at)

    def client_state() -> dict[str, Any]:
        mine = {"stream": stream.state_dict(), "rng": _rng_state(noise)}
        ranks: list[Any] = [None] * world
        dist.all_gather_object(ranks, mine)
        state = {"step": step, "ema": ema.state_dict(), "ranks": ranks, "world_size": world}
        if rest:
            current = model.state_dict()
            state["rest"] = {key: current[key].detach().cpu().clone() for key in rest}
        return state

    batches = _batches(stream)
    bar = tqdm(total=t.max_steps, initial=step, disable=None if main else True, unit="step")
    window = Window(device, names)
    while step < t.max_steps:
        lrs = {}
        for name, part in parts.items():
            lrs[name] = lr_at(step + 1, part.config)
            for group in part.engine.optimizer.param_groups:
                group["lr"] = lrs[name]
        shared: list[Any] = []  # the step's micro-batches, kept for the parts after the first
        for name, part in parts.items():
            if not whole:
                set_trainable(parts, trainable, name)
            engine = part.engine
            for i in range(t.grad_accum):
                if i < len(shared):
                    batch = shared[i]
                else:
                    waited = time.perf_counter()
                    batch = _to_device(next(batches), device, dtype)
                    window.wait += time.perf_counter() - waited
                    if len(parts) > 1:
                        shared.append(batch)
                loss = engine(batch, noise)
                engine.backward(loss)
                engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary
                window.add(name, loss, engine.module.extras)
        if not whole:
            set_trainable(parts, trainable, None)
        del shared
        step += 1
        window.steps += 1
        params = list(ema_part.engine.module.parameters()) if zero3 else []
        with deepspeed.zero.GatheredParameters(params, enabled=zero3):
            ema.update(ema_part.module)
        bar.update(1)

        if step % t.log_every == 0 or step == t.max_steps:
            record = log_record(
                window, step, lrs, stream.stats.bad, world, t, dist, plain, recipe.ema_part
            )
            if main:
                metrics.write(record)
                assert tensorboard is not None
                tensorboard.write(record)
                bar.set_postfix(loss=f"{record['loss']:.4g}", lr=f"{record['lr']:.3g}")
                if bar.disable:
                    per_part = (
                        ""
                        if plain
                        else " (" + ", ".join(f"{n} {record[f'loss/{n}']:.5g}" for n in names) + ")"
                    )
                    print(
                        f"[polydiff] step {step}/{t.max_steps} loss {record['loss']:.5g}{per_part} "
                        f"lr {record['lr']:.3g} {record['samples_per_s']:.1f} samples/s "
                        f"data wait {record['data_wait_fraction']:.0%}",
                        file=sys.stderr,
                    )
            window.reset()
        busy = time.perf_counter()
        is_last = step == t.max_steps
        # Checkpoint first: a preview that fails (a bad prompt, a bug in a recipe's sampler)
        # must not cost the steps since the last checkpoint.
        if (t.checkpoint_every and step % t.checkpoint_every == 0) or is_last:
            checkpoints.save(engines, step, client_state(), recipe.ema_part)
            if tensorboard is not None:
                tensorboard.flush()
        if main and ((t.preview_every and step % t.preview_every == 0) or is_last):
            preview(step)
            plot(out)
        window.housekeeping += time.perf_counter() - busy
    bar.close()

    final = out / "final"
    if main:
        final_model = ema_module(recipe, recipe.build_model())
        ema.copy_to(final_model)
        model_cfg, extra = cfg.model, None
        if isinstance(recipe, Distillation):  # LoRA merged; lcm defaults; how it was made
            final_model, model_cfg, extra = recipe.final(final_model)
        write_final(final_model, final, cfg.modality, model_cfg, extra)
        if isinstance(recipe, Distillation):  # the lcm grids the student was distilled on
            for grid in lcm_grids(make_schedule(model_cfg), recipe.settings.ode_steps):
                write_grid(final, grid)
        plot(out)
        assert tensorboard is not None
        tensorboard.close()
        print(f"[polydiff] done: EMA weights in {final}", file=sys.stderr)
    dist.barrier()
    return final


def bind_recipe(cfg: TrainConfig) -> Modality:
    """The recipe a checked config trains: its modality bound to ``model``, or for a
    ``distill:`` run the :class:`~polydiff.core.train.distill.Distillation` wrapping it."""
    if cfg.distill is not None:
        return Distillation.from_train_config(cfg)
    return load_modality(cfg.modality)(cfg.model)


def _check_picklable(recipe: Modality) -> None:
    """Loader workers receive the bound recipe (its ``decode``/``bucket``/``collate``) pickled."""
    try:
        pickle.loads(pickle.dumps(recipe))
    except Exception as e:
        raise RunError(
            f"data.num_workers > 0 sends the {type(recipe).__name__} instance to loader "
            f"workers, but it cannot be pickled ({type(e).__name__}: {e}); keep unpicklable "
            "things (open files, loaded models) out of its attributes or set data.num_workers: 0"
        ) from e


def existing_run(out: Path) -> str | None:
    """Why ``out`` already holds a run (its checkpoints or metrics), or None when it does not."""
    folder = out / "checkpoints"
    if folder.is_dir() and any(
        p.is_dir() and not p.name.startswith((TMP_PREFIX, TRASH_PREFIX)) for p in folder.iterdir()
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
