"""``ShapeRecipe``: text- or class-conditioned 3D shapes by point-cloud diffusion and by latent
shape diffusion, on the shared modality kit (``polydiff.core.modality``).

The ``model:`` section is :class:`polydiff.shape.config.ShapeConfig`. Three kinds:

- ``points``: a permutation-equivariant DiT over the shape's surface points (one run). The
  RMS coordinate of the training clouds is fitted before step 0 (``fit_statistics``) and
  normalises the denoiser's space.
- ``autoencoder``: the point autoencoder (set encoder -> latent set -> point decoder and
  occupancy-field decoder), trained on surface points and occupancy queries; its ``final/``
  is the codec of
- ``latent``: a DiT over the autoencoder's latent set (``codec:`` names the ``final/``
  folder), carrying the frozen autoencoder in its checkpoint — two runs, as image's
  autoencoder + latent DiT.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from polydiff.core.ema import unwrap_model
from polydiff.core.modality import (
    ConfigError,
    GenerateOption,
    GenerationRequest,
    Loss,
    Modality,
    codec_record,
    conditioned_batch,
    denoising_loss,
    load_codec,
    model_params,
)
from polydiff.core.pretrained import CheckpointError

from . import data, synthetic
from .config import ShapeConfig
from .export import (
    MAX_PREVIEW_SHAPES,
    SHAPE_OUTPUT_SUFFIXES,
    Shape,
    render_preview,
    save_shapes,
)
from .model import LatentShapeDenoiser, PointAutoencoder, PointDenoiser, autoencoder_loss
from .pipeline import (
    check_shape_options,
    check_shape_request,
    conditioner_for,
    generate_shapes,
    latent_mesh,
    resolved_points,
    sample_shapes,
)

__all__ = ["PREVIEW_PROMPTS", "ShapeRecipe"]

PREVIEW_PROMPTS = synthetic.CAPTIONS
_BUNDLED = Path(__file__).resolve().parent / "bundled" / "points"
_AUTOENCODER_WEIGHTS = ("points_weight", "field_weight", "kl_weight")


class ShapeRecipe(Modality):
    """3D shapes: point-cloud diffusion, and latent diffusion over a point autoencoder."""

    name = "shape"
    schema = ShapeConfig
    output_suffixes = SHAPE_OUTPUT_SUFFIXES
    bundled = (_BUNDLED, "shared/configs/shape/points.yaml")
    synthetic_sets: ClassVar[dict[str, Any]] = {"primitives": synthetic.primitives}
    example_config: ClassVar[dict[str, Any]] = {
        "points": 64,
        "text_max_length": 8,
        "sample_steps": 2,
        "mesh_resolution": 16,
        "dit": {"dim": 32, "depth": 1, "heads": 2},
    }
    generate_options = (
        GenerateOption("points", int, "points per shape (default: the checkpoint's sample_points)"),
        GenerateOption("mesh", bool, "also make a mesh (.ply holds it; .glb/.obj always do)"),
        GenerateOption("preview", Path, "also render the outputs into this PNG (3 views each)"),
    )

    @property
    def statistics_batches(self) -> int:  # type: ignore[override]
        """The point denoiser fits its coordinate scale on 8 batches; the others need none
        (the autoencoder tracks its latent scale while training)."""
        return 8 if self.config["kind"] == "points" else 0

    # --- data ----------------------------------------------------------------------------
    @classmethod
    def source(cls, folder: Path) -> Iterator[dict[str, Any]]:
        """Meshes (OBJ, PLY, STL, OFF, GLB) and point clouds (PLY, NPY, XYZ) of a folder with
        their captions or class folders (see ``data.folder_source``)."""
        return data.folder_source(folder)

    def decode(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        """Shard sample -> ``{"points": (N, 3), "queries": (Q, 3), "occupancy": (Q,),
        "has_field": (), "caption": str, "label": str}``: fresh surface points every call."""
        cfg = self.config
        rng = np.random.default_rng(random.getrandbits(64))  # seeded per worker by the trainer
        queries = int(cfg["queries"]) if cfg["kind"] == "autoencoder" else 0
        decoded = data.decode(sample, points=int(cfg["points"]), queries=queries,
                              normalize=cfg["normalize"], rng=rng)  # fmt: skip
        decoded["label"] = data.sample_label(sample) or decoded["caption"]
        if cfg["kind"] != "autoencoder":
            if cfg["conditioning"] == "text" and not decoded["caption"]:
                raise ValueError("no caption (text conditioning)")
            if cfg["conditioning"] == "label" and decoded["label"] not in cfg["classes"]:
                raise ValueError(f"label {decoded['label']!r} is not one of model.classes")
        return decoded

    # --- model ---------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        """A fresh model of ``kind`` (latent: with the trained autoencoder loaded, frozen)."""
        cfg = self.config
        if cfg["kind"] == "autoencoder":
            network = {k: v for k, v in cfg["autoencoder"].items() if not k.endswith("_weight")}
            return PointAutoencoder(**network)
        if cfg["conditioning"] == "label":
            context_dim, pooled_dim = None, 0
        else:
            context_dim, pooled_dim = self.conditioner().dims
        dit = cfg["dit"]
        args = {
            "dim": dit["dim"],
            "depth": dit["depth"],
            "heads": dit["heads"],
            "mlp_ratio": float(dit["mlp_ratio"]),
            "qk_norm": bool(dit["qk_norm"]),
            "conditioning": cfg["conditioning"],
            "context_dim": context_dim,
            "pooled_dim": pooled_dim,
            "num_classes": len(cfg["classes"]),
            "gradient_checkpointing": bool(cfg["gradient_checkpointing"]),
        }
        if cfg["kind"] == "points":
            return PointDenoiser(**args)
        try:
            codec = load_codec(cfg["codec"], "a codec")
            codec.latent_shape((int(cfg["points"]), 3))
        except (CheckpointError, ValueError) as e:
            raise ConfigError(f"model.codec: {e}") from e
        model = LatentShapeDenoiser(**codec_record(codec), **args)
        model.autoencoder.load_state_dict(codec.state_dict())
        return model

    def fit_statistics(
        self, model: nn.Module, batches: Iterable[dict[str, Any]]
    ) -> dict[str, Tensor]:
        """Kind points: the RMS coordinate of the training clouds (one scalar). Each process
        fits its own and the trainer averages them."""
        squares, count = 0.0, 0
        for batch in batches:
            points = batch["points"].double()
            squares += float(points.square().sum())
            count += points.numel()
        if count == 0:
            return {}
        return {"point_std": torch.tensor((squares / count) ** 0.5, dtype=torch.float32)}

    # --- training ------------------------------------------------------------------------
    def loss(
        self, model: nn.Module, batch: Mapping[str, Any], generator: torch.Generator, part: str
    ) -> Loss:
        """Autoencoder: Chamfer + occupancy BCE + KL (``autoencoder_loss``). Denoisers: the
        configured diffusion loss on the normalised points or on the codec's latents,
        conditioned on captions or labels dropped to the null input with probability
        ``cond_drop``."""
        cfg = self.config
        device, dtype = model_params(model)
        points = batch["points"].to(device=device, dtype=dtype)
        if cfg["kind"] == "autoencoder":
            tensors = {
                "points": points,
                "queries": batch["queries"].to(device=device, dtype=dtype),
                "occupancy": batch["occupancy"].to(device=device),
                "has_field": batch["has_field"].to(device=device),
            }
            weights = {k: float(cfg["autoencoder"][k]) for k in _AUTOENCODER_WEIGHTS}
            return autoencoder_loss(model, tensors, weights, generator)
        net = unwrap_model(model)
        x0 = net.normalize(points) if cfg["kind"] == "points" else net.encode(points)
        values = batch["label"] if cfg["conditioning"] == "label" else batch["caption"]
        cond = conditioned_batch(
            self.conditioner(), values, cfg["cond_drop"], generator, device, dtype
        )
        return denoising_loss(model, x0, cfg, cond, generator)

    def conditioner(self, device: str | None = None, dtype: torch.dtype | None = None):
        return conditioner_for(self.config, device, dtype)

    def preview(self, model: nn.Module, out_dir: Path, step: int) -> list[Path]:
        """Denoisers: ``previews.png``, one shape per ``PREVIEW_PROMPTS`` caption (or class)
        in three views. Autoencoder: ``reconstructions.png``: synthetic primitives, each above
        its decoded points and its decoded mesh."""
        net = unwrap_model(model)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with torch.no_grad():
            if self.config["kind"] == "autoencoder":
                shapes = self._reconstructions(net, step)
                path = out / "reconstructions.png"
            else:
                # At most what one preview renders (a label set may have 40 classes).
                prompts = list(self.config["classes"] or PREVIEW_PROMPTS)[:MAX_PREVIEW_SHAPES]
                shapes = sample_shapes(net, self.config, prompts, seed=step)
                path = out / "previews.png"
        return [render_preview(shapes, path, views=3)]

    def _reconstructions(self, net: PointAutoencoder, step: int) -> list[Shape]:
        device, dtype = model_params(net)
        rng = np.random.default_rng(step)
        clouds = []
        for caption in PREVIEW_PROMPTS[:4]:
            sample = {"__key__": caption, **data.mesh_sample(synthetic.render(caption, rng))}
            decoded = data.decode(sample, points=int(self.config["points"]), queries=0,
                                  normalize=self.config["normalize"], rng=rng)  # fmt: skip
            clouds.append(decoded["points"])
        points = torch.stack(clouds).to(device=device, dtype=dtype)
        z = net.encode_latents(points)
        decoded = net.decode_latents(z, count=points.shape[1]).float().cpu().numpy()
        resolution = int(self.config["mesh_resolution"])
        shapes = []
        for real, cloud, code in zip(points.float().cpu().numpy(), decoded, z, strict=True):
            shapes.append(Shape(points=real))
            shapes.append(Shape(points=cloud))
            try:
                shapes.append(Shape(points=cloud, mesh=latent_mesh(net, code, resolution)))
            except ValueError:  # an untrained field has no surface yet
                shapes.append(Shape(points=cloud))
        return shapes

    # --- generation ----------------------------------------------------------------------
    def check_request(self, request: GenerationRequest) -> None:
        if self.config["kind"] == "autoencoder":
            raise CheckpointError(
                f"{request.checkpoint or 'the checkpoint'} is a point autoencoder; generate "
                "from a denoiser (kind points or latent)"
            )
        check_shape_options(request.options)
        check_shape_request(self.config, request)

    def generate(self, model: nn.Module, request: GenerationRequest) -> list[Shape]:
        """Shapes, one per ``request.repeated`` prompt (their meshes made at export)."""
        conditioner = self.conditioner(request.device, request.torch_dtype)
        return generate_shapes(model, self.config, request, conditioner)

    def output_metadata(self, request: GenerationRequest) -> dict[str, Any]:
        return {
            "points": resolved_points(self.config, request.options),
            "kind": self.config["kind"],
            "normalize": self.config["normalize"],
            "up_axis": "Y",
            "mesh_resolution": int(self.config["mesh_resolution"]),
        }

    def export(
        self,
        outputs: Sequence[Shape],
        paths: Sequence[Path],
        metadata: Sequence[Mapping[str, Any]],
    ) -> list[Path]:
        """PLY point clouds (or meshes with ``mesh``), GLB and OBJ meshes, each with its
        provenance embedded and a sidecar JSON; with ``preview`` also one PNG of them all
        (see ``polydiff.shape.export``)."""
        options = metadata[0] if metadata else {}
        shapes = [
            shape.with_mesh()
            if options.get("mesh") or Path(path).suffix.lower() in (".glb", ".obj")
            else shape
            for shape, path in zip(outputs, paths, strict=True)
        ]
        written = save_shapes(shapes, paths, metadata)
        if options.get("preview"):
            written.append(render_preview(shapes, Path(options["preview"]), views=3))
        return written
