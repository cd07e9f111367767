"""Generation, the same for every modality: request checks, sampling defaults, seeded noise,
guidance against the null input or a negative prompt, batches, progress, files with their
provenance.

Two layers:

- :func:`denoise` samples one batch of outputs from a denoiser in the space it diffuses; a
  modality's ``generate`` and ``preview`` call it with their shape and extra inputs.
- :func:`generate` and :func:`generate_files` run a whole :class:`GenerationRequest`: check it
  (before anything is loaded), load the checkpoint (bundled by default), call the modality's
  ``generate`` under inference mode, and (files) export every output with how it was made.

The grid: ``request.timesteps`` when given, else a grid that ``polydiff tune-steps`` stored
beside the checkpoint's weights for the sampler and step count (:mod:`polydiff.core.step_grids`),
else the schedule's default spacing; every output records which (``grid``) and its model times.

Same seed, same output: the starting noise of all outputs is drawn at once from ``seed`` on
the CPU, so an output depends on its position in the request and the seed only, whatever the
device or batch size (ancestral samplers also draw per step from the same generator, so for
them the batch size matters too).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..guidance import CFG
from ..sampling import SAMPLERS, make_grid, sample, timesteps
from ..step_grids import GRIDS_NAME, TunedGrid, find_grid, read_grids
from .conditioning import Conditioner
from .contract import DTYPES, GenerationRequest, Modality, load_modality
from .denoising import make_schedule, model_params

__all__ = [
    "MAX_GUIDANCE",
    "MAX_OUTPUTS",
    "MAX_SEED",
    "MAX_STEPS",
    "Generated",
    "RequestError",
    "Sampling",
    "SamplingCaptured",
    "capture_sampling",
    "check_request",
    "denoise",
    "generate",
    "generate_files",
    "time_ranges",
]

#: Guidance scales above this only saturate; the same limit for the CLI and the Python API.
MAX_GUIDANCE = 50.0
#: Sampler steps beyond the schedules' 1000 training steps cannot be placed on them.
MAX_STEPS = 1000
#: Outputs of one request (prompts x num): the starting noise of all of them is drawn at once.
MAX_OUTPUTS = 10_000
#: Seeds are 64-bit (torch.Generator.manual_seed).
MAX_SEED = 2**63 - 1


class RequestError(ValueError):
    """A bad request option; ``option`` is its Python name (the CLI names it ``--option``)."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(message)
        self.option = option


@dataclass(frozen=True)
class Sampling:
    """Resolved sampling options of one generation (or preview).

    ``timesteps`` is the grid's model times (None: the schedule's default spacing for
    ``steps``); ``grid`` says where it came from: ``default``, ``tuned`` (stored by
    ``polydiff tune-steps``; ``tuned`` then holds its record) or ``given``.
    """

    steps: int
    sampler: str
    guidance: float
    negative_prompt: str | None = None
    batch_size: int = 16
    progress: bool = False
    timesteps: tuple[float, ...] | None = None
    grid: str = "default"
    tuned: TunedGrid | None = field(default=None, compare=False)

    @classmethod
    def resolve(
        cls,
        config: Mapping[str, Any],
        request: GenerationRequest | None = None,
        default_batch_size: int = 16,
    ) -> Sampling:
        """The request's options, ``None`` ones taken from the model config's defaults
        (``sample_steps``, ``sampler``, ``guidance``), and the grid (see the module doc: the
        stored grids are those of ``request.checkpoint``)."""
        if request is None:
            request = GenerationRequest(prompts=("",))
        given = request.timesteps
        steps = request.steps
        if steps is None:
            steps = len(given) if given else int(config["sample_steps"])
        sampler = str(config["sampler"]) if request.sampler is None else request.sampler
        guidance = float(config["guidance"]) if request.guidance is None else request.guidance
        _check_sampling(steps, sampler, guidance)
        grid, chosen, tuned = "default", None, None
        if given:
            grid, chosen = "given", tuple(float(v) for v in given)
            try:
                make_grid(make_schedule(config), chosen)
            except ValueError as e:
                raise RequestError("timesteps", str(e)) from e
        elif request.checkpoint is not None:
            tuned = find_grid(stored_grids(request.checkpoint), sampler, steps)
            if tuned is not None:
                grid, chosen = "tuned", tuned.timesteps
        return cls(
            steps=steps,
            sampler=sampler,
            guidance=float(guidance),
            negative_prompt=request.negative_prompt,
            batch_size=request.batch_size or default_batch_size,
            progress=request.progress,
            timesteps=chosen,
            grid=grid,
            tuned=tuned,
        )

    def record(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """How the grid was chosen, for an output's provenance: ``grid`` and the model times
        (``timesteps``), with a tuned grid's method and errors (``tuned_grid``)."""
        times = self.timesteps
        if times is None:
            times = tuple(timesteps(make_schedule(config), self.steps).tolist())
        record: dict[str, Any] = {"grid": self.grid, "timesteps": [round(t, 6) for t in times]}
        if self.tuned is not None:
            record["tuned_grid"] = {
                "method": self.tuned.method,
                "error": self.tuned.error,
                "default_error": self.tuned.default_error,
                "teacher": dict(self.tuned.teacher),
            }
        return record


def stored_grids(folder: str | Path) -> list[TunedGrid]:
    """The tuned grids of a checkpoint folder (read once per file version; GridError if the
    file is corrupt)."""
    path = Path(folder) / GRIDS_NAME
    try:
        stat = path.stat()
    except OSError:
        return []
    return _read_grids_cached(str(path.parent.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=64)
def _read_grids_cached(folder: str, mtime_ns: int, size: int) -> list[TunedGrid]:
    return read_grids(folder)


def _check_sampling(steps: Any, sampler: Any, guidance: Any) -> None:
    if sampler is not None and sampler not in SAMPLERS:
        valid = ", ".join(SAMPLERS)
        raise RequestError("sampler", f"unknown sampler {sampler!r}; valid: {valid}")
    if steps is not None:
        _positive_int("steps", steps)
        if steps > MAX_STEPS:
            raise RequestError("steps", f"steps must be at most {MAX_STEPS}, got {steps}")
    if guidance is not None and (
        isinstance(guidance, bool)
        or not isinstance(guidance, int | float)
        or not math.isfinite(guidance)
        or not 0 <= guidance <= MAX_GUIDANCE
    ):
        limit = f"[0, {MAX_GUIDANCE:g}]"
        raise RequestError("guidance", f"guidance must be a number in {limit}, got {guidance!r}")


def time_ranges(text: str, option: str = "keep") -> list[tuple[float, float]]:
    """``"0:1.5"`` or ``"0:1.5,3:4"`` -> [(0.0, 1.5), (3.0, 4.0)] seconds: the ranges an
    inpainting option keeps (RequestError naming ``option``)."""
    ranges = []
    for part in str(text).split(","):
        start, sep, stop = part.strip().partition(":")
        try:
            a, b = float(start), float(stop)
        except ValueError:
            a = b = math.nan
        if not sep or not (math.isfinite(a) and math.isfinite(b)) or not 0 <= a < b:
            raise RequestError(
                option, f"{option} {text!r}: expected START:STOP seconds with 0 <= START < STOP"
            )
        ranges.append((a, b))
    return ranges


def _check_timesteps(given: Any, steps: int | None) -> None:
    """An explicit grid: 1 to MAX_STEPS finite model times, strictly decreasing, >= 0 (the
    schedule's range is checked once the checkpoint is loaded)."""
    if given is None:
        return
    values = list(given) if isinstance(given, list | tuple) else None
    if (
        not values
        or len(values) > MAX_STEPS
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        or not all(math.isfinite(v) and v >= 0 for v in values)
        or any(b >= a for a, b in itertools.pairwise(values))
    ):
        raise RequestError(
            "timesteps",
            f"timesteps must be 1 to {MAX_STEPS} finite model times >= 0, strictly "
            f"decreasing, got {given!r}",
        )
    if steps is not None and steps != len(values):
        raise RequestError("steps", f"steps {steps} but {len(values)} timesteps given")


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RequestError(name, f"{name} must be an integer >= 1, got {value!r}")


def check_device(device: str) -> torch.device:
    """``cpu``, ``cuda[:N]`` or ``mps``, available on this machine (ValueError otherwise)."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a device (cpu, cuda, cuda:N, mps)") from e
    if parsed.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {device!r}: expected cpu, cuda, cuda:N or mps")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: no CUDA GPU is available here; use --device cpu")
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} GPU(s) here")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: MPS is not available here; use --device cpu")
    return parsed


def check_request(modality: type[Modality], request: GenerationRequest) -> None:
    """Refuse a bad request with one ValueError line, before anything is loaded."""
    prompts = request.prompts
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise RequestError("prompt", "prompts must be a sequence of strings")
    if not [p for p in prompts if p.strip()]:
        raise RequestError("prompt", "no prompt given: pass at least one non-empty prompt")
    if request.negative_prompt is not None and not isinstance(request.negative_prompt, str):
        raise RequestError("negative_prompt", "the negative prompt must be a string")
    _positive_int("num", request.num)
    if len(prompts) * request.num > MAX_OUTPUTS:
        raise RequestError(
            "num",
            f"{len(prompts)} prompt(s) x num {request.num} is more than {MAX_OUTPUTS} outputs "
            "in one call; split the request",
        )
    if request.batch_size is not None:
        _positive_int("batch_size", request.batch_size)
    seed = request.seed
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise RequestError("seed", f"seed must be an integer in [0, 2**63 - 1], got {seed!r}")
    _check_sampling(request.steps, request.sampler, request.guidance)
    _check_timesteps(request.timesteps, request.steps)
    if request.dtype not in DTYPES:
        valid = ", ".join(DTYPES)
        raise RequestError("dtype", f"dtype {request.dtype!r} is not one of {valid}")
    try:
        check_device(request.device)
    except ValueError as e:
        raise RequestError("device", str(e)) from e
    known = {option.name for option in modality.generate_options}
    unknown = sorted(set(request.options) - known)
    if unknown:
        valid = ", ".join(sorted(known)) or "none"
        raise ValueError(f"unknown {modality.name} option(s) {', '.join(unknown)}; valid: {valid}")
    if request.checkpoint is not None and not Path(request.checkpoint).is_dir():
        raise RequestError("checkpoint", f"checkpoint folder not found: {request.checkpoint}")


class SamplingCaptured(Exception):
    """Raised by :func:`denoise` inside :func:`capture_sampling` once it has sampled: what
    follows (decoding, export) is skipped."""


@dataclass
class Capture:
    """What :func:`capture_sampling` recorded of the first :func:`denoise` call: the final
    samples (N, *shape) and, per evaluated level, the sampler's state and x0 estimate."""

    final: Tensor | None = None
    states: list[Tensor] = field(default_factory=list)
    x0s: list[Tensor] = field(default_factory=list)


_CAPTURE: contextvars.ContextVar[Capture | None] = contextvars.ContextVar(
    "polydiff_capture", default=None
)


@contextlib.contextmanager
def capture_sampling() -> Iterator[Capture]:
    """Run a modality's ``generate`` only as far as its first sampling pass, and record it.

    Inside, the first :func:`denoise` call stores its samples in the model's space (and the
    state and x0 estimate at every level) in the yielded :class:`Capture`, then raises
    :class:`SamplingCaptured`, which this context swallows. ``polydiff tune-steps`` scores
    grids this way for any modality, without decoding or exporting anything.
    """
    capture = Capture()
    token = _CAPTURE.set(capture)
    try:
        yield capture
    except SamplingCaptured:
        pass
    finally:
        _CAPTURE.reset(token)


def _progress_bar(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    # disable=None hides the bar when stderr is no terminal (logs, CI).
    return tqdm(total=total, disable=None if enabled else True, unit="step", leave=False)


def denoise(
    model: nn.Module,
    config: Mapping[str, Any],
    conditioner: Conditioner,
    prompts: Sequence[Any],
    shape: Sequence[int],
    options: Sampling,
    *,
    generator: torch.Generator,
    extra: Mapping[str, Tensor] | None = None,
    init: Tensor | None = None,
    mask: Tensor | None = None,
    valid: Tensor | None = None,
    clip_x0: float | None = None,
) -> Tensor:
    """Sample one output per prompt in the model's space: (N, *shape) float32 on the CPU.

    Args:
        model: the denoiser (eval mode); it runs where its parameters are.
        config: its validated model config (schedule, prediction).
        conditioner: encodes ``prompts`` and the null input (or ``options.negative_prompt``,
            the unconditional branch of guidance when given).
        prompts: N prompts (or labels / vectors, whatever the conditioner encodes).
        shape: one output's shape in the model's space, e.g. (C, H, W).
        options: steps, sampler, guidance (1 = conditional only), batch size, progress.
        generator: a CPU generator; the noise of all N outputs is drawn from it at once.
        extra: batch-first (N, ...) model inputs given to both guidance branches (e.g. a
            video's first frame).
        init, mask: (N, *shape) known content and (N, ...) mask, 0 where ``init`` is kept
            (inpainting; see ``polydiff.core.sample``).
        valid: (N, ...) broadcastable to the output, 1 at real positions (variable length):
            padding stays 0 and guidance statistics ignore it.
        clip_x0: clamp x0 estimates to [-clip_x0, clip_x0] (pixels), None for latents.
    """
    device, dtype = model_params(model)
    count = len(prompts)
    noise = torch.randn((count, *shape), generator=generator)
    schedule = make_schedule(config)
    guided = options.guidance != 1.0
    uncond_base: dict[str, Tensor] | None = None
    if guided:
        negative = options.negative_prompt
        uncond_base = (
            conditioner.encode([negative], device, dtype)
            if negative
            else conditioner.null(device, dtype)
        )
    batch = max(1, options.batch_size)
    bar = _progress_bar(options.steps * math.ceil(count / batch), options.progress)
    capture = _CAPTURE.get()
    states: list[list[Tensor]] = []  # per batch, per level (only when capturing)
    x0s: list[list[Tensor]] = []
    outputs = []
    try:
        for start in range(0, count, batch):
            part = slice(start, min(start + batch, count))
            size = part.stop - part.start
            cond: dict[str, Any] = dict(conditioner.encode(list(prompts[part]), device, dtype))
            uncond = None
            if uncond_base is not None:
                uncond = {k: v.expand(size, *v.shape[1:]) for k, v in uncond_base.items()}
            for key, value in (extra or {}).items():
                cond[key] = value[part].to(device=device)
                if uncond is not None:
                    uncond[key] = cond[key]
            kwargs: dict[str, Any] = {}
            if valid is not None:
                kwargs["valid"] = valid[part].to(device=device)

            if capture is not None:
                states.append([])
                x0s.append([])

            def on_step(_i: int, _t: float, x: Tensor, x0: Tensor) -> None:
                bar.update(1)
                if capture is not None:
                    states[-1].append(x.float().cpu())
                    x0s[-1].append(x0.float().cpu())

            x = sample(
                model,
                noise[part].to(device=device, dtype=dtype),
                schedule=schedule,
                sampler=options.sampler,
                steps=options.steps,
                prediction=config["prediction"],
                guidance=CFG(options.guidance) if guided else None,
                cond=cond,
                uncond=uncond,
                init=None if init is None else init[part].to(device=device, dtype=dtype),
                mask=None if mask is None else mask[part].to(device=device, dtype=dtype),
                clip_x0=clip_x0,
                timesteps=options.timesteps,
                generator=generator,
                callback=on_step,
                **kwargs,
            )
            outputs.append(x.float().cpu())
    finally:
        bar.close()
    result = torch.cat(outputs) if outputs else torch.zeros((0, *shape))
    if capture is not None:
        capture.final = result
        capture.states = [torch.cat(level) for level in zip(*states, strict=True)]
        capture.x0s = [torch.cat(level) for level in zip(*x0s, strict=True)]
        raise SamplingCaptured
    return result


@dataclass(frozen=True)
class Generated:
    """What :func:`generate` made: one output and one provenance record per repeated prompt."""

    outputs: list[Any]
    metadata: list[dict[str, Any]]
    modality: Modality
    checkpoint: Path


def _modality_class(modality: type[Modality] | str) -> type[Modality]:
    return load_modality(modality) if isinstance(modality, str) else modality


def generate(modality: type[Modality] | str, request: GenerationRequest) -> Generated:
    """Run ``request`` with ``modality``'s checkpoint (``request.checkpoint``, or the bundled
    one) under inference mode.

    Raises:
        ValueError: a bad request (before anything is loaded) or bad modality options.
        FileNotFoundError: no checkpoint given and none bundled.
        CheckpointError: a missing, corrupt or other-modality checkpoint.
    """
    cls = _modality_class(modality)
    check_request(cls, request)
    return _generate_checked(cls, request)


def _generate_checked(cls: type[Modality], request: GenerationRequest) -> Generated:
    from ..provenance import provenance
    from .checkpoint import bundled_checkpoint, load_trained

    folder = bundled_checkpoint(cls) if request.checkpoint is None else Path(request.checkpoint)
    # The modality resolves its sampling options from the request: name the folder there so
    # the grids stored beside its weights are found (and a corrupt grids file is refused now).
    request = replace(request, checkpoint=str(folder))
    stored_grids(folder)
    model, bound = load_trained(folder, cls, request.device, request.torch_dtype)
    bound.check_request(request)
    options = Sampling.resolve(bound.config, request)
    with torch.inference_mode():
        outputs = list(bound.generate(model, request))
    resolved = {**request.options, **bound.output_metadata(request), **options.record(bound.config)}
    extras = {k: v for k, v in resolved.items() if v is not None}
    metadata = [
        provenance(
            modality=cls.name,
            prompt=prompt,
            negative_prompt=request.negative_prompt,
            index=index % request.num,
            seed=request.seed,
            sampler=options.sampler,
            steps=options.steps,
            guidance=options.guidance,
            checkpoint=str(folder),
            device=request.device,
            dtype=request.dtype,
            **extras,
        )
        for index, prompt in enumerate(request.repeated)
    ]
    return Generated(outputs, metadata, bound, folder)


def generate_files(
    modality: type[Modality] | str, request: GenerationRequest, out: str | Path
) -> list[Path]:
    """:func:`generate`, then write every output: ``out`` when there is one, else ``out``'s
    stem + ``_0``, ``_1`` ... in ``request.repeated`` order (prompt by prompt, ``num`` each),
    each with its provenance embedded and in a sidecar JSON. ``out`` is checked (suffix,
    folder) before anything is sampled."""
    from ..provenance import check_output

    cls = _modality_class(modality)
    check_request(cls, request)
    paths = check_output(out, cls.output_suffixes, len(request.prompts) * request.num)
    made = _generate_checked(cls, request)
    return made.modality.export(made.outputs, paths, made.metadata)
