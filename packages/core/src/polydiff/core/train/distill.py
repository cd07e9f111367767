"""Consistency distillation of any trained polydiff denoiser (LCM: Luo et al. 2023).

A training config with a ``distill:`` section (:class:`~polydiff.core.train.config.DistillConfig`)
turns the run into a distillation of the checkpoint ``distill.teacher``: the trainer binds
:class:`Distillation`, a recipe that wraps the teacher's own modality (found by the name its
``config.json`` records, like any other run), and the rest of the run is the ordinary one:
DeepSpeed engine, EMA, checkpoints, exact resume, previews, ``final/``.

The objective (consistency distillation with iCT's lessons, Song & Dhariwal 2023):

- a noisy sample ``x_t = alpha_t x0 + sigma_t eps`` at model time ``t`` is what the modality's
  own loss feeds its denoiser: the wrapper runs the inner loss with a stand-in for the model
  that captures that call (``x_t``, ``t``, the conditioning and extra inputs, the padding
  mask) and stops it there, so every modality's batch preparation (latent encoding,
  normalisation, CFG dropout, image-to-video first frames, variable lengths) is reused as is;
- the frozen teacher takes one first-order ODE step (DDIM, in x0-space through its
  prediction type) from ``t`` to the level ``s`` one interval lower on a grid of
  ``ode_steps`` intervals (LCM's ``trailing`` grid for VP, the shifted ``flow_shift`` for
  flow: 40 intervals hold the 1, 2, 4 and 8-step grids exactly, which ``final/`` stores in
  its ``grids.json`` so lcm sampling lands on them), with
  classifier-free guidance at scale ``w`` folded in (the unconditional branch through the
  conditioner's null input);
- the target is the student's own x0 estimate at ``(x_s, s)`` without gradient (iCT: no
  separate EMA target network, which also keeps resume free of extra state), or the ODE
  state itself when ``s`` is the clean level (the boundary condition ``f(x, 0) = x``);
- the loss is the pseudo-Huber (or squared) distance between the student's x0 estimate at
  ``(x_t, t)`` and the target, per sample over its real (unpadded) elements.

The student is the teacher's class initialised from its weights (``lora_rank > 0``: frozen,
with trainable low-rank updates of its Linear and Conv weights, merged when ``final/`` is
written), so ``final/`` is a plain checkpoint of the teacher's modality; its model config
records ``sampler: lcm``, ``sample_steps`` (4) and ``guidance: 1`` (the guidance is in the
weights), and ``config.json`` records the distillation under ``distilled_from``.

Generation never imports this module.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Hashable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..ema import unwrap_model
from ..guidance import concat_cond
from ..modality.contract import GenerationRequest, Modality, load_modality
from ..modality.denoising import make_schedule, model_params
from ..predictions import model_output, to_x0
from ..pretrained import CONFIG_NAME, CheckpointError, from_pretrained
from ..sampling import timesteps
from ..schedules import Schedule
from ..step_grids import TunedGrid
from .config import DistillConfig, RunError, TrainConfig

__all__ = [
    "Distillation",
    "LoRA",
    "add_lora",
    "consistency_loss",
    "lcm_grids",
    "merge_lora",
    "previous_time",
    "student_config",
]

#: The record ``final/config.json`` gets about how the student was made.
RECORD_KEY = "distilled_from"


# --- the objective ----------------------------------------------------------------------------


def previous_time(schedule: Schedule, t: Tensor, ode_steps: int) -> tuple[Tensor, Tensor]:
    """The model time one teacher interval below ``t`` and whether that is the clean level.

    The ``ode_steps`` intervals: VP ``trailing`` times ``T - k T / N - 1`` (LCM's skipping-step
    grid), so the interval is ``T / N`` model-time units and the last one ends at the clean
    level; flow ``flow_shift`` times (the flow sampler's default grid), uniform in the unshifted
    time ``u`` with ``s = k u / (1 + (k-1) u)``. The few-step lcm grids on these intervals are
    stored beside the student (:func:`lcm_grids`), so generation samples exactly on them.

    Args:
        schedule: the teacher's schedule.
        t: (B,) model times.
        ode_steps: N, the number of intervals from pure noise to the clean level.

    Returns:
        ``(s, clean)``: (B,) float64 model times (meaningless where ``clean``) and (B,) bool.
    """
    tt = t.to(torch.float64)
    if schedule.kind == "vp":
        s = tt - schedule.train_steps / ode_steps
        return s, s < schedule.t_min
    k = schedule.shift
    frac = (tt / schedule.t_max).clamp(0.0, 1.0)
    u = frac / (k - (k - 1.0) * frac) - 1.0 / ode_steps  # unshift, step down one interval
    s = schedule.t_max * k * u / (1.0 + (k - 1.0) * u)
    return s, (u <= 0) | (s < schedule.t_min)


def lcm_grids(
    schedule: Schedule, ode_steps: int, steps: Sequence[int] = (1, 2, 4, 8)
) -> list[TunedGrid]:
    """The ``lcm`` grids of ``steps`` steps that lie on the distillation's intervals (every
    ``ode_steps / n``-th of them from the first), as records for the student's ``grids.json``.
    Step counts that do not divide ``ode_steps`` are left out."""
    first = float(timesteps(schedule, ode_steps, "trailing" if schedule.kind == "vp" else None)[0])
    chain = [first]
    while True:
        s, clean = previous_time(
            schedule, torch.tensor([chain[-1]], dtype=torch.float64), ode_steps
        )
        if bool(clean):
            break
        chain.append(float(s))
    return [
        TunedGrid(
            sampler="lcm",
            steps=n,
            timesteps=tuple(chain[:: ode_steps // n][:n]),
            error=None,
            default_error=None,
            model_evaluations=0,
            method=f"consistency distillation: every {ode_steps // n}th of {ode_steps} intervals",
        )
        for n in steps
        if ode_steps % n == 0 and n <= ode_steps
    ]


def _scales(schedule: Schedule, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """(alpha, sigma) at model times ``t`` (B,), float32, shaped (B, 1, ...) like ``like``."""
    shape = (-1,) + (1,) * (like.ndim - 1)
    tt = t.to(torch.float64)
    alpha = schedule.alpha(tt).view(shape).to(device=like.device, dtype=torch.float32)
    sigma = schedule.sigma(tt).view(shape).to(device=like.device, dtype=torch.float32)
    return alpha, sigma


def _x0(
    model: Any,
    x: Tensor,
    t: Tensor,
    scales: tuple[Tensor, Tensor],
    inputs: Mapping[str, Any],
    prediction: str,
    valid: Tensor | None,
) -> Tensor:
    """The model's clean-sample estimate (float32), exactly 0 at padding."""
    kwargs = dict(inputs) if valid is None else {**inputs, "valid": valid}
    out = model_output(model(x, t.to(torch.float32), **kwargs)).float()
    x0 = to_x0(out, x.float(), scales[0], scales[1], prediction)
    return x0 if valid is None else torch.where(valid, x0, 0.0)


def _guided_x0(
    teacher: Any,
    x: Tensor,
    t: Tensor,
    scales: tuple[Tensor, Tensor],
    cond: Mapping[str, Any],
    uncond: Mapping[str, Any],
    guidance: float,
    prediction: str,
    valid: Tensor | None,
) -> Tensor:
    """CFG in x0-space, ``u + w (c - u)``, with both branches in one batch (as sampling)."""
    if guidance == 1.0:
        return _x0(teacher, x, t, scales, cond, prediction, valid)
    both = concat_cond(cond, uncond, batch=x.shape[0])
    twice = (torch.cat([scales[0], scales[0]]), torch.cat([scales[1], scales[1]]))
    valid2 = None if valid is None else torch.cat([valid, valid])
    x0 = _x0(teacher, torch.cat([x, x]), torch.cat([t, t]), twice, both, prediction, valid2)
    cond_x0, uncond_x0 = x0.chunk(2)
    return torch.lerp(uncond_x0, cond_x0, guidance)


def _distance(
    estimate: Tensor, target: Tensor, valid: Tensor | None, distance: str, huber_c: float
) -> Tensor:
    """Mean over samples of the pseudo-Huber ``sqrt(m + c^2) - c`` (or just ``m``) of each
    sample's mean squared difference ``m`` over its real elements (iCT's distance, divided by
    the square root of the dimension so that ``c`` does not depend on the data's size)."""
    diff = estimate - target
    dims = tuple(range(1, diff.ndim))
    if valid is None:
        mean_square = (diff * diff).mean(dim=dims)
    else:
        mask = torch.broadcast_to(valid, diff.shape)
        diff = torch.where(mask, diff, 0.0)
        mean_square = (diff * diff).sum(dim=dims) / mask.sum(dim=dims).clamp(min=1)
    if distance == "mse":
        return mean_square.mean()
    return (torch.sqrt(mean_square + huber_c * huber_c) - huber_c).mean()


def consistency_loss(
    student: Any,
    teacher: Any,
    x: Tensor,
    t: Tensor,
    cond: Mapping[str, Any],
    uncond: Mapping[str, Any],
    *,
    schedule: Schedule,
    prediction: str,
    guidance: float,
    ode_steps: int,
    distance: str = "pseudo_huber",
    huber_c: float = 0.00054,
    valid: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The consistency-distillation loss of one batch of noisy samples.

    Args:
        student, teacher: ``model(x, t, **inputs)`` denoisers with the same prediction type;
            the teacher is run without gradient.
        x: (B, ...) noisy samples ``alpha_t x0 + sigma_t eps`` (0 at padding).
        t: (B,) their model times.
        cond: the model inputs of the conditional branch (tensors batch-first, B or 1).
        uncond: the same keys for the unconditional branch of the teacher's guidance.
        schedule, prediction: the teacher's.
        guidance: the CFG scale folded into the student (1: conditional only).
        ode_steps: intervals of the teacher ODE grid (see :func:`previous_time`).
        distance, huber_c: ``pseudo_huber`` (c per element) or ``mse``, on x0 estimates.
        valid: bool padding mask (B, ...) with ``x.ndim`` dims, True at real elements; the
            models get it as ``valid=`` and the distance ignores padding.

    Returns:
        The scalar loss and extras: ``boundary``, the share of samples whose target is the
        ODE state at the clean level.
    """
    s, clean = previous_time(schedule, t, ode_steps)
    s = s.clamp(min=schedule.t_min)  # where clean, any level: the student's value is unused
    at_t, at_s = _scales(schedule, t, x), _scales(schedule, s, x)
    is_clean = clean.view((-1,) + (1,) * (x.ndim - 1)).to(x.device)
    with torch.no_grad():
        x0 = _guided_x0(teacher, x, t, at_t, cond, uncond, guidance, prediction, valid)
        eps = (x.float() - at_t[0] * x0) / at_t[1]  # sigma_t > 0: t is never the clean level
        x_s = torch.where(is_clean, x0, at_s[0] * x0 + at_s[1] * eps)
        s_model = s.to(device=t.device, dtype=t.dtype)
        target = _x0(student, x_s.to(x.dtype), s_model, at_s, cond, prediction, valid)
        target = torch.where(is_clean, x_s, target)
    estimate = _x0(student, x, t, at_t, cond, prediction, valid)
    loss = _distance(estimate, target, valid, distance, huber_c)
    return loss, {"boundary": clean.double().mean()}


# --- LoRA -------------------------------------------------------------------------------------

_ADAPTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class LoRA(nn.Module):
    """A low-rank update of a frozen weight (Hu et al. 2021), as a parametrization:
    ``weight -> weight + alpha / rank * up @ down`` on the weight flattened to (out, rest), so
    a Conv's update is a ``rank``-channel conv with its kernel followed by a 1x1 one. ``up``
    starts at zero: the adapted layer starts equal to its base. Being a parametrization, it
    is in the weight wherever the layer's ``weight`` is read (not only in its forward)."""

    def __init__(self, weight: Tensor, rank: int, alpha: float) -> None:
        super().__init__()
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.down = nn.Parameter(torch.empty(rank, weight[0].numel(), **factory))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))  # nn.Linear's initialisation
        self.up = nn.Parameter(torch.zeros(weight.shape[0], rank, **factory))
        self.scale = float(alpha) / rank

    def forward(self, weight: Tensor) -> Tensor:
        return weight + (self.up @ self.down).view_as(weight) * self.scale


def add_lora(model: nn.Module, rank: int, alpha: float | None = None) -> list[str]:
    """Freeze ``model`` and give the weight of each trainable Linear / Conv layer a
    :class:`LoRA` of ``rank`` (``alpha`` default: ``rank``, a scale of 1), in place. Layers
    that were frozen already (a latent codec) are left alone.

    Returns:
        The names of the adapted layers.

    Raises:
        ValueError: ``rank`` < 1 or no layer to adapt.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    chosen = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, _ADAPTED) and module.weight.requires_grad
    ]
    if not chosen:
        raise ValueError(f"{type(model).__name__} has no trainable Linear or Conv layer")
    model.requires_grad_(False)
    for _, module in chosen:
        parametrize.register_parametrization(
            module, "weight", LoRA(module.weight, rank, alpha or rank)
        )
    return [name for name, _ in chosen]


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every :class:`LoRA` into its layer's weight, in place; returns ``model`` as the
    unadapted class's module (its state dict, its layer types), trainable again."""
    for module in list(model.modules()):
        if parametrize.is_parametrized(module, "weight") and any(
            isinstance(p, LoRA) for p in module.parametrizations["weight"]
        ):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return model.requires_grad_(True)


# --- the recipe -------------------------------------------------------------------------------


class _DenoiserCall(BaseException):
    """Carries the inner loss's denoiser call out of it. A BaseException, so that no
    ``except Exception`` in a modality's loss can swallow it."""

    def __init__(self, x: Tensor, t: Any, inputs: dict[str, Any]) -> None:
        super().__init__("denoiser call")
        self.x, self.t, self.inputs = x, t, inputs


class _Probe:
    """Stands in for the student in the inner modality's loss: attribute access and
    ``unwrap_model`` reach the student (``_orig_mod``, torch.compile's convention), so the
    loss prepares its batch as it would (``encode``, ``normalize``, ``model_params``);
    calling it raises :class:`_DenoiserCall` with the arguments."""

    def __init__(self, student: nn.Module) -> None:
        self._orig_mod = student

    def __getattr__(self, name: str) -> Any:
        return getattr(self._orig_mod, name)

    def __call__(self, x: Tensor, t: Any, **inputs: Any) -> Tensor:
        raise _DenoiserCall(x, t, inputs)


def student_config(model: Mapping[str, Any], settings: DistillConfig) -> dict[str, Any]:
    """The student's model config: the teacher's with lcm sampling defaults and guidance 1
    (the scale is folded into its weights)."""
    return {
        **copy.deepcopy(dict(model)),
        "sampler": "lcm",
        "sample_steps": int(settings.sample_steps),
        "guidance": 1.0,
    }


class Distillation(Modality):
    """The recipe of a ``distill:`` run: the teacher's modality with the consistency loss.

    Data (decode, bucket, collate), conditioning, previews, generation and export are the
    inner modality's, bound to the student's config (:func:`student_config`); ``build_model``
    is the teacher's class with the teacher's weights (and LoRA adapters when asked);
    ``loss`` is :func:`consistency_loss` on the noisy batch the inner loss prepares.
    """

    name = "distill"
    schema = DistillConfig
    statistics_batches: ClassVar[int] = 0  # the teacher's weights carry its fitted buffers

    def __init__(self, inner: Modality, settings: DistillConfig) -> None:
        super().__init__(inner.config)
        self.inner = inner
        self.settings = settings
        self.output_suffixes = inner.output_suffixes
        self._teacher: nn.Module | None = None

    @classmethod
    def from_train_config(cls, cfg: TrainConfig) -> Distillation:
        """The recipe of a checked config with a ``distill`` section."""
        if cfg.distill is None:
            raise ValueError("the config has no distill section")
        inner = load_modality(cfg.modality).from_config(student_config(cfg.model, cfg.distill))
        return cls(inner, cfg.distill)

    def __getstate__(self) -> dict[str, Any]:
        # Loader workers get the recipe pickled; they decode, they never need the teacher.
        return {**self.__dict__, "_teacher": None}

    # --- class level: a distillation reads the teacher modality's shards -------------------
    @classmethod
    def validate(cls, raw: Any) -> dict[str, Any]:
        raise TypeError("a distillation is configured by a training config's distill section")

    @classmethod
    def source(cls, folder: Path) -> Iterator[dict[str, Any]]:
        raise TypeError("a distillation trains on shards of its teacher's modality; make them "
                        "with `polydiff data make-shards --modality <the teacher's>`")  # fmt: skip

    # --- data and conditioning: the inner modality's -----------------------------------------
    def decode(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        return self.inner.decode(sample)

    def bucket(self, sample: Mapping[str, Any]) -> Hashable | None:
        return self.inner.bucket(sample)

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return self.inner.collate(samples)

    def conditioner(self, device: str | None = None, dtype: torch.dtype | None = None) -> Any:
        return self.inner.conditioner(device, dtype)

    # --- the student and the teacher ---------------------------------------------------------
    def _read_teacher(self, cls: type[nn.Module]) -> nn.Module:
        """The teacher's weights in a fresh ``cls`` (on forked RNGs: building a module draws
        random numbers, which would shift the training RNGs of a resumed run)."""
        with torch.random.fork_rng(devices=[]):
            try:
                return from_pretrained(self.settings.teacher, cls)
            except CheckpointError as e:
                raise RunError(f"distill.teacher: {e}") from e

    def build_model(self) -> nn.Module:
        """The inner modality's model with the teacher's weights (the architectures must be
        equal: a ``model:`` override that changes them is refused), LoRA-adapted when
        ``lora_rank > 0``."""
        student = self.inner.build_model()
        teacher = self._read_teacher(type(student))
        mine, theirs = getattr(student, "config", {}), teacher.config
        differ = sorted(
            k
            for k in set(mine) | set(theirs)
            if k != "gradient_checkpointing" and mine.get(k) != theirs.get(k)
        )
        if differ:
            raise RunError(
                f"distill: the student's {type(student).__name__} differs from the teacher's "
                f"in {', '.join(differ)}; the model: section may not change the architecture"
            )
        student.load_state_dict(teacher.state_dict())
        if self.settings.lora_rank > 0:
            add_lora(student, self.settings.lora_rank, self.settings.lora_alpha)
        return student

    def parts(self, model: nn.Module) -> dict[str, nn.Module]:
        found = self.inner.parts(model)
        if list(found) != ["model"] or found["model"] is not model:
            raise RunError(
                f"distill: {type(self.inner).__name__} trains the parts {', '.join(found)}; "
                "only one-part denoisers can be distilled"
            )
        return found

    def teacher(self, like: nn.Module) -> nn.Module:
        """The frozen teacher in eval mode, where ``like``'s parameters are (loaded once)."""
        device, dtype = model_params(like)
        if self._teacher is None or model_params(self._teacher) != (device, dtype):
            teacher = self._read_teacher(type(unwrap_model(like)))
            self._teacher = teacher.to(device=device, dtype=dtype).eval().requires_grad_(False)
        return self._teacher

    # --- training ----------------------------------------------------------------------------
    def loss(
        self, model: nn.Module, batch: Mapping[str, Any], generator: torch.Generator, part: str
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """:func:`consistency_loss` of the noisy batch the inner loss feeds its denoiser."""
        inner_name = type(self.inner).__name__
        try:
            self.inner.loss(_Probe(model), batch, generator, part)
        except _DenoiserCall as call:
            x, t, inputs = call.x, call.t, call.inputs
        else:
            raise RunError(f"distill: {inner_name}.loss never called its denoiser model(x, t)")
        if not (isinstance(t, Tensor) and t.shape == (x.shape[0],)):
            raise RunError(
                f"distill: {inner_name}.loss called its model with no (B,) model time as the "
                "second argument; is the teacher a denoiser?"
            )
        valid = inputs.pop("valid", None)
        device, dtype = model_params(model)
        null = self.inner.conditioner().null(device, dtype)
        uncond = {k: null.get(k, v) for k, v in inputs.items()}  # extras shared, as sampling
        cfg, scale = self.config, self.settings.guidance
        return consistency_loss(
            model,
            self.teacher(model),
            x,
            t,
            inputs,
            uncond,
            schedule=make_schedule(cfg),
            prediction=cfg["prediction"],
            guidance=1.0 if scale is None else float(scale),
            ode_steps=self.settings.ode_steps,
            distance=self.settings.distance,
            huber_c=self.settings.huber_c,
            valid=valid,
        )

    def preview(self, model: nn.Module, out_dir: Path, step: int) -> list[Path]:
        """The inner modality's previews, sampled as the student is (lcm, few steps)."""
        return self.inner.preview(model, out_dir, step)

    def final(self, model: nn.Module) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
        """What ``final/`` holds: the EMA student with LoRA merged (the teacher's class), its
        model config and the ``distilled_from`` record for ``config.json``."""
        teacher = Path(self.settings.teacher)
        record = json.loads((teacher / CONFIG_NAME).read_text(encoding="utf-8"))
        made = {
            **dataclasses.asdict(self.settings),
            "teacher_checkpoint_id": record.get("checkpoint_id"),
            "teacher_sampling": {k: record["model"].get(k)
                                 for k in ("sampler", "sample_steps", "guidance")},
        }  # fmt: skip
        return merge_lora(model), dict(self.config), {RECORD_KEY: made}

    # --- generation: the inner modality's ----------------------------------------------------
    def check_request(self, request: GenerationRequest) -> None:
        self.inner.check_request(request)

    def generate(self, model: nn.Module, request: GenerationRequest) -> list[Any]:
        return self.inner.generate(model, request)

    def output_metadata(self, request: GenerationRequest) -> dict[str, Any]:
        return self.inner.output_metadata(request)

    def export(
        self, outputs: Sequence[Any], paths: Sequence[Path], metadata: Sequence[Mapping[str, Any]]
    ) -> list[Path]:
        return self.inner.export(outputs, paths, metadata)
