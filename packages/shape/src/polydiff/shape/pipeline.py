"""Shape generation from a checkpoint written by ``polydiff train``: point clouds from the
point model or the latent model, meshes from either. Inference only: nothing here imports the
trainer.

- Kind points: the sampler denoises ``points`` x 3 coordinates; a mesh is reconstructed from
  the cloud alone (:func:`polydiff.shape.export.points_to_mesh`).
- Kind latent: the sampler denoises the latent set; the carried autoencoder decodes it to
  ``points`` surface points (its point decoder) and, for a mesh, to its occupancy field on a
  ``mesh_resolution``^3 grid, meshed by marching cubes at logit 0 (occupancy 1/2).

Meshes are made only for outputs that need one (``--mesh``, or a ``.glb`` / ``.obj`` file),
when they are exported: a :class:`~polydiff.shape.export.Shape` carries how to make its mesh.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Unpack

import numpy as np
import torch
import trimesh
from torch import Tensor, nn

from polydiff.core.ema import unwrap_model
from polydiff.core.modality import (
    Conditioner,
    GenerationRequest,
    LabelConditioner,
    RequestError,
    RequestOptions,
    Sampling,
    TextConditioner,
    denoise,
    model_params,
)
from polydiff.core.modality import generate as generate_request

from .config import MAX_POINTS
from .export import MAX_PREVIEW_SHAPES, Shape, field_to_mesh, points_to_mesh
from .model import FIELD_BOUND

__all__ = [
    "BATCH_SIZE",
    "MAX_TOTAL_POINTS",
    "ShapeOptions",
    "check_shape_options",
    "check_shape_request",
    "conditioner_for",
    "generate",
    "generate_shapes",
    "latent_mesh",
    "resolved_points",
    "sample_shapes",
]

BATCH_SIZE = 16  # shapes per sampling batch (the default of --batch-size)
#: Points one call samples (outputs x points): their noise and clouds are held at once
#: (16 M points: ~200 MB of noise).
MAX_TOTAL_POINTS = 16 * 2**20


class ShapeOptions(RequestOptions, total=False):
    """Shape's own options of :func:`generate` (CLI: ``--points`` ...)."""

    points: int
    mesh: bool
    preview: str | Path


def check_shape_options(options: Mapping[str, Any]) -> None:
    """Refuse bad shape options with one line, before anything is loaded."""
    points = options.get("points")
    if points is not None and (
        isinstance(points, bool) or not isinstance(points, int) or not 16 <= points <= MAX_POINTS
    ):
        raise RequestError("points", f"points must be an integer in [16, {MAX_POINTS}], got "
                           f"{points!r}")  # fmt: skip
    mesh = options.get("mesh")
    if mesh is not None and not isinstance(mesh, bool):
        raise RequestError("mesh", f"mesh must be True or False, got {mesh!r}")
    preview = options.get("preview")
    if preview is not None:
        path = Path(preview)
        if path.suffix.lower() != ".png":
            raise RequestError("preview", f"preview must be a .png file, got {str(preview)!r}")
        if path.is_dir():
            raise RequestError("preview", f"preview {str(preview)!r} is a folder")
        if not path.parent.is_dir():
            raise RequestError("preview", f"preview's folder {str(path.parent)!r} does not exist")


def resolved_points(config: Mapping[str, Any], options: Mapping[str, Any]) -> int:
    """Points per shape: ``points``, else the config's ``sample_points``, else the trained
    count."""
    return int(options.get("points") or config.get("sample_points") or config["points"])


def conditioner_for(
    config: Mapping[str, Any], device: str | None = None, dtype: torch.dtype | None = None
) -> Conditioner:
    """The conditioner the config trains with: the text encoder, or one label per prompt
    (a prompt must then be one of ``classes``)."""
    if config["conditioning"] == "label":
        return LabelConditioner(len(config["classes"]), tuple(config["classes"]))
    return TextConditioner.from_config(config, device=device, dtype=dtype)


def latent_mesh(codec: nn.Module, latent: Tensor, resolution: int) -> trimesh.Trimesh:
    """The mesh of one (K, C) normalised latent: the codec's occupancy field on a
    ``resolution``^3 grid, marching cubes at logit 0."""
    with torch.inference_mode():
        logits = codec.occupancy_grid(latent[None], resolution)[0]
    return field_to_mesh(logits.cpu().numpy(), bound=FIELD_BOUND, level=0.0)


def sample_shapes(
    model: nn.Module,
    config: Mapping[str, Any],
    prompts: Sequence[Any],
    *,
    seed: int,
    options: Sampling | None = None,
    conditioner: Conditioner | None = None,
    points: int | None = None,
) -> list[Shape]:
    """One :class:`Shape` per prompt (a class name under label conditioning): its points in
    the normalised space and how to make its mesh."""
    net = unwrap_model(model)
    options = options or Sampling.resolve(config, None, BATCH_SIZE)
    conditioner = conditioner or conditioner_for(config)
    count = int(points or resolved_points(config, {}))
    generator = torch.Generator().manual_seed(int(seed))
    resolution = int(config["mesh_resolution"])
    latent = config["kind"] == "latent"
    shape = net.latent_shape if latent else (count, 3)
    x = denoise(net, config, conditioner, list(prompts), shape, options, generator=generator)
    device, dtype = model_params(net)
    shapes = []
    for start in range(0, x.shape[0], options.batch_size):
        part = x[start : start + options.batch_size].to(device=device, dtype=dtype)
        if latent:
            clouds = net.autoencoder.decode_latents(part, count=count, seed=int(seed))
        else:
            clouds = net.denormalize(part)
        for offset, cloud in enumerate(clouds.float().cpu().numpy()):
            cloud = np.ascontiguousarray(cloud, dtype=np.float32)
            if latent:
                code = part[offset].detach().clone()
                make = functools.partial(latent_mesh, net.autoencoder, code, resolution)
            else:
                make = functools.partial(points_to_mesh, cloud, resolution)
            shapes.append(Shape(points=cloud, reconstruct=make))
    return shapes


def check_shape_request(config: Mapping[str, Any], request: GenerationRequest) -> None:
    """Refuse, with one line and before sampling, what one call cannot make: more than
    :data:`MAX_TOTAL_POINTS` points, a preview of more than ``MAX_PREVIEW_SHAPES`` shapes,
    or (label conditioning) a prompt that is none of the checkpoint's classes."""
    points = resolved_points(config, request.options)
    if len(request.repeated) * points > MAX_TOTAL_POINTS:
        raise RequestError(
            "num",
            f"{len(request.repeated)} shape(s) x {points} points is more than "
            f"{MAX_TOTAL_POINTS} points in one call; split the request",
        )
    if request.options.get("preview") and len(request.repeated) > MAX_PREVIEW_SHAPES:
        raise RequestError(
            "preview",
            f"a preview renders at most {MAX_PREVIEW_SHAPES} shapes, not "
            f"{len(request.repeated)}; drop --preview or split the request",
        )
    if config["conditioning"] == "label":
        classes = LabelConditioner(len(config["classes"]), tuple(config["classes"]))
        for prompt in request.prompts:
            try:
                classes.index(prompt)
            except ValueError as e:
                raise RequestError("prompt", f"this checkpoint is class-conditioned: {e}") from e


def generate_shapes(
    model: nn.Module, config: Mapping[str, Any], request: GenerationRequest,
    conditioner: Conditioner,
) -> list[Shape]:  # fmt: skip
    """The shapes of ``request``, one per repeated prompt (the recipe's ``generate``)."""
    return sample_shapes(
        model,
        config,
        request.repeated,
        seed=request.seed,
        options=Sampling.resolve(config, request, BATCH_SIZE),
        conditioner=conditioner,
        points=resolved_points(config, request.options),
    )


def generate(prompts: str | Sequence[str], **options: Unpack[ShapeOptions]) -> list[Shape]:
    """Generate shapes in Python: ``generate("a torus", points=4096)``.

    ``options`` are those of ``polydiff generate shape`` (``checkpoint`` None: the bundled
    model). Returns one :class:`Shape` per prompt and ``num`` (prompt by prompt); call
    ``shape.with_mesh()`` for its mesh.
    """
    return list(generate_request("shape", GenerationRequest.of(prompts, **options)).outputs)
