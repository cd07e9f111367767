"""Text-to-motion generation from a checkpoint written by ``polydiff train``, and editing
through the core's inpainting sampler. Inference only: nothing here imports the trainer.

A request's motions are ``seconds`` long (default: the config's ``sample_seconds``; with
``keyframes``, the keyframe file's length). The sampler denoises (263, T) normalised features;
they are denormalised and the joints recovered from them
(:func:`polydiff.motion.features.features_to_joints`).

Editing (``keyframes FILE``, a motion file: (T, 22, 3) joints NPY, (T, 263) features NPY or
BVH): the file's features are the sampler's known content and the model regenerates the rest
in harmony with it (:func:`polydiff.core.sample`'s ``init`` and ``mask``):

- *in-betweening*: the kept frames are the file's finite ones (joint or feature rows of NaN
  are to be generated), or those within ``keep`` (seconds, ``0:0.5,3.5:4``);
- *body-part editing*: ``regenerate upper_body`` (or ``lower_body``, ``left_arm``,
  ``right_arm``, ``arms``, ``legs``; comma-separated) regenerates those joints' channels at
  every frame and keeps the rest (the legs and the root's path, for ``upper_body``).

Kept channels come out exactly as the file's features. After sampling, the root's turns and
velocities in each generated stretch are corrected (spread evenly over the stretch) so that
integrating them lands exactly on the next kept frame's root: kept frames' joints are then the
file's exactly, in world space too. Joints from a joint or BVH file come back in the file's
own coordinates (features are always in HumanML3D's canonical place).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Unpack

import numpy as np
import torch
from torch import nn

from polydiff.core.ema import unwrap_model
from polydiff.core.modality import (
    Conditioner,
    GenerationRequest,
    RequestError,
    RequestOptions,
    Sampling,
    TextConditioner,
    denoise,
    model_params,
    time_ranges,
)
from polydiff.core.modality import generate as generate_request

from .config import MAX_SECONDS
from .data import BadMotion, read_motion
from .export import Motion
from .features import (
    FEATURES,
    FPS,
    canonical_transform,
    features_to_joints,
    joint_mask,
    joints_to_features,
    root_trajectory,
)
from .skeleton import JOINT_NAMES, LOWER_BODY, NUM_JOINTS

__all__ = [
    "BATCH_SIZE",
    "BODY_PARTS",
    "MAX_TOTAL_FRAMES",
    "MIN_SECONDS",
    "NPY_CONTENTS",
    "Keyframes",
    "MotionOptions",
    "check_motion_options",
    "generate",
    "generate_motions",
    "read_keyframes",
    "resolved_frames",
    "sample_motions",
]

BATCH_SIZE = 16  # motions per sampling batch (the default of --batch-size)
MIN_SECONDS = 1.0
#: Frames one call samples (outputs x frames): their noise and features are held at once
#: (~260 MB of float32 noise).
MAX_TOTAL_FRAMES = 2**18
NPY_CONTENTS = ("joints", "features")
_ARM = {side: tuple(JOINT_NAMES.index(f"{side}_{j}") for j in ("collar", "shoulder", "elbow",
        "wrist")) for side in ("left", "right")}  # fmt: skip
#: Body parts ``regenerate`` names -> their joints.
BODY_PARTS: dict[str, tuple[int, ...]] = {
    "upper_body": tuple(j for j in range(NUM_JOINTS) if j not in LOWER_BODY),
    "lower_body": LOWER_BODY,
    "legs": tuple(j for j in LOWER_BODY if j != 0),
    "arms": _ARM["left"] + _ARM["right"],
    "left_arm": _ARM["left"],
    "right_arm": _ARM["right"],
}


class MotionOptions(RequestOptions, total=False):
    """Motion's own options of :func:`generate` (CLI: ``--seconds`` ...)."""

    seconds: float
    keyframes: str | Path
    keep: str
    regenerate: str
    npy: str


# --- options ---------------------------------------------------------------------------------
def _parts(text: str) -> list[str]:
    names = [p.strip() for p in str(text).split(",") if p.strip()]
    unknown = [n for n in names if n not in BODY_PARTS]
    if not names or unknown:
        raise RequestError(
            "regenerate",
            f"regenerate {text!r}: expected body parts among {', '.join(BODY_PARTS)}",
        )
    return names


def check_motion_options(options: Mapping[str, Any]) -> None:
    """Refuse bad motion options with one line, before anything is loaded."""
    seconds = options.get("seconds")
    if seconds is not None and (
        isinstance(seconds, bool)
        or not isinstance(seconds, int | float)
        or not math.isfinite(seconds)
        or not MIN_SECONDS <= seconds <= MAX_SECONDS
    ):
        raise RequestError(
            "seconds", f"seconds must be in [{MIN_SECONDS:g}, {MAX_SECONDS:g}], got {seconds!r}"
        )
    npy = options.get("npy")
    if npy is not None and npy not in NPY_CONTENTS:
        raise RequestError("npy", f"npy must be one of {', '.join(NPY_CONTENTS)}, got {npy!r}")
    keyframes = options.get("keyframes")
    if keyframes is None:
        for name in ("keep", "regenerate"):
            if options.get(name) is not None:
                raise RequestError(name, f"{name} needs keyframes: the motion file to edit")
        return
    path = Path(keyframes)
    if path.suffix.lower() not in (".npy", ".bvh"):
        raise RequestError("keyframes", f"keyframes must be a .npy or .bvh file, got {path.name!r}")
    if not path.is_file():
        raise RequestError("keyframes", f"keyframes file not found: {keyframes}")
    if options.get("keep") is not None:
        time_ranges(options["keep"], "keep")
    if options.get("regenerate") is not None:
        _parts(options["regenerate"])


class Keyframes:
    """A motion file to edit: its (T, 263) ``features`` (canonical), ``known`` (T, 263) bool
    channels kept, and how to put joints back in the file's coordinates."""

    def __init__(self, features: np.ndarray, known: np.ndarray, rotation: np.ndarray,
                 offset: np.ndarray) -> None:  # fmt: skip
        self.features, self.known = features, known
        self.rotation, self.offset = rotation, offset  # canonical -> file: x @ R.T + offset

    @property
    def frames(self) -> int:
        return len(self.features)

    def to_file(self, joints: np.ndarray) -> np.ndarray:
        """(..., 22, 3) canonical joints -> the file's coordinates."""
        return joints @ self.rotation.T + self.offset


def _filled(array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows with a NaN are missing: (filled by linear interpolation in time, finite rows)."""
    flat = array.reshape(len(array), -1)
    finite = np.isfinite(flat).all(axis=1)
    if not finite.any():
        raise RequestError("keyframes", "keyframes: no frame of the file is finite")
    frames = np.arange(len(array))
    filled = np.stack(
        [np.interp(frames, frames[finite], flat[finite, c]) for c in range(flat.shape[1])], axis=1
    )
    return filled.reshape(array.shape), finite


def read_keyframes(path: str | Path, keep: str | None, regenerate: str | None) -> Keyframes:
    """The motion ``path`` to edit and what of it to keep (see the module doc)."""
    try:
        array = np.load(path, allow_pickle=False) if str(path).lower().endswith(".npy") else None
        if array is None:
            array = read_motion(path)
        array = np.asarray(array, dtype=np.float64)
        if array.ndim == 3 and array.shape[1:] == (NUM_JOINTS, 3):
            filled, finite = _filled(array)
            rotation, offset = canonical_transform(filled)
            features = joints_to_features(filled)
            finite = finite[: len(features)]
        elif array.ndim == 2 and array.shape[1] == FEATURES:
            features, finite = _filled(array)
            features = features.astype(np.float32)
            rotation, offset = np.eye(3), np.zeros(3)
        else:
            raise BadMotion(
                "unreadable motion", f"shape {array.shape}: expected (T, 22, 3) or (T, 263)"
            )
    except (ValueError, OSError) as e:
        if isinstance(e, RequestError):
            raise
        raise RequestError("keyframes", f"keyframes {Path(path).name}: {e}") from e
    frames = len(features)
    if frames < 2 or frames > round(MAX_SECONDS * FPS):
        raise RequestError(
            "keyframes", f"keyframes: {frames} frames; expected 2 to {round(MAX_SECONDS * FPS)}"
        )
    kept_frames = finite.copy()
    if keep is not None:
        centres = np.arange(frames) / FPS
        inside = np.zeros(frames, dtype=bool)
        for start, stop in time_ranges(keep, "keep"):
            inside |= (centres >= start - 1e-9) & (centres < stop - 1e-9)
        kept_frames &= inside
    known = np.repeat(kept_frames[:, None], FEATURES, axis=1)
    if regenerate is not None:
        joints = sorted({j for part in _parts(regenerate) for j in BODY_PARTS[part]})
        known &= ~joint_mask(joints)[None, :]
    elif keep is None and kept_frames.all():
        raise RequestError(
            "keyframes",
            "every frame of the keyframes file is given: pass keep (seconds) or regenerate "
            "(body parts), or mark the frames to generate with NaN",
        )
    if not known.any():
        raise RequestError("keep", "nothing of the keyframes file would be kept")
    if known.all():
        raise RequestError(
            "keep", "everything of the keyframes file would be kept: nothing to generate"
        )
    return Keyframes(features.astype(np.float32), known, rotation, offset)


def resolved_frames(config: Mapping[str, Any], options: Mapping[str, Any],
                    keyframes: Keyframes | None = None) -> int:  # fmt: skip
    """Feature frames of a request's motions: the keyframes file's, else ``seconds``, else
    the config's ``sample_seconds``, at 20 fps."""
    if keyframes is not None:
        return keyframes.frames
    seconds = options.get("seconds") or config["sample_seconds"]
    return max(2, round(float(seconds) * FPS))


def conditioner_for(config: Mapping[str, Any], device: str | None = None,
                    dtype: torch.dtype | None = None) -> Conditioner:  # fmt: skip
    """The text encoder the config trains with."""
    return TextConditioner.from_config(config, device=device, dtype=dtype)


# --- root correction ---------------------------------------------------------------------------
def _stretches(generated: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs [a, b) of True in (T,) ``generated`` that end before a kept frame."""
    runs, start = [], None
    for t, flag in enumerate(generated):
        if flag and start is None:
            start = t
        elif not flag and start is not None:
            runs.append((start, t))
            start = None
    return runs  # a run that reaches the end has no kept frame to land on


def land_on_keyframes(
    features: np.ndarray, source: np.ndarray, root_known: np.ndarray
) -> np.ndarray:
    """Correct the generated root channels so the integrated root meets the source's at every
    kept frame after a generated stretch.

    Args:
        features: (T, 263) generated features whose kept channels are already the source's.
        source: (T, 263) the keyframe features. root_known: (T,) bool, True where the root
            channels (0-3) are kept.

    Returns:
        (T, 263) float32 features: in each stretch [a, b) of generated root channels before a
        kept frame b, the half turns get the missing turn spread evenly and the velocities the
        missing displacement (in world space, turned into each frame's body frame).
    """
    out = features.astype(np.float64).copy()
    src = source.astype(np.float64)
    _, src_root = _root(src)
    for a, b in _stretches(~root_known):
        span = b - a
        out[a:b, 0] += (src[a:b, 0].sum() - out[a:b, 0].sum()) / span
        to_body, root = _root(out)
        missing = (src_root[b] - root[b])[[0, 2]]
        # Velocity stored at s moves the root into s + 1 in the body frame of s + 1.
        for s in range(a, b):
            angle = to_body[s + 1]
            c, sn = math.cos(angle), math.sin(angle)
            dx, dz = missing / span
            # world -> body of frame s + 1 turns by +to_body about +Y.
            out[s, 1] += c * dx + sn * dz
            out[s, 2] += -sn * dx + c * dz
    return out.astype(np.float32)


def _root(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    to_body, root = root_trajectory(torch.from_numpy(features))
    return to_body.numpy(), root.numpy()


# --- sampling --------------------------------------------------------------------------------
def sample_motions(
    model: nn.Module,
    config: Mapping[str, Any],
    prompts: Sequence[str],
    *,
    seed: int,
    frames: int,
    options: Sampling | None = None,
    conditioner: Conditioner | None = None,
    keyframes: Keyframes | None = None,
) -> list[Motion]:
    """One :class:`Motion` of ``frames`` feature frames per prompt (edited from ``keyframes``
    when given)."""
    net = unwrap_model(model)
    options = options or Sampling.resolve(config, None, BATCH_SIZE)
    conditioner = conditioner or conditioner_for(config)
    generator = torch.Generator().manual_seed(int(seed))
    count = len(prompts)
    init = mask = None
    if keyframes is not None:
        device, _ = model_params(net)
        source = torch.from_numpy(keyframes.features.T.copy())[None].to(device)
        init = net.normalize(source).cpu().expand(count, -1, -1)
        mask = torch.from_numpy(~keyframes.known.T.copy()).float()[None].expand(count, -1, -1)
    x = denoise(net, config, conditioner, list(prompts), (FEATURES, frames), options,
                generator=generator, init=init, mask=mask)  # fmt: skip
    device, _ = model_params(net)
    features = net.denormalize(x.to(device)).transpose(1, 2).cpu().numpy()
    motions = []
    for prompt, made in zip(prompts, features, strict=True):
        if keyframes is not None:
            made = np.where(keyframes.known, keyframes.features, made)
            made = land_on_keyframes(made, keyframes.features, keyframes.known[:, :4].all(axis=1))
            made = np.where(keyframes.known, keyframes.features, made)
        joints = features_to_joints(made.astype(np.float64)).numpy()
        if keyframes is not None:
            joints = keyframes.to_file(joints)
        motions.append(Motion(features=made.astype(np.float32), joints=joints.astype(np.float32),
                              fps=FPS, caption=str(prompt)))  # fmt: skip
    return motions


def check_motion_request(config: Mapping[str, Any], request: GenerationRequest) -> None:
    """Refuse, before sampling, more than :data:`MAX_TOTAL_FRAMES` frames in one call, and a
    ``seconds`` that contradicts the keyframes file."""
    options = request.options
    if options.get("keyframes") is not None and options.get("seconds") is not None:
        raise RequestError("seconds", "keyframes sets the length; drop seconds")
    frames = resolved_frames(config, options) if options.get("keyframes") is None else 0
    if len(request.repeated) * frames > MAX_TOTAL_FRAMES:
        raise RequestError(
            "num",
            f"{len(request.repeated)} motion(s) x {frames} frames is more than "
            f"{MAX_TOTAL_FRAMES} frames in one call; split the request",
        )


def generate_motions(model: nn.Module, config: Mapping[str, Any], request: GenerationRequest,
                     conditioner: Conditioner) -> list[Motion]:  # fmt: skip
    """The motions of ``request``, one per repeated prompt (the recipe's ``generate``)."""
    options = request.options
    keyframes = None
    if options.get("keyframes") is not None:
        keyframes = read_keyframes(options["keyframes"], options.get("keep"),
                                   options.get("regenerate"))  # fmt: skip
    return sample_motions(
        model,
        config,
        request.repeated,
        seed=request.seed,
        frames=resolved_frames(config, options, keyframes),
        options=Sampling.resolve(config, request, BATCH_SIZE),
        conditioner=conditioner,
        keyframes=keyframes,
    )


def generate(prompts: str | Sequence[str], **options: Unpack[MotionOptions]) -> list[Motion]:
    """Generate motions in Python: ``generate("a person jumps", seconds=3)``.

    ``options`` are those of ``polydiff generate motion`` (``checkpoint`` None: the bundled
    model). Returns one :class:`Motion` per prompt and ``num`` (prompt by prompt).
    """
    return list(generate_request("motion", GenerationRequest.of(prompts, **options)).outputs)
