"""``MotionRecipe``: MDM-style text-to-motion diffusion on the shared modality kit
(``polydiff.core.modality``).

The ``model:`` section is :class:`polydiff.motion.config.MotionConfig`. One run: a transformer
over frames (:class:`~polydiff.motion.model.MotionDenoiser`) learns HumanML3D's 263-d features
in length buckets with the kit's padding mask. Per-channel mean and std are fitted before step 0
(``fit_statistics``) and normalise its space. Its loss is the configured diffusion loss (x0
prediction by default, as MDM) plus the geometric losses on the joints of its x0 estimate
(:func:`~polydiff.motion.model.geometric_losses`), reported by name in ``metrics.jsonl``.
"""

from __future__ import annotations

import random
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from polydiff.core.ema import unwrap_model
from polydiff.core.modality import (
    GenerateOption,
    GenerationRequest,
    Loss,
    Modality,
    conditioned_batch,
    denoising_loss,
    make_schedule,
    model_params,
)
from polydiff.core.predictions import to_x0

from . import data, synthetic
from .config import MotionConfig
from .export import MOTION_OUTPUT_SUFFIXES, Motion, save_motions
from .features import FEATURES, FPS
from .model import GEOMETRIC_TERMS, MotionDenoiser, geometric_losses
from .pipeline import (
    check_motion_options,
    check_motion_request,
    conditioner_for,
    generate_motions,
    resolved_frames,
    sample_motions,
)

__all__ = ["PREVIEW_PROMPTS", "MotionRecipe"]

PREVIEW_PROMPTS = synthetic.CAPTIONS
_BUNDLED = Path(__file__).resolve().parent / "bundled" / "motions"


class _Recorded:
    """The denoiser, remembering its last call: the geometric losses need the model's own
    output for the noisy input the diffusion loss drew."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.call: tuple[Tensor, Tensor, Tensor] | None = None

    def __call__(self, x: Tensor, t: Tensor, **kwargs: Any) -> Tensor:
        out = self.model(x, t, **kwargs)
        self.call = (x, t, out)
        return out


class MotionRecipe(Modality):
    """Text-to-motion: an MDM-style transformer over HumanML3D features."""

    name = "motion"
    schema = MotionConfig
    output_suffixes = MOTION_OUTPUT_SUFFIXES
    bundled = (_BUNDLED, "shared/configs/motion/motions.yaml")
    synthetic_sets: ClassVar[dict[str, Any]] = {"motions": synthetic.motions}
    statistics_batches = 8
    example_config: ClassVar[dict[str, Any]] = {
        "length_buckets": [40, 48],
        "sample_seconds": 2.0,
        "text_max_length": 8,
        "sample_steps": 2,
        "dit": {"dim": 32, "depth": 1, "heads": 2},
    }
    generate_options = (
        GenerateOption(
            "seconds", float, "length in seconds (default: the checkpoint's sample_seconds)"
        ),
        GenerateOption(
            "keyframes",
            Path,
            "a motion to edit (.npy joints or features, .bvh): its NaN-free "
            "frames are kept (in-betweening)",
        ),
        GenerateOption(
            "keep", str, "only these times of --keyframes are kept, in seconds: 0:0.5[,3.5:4]"
        ),
        GenerateOption(
            "regenerate",
            str,
            "regenerate these body parts of --keyframes, keep the rest: "
            "upper_body, lower_body, legs, arms, left_arm, right_arm",
        ),
        GenerateOption(
            "npy", str, "what a .npy output holds: joints (T, 22, 3) | features (T, 263)", "joints"
        ),
    )

    # --- data ----------------------------------------------------------------------------
    @classmethod
    def source(cls, folder: Path) -> Iterator[dict[str, Any]]:
        """HumanML3D's layout, or captioned joint NPYs and BVH files (see ``data``)."""
        return data.folder_source(folder)

    def decode(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        """Shard sample -> ``{"motion": (263, L), "valid": (L,), "length", "caption"}`` in its
        length bucket L (a random window of a longer motion)."""
        return data.decode(sample, self.config["length_buckets"], random)

    def bucket(self, sample: Mapping[str, Any]) -> Hashable | None:
        """The length bucket, from the sample's metadata."""
        return data.choose_bucket(data.sample_frames(sample), self.config["length_buckets"])

    # --- model ---------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        cfg = self.config
        dit = cfg["dit"]
        context_dim, pooled_dim = self.conditioner().dims
        return MotionDenoiser(
            dim=dit["dim"],
            depth=dit["depth"],
            heads=dit["heads"],
            mlp_ratio=float(dit["mlp_ratio"]),
            qk_norm=bool(dit["qk_norm"]),
            rope_theta=float(dit["rope_theta"]),
            context_dim=context_dim,
            pooled_dim=pooled_dim,
            gradient_checkpointing=bool(cfg["gradient_checkpointing"]),
        )

    def fit_statistics(
        self, model: nn.Module, batches: Iterable[dict[str, Any]]
    ) -> dict[str, Tensor]:
        """Per-channel mean and std of the training features over real frames. Each process
        fits its own and the trainer averages them."""
        total = torch.zeros(FEATURES, dtype=torch.float64)
        squares = torch.zeros_like(total)
        count = 0.0
        for batch in batches:
            motion = batch["motion"].double()  # (B, 263, L)
            valid = batch["valid"].double()[:, None]  # (B, 1, L)
            total += (motion * valid).sum((0, 2))
            squares += (motion.square() * valid).sum((0, 2))
            count += float(valid.sum())
        if count == 0:
            return {}
        mean = total / count
        std = (squares / count - mean.square()).clamp_min(0.0).sqrt()
        return {"feature_mean": mean.float(), "feature_std": std.float()}

    # --- training ------------------------------------------------------------------------
    def loss(
        self, model: nn.Module, batch: Mapping[str, Any], generator: torch.Generator, part: str
    ) -> Loss:
        """The diffusion loss over real frames plus the weighted geometric losses of the x0
        estimate; extras: ``diffusion`` and each geometric term (unweighted)."""
        cfg = self.config
        device, dtype = model_params(model)
        net = unwrap_model(model)
        valid = batch["valid"].to(device) > 0.5  # (B, L)
        motion = batch["motion"].to(device)
        x0 = torch.where(valid[:, None], net.normalize(motion), 0.0).to(dtype)
        cond = conditioned_batch(
            self.conditioner(), batch["caption"], cfg["cond_drop"], generator, device, dtype
        )
        recorded = _Recorded(model)
        diffusion = denoising_loss(recorded, x0, cfg, cond, generator, valid=valid[:, None])
        weights = {k: float(cfg["geometric"][k]) for k in GEOMETRIC_TERMS}
        terms = {k: diffusion.new_zeros(()) for k in GEOMETRIC_TERMS}
        total = diffusion
        if any(w > 0 for w in weights.values()):
            assert recorded.call is not None
            x_t, t, out = recorded.call
            schedule = make_schedule(cfg)
            level = t.double()
            alpha = schedule.alpha(level).view(-1, 1, 1).to(out.dtype)
            sigma = schedule.sigma(level).view(-1, 1, 1).to(out.dtype)
            estimate = to_x0(out, x_t, alpha, sigma, cfg["prediction"])
            predicted = net.denormalize(estimate).transpose(1, 2)
            terms = geometric_losses(predicted, motion.float().transpose(1, 2), valid, weights)
            total = diffusion + sum(weights[k] * terms[k] for k in GEOMETRIC_TERMS)
        extras = {"diffusion": diffusion.detach(), **{k: v.detach() for k, v in terms.items()}}
        return total, extras

    def conditioner(self, device: str | None = None, dtype: torch.dtype | None = None):
        return conditioner_for(self.config, device, dtype)

    def preview(self, model: nn.Module, out_dir: Path, step: int) -> list[Path]:
        """``previews.png``: a few frames of one motion per ``PREVIEW_PROMPTS`` caption."""
        from .render import contact_sheet

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with torch.no_grad():
            motions = sample_motions(model, self.config, list(PREVIEW_PROMPTS), seed=step,
                                     frames=resolved_frames(self.config, {}))  # fmt: skip
        return [contact_sheet([m.joints for m in motions], out / "previews.png",
                              captions=[m.caption for m in motions])]  # fmt: skip

    # --- generation ----------------------------------------------------------------------
    def check_request(self, request: GenerationRequest) -> None:
        check_motion_options(request.options)
        check_motion_request(self.config, request)

    def generate(self, model: nn.Module, request: GenerationRequest) -> list[Motion]:
        """Motions, one per ``request.repeated`` prompt."""
        conditioner = self.conditioner(request.device, request.torch_dtype)
        return generate_motions(model, self.config, request, conditioner)

    def output_metadata(self, request: GenerationRequest) -> dict[str, Any]:
        options = request.options
        meta: dict[str, Any] = {"fps": FPS, "npy": options.get("npy") or "joints",
                                "skeleton": "smpl-22", "up_axis": "Y", "units": "m"}  # fmt: skip
        if options.get("keyframes") is None:
            frames = resolved_frames(self.config, options)
            meta.update(frames=frames, seconds=frames / FPS)
        return meta

    def export(
        self,
        outputs: Sequence[Motion],
        paths: Sequence[Path],
        metadata: Sequence[Mapping[str, Any]],
    ) -> list[Path]:
        """BVH, stick-figure MP4 or NPY by suffix, each with its provenance (a sidecar JSON;
        the MP4's comment tag too); see ``polydiff.motion.export``."""
        npy = (metadata[0].get("npy") if metadata else None) or "joints"
        return save_motions(list(outputs), list(paths), list(metadata), npy=npy)
