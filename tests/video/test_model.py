"""The spacetime-patch video DiT: any clip size its patch divides, full or factorised
attention, text and first-frame conditioning."""

from __future__ import annotations

import pytest
import torch

from polydiff.core.modality import TextConditioner
from polydiff.video.model import VideoDiT, first_frame_condition


def _perturbed(model: VideoDiT) -> VideoDiT:
    # Leave adaLN-Zero's all-zero start so outputs depend on the inputs.
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _text(cfg, prompts):
    return TextConditioner.from_config(cfg).encode(prompts, torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("attention", ["full", "factorised"])
def test_predicts_a_video_shaped_like_its_input_for_every_bucket_size(recipe, tiny, attention):
    cfg = tiny(dit={"attention": attention})
    model = _perturbed(recipe(cfg).build_model())
    cond = _text(cfg, ["a red circle moving left", "a blue square growing"])
    for shape in [(2, 3, 8, 16, 16), (2, 3, 4, 16, 32), (2, 3, 12, 8, 8)]:
        out = model(torch.randn(shape), torch.tensor([10.0, 500.0]), **cond)
        assert out.shape == shape and torch.isfinite(out).all()


def test_a_fresh_model_outputs_zeros_adaln_zero(recipe, tiny):
    cfg = tiny()
    model = recipe(cfg).build_model()
    out = model(torch.randn(1, 3, 8, 16, 16), torch.tensor([3.0]), **_text(cfg, ["a"]))
    assert torch.count_nonzero(out) == 0


def test_sizes_the_patch_does_not_divide_are_refused(recipe, tiny):
    cfg = tiny()
    model = recipe(cfg).build_model()
    with pytest.raises(ValueError, match="not divisible by patch"):
        model(torch.randn(1, 3, 7, 16, 16), torch.tensor([3.0]), **_text(cfg, ["a"]))
    with pytest.raises(ValueError, match=r"\(B, 3, T, H, W\)"):
        model(torch.randn(1, 1, 8, 16, 16), torch.tensor([3.0]), **_text(cfg, ["a"]))


def test_the_prompt_and_the_first_frame_both_change_the_prediction(recipe, tiny):
    cfg = tiny()
    model = _perturbed(recipe(cfg).build_model())
    x, t = torch.randn(1, 3, 8, 16, 16), torch.tensor([300.0])
    left = model(x, t, **_text(cfg, ["a red circle moving left"]))
    right = model(x, t, **_text(cfg, ["a red circle moving right"]))
    assert (left - right).abs().max() > 1e-4
    frame = torch.rand(1, 3, 16, 16) * 2 - 1
    with_frame = model(x, t, first_frame=frame, **_text(cfg, ["a red circle moving left"]))
    assert (with_frame - left).abs().max() > 1e-4
    not_given = model(
        x, t, first_frame=frame, first_frame_given=torch.tensor([False]),
        **_text(cfg, ["a red circle moving left"]),
    )  # fmt: skip
    torch.testing.assert_close(not_given, left)


def test_first_frame_condition_is_the_frame_and_a_mask_at_frame_zero_only():
    frame = torch.rand(2, 3, 4, 4)
    cond = first_frame_condition(frame, (2, 3, 5, 4, 4), torch.float32, torch.device("cpu"))
    assert cond.shape == (2, 4, 5, 4, 4)
    torch.testing.assert_close(cond[:, :3, 0], frame)
    assert (cond[:, 3, 0] == 1).all() and (cond[:, :, 1:] == 0).all()
    partial = first_frame_condition(
        frame, (2, 3, 5, 4, 4), torch.float32, torch.device("cpu"), torch.tensor([True, False])
    )
    assert (partial[1] == 0).all() and (partial[0, 3, 0] == 1).all()
    with pytest.raises(ValueError, match="first_frame must have shape"):
        first_frame_condition(frame[:, :, :2], (2, 3, 5, 4, 4), torch.float32, torch.device("cpu"))


def test_factorised_attention_adds_one_temporal_branch_per_block(recipe, tiny):
    full = recipe(tiny(dit={"attention": "full"})).build_model()
    fact = recipe(tiny(dit={"attention": "factorised"})).build_model()
    extra = sum(p.numel() for p in fact.parameters()) - sum(p.numel() for p in full.parameters())
    dim, head_dim = 24, 6
    attention = 4 * dim * dim + 4 * dim + 2 * head_dim  # qkv + out projections, q/k norms
    adaln = 3 * dim * dim + 3 * dim  # its shift, scale and gate
    assert extra == attention + adaln


def test_every_frame_of_pure_noise_gets_its_own_prediction_with_absolute_positions(recipe, tiny):
    # Where a shape starts and ends depends on the prompt ("moving left": right, then left);
    # from pure noise only absolute (t, h, w) positions can say which frame is which.
    cfg = tiny()
    assert cfg["dit"]["absolute_positions"] is True
    model = _perturbed(recipe(cfg).build_model())
    still = torch.randn(1, 3, 1, 32, 32).expand(1, 3, 8, 32, 32)  # the same frame 8 times
    out = model(still, torch.tensor([999.0]), **_text(cfg, ["a red circle moving left"]))
    assert (out[:, :, 0] - out[:, :, 6]).abs().max() > 1e-3


def test_checkpoints_saved_before_absolute_positions_existed_load_without_them():
    model = VideoDiT(dim=24, depth=1, heads=4)  # the constructor config of such a checkpoint
    assert model.dit.absolute_positions is False
    assert not any("pos" in name for name in model.state_dict())  # a fixed table, no weights
