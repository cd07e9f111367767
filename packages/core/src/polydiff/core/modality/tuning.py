"""``polydiff tune-steps``: a step grid tuned to one trained checkpoint, for any modality.

The modality's own ``generate`` is run inside :func:`~.generation.capture_sampling`, so the
grid is scored on exactly what generation samples (its shapes, conditions, guidance, padding
and inpainting inputs) in the model's space, and nothing is decoded; the search itself is
:func:`polydiff.core.step_grids.tune_grid`. The grid is stored beside the weights
(``grids.json``), where generation finds it when sampler and step count match.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from ..pretrained import CONFIG_NAME, CheckpointError
from ..step_grids import TUNABLE, TunedGrid, steps_for, tune_grid, write_grid
from .checkpoint import load_trained
from .contract import GenerationRequest, Modality, load_modality
from .denoising import make_schedule
from .generation import MAX_OUTPUTS, RequestError, Sampling, capture_sampling, check_request

__all__ = ["MAX_TUNING_OUTPUTS", "checkpoint_modality", "tune_steps"]

#: Samples scored per candidate grid: tuning runs the sampler hundreds of times on all of them.
MAX_TUNING_OUTPUTS = 256


def checkpoint_modality(folder: str | Path) -> type[Modality]:
    """The modality class a trained checkpoint records (``config.json``'s ``modality``).

    Raises:
        CheckpointError: no folder, no readable config, or no recorded modality.
    """
    path = Path(folder) / CONFIG_NAME
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint config ({e})") from e
    name = record.get("modality") if isinstance(record, dict) else None
    if not isinstance(name, str) or ":" in name:
        raise CheckpointError(f"{path} records no installed modality ('modality' key)")
    return load_modality(name)


def tune_steps(
    request: GenerationRequest,
    sampler: str,
    nfe: int,
    *,
    teacher_steps: int = 100,
    sweeps: int = 2,
    evals: int = 7,
    write: bool = True,
) -> TunedGrid:
    """Tune a grid of ``sampler`` for ``nfe`` evaluations to ``request.checkpoint``.

    The request says what to tune on: its prompts x ``num`` outputs from ``seed``, its
    guidance (default: the checkpoint's), negative prompt and modality options. Stored in the
    checkpoint folder when ``write``.

    Raises:
        ValueError: a bad request, sampler, nfe or teacher setting (before loading anything).
        CheckpointError: a missing or unreadable checkpoint.
    """
    if request.checkpoint is None:
        raise RequestError("checkpoint", "tune-steps needs --checkpoint DIR (it writes there)")
    if sampler not in TUNABLE:
        raise RequestError(
            "sampler", f"cannot tune {sampler!r}: one of {', '.join(TUNABLE)} (deterministic)"
        )
    if isinstance(nfe, bool) or not isinstance(nfe, int) or not 1 <= nfe <= 100:
        raise RequestError("nfe", f"nfe must be an integer in [1, 100], got {nfe!r}")
    steps = steps_for(sampler, nfe)
    if steps < 1:
        raise RequestError("nfe", f"nfe {nfe} allows no step of {sampler}")
    if not isinstance(teacher_steps, int) or not max(2 * steps, 10) <= teacher_steps <= 1000:
        raise RequestError(
            "teacher_steps",
            f"teacher steps must be an integer in [{max(2 * steps, 10)}, 1000], "
            f"got {teacher_steps!r}",
        )
    for name, value, top in (("sweeps", sweeps, 10), ("evals", evals, 20)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
            raise RequestError(name, f"{name} must be an integer in [1, {top}], got {value!r}")
    outputs = len(request.prompts) * request.num
    if outputs > min(MAX_TUNING_OUTPUTS, MAX_OUTPUTS):
        raise RequestError(
            "num", f"tune on at most {MAX_TUNING_OUTPUTS} outputs (prompts x num), got {outputs}"
        )
    cls = checkpoint_modality(request.checkpoint)
    request = replace(request, sampler=sampler, steps=steps, progress=False)
    check_request(cls, request)
    model, bound = load_trained(request.checkpoint, cls, request.device, request.torch_dtype)
    bound.check_request(request)
    base = Sampling.resolve(bound.config, replace(request, checkpoint=None))
    # One batch of every output: the trajectory of one denoise call is then all of them.
    request = replace(request, batch_size=outputs, guidance=base.guidance)

    def trajectory(name: str, times: Sequence[float]) -> tuple[list[Tensor], list[Tensor], Tensor]:
        run = replace(request, sampler=name, steps=len(times), timesteps=tuple(times))
        with torch.inference_mode(), capture_sampling() as captured:
            bound.generate(model, run)
        if captured.final is None:
            raise RuntimeError(f"the {cls.name} modality's generate never sampled")
        return captured.states, captured.x0s, captured.final

    grid = tune_grid(
        make_schedule(bound.config),
        trajectory,
        sampler,
        nfe,
        teacher_steps=teacher_steps,
        sweeps=sweeps,
        evals=evals,
        context={
            "modality": cls.name,
            "prompts": list(request.prompts),
            "num": request.num,
            "seed": request.seed,
            "guidance": base.guidance,
            "negative_prompt": request.negative_prompt,
            "options": {k: str(v) for k, v in request.options.items()},
        },
    )
    if write:
        write_grid(request.checkpoint, grid)
    return grid
