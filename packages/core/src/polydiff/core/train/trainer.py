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

The loop is :func:`train`; the helpers around it do one job each:

- :func:`lr_at`: linear warm-up, then cosine / linear / constant decay to ``min_lr``.
- :class:`Checkpoints`: atomic DeepSpeed checkpoints. All ranks write ``checkpoints/tmp-<tag>/``;
  after a barrier rank 0 adds ``checkpoint.json`` (step, world size, parts, every file's size),
  renames the folder to ``checkpoints/<tag>/`` and replaces ``checkpoints/latest`` (temp file +
  ``os.replace``). A folder is complete iff it has no ``tmp-`` prefix and its manifest matches
  the files, so a kill -9 at any moment leaves the previous checkpoint (or the new one) usable.
  A one-part ``model`` run keeps DeepSpeed's files directly in ``<tag>/``; a run with other
  parts has one DeepSpeed checkpoint per part in ``<tag>/<part>/``.
- :class:`Metrics`: ``<out>/metrics.jsonl``, one JSON object per ``log_every`` steps, plotted
  into ``<out>/loss.png`` (and TensorBoard scalars in ``<out>/tensorboard`` when it is installed).
  A lone ``model`` part logs ``loss``, ``lr`` and the loss extras by their names; with parts,
  ``loss/<part>``, ``lr/<part>`` and ``<part>/<extra>``, and ``loss`` / ``lr`` are the EMA
  part's. Losses and extras are means over the window's micro-batches and all ranks.

The parts are sub-modules with no shared parameter; while one part trains, the others'
parameters have ``requires_grad`` off (parameters outside every part stay frozen), so no
gradient leaks. ``recipe.loss`` gets the whole bare model (the engines hold its parts);
``recipe.preview`` and ``final/`` get the EMA part (``recipe.ema_part``) with EMA weights. ZeRO-3
needs one engine over the whole model, so it is refused for anything but the lone ``model``.

Fitted statistics: when ``recipe.statistics_batches > 0`` and the run starts at step 0, that
many batches of a separately seeded stream go to ``recipe.fit_statistics`` (fp32 weights and
batches on the device, eval mode, no grad, forked RNGs) before the EMA and the engines exist;
the returned tensors are averaged over ranks and copied into the model's persistent buffers of
those names, so the EMA, every checkpoint and ``final/`` (for buffers inside the EMA part)
carry them. A resumed run takes them from its checkpoint.

Exact resume: the checkpoint holds every part's weights and optimizer, the EMA, the model state
outside the parts, the step, every rank's data position and its Python / NumPy / torch /
loss-noise generator states, and previews run on forked RNGs, so on CPU a resumed run's losses
equal an uninterrupted run's bit for bit.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import math
import os
import pickle
import random
import re
import shutil
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from polydiff.core.ema import EMA
from polydiff.core.modality.contract import Modality, load_modality
from polydiff.core.pretrained import CONFIG_NAME, fsync_path, save_pretrained

from .config import ConfigError, OptimConfig, TrainConfig

__all__ = [
    "MANIFEST_NAME",
    "Checkpoints",
    "Metrics",
    "RunError",
    "existing_run",
    "lr_at",
    "plot_metrics",
    "train",
    "write_final",
]

MANIFEST_NAME = "checkpoint.json"
PLOT_NAME = "loss.png"
_TMP_PREFIX = "tmp-"
_TRASH_PREFIX = "trash-"
_PLAIN = "model"  # the one part of a recipe that does not override ``parts``
_PART_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


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


# --- parts ------------------------------------------------------------------------------------


@dataclass
class _Part:
    """One separately optimised sub-module: its settings, its place in the model, its engine."""

    name: str
    module: nn.Module
    prefix: str  # its name in the model ("" for the model itself)
    params: list[nn.Parameter]
    config: OptimConfig
    engine: Any = None

    def key(self, name: str) -> str:
        """A name inside the part as a name inside the model."""
        return f"{self.prefix}.{name}" if self.prefix else name


def _part_config(t: OptimConfig, name: str) -> OptimConfig:
    for_part = getattr(t, "for_part", None)
    return for_part(name) if for_part is not None else t


def _model_parts(recipe: Modality, model: nn.Module, t: OptimConfig) -> dict[str, _Part]:
    """``recipe.parts(model)``, checked: named sub-modules of ``model`` that share no
    parameter, each with something to train, ``recipe.ema_part`` among them, and every
    ``train.parts`` name a part."""
    who = type(recipe).__name__
    found = recipe.parts(model)
    if not isinstance(found, Mapping) or not found:
        raise RunError(f"{who}.parts must return a non-empty dict of name -> sub-module")
    where = {id(m): name for name, m in model.named_modules()}
    owner: dict[int, str] = {}
    parts: dict[str, _Part] = {}
    for name, module in found.items():
        if not isinstance(name, str) or not _PART_NAME.fullmatch(name):
            raise RunError(
                f"{who}.parts: part name {name!r} must be letters, digits, '_' or '-' "
                "(it names metrics and checkpoint folders)"
            )
        if not isinstance(module, nn.Module) or id(module) not in where:
            raise RunError(f"{who}.parts: part {name!r} is not a sub-module of the model")
        params = list(module.parameters())
        for p in params:
            if id(p) in owner:
                raise RunError(
                    f"{who}.parts: parts {owner[id(p)]!r} and {name!r} share parameters; "
                    "every parameter may belong to one part only"
                )
            owner[id(p)] = name
        if not any(p.requires_grad for p in params):
            raise RunError(f"{who}.parts: part {name!r} has no trainable parameters")
        parts[name] = _Part(name, module, where[id(module)], params, _part_config(t, name))
    if recipe.ema_part not in parts:
        raise RunError(
            f"{who}.ema_part is {recipe.ema_part!r}, which is not one of its parts "
            f"({', '.join(parts)})"
        )
    ema = parts[recipe.ema_part].module
    if not isinstance(getattr(ema, "config", None), dict):
        raise RunError(
            f"{who}: the EMA part {recipe.ema_part!r} ({type(ema).__name__}) becomes final/ "
            "and needs a dict `config` of constructor arguments (Configurable)"
        )
    configured = getattr(t, "parts", None) or {}
    unknown = sorted(set(configured) - set(parts))
    if unknown:
        raise ConfigError(
            f"train.parts.{unknown[0]}: {who} has no part {unknown[0]!r}; its parts are "
            + ", ".join(parts)
        )
    return parts


def _ema_module(recipe: Modality, model: nn.Module) -> nn.Module:
    """The EMA part of a freshly built ``model`` (previews and final/)."""
    return recipe.parts(model)[recipe.ema_part]


class _PartStep(nn.Module):
    """What one part's DeepSpeed engine runs: the recipe's loss of a micro-batch for that part.

    The engine's module holds only the part's parameters (so each engine optimises, clips,
    reduces and checkpoints its own part), while the loss sees the whole model. Going through
    ``engine(...)`` keeps DeepSpeed's forward/backward bookkeeping intact (its backward
    prologue is registered on the forward's output).
    """

    def __init__(self, part: nn.Module, loss: Any, name: str) -> None:
        super().__init__()
        self.part = part
        self._loss = loss  # a plain callable: the full model is not registered here
        self._name = name
        self.extras: dict[str, Any] = {}

    def forward(self, batch: Any, generator: torch.Generator) -> Tensor:
        out = self._loss(batch, generator, self._name)
        extras: Any = {}
        if isinstance(out, tuple):
            if len(out) != 2 or not isinstance(out[1], Mapping):
                raise RunError(
                    f"loss of part {self._name!r} must be a scalar tensor or (scalar, dict of "
                    f"extras), got a tuple of {len(out)}"
                )
            out, extras = out
        if not isinstance(out, Tensor) or out.numel() != 1:
            raise RunError(
                f"loss of part {self._name!r} must be a scalar tensor, got "
                + (f"shape {tuple(out.shape)}" if isinstance(out, Tensor) else type(out).__name__)
            )
        self.extras = dict(extras)
        return out.reshape(())


def _set_trainable(parts: Mapping[str, _Part], trainable: Mapping[int, bool], only: str | None):
    """Freeze every part but ``only`` (None: restore every part's own requires_grad), so a
    part's loss puts no gradient into the others."""
    for name, part in parts.items():
        for p in part.params:
            p.requires_grad_(trainable[id(p)] and (only is None or name == only))


# --- fitted statistics ------------------------------------------------------------------------


def _fit_statistics(
    recipe: Modality,
    model: nn.Module,
    batches: Iterator[Any],
    *,
    seed: int,
    persistent: set[str],
    device: torch.device,
    world: int,
    dist: Any,
) -> list[str]:
    """``recipe.fit_statistics`` on ``batches`` (no grad, eval mode, forked RNGs), averaged
    over processes and copied into the model's buffers of those names; returns the names."""
    who = type(recipe).__name__
    was_training = model.training
    try:
        with _forked_rng(seed), torch.no_grad():
            model.eval()
            stats = recipe.fit_statistics(model, batches)
    finally:
        model.train(was_training)
        close = getattr(batches, "close", None)
        if close is not None:
            close()  # stops the statistics stream's loader workers
    if not isinstance(stats, Mapping):
        raise RunError(f"{who}.fit_statistics must return a dict of buffer name -> tensor")
    buffers = dict(model.named_buffers())
    unknown = sorted(str(n) for n in stats if n not in buffers)
    if unknown:
        raise RunError(
            f"{who}.fit_statistics returned {', '.join(unknown)}: the model has no buffer of "
            f"that name (its buffers: {', '.join(buffers) or 'none'})"
        )
    transient = sorted(n for n in stats if n not in persistent)
    if transient:
        raise RunError(
            f"{who}.fit_statistics: buffer {', '.join(transient)} is not persistent, so "
            "checkpoints and final/ would not carry it (register_buffer(..., persistent=True))"
        )
    names = sorted(stats)
    values = []
    for name in names:
        value = torch.as_tensor(stats[name]).detach()
        if tuple(value.shape) != tuple(buffers[name].shape):
            raise RunError(
                f"{who}.fit_statistics: {name} has shape {tuple(value.shape)}, the buffer "
                f"{tuple(buffers[name].shape)}"
            )
        values.append(value.to(device, torch.float64).reshape(-1))
    layout = [(n, tuple(buffers[n].shape)) for n in names]
    if world > 1:
        seen: list[Any] = [None] * world
        dist.all_gather_object(seen, layout)
        if any(s != layout for s in seen):
            raise RunError(f"{who}.fit_statistics returned different buffers on different ranks")
    if not names:
        return names
    flat = torch.cat(values)
    dist.all_reduce(flat)
    flat /= world
    with torch.no_grad():
        for name, value in zip(names, flat.split([v.numel() for v in values]), strict=True):
            buffer = buffers[name]
            value = value.reshape(buffer.shape)
            buffer.copy_(value if buffer.is_floating_point() else value.round())
    return names


# --- checkpoints ------------------------------------------------------------------------------


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


def _engines(engines: Any) -> dict[str, Any]:
    return dict(engines) if isinstance(engines, Mapping) else {_PLAIN: engines}


class Checkpoints:
    """The ``<out>/checkpoints`` folder: atomic saves, finding the newest complete one, pruning.

    Every rank calls :meth:`save` and :meth:`load_newest` (they run collectives); the folder
    operations happen on rank 0, so the folder must be shared by all nodes. ``engines`` is one
    DeepSpeed engine (the plain one-part layout) or ``{part: engine}``; with any part other
    than a lone ``model``, each part's DeepSpeed checkpoint goes to ``<tag>/<part>/`` and the
    trainer's client state is stored with the ``main`` part.
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

    def save(
        self, engines: Any, step: int, client_state: dict[str, Any], main: str | None = None
    ) -> Path:
        """Write checkpoint ``step`` atomically (all ranks call this)."""
        from deepspeed import comm as dist

        engines = _engines(engines)
        main = main or next(iter(engines))
        tag = self.tag(step)
        tmp = self.folder / f"{_TMP_PREFIX}{tag}"
        if self.rank == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # from a save that was killed
            tmp.mkdir()
        dist.barrier()
        # save_latest=False: `latest` must only ever name a renamed, complete folder.
        if list(engines) == [_PLAIN]:
            engines[_PLAIN].save_checkpoint(
                str(self.folder), tag=tmp.name, client_state=client_state, save_latest=False
            )
        else:
            for name, engine in engines.items():
                state = client_state if name == main else {"step": step, "part": name}
                engine.save_checkpoint(str(tmp), tag=name, client_state=state, save_latest=False)
        dist.barrier()  # every rank's files are written
        final = self.folder / tag
        if self.rank == 0:
            files = {}
            for file in sorted(p for p in tmp.rglob("*") if p.is_file()):
                fsync_path(file)
                files[file.relative_to(tmp).as_posix()] = file.stat().st_size
            manifest = {
                "step": step,
                "world_size": self.world_size,
                "parts": list(engines),
                "files": files,
            }
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

    def load_newest(
        self, engines: Any, main: str | None = None
    ) -> tuple[int, dict[str, Any]] | None:
        """Load the newest complete checkpoint into ``engines`` (all ranks call this).

        Falls back to the previous complete checkpoint when one cannot be loaded (any part).
        Returns ``(step, client_state)`` or None when there is none.

        Raises:
            RunError: the newest checkpoint was written by a different number of processes,
                or holds other parts than ``engines``.
        """
        from deepspeed import comm as dist

        engines = _engines(engines)
        main = main or next(iter(engines))
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
            saved = manifest.get("parts", [_PLAIN])
            if saved != list(engines):
                raise RunError(
                    f"checkpoint {self.folder / name} holds the parts {', '.join(saved)}; this "
                    f"recipe trains {', '.join(engines)}: resume with the recipe that wrote it"
                )
            error, client_state, ok = "", None, True
            try:
                for part, engine in engines.items():
                    if list(engines) == [_PLAIN]:
                        path, state = engine.load_checkpoint(str(self.folder), tag=name)
                    else:
                        path, state = engine.load_checkpoint(str(self.folder / name), tag=part)
                    ok = ok and path is not None and isinstance(state, dict)
                    if part == main:
                        client_state = state
            except Exception as e:  # a corrupt file: try the previous checkpoint
                ok, error = False, f"{type(e).__name__}: {e}"
            flag = torch.tensor([1.0 if ok else 0.0])
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            if flag.item() == 1.0:
                assert client_state is not None
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


def plot_metrics(metrics_file: Path, png: Path) -> Path | None:
    """Plot ``metrics.jsonl``'s losses (``loss`` and every ``loss/<part>``) and learning rates
    against the step into ``png`` (matplotlib's Agg canvas, written atomically); None when
    there is nothing to plot yet."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = []
    if metrics_file.exists():
        for line in metrics_file.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):
                rows.append(json.loads(line))
    rows = [r for r in rows if isinstance(r, dict) and isinstance(r.get("step"), int)]
    if not rows:
        return None

    def series(prefix: str) -> dict[str, tuple[list[int], list[float]]]:
        keys = [k for k in rows[-1] if k == prefix or k.startswith(prefix + "/")]
        if any(k != prefix for k in keys):
            keys = [k for k in keys if k != prefix]  # per part; `loss`/`lr` repeat the EMA part
        found = {}
        for key in keys:
            pairs = [
                (r["step"], float(r[key])) for r in rows if isinstance(r.get(key), (int, float))
            ]
            found[key] = ([s for s, _ in pairs], [v for _, v in pairs])
        return found

    fig = Figure(figsize=(7, 5.5), tight_layout=True)
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    losses = series("loss")
    for key, (steps, values) in losses.items():
        top.plot(steps, values, label=key, linewidth=1)
    values = [v for _, vs in losses.values() for v in vs]
    if values and all(v > 0 and math.isfinite(v) for v in values):
        top.set_yscale("log")
    top.set(ylabel="loss", title=f"{png.parent.name}: step {rows[-1]['step']}")
    top.grid(True, alpha=0.3)
    if len(losses) > 1:
        top.legend()
    for key, (steps, values) in series("lr").items():
        bottom.plot(steps, values, label=key, linewidth=1)
    bottom.set(xlabel="step", ylabel="learning rate")
    bottom.grid(True, alpha=0.3)
    if len(series("lr")) > 1:
        bottom.legend()
    tmp = png.with_name(f".{png.stem}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, png)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return png


class _TensorBoard:
    """The metrics as TensorBoard scalars in ``<out>/tensorboard`` (rank 0), when the
    ``tensorboard`` package is installed; silently nothing otherwise."""

    def __init__(self, folder: Path, resume_step: int) -> None:
        self.writer = None
        if importlib.util.find_spec("tensorboard") is None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a resumed run drops the events of the steps it redoes.
            self.writer = SummaryWriter(
                str(folder), purge_step=resume_step + 1 if resume_step else None
            )
        except Exception as e:  # a broken install must not stop training
            print(f"[polydiff] no TensorBoard scalars: {type(e).__name__}: {e}", file=sys.stderr)

    def write(self, record: Mapping[str, Any]) -> None:
        if self.writer is None:
            return
        for key, value in record.items():
            if key not in ("step", "time") and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, record["step"])

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class _Window:
    """What happened since the last metrics line: losses and extras per part, data wait, time."""

    def __init__(self, device: torch.device, parts: list[str]) -> None:
        self.device, self.parts = device, parts
        self.extra_names: dict[str, list[str] | None] = {p: None for p in parts}
        self.checked_ranks = False
        self.reset()

    def reset(self) -> None:
        zero = functools.partial(torch.zeros, (), dtype=torch.float64, device=self.device)
        self.loss_sum = {p: zero() for p in self.parts}
        self.micro_batches = dict.fromkeys(self.parts, 0)
        self.extra_sum: dict[str, dict[str, Tensor]] = {p: {} for p in self.parts}
        self.steps = 0
        self.wait = 0.0
        self.housekeeping = 0.0  # previews and checkpoints: not training time
        self.start = time.perf_counter()

    def add(self, part: str, loss: Tensor, extras: Mapping[str, Any]) -> None:
        self.loss_sum[part] += loss.detach().to(torch.float64)
        self.micro_batches[part] += 1
        names = self.extra_names[part]
        if names is None:
            for name in extras:
                if not isinstance(name, str) or not name:
                    raise RunError(
                        f"loss extras of part {part!r}: names must be strings, got {name!r}"
                    )
            names = self.extra_names[part] = list(extras)
        elif set(extras) != set(names):
            raise RunError(
                f"loss of part {part!r} returned the extras {sorted(extras)}; its first call "
                f"returned {sorted(names)}: return the same names every call"
            )
        sums = self.extra_sum[part]
        for name in names:
            value = extras[name]
            if isinstance(value, Tensor):
                if value.numel() != 1:
                    raise RunError(
                        f"loss extra {name!r} of part {part!r} must be a scalar, got shape "
                        f"{tuple(value.shape)}"
                    )
                value = value.detach().to(self.device, torch.float64).reshape(())
            else:
                value = torch.tensor(float(value), dtype=torch.float64, device=self.device)
            sums[name] = sums[name] + value if name in sums else value


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

    recipe = load_modality(cfg.modality)(cfg.model)
    if cfg.data.num_workers > 0:
        _check_picklable(recipe)
    _seed_all(t.seed)  # the same initial weights on every rank
    model = recipe.build_model()
    parts = _model_parts(recipe, model, t)
    names = list(parts)
    plain = names == [_PLAIN]
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

    def fit_statistics(cast: torch.dtype | None) -> None:
        fitted = _fit_statistics(
            recipe,
            model,
            statistics_stream(cast),
            seed=_seed(t.seed, rank, 2),
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
            fit_statistics(None)  # fp32 weights and batches
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
            model=_PartStep(part.module, loss_fn, part.name), optimizer=optimizer, config=ds
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
            fit_statistics(dtype)  # the engines' weights: batches cast as in training
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
        _write_atomic(out / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
    tensorboard = _TensorBoard(out / "tensorboard", step) if main else None
    dist.barrier()

    preview_model: nn.Module | None = None

    def preview(at: int) -> None:
        nonlocal preview_model
        folder = out / "previews" / f"step_{at:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        with _forked_rng(t.seed), torch.no_grad():
            if preview_model is None:  # built on forked RNGs too: init draws random numbers
                preview_model = _ema_module(recipe, recipe.build_model()).to(device).eval()
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
    window = _Window(device, names)
    while step < t.max_steps:
        lrs = {}
        for name, part in parts.items():
            lrs[name] = lr_at(step + 1, part.config)
            for group in part.engine.optimizer.param_groups:
                group["lr"] = lrs[name]
        shared: list[Any] = []  # the step's micro-batches, kept for the parts after the first
        for name, part in parts.items():
            if not whole:
                _set_trainable(parts, trainable, name)
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
            _set_trainable(parts, trainable, None)
        del shared
        step += 1
        window.steps += 1
        params = list(ema_part.engine.module.parameters()) if zero3 else []
        with deepspeed.zero.GatheredParameters(params, enabled=zero3):
            ema.update(ema_part.module)
        bar.update(1)

        if step % t.log_every == 0 or step == t.max_steps:
            record = _log_record(
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
            _plot(out)
        window.housekeeping += time.perf_counter() - busy
    bar.close()

    final = out / "final"
    if main:
        final_model = _ema_module(recipe, recipe.build_model())
        ema.copy_to(final_model)
        write_final(final_model, final, cfg.modality, cfg.model)
        _plot(out)
        assert tensorboard is not None
        tensorboard.close()
        print(f"[polydiff] done: EMA weights in {final}", file=sys.stderr)
    dist.barrier()
    return final


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


def _plot(out: Path) -> None:
    """``<out>/loss.png`` from ``metrics.jsonl``; a plotting problem never stops a run."""
    try:
        plot_metrics(out / "metrics.jsonl", out / PLOT_NAME)
    except Exception as e:
        print(f"[polydiff] cannot plot {out / PLOT_NAME}: {type(e).__name__}: {e}", file=sys.stderr)


def _log_record(
    window: _Window,
    step: int,
    lrs: Mapping[str, float],
    bad: int,
    world: int,
    t: OptimConfig,
    dist: Any,
    plain: bool,
    ema_part: str,
) -> dict[str, Any]:
    """The metrics line for the window ending at ``step``; losses, loss extras and bad samples
    summed over ranks (one all-reduce), timings from this rank.

    A plain run (the one part ``model``) logs ``loss``, ``lr`` and each extra by its name; a
    run with parts logs ``loss/<part>``, ``lr/<part>`` and ``<part>/<extra>``, with ``loss``
    and ``lr`` those of the EMA part.
    """
    parts = window.parts
    extras = [(p, n) for p in parts for n in window.extra_names[p] or []]
    if world > 1 and not window.checked_ranks:  # the all-reduce below needs one layout
        seen: list[Any] = [None] * world
        dist.all_gather_object(seen, extras)
        if any(s != extras for s in seen):
            raise RunError("recipe.loss returned different extras on different ranks")
    window.checked_ranks = True
    f64 = functools.partial(torch.tensor, dtype=torch.float64)
    values = [window.loss_sum[p] for p in parts]
    values += [f64(float(window.micro_batches[p])) for p in parts]
    values += [f64(float(bad))]
    values += [window.extra_sum[p][n] for p, n in extras]
    totals = torch.stack([v.to(window.device) for v in values])
    dist.all_reduce(totals)
    n = len(parts)
    loss = {p: (totals[i] / totals[n + i]).item() for i, p in enumerate(parts)}
    for p, value in loss.items():
        if not math.isfinite(value):
            what = "loss" if plain else f"loss/{p}"
            raise FloatingPointError(f"{what} is {value} at step {step}; lower train.lr?")
    seconds = max(time.perf_counter() - window.start - window.housekeeping, 1e-9)
    samples = window.steps * t.grad_accum * t.batch_size * world
    record: dict[str, Any] = {"step": step, "loss": loss[ema_part]}
    if not plain:
        record.update({f"loss/{p}": loss[p] for p in parts})
    record["lr"] = lrs[ema_part]
    if not plain:
        record.update({f"lr/{p}": lrs[p] for p in parts})
    record.update(
        {
            "samples_per_s": samples / seconds,
            "data_wait_fraction": min(1.0, window.wait / seconds),
            "bad_samples": int(totals[2 * n].item()),
            "samples": step * t.grad_accum * t.batch_size * world,
            "time": time.time(),
        }
    )
    index = {p: i for i, p in enumerate(parts)}
    for j, (p, name) in enumerate(extras):
        key = name if plain else f"{p}/{name}"
        if key in record:
            raise RunError(f"loss extra {name!r} of part {p!r} would overwrite the metric {key!r}")
        record[key] = (totals[2 * n + 1 + j] / totals[n + index[p]]).item()
    return record


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
