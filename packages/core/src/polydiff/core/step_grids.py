"""Tuned step grids: the few noise levels at which a sampler best reproduces a many-step
teacher from the same noise.

At 5-10 model evaluations the grid matters as much as the solver, and the best grid depends on
the model (on where its data's structure appears as noise falls). :func:`tune_grid` finds one
per model, sampler and budget, in two stages, from nothing but runs of the sampler:

1. **Dynamic programming over a fine teacher trajectory** (the idea of GITS, Chen et al.,
   ICML 2024). A teacher (``exp_ab3``: no corrector, so the states it records are its
   trajectory) integrates the ODE on ``teacher_steps`` fine levels from fixed noise;
   the cost of jumping from fine level i to level j is how far one first-order step from the
   teacher's state at i, with the teacher's x0 estimate there, lands from the teacher's state at
   j. These costs need no model evaluation beyond the teacher's, and the cheapest path of N
   jumps from the first level to the clean one is found exactly by DP (O(N M^2) steps).
2. **Coordinate refinement for the sampler itself** (in the spirit of Align Your Steps, Sabour
   et al. 2024, which optimises the grid of the actual sampler). The DP's cost is a first-order
   one; a multistep solver's errors differ, so each free level is moved in turn by a golden-
   section search in log-SNR between its neighbours, scoring the sampler's whole run against
   the teacher's end point. The first level stays where the default grid starts (so the noise
   is scaled the same way); every other one is free, the last included.

The result never scores worse than the schedule's default grid on the tuning noise (the
refinement starts from the better of the two). Its record (:class:`TunedGrid`) says how it was
found, what it cost in model evaluations and its error next to the default's, and is stored as
JSON beside a checkpoint's weights (:func:`write_grid`, :data:`GRIDS_NAME`) for generation to
use when sampler and step count match (:func:`find_grid`).
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .sampling import SAMPLERS, make_grid, timesteps
from .sampling import _exp_step as first_order_step  # DDIM's step, shared with the samplers
from .schedules import Schedule

__all__ = [
    "GRIDS_FORMAT",
    "GRIDS_NAME",
    "TUNABLE",
    "GridError",
    "TunedGrid",
    "find_grid",
    "nfe_of",
    "read_grids",
    "steps_for",
    "tune_grid",
    "write_grid",
]

#: The file beside a checkpoint's weights that holds its tuned grids.
GRIDS_NAME = "grids.json"
GRIDS_FORMAT = "polydiff-grids/1"
#: Samplers a grid can be tuned for: the deterministic (ODE) ones; a stochastic sampler's
#: output is not a function of the grid and the noise alone.
TUNABLE: tuple[str, ...] = tuple(name for name, spec in SAMPLERS.items() if spec.eta == 0.0)

#: ``run(sampler, timesteps) -> final samples`` from fixed noise and conditions.
Run = Callable[[str, Sequence[float]], Tensor]
#: ``trajectory(sampler, timesteps) -> (states, x0s, final)``: the state and the x0 estimate at
#: every evaluated level (lists of tensors) and the final samples.
Trajectory = Callable[[str, Sequence[float]], tuple[list[Tensor], list[Tensor], Tensor]]


class GridError(ValueError):
    """A grids file that is not valid JSON of the expected layout (names the file)."""


def nfe_of(sampler: str, steps: int) -> int:
    """Model evaluations of ``steps`` steps of ``sampler`` (Heun evaluates twice per step
    except into sigma = 0)."""
    return 2 * steps - 1 if sampler == "heun" else steps


def steps_for(sampler: str, nfe: int) -> int:
    """The most steps of ``sampler`` that use at most ``nfe`` model evaluations."""
    return (nfe + 1) // 2 if sampler == "heun" else nfe


@dataclass(frozen=True)
class TunedGrid:
    """A grid tuned for one sampler and step count, and how it was found.

    Attributes:
        sampler, steps: what it is for (``nfe`` evaluations).
        timesteps: the ``steps`` model times, decreasing (the sampler ends at sigma = 0).
        error: relative error ||x - x_teacher|| / ||x_teacher|| of the sampler on this grid on
            the tuning noise; ``default_error`` the same for the schedule's default grid (None:
            not measured, e.g. the grid a consistency student was distilled on).
        model_evaluations: what tuning cost, counted per sample (teacher included).
        method: how it was found; ``teacher``: the reference (sampler, steps, spacing);
            ``context``: what it was tuned on (prompts, guidance, outputs, seed...).
    """

    sampler: str
    steps: int
    timesteps: tuple[float, ...]
    error: float | None
    default_error: float | None
    model_evaluations: int
    method: str = "gits-dp+refine"
    teacher: Mapping[str, Any] = field(default_factory=dict)
    context: Mapping[str, Any] = field(default_factory=dict)

    @property
    def nfe(self) -> int:
        return nfe_of(self.sampler, self.steps)

    def to_json(self) -> dict[str, Any]:
        record = asdict(self)
        record["timesteps"] = list(self.timesteps)
        record["nfe"] = self.nfe
        return record

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> TunedGrid:
        """Parse and check one record (ValueError naming the problem)."""
        try:
            grid = cls(
                sampler=str(record["sampler"]),
                steps=int(record["steps"]),
                timesteps=tuple(float(v) for v in record["timesteps"]),
                error=_optional_float(record["error"]),
                default_error=_optional_float(record["default_error"]),
                model_evaluations=int(record["model_evaluations"]),
                method=str(record.get("method", "")),
                teacher=dict(record.get("teacher", {})),
                context=dict(record.get("context", {})),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a tuned grid record ({type(e).__name__}: {e})") from e
        if grid.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {grid.sampler!r}")
        if len(grid.timesteps) != grid.steps or grid.steps < 1:
            raise ValueError(f"{grid.steps} steps but {len(grid.timesteps)} timesteps")
        values = grid.timesteps
        if not all(math.isfinite(v) and v >= 0 for v in values) or any(
            b >= a for a, b in itertools.pairwise(values)
        ):
            raise ValueError(f"timesteps must be finite, >= 0, strictly decreasing: {values}")
        return grid


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


# --------------------------------------------------------------------------- tuning


def _relative_error(x: Tensor, reference: Tensor) -> float:
    x, reference = x.double(), reference.double()
    return float((x - reference).norm() / reference.norm().clamp_min(1e-30))


def teacher_times(schedule: Schedule, first: float, count: int) -> list[float]:
    """``count`` fine model times for the teacher: ``first`` (where sampling starts), then
    evenly spaced in log-SNR down to the schedule's least noisy level."""
    fine = timesteps(schedule, max(count, 2), "logsnr").tolist()
    below = [t for t in fine if t < first]
    return [first, *below[-(count - 1) :]] if count > 1 else [first]


def dp_grid(
    schedule: Schedule,
    times: Sequence[float],
    states: Sequence[Tensor],
    x0s: Sequence[Tensor],
    final: Tensor,
    steps: int,
) -> list[float]:
    """The ``steps`` of ``times`` (always starting at ``times[0]``) whose first-order jumps
    best follow the teacher: states[i] and x0s[i] at times[i], ``final`` at sigma = 0.

    Returns the chosen model times, decreasing.
    """
    m = len(times)
    if steps > m:
        raise ValueError(f"cannot choose {steps} steps from {m} teacher levels")
    levels = make_grid(schedule, times).levels  # m evaluated levels + the clean one
    targets = [*states, final]
    norm = float(final.double().pow(2).sum().clamp_min(1e-30))
    # cost[i][j]: squared error of one jump i -> j (j = m is the clean level).
    cost = [[math.inf] * (m + 1) for _ in range(m)]
    for i in range(m):
        x, x0 = states[i].double(), x0s[i].double()
        for j in range(i + 1, m + 1):
            jump = first_order_step(x, x0, levels[i], levels[j])
            cost[i][j] = float((jump - targets[j].double()).pow(2).sum()) / norm
    # best[n][j]: the cheapest n jumps from level 0 to level j, and where the last came from.
    best = [[math.inf] * (m + 1) for _ in range(steps + 1)]
    came = [[-1] * (m + 1) for _ in range(steps + 1)]
    best[0][0] = 0.0
    for n in range(1, steps + 1):
        for j in range(1, m + 1):
            for i in range(j):
                value = best[n - 1][i] + cost[i][j] if i < m else math.inf
                if value < best[n][j]:
                    best[n][j], came[n][j] = value, i
    path, j = [], m
    for n in range(steps, 0, -1):
        j = came[n][j]
        path.append(j)
    return [float(times[i]) for i in reversed(path)]


def _golden_section(
    f: Callable[[float], float], lo: float, hi: float, evals: int
) -> tuple[float, float]:
    """(argmin, min) of ``f`` on [lo, hi], to within (hi - lo) * 0.618**evals (unimodal f),
    from ``evals`` evaluations."""
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = lo, hi
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(max(evals - 2, 0)):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = f(d)
    return (c, fc) if fc <= fd else (d, fd)


def refine_grid(
    schedule: Schedule,
    run: Run,
    sampler: str,
    start: Sequence[float],
    reference: Tensor,
    *,
    sweeps: int = 2,
    evals: int = 7,
    start_error: float | None = None,
) -> tuple[list[float], float, int]:
    """Move each level of ``start`` but the first, one at a time, to where ``sampler``'s run
    lands closest to ``reference`` (golden-section search in log-SNR between its neighbours,
    the last one down to the schedule's least noisy level); ``sweeps`` passes.

    Returns (times, relative error, sampler runs made).
    """
    times = [float(t) for t in start]
    runs = 0

    def score(candidate: Sequence[float]) -> float:
        nonlocal runs
        runs += 1
        return _relative_error(run(sampler, candidate), reference)

    current = score(times) if start_error is None else start_error  # the caller's run of it
    # Log-SNR of the most noisy finite level and the least noisy one (the search bounds).
    top = float(schedule.log_snr(times[0]))
    if not math.isfinite(top):
        top = float(schedule.log_snr(schedule.t_max - schedule.t_max / schedule.train_steps))
    bottom = float(schedule.log_snr(schedule.t_min))
    for _ in range(sweeps):
        improved = False
        for k in range(1, len(times)):
            upper = float(schedule.log_snr(times[k - 1])) if k > 1 else top
            lower = float(schedule.log_snr(times[k + 1])) if k + 1 < len(times) else bottom
            # Stay strictly between the neighbours (the grid must stay decreasing).
            pad = 1e-3 * (lower - upper)
            lo, hi = upper + pad, lower - pad
            if not hi > lo:
                continue

            def at(lam: float, k: int = k, base: list[float] = times) -> list[float]:
                t = float(schedule.t_from_log_snr(torch.tensor(lam, dtype=torch.float64)))
                return [*base[:k], t, *base[k + 1 :]]

            def f(lam: float, k: int = k) -> float:
                candidate = at(lam, k)
                if any(b >= a for a, b in itertools.pairwise(candidate)):
                    return math.inf
                return score(candidate)

            lam, value = _golden_section(f, lo, hi, evals)  # value: f(lam), already run
            candidate = at(lam)
            if value < current:
                times, current, improved = candidate, value, True
        if not improved:
            break
    return times, current, runs


# Standard spacings tried as starting points: (spacing, time shift).
_STARTS: tuple[tuple[str, float | None], ...] = (
    ("logsnr", None),
    ("karras", None),
    ("flow_shift", 0.3),
    ("flow_shift", 0.5),
    ("flow_shift", 0.7),
    ("flow_shift", 1.0),
    ("flow_shift", 2.0),
    ("flow_shift", 3.0),
)


def _starting_at(
    schedule: Schedule, first: float, steps: int, spacing: str, shift: float | None
) -> list[float]:
    """``steps`` times of a standard spacing with the first one moved to ``first``."""
    times = timesteps(schedule, steps, spacing, shift=shift).tolist()
    rest = [t for t in times[1:] if t < first]
    fill = [first * (1.0 - (i + 1) / steps) for i in range(steps - 1)]  # if a spacing clumps
    return [first, *rest] if len(rest) == steps - 1 else [first, *fill]


def tune_grid(
    schedule: Schedule,
    trajectory: Trajectory,
    sampler: str,
    nfe: int,
    *,
    teacher_sampler: str = "exp_ab3",
    teacher_steps: int = 100,
    sweeps: int = 3,
    evals: int = 7,
    context: Mapping[str, Any] | None = None,
) -> TunedGrid:
    """Tune a grid of ``sampler`` for at most ``nfe`` model evaluations (see the module doc).

    Args:
        schedule: the model's noise schedule.
        trajectory: runs a sampler on a grid from the same noise and conditions every time
            (``trajectory(sampler, times) -> (states, x0s, final)``); only the teacher's run
            needs its states and x0 estimates.
        sampler: one of :data:`TUNABLE`.
        nfe: model evaluations per sample allowed (Heun: ``(nfe + 1) // 2`` steps).
        teacher_sampler, teacher_steps: the reference integration (fine, log-SNR spaced).
        sweeps, evals: refinement passes over the levels and golden-section runs per level.
        context: what the caller tuned on, recorded with the grid.

    Returns:
        The grid, its error and the default grid's on the tuning noise, and its cost.
    """
    if sampler not in TUNABLE:
        raise ValueError(f"cannot tune {sampler!r}: only {', '.join(TUNABLE)} (deterministic)")
    steps = steps_for(sampler, nfe)
    if steps < 1:
        raise ValueError(f"nfe {nfe} allows no step of {sampler}")
    if teacher_steps < max(2 * steps, 10):
        least = max(2 * steps, 10)
        raise ValueError(f"teacher_steps must be at least max(2 * steps, 10) = {least}")
    default = timesteps(schedule, steps).tolist()
    fine = teacher_times(schedule, default[0], teacher_steps)
    states, x0s, reference = trajectory(teacher_sampler, fine)
    evaluations = nfe_of(teacher_sampler, len(fine))

    def run(name: str, times: Sequence[float]) -> Tensor:
        return trajectory(name, times)[2]

    default_error = _relative_error(run(sampler, default), reference)
    # Start the refinement from the best of the DP grid and a few standard spacings (each
    # moved to start where the default does): coordinate search only finds a nearby minimum.
    starts = [dp_grid(schedule, fine, states, x0s, reference, steps)]
    starts += [_starting_at(schedule, default[0], steps, *spacing) for spacing in _STARTS]
    scored = [(default_error, default)]
    scored += [(_relative_error(run(sampler, g), reference), g) for g in starts if g != default]
    runs = len(scored)
    start_error, start = min(scored, key=lambda pair: pair[0])
    times, error, made = refine_grid(
        schedule, run, sampler, start, reference, sweeps=sweeps, evals=evals,
        start_error=start_error,
    )  # fmt: skip
    evaluations += (runs + made) * nfe_of(sampler, steps)
    return TunedGrid(
        sampler=sampler,
        steps=steps,
        timesteps=tuple(times),
        error=error,
        default_error=default_error,
        model_evaluations=evaluations,
        teacher={"sampler": teacher_sampler, "steps": len(fine), "spacing": "logsnr"},
        context=dict(context or {}),
    )


# --------------------------------------------------------------------------- the file


def read_grids(folder: str | os.PathLike[str]) -> list[TunedGrid]:
    """The tuned grids stored in a checkpoint folder ([] when it has none).

    Raises:
        GridError: the file is not JSON, not the expected layout, or a record is invalid.
    """
    path = Path(folder) / GRIDS_NAME
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GridError(f"{path}: not a readable JSON file ({e})") from e
    if not isinstance(data, dict) or data.get("format") != GRIDS_FORMAT:
        raise GridError(f"{path}: not a polydiff grids file (format {GRIDS_FORMAT!r})")
    records = data.get("grids")
    if not isinstance(records, list):
        raise GridError(f"{path}: 'grids' must be a list")
    grids = []
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise GridError(f"{path}: grids[{index}] is not an object")
        try:
            grids.append(TunedGrid.from_json(record))
        except ValueError as e:
            raise GridError(f"{path}: grids[{index}]: {e}") from e
    return grids


def find_grid(grids: Sequence[TunedGrid], sampler: str, steps: int) -> TunedGrid | None:
    """The stored grid for ``sampler`` at ``steps`` steps, if any."""
    for grid in grids:
        if grid.sampler == sampler and grid.steps == steps:
            return grid
    return None


def write_grid(folder: str | os.PathLike[str], grid: TunedGrid) -> Path:
    """Store ``grid`` in ``folder``'s grids file, replacing one for the same sampler and
    steps; written beside the file and renamed into place (never half-written)."""
    path = Path(folder) / GRIDS_NAME
    kept = [g for g in read_grids(folder) if (g.sampler, g.steps) != (grid.sampler, grid.steps)]
    ordered = sorted([*kept, grid], key=lambda g: (g.sampler, g.steps))
    text = json.dumps({"format": GRIDS_FORMAT, "grids": [g.to_json() for g in ordered]}, indent=1)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text + "\n", encoding="utf-8")
    os.replace(partial, path)
    return path
