"""What a run reports: ``<out>/metrics.jsonl``, ``<out>/loss.png`` and TensorBoard scalars.

:class:`Metrics` appends one JSON object per ``log_every`` steps to ``<out>/metrics.jsonl``;
:func:`plot_metrics` plots it into ``<out>/loss.png`` and :class:`TensorBoard` writes the same
scalars to ``<out>/tensorboard`` when it is installed. A lone ``model`` part logs ``loss``,
``lr`` and the loss extras by their names; with parts, ``loss/<part>``, ``lr/<part>`` and
``<part>/<extra>``, and ``loss`` / ``lr`` are the EMA part's. Losses and extras are means over
the window's micro-batches (:class:`Window`) and all ranks (:func:`log_record`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .checkpoints import write_atomic
from .config import OptimConfig, RunError

__all__ = ["PLOT_NAME", "Metrics", "TensorBoard", "Window", "log_record", "plot", "plot_metrics"]

PLOT_NAME = "loss.png"


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
        write_atomic(self.path, "".join(line + "\n" for line in kept))

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


def plot(out: Path) -> None:
    """``<out>/loss.png`` from ``metrics.jsonl``; a plotting problem never stops a run."""
    try:
        plot_metrics(out / "metrics.jsonl", out / PLOT_NAME)
    except Exception as e:
        print(f"[polydiff] cannot plot {out / PLOT_NAME}: {type(e).__name__}: {e}", file=sys.stderr)


class TensorBoard:
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


class Window:
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


def log_record(
    window: Window,
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
