"""The motion denoiser and its losses: padding never changes real frames, and the geometric
losses act on the joints the 263-d features mean — they change the gradient."""

import random

import numpy as np
import pytest
import torch

from polydiff.core.data import iter_shard  # noqa: F401 (the kit's shard reader exists)
from polydiff.motion import data, synthetic
from polydiff.motion.features import LAYOUT
from polydiff.motion.model import MotionDenoiser, geometric_losses
from polydiff.motion.recipe import MotionRecipe
from tests.modality_fixtures import jitter

TINY = {"length_buckets": [40, 64], "text_max_length": 8, "sample_steps": 2,
        "dit": {"dim": 32, "depth": 1, "heads": 2}}  # fmt: skip


def _batch(count: int = 3, buckets=(64,)) -> dict:
    rng = random.Random(0)
    decoded = [data.decode(s, list(buckets), rng) for s in synthetic.motions(count)]
    return MotionRecipe.from_config(TINY).collate(decoded)


def _denoiser() -> MotionDenoiser:
    torch.manual_seed(0)
    model = MotionDenoiser(dim=32, depth=2, heads=2, context_dim=None, pooled_dim=8)
    jitter(model)
    return model.eval()


def test_the_denoiser_maps_features_to_features():
    model = _denoiser()
    x = torch.randn(2, 263, 50)
    out = model(x, torch.tensor([10.0, 500.0]), pooled=torch.randn(2, 8))
    assert out.shape == x.shape


def test_padding_never_changes_real_frames():
    model = _denoiser()
    pooled, t = torch.randn(1, 8), torch.tensor([300.0])
    real = torch.randn(1, 263, 45)
    short = model(real, t, pooled=pooled)
    padded = torch.cat([real, torch.randn(1, 263, 19) * 100], dim=-1)  # garbage padding
    valid = torch.zeros(1, 1, 64, dtype=torch.bool)
    valid[..., :45] = True
    long = model(padded, t, pooled=pooled, valid=valid)
    torch.testing.assert_close(long[..., :45], short, atol=1e-5, rtol=1e-5)
    assert not long[..., 45:].any()


def test_geometric_losses_vanish_on_the_truth_and_see_a_drifting_root():
    batch = _batch()
    motion = batch["motion"].transpose(1, 2)
    valid = batch["valid"] > 0.5
    weights = {"positions": 1.0, "velocities": 1.0, "foot_contact": 1.0}
    same = geometric_losses(motion, motion, valid, weights)
    assert same["positions"] == 0 and same["velocities"] == 0
    assert same["foot_contact"] < 0.05  # the data's own feet barely move in contact
    drift = motion.clone()
    drift[..., LAYOUT["root_linear"]] += 0.01  # 1 cm a frame: 20 cm/s sideways drift
    moved = geometric_losses(drift, motion, valid, weights)
    assert moved["positions"] > 0.01 and moved["velocities"] > 0.01
    assert moved["foot_contact"] > same["foot_contact"]
    off = geometric_losses(drift, motion, valid, dict.fromkeys(weights, 0.0))
    assert all(v == 0 for v in off.values())


def _gradient(weights: dict) -> tuple[torch.Tensor, dict]:
    recipe = MotionRecipe.from_config({**TINY, "geometric": weights})
    torch.manual_seed(0)
    model = recipe.build_model()
    jitter(model)
    statistics = recipe.fit_statistics(model, [_batch(12)])
    for name, value in statistics.items():
        getattr(model, name).copy_(value)
    loss, extras = recipe.loss(model, _batch(), torch.Generator().manual_seed(3), "model")
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return grad, extras


def test_the_geometric_losses_change_the_gradient():
    off, extras_off = _gradient({"positions": 0.0, "velocities": 0.0, "foot_contact": 0.0})
    on, extras_on = _gradient({"positions": 1.0, "velocities": 1.0, "foot_contact": 1.0})
    # The same draw of times and noise: the same diffusion term, reported by name.
    assert extras_on["diffusion"] == pytest.approx(float(extras_off["diffusion"]))
    assert extras_on["positions"] > 0 and extras_off["positions"] == 0
    assert not torch.allclose(on, off)
    assert (on - off).norm() > 1e-3 * off.norm()


def test_the_geometric_gradient_reaches_the_root_channels_through_the_integration():
    batch = _batch()
    motion = batch["motion"].transpose(1, 2)
    valid = batch["valid"] > 0.5
    estimate = (motion + 0.01 * torch.randn_like(motion)).requires_grad_(True)
    losses = geometric_losses(estimate, motion, valid, {"positions": 1.0})
    losses["positions"].backward()
    grad = estimate.grad
    assert grad[..., LAYOUT["root_linear"]].abs().sum() > 0  # integrated into every joint
    assert grad[..., LAYOUT["root_angular"]].abs().sum() > 0
    assert grad[..., LAYOUT["positions"]].abs().sum() > 0
    # Rotations and local velocities do not place joints: MSE on them is the diffusion loss's.
    assert grad[..., LAYOUT["rotations"]].abs().sum() == 0
    assert not grad[~valid].any()  # padding adds nothing


def test_statistics_are_fitted_over_real_frames_only():
    recipe = MotionRecipe.from_config(TINY)
    batch = _batch(4, buckets=(196,))
    stats = recipe.fit_statistics(recipe.build_model(), [batch])
    real = torch.cat([m[:, : int(v.sum())] for m, v in zip(batch["motion"], batch["valid"],
                                                            strict=True)], dim=1)  # fmt: skip
    torch.testing.assert_close(stats["feature_mean"], real.double().mean(1).float())
    torch.testing.assert_close(stats["feature_std"], real.double().std(1, correction=0).float(),
                               atol=1e-4, rtol=1e-3)  # fmt: skip
    assert np.isfinite(stats["feature_std"].numpy()).all()
