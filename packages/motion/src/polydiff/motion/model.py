"""The MDM-style motion denoiser and its geometric losses, built from ``polydiff.core.blocks``.

The denoiser works on normalised features ``x`` (B, 263, T): each HumanML3D channel minus its
dataset mean, over its dataset std (``feature_mean`` / ``feature_std``, fitted by the recipe's
statistics hook and carried in the checkpoint). It is a transformer over frames (one token a
frame, 1D rotary and absolute sin-cos positions), conditioned on the diffusion time and the
prompt's pooled sentence embedding through adaLN and on its text tokens through
cross-attention (MDM prepends one CLIP token instead). Its call signature is what
``diffusion_loss`` and ``sample`` pass::

    model(x, t, context=None, context_mask=None, pooled=None, valid=None) -> like x

with ``valid`` (B, 1, T) bool, True at real frames: padded frames are masked out of attention
and their outputs are 0, so padding never changes real frames.

:func:`geometric_losses` are MDM's position, velocity and foot-contact losses, computed on the
joints that the features *mean* — recovered by integrating the root and placing the joints
(:func:`polydiff.motion.features.features_to_joints`, differentiable) — so that they act on
HumanML3D's 263-d representation (MDM's own are computed there on the features themselves,
which leaves them no geometry to act on).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from polydiff.core.blocks import DiT
from polydiff.core.pretrained import Configurable

from .features import FEATURES, FPS, LAYOUT, features_to_joints
from .skeleton import FEET

__all__ = ["GEOMETRIC_TERMS", "MotionDenoiser", "geometric_losses"]

GEOMETRIC_TERMS = ("positions", "velocities", "foot_contact")
_FOOT_JOINTS = (*FEET["left"], *FEET["right"])  # the order of the contact channels
_STD_FLOOR = 1e-2  # constant channels (a leaf's rotation) would divide by ~0


class MotionDenoiser(Configurable, nn.Module):
    """Text-conditioned denoiser of normalised (B, 263, T) motion features.

    Args:
        dim, depth, heads, mlp_ratio, qk_norm, rope_theta: the transformer's sizes.
        context_dim: text-token width (cross-attention). pooled_dim: sentence-embedding width.
        gradient_checkpointing: recompute block activations in backward.
    """

    def __init__(
        self,
        dim: int = 256,
        depth: int = 8,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        qk_norm: bool = True,
        rope_theta: float = 10000.0,
        context_dim: int | None = 384,
        pooled_dim: int = 384,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.dit = DiT(
            FEATURES,
            FEATURES,
            dim,
            depth,
            heads,
            mlp_ratio=mlp_ratio,
            context_dim=context_dim,
            qk_norm=qk_norm,
            rope_axes=1,
            cond_dim=pooled_dim,
            gradient_checkpointing=gradient_checkpointing,
            rope_theta=rope_theta,
            absolute_positions=True,
        )
        # Per-channel statistics of the training features (fitted at step 0; carried in
        # checkpoints). Until fitted: identity.
        self.register_buffer("feature_mean", torch.zeros(FEATURES))
        self.register_buffer("feature_std", torch.ones(FEATURES))

    def normalize(self, motion: Tensor) -> Tensor:
        """(B, 263, T) features -> the denoiser's space (float32)."""
        mean = self.feature_mean.float()[:, None]
        std = self.feature_std.float().clamp_min(_STD_FLOOR)[:, None]
        return (motion.float() - mean) / std

    def denormalize(self, x: Tensor) -> Tensor:
        """Inverse of :meth:`normalize`: (B, 263, T) -> features (float32)."""
        mean = self.feature_mean.float()[:, None]
        std = self.feature_std.float().clamp_min(_STD_FLOOR)[:, None]
        return x.float() * std + mean

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        pooled: Tensor | None = None,
        valid: Tensor | None = None,
    ) -> Tensor:
        """(B, 263, T), (B,), (B, L, D), (B, L), (B, P), (B, 1, T) -> (B, 263, T)."""
        if pooled is None:
            raise ValueError("MotionDenoiser needs `pooled` (B, pooled_dim) sentence embeddings")
        if x.ndim != 3 or x.shape[1] != FEATURES:
            raise ValueError(f"expected (B, {FEATURES}, T) features, got {tuple(x.shape)}")
        mask = None if valid is None else valid.reshape(x.shape[0], -1).bool()
        out = self.dit(x.transpose(1, 2), t, context, context_mask, None, mask, pooled)
        return out.transpose(1, 2)


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` (B, T, ...) over the (B, T) positions where ``mask`` is True."""
    weights = mask.to(values.dtype).reshape(*mask.shape, *([1] * (values.ndim - mask.ndim)))
    count = weights.expand_as(values).sum().clamp_min(1.0)
    return (values * weights).sum() / count


def geometric_losses(
    predicted: Tensor, target: Tensor, valid: Tensor, weights: Mapping[str, float]
) -> dict[str, Tensor]:
    """MDM's geometric losses between two motions' joints.

    Args:
        predicted, target: (B, T, 263) features (denormalised): the x0 estimate and the data.
        valid: (B, T) bool, True at real frames.
        weights: ``positions`` / ``velocities`` / ``foot_contact`` -> weight (0 skips a term:
            it is not computed and reads 0).

    Returns:
        The unweighted terms by name (scalars): ``positions`` the mean squared joint error
        (m^2), ``velocities`` the mean squared joint-velocity error ((m/s)^2) and
        ``foot_contact`` the mean squared speed of the predicted foot joints where the data's
        foot is in contact ((m/s)^2).
    """
    zero = predicted.new_zeros(())
    terms = dict.fromkeys(GEOMETRIC_TERMS, zero)
    if not any(float(weights.get(k, 0.0)) > 0 for k in GEOMETRIC_TERMS):
        return terms
    joints = features_to_joints(predicted.float())  # (B, T, 22, 3)
    both = valid[:, 1:] & valid[:, :-1]
    if float(weights.get("positions", 0.0)) > 0 or float(weights.get("velocities", 0.0)) > 0:
        real = features_to_joints(target.float())
        if float(weights.get("positions", 0.0)) > 0:
            terms["positions"] = _masked_mean((joints - real).square().sum(-1), valid)
        if float(weights.get("velocities", 0.0)) > 0:
            speed = (joints[:, 1:] - joints[:, :-1]) * FPS
            real_speed = (real[:, 1:] - real[:, :-1]) * FPS
            terms["velocities"] = _masked_mean((speed - real_speed).square().sum(-1), both)
    if float(weights.get("foot_contact", 0.0)) > 0:
        feet = joints[:, :, list(_FOOT_JOINTS)]  # (B, T, 4, 3)
        foot_speed = ((feet[:, 1:] - feet[:, :-1]) * FPS).square().sum(-1)  # (B, T - 1, 4)
        contact = target[:, :-1, LAYOUT["contacts"]] > 0.5
        terms["foot_contact"] = _masked_mean(foot_speed * contact, both)
    return terms
