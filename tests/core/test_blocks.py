"""Behavioural specification of polydiff.core.blocks (tiny sizes, CPU)."""

import math

import pytest
import torch
from torch import nn

from polydiff.core.blocks import (
    Attention,
    DiT,
    DiTBlock,
    FinalLayer,
    PatchEmbed,
    RotaryEmbedding,
    TimestepEmbedder,
    UNet,
    _utils,
    apply_rotary,
    grid_positions,
    patchify_1d,
    patchify_2d,
    sincos_pos_embed,
    sincos_position_embedding,
    spacetime_patchify,
    spacetime_unpatchify,
    timestep_embedding,
    unpatchify_1d,
    unpatchify_2d,
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def randomize_(module: nn.Module, std: float = 0.2) -> nn.Module:
    """Overwrite every parameter (zero-initialised ones included) so behaviour is non-trivial."""
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(0.0, std)
    return module


def grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


# --- embeddings ----------------------------------------------------------------------------


def test_timestep_embedding_is_cos_then_sin_of_geometric_frequencies() -> None:
    t = torch.tensor([0.0, 3.5, 999.0])
    emb = timestep_embedding(t, 8, max_period=100.0)
    freqs = 100.0 ** (-torch.arange(4) / 4)
    expected = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=-1)
    assert emb.shape == (3, 8)
    torch.testing.assert_close(emb, expected)


def test_timestep_embedding_pads_odd_dim_with_zero_column() -> None:
    emb = timestep_embedding(torch.tensor([1.0, 2.0]), 7)
    assert emb.shape == (2, 7)
    assert torch.all(emb[:, -1] == 0)


def test_timestep_embedder_maps_timesteps_to_hidden_vectors() -> None:
    embedder = TimestepEmbedder(hidden=16, freq_dim=8)
    out = embedder(torch.tensor([0.0, 500.0]))
    assert out.shape == (2, 16)
    assert not torch.allclose(out[0], out[1])


@pytest.mark.parametrize("grid", [(5,), (3, 4), (2, 3, 4)])
def test_sincos_pos_embed_has_one_row_per_grid_cell(grid: tuple[int, ...]) -> None:
    table = sincos_pos_embed(24, grid)
    assert table.shape == (math.prod(grid), 24)
    assert torch.unique(table, dim=0).shape[0] == math.prod(grid)


def test_sincos_pos_embed_1d_is_sin_then_cos_of_position() -> None:
    table = sincos_pos_embed(4, 3)
    pos = torch.arange(3.0)[:, None]
    freqs = torch.tensor([1.0, 0.01])
    torch.testing.assert_close(
        table, torch.cat([torch.sin(pos * freqs), torch.cos(pos * freqs)], 1)
    )


def test_sincos_pos_embed_2d_splits_dim_between_row_and_column() -> None:
    table = sincos_pos_embed(8, (2, 3)).view(2, 3, 8)
    rows, cols = table[..., :4], table[..., 4:]
    # The first half depends only on the row, the second only on the column.
    assert torch.equal(rows[:, :1].expand_as(rows), rows)
    assert torch.equal(cols[:1].expand_as(cols), cols)
    torch.testing.assert_close(rows[:, 0], sincos_pos_embed(4, 2))


def test_sincos_pos_embed_rejects_dim_that_cannot_be_split_evenly() -> None:
    with pytest.raises(ValueError, match="dimension 5"):
        sincos_pos_embed(5, (2, 2))


# --- rotary embeddings ---------------------------------------------------------------------


def test_grid_positions_enumerates_cells_row_major() -> None:
    pos = grid_positions((2, 3))
    assert pos.tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    assert grid_positions((2, 2, 2)).shape == (8, 3)
    assert grid_positions((4,)).squeeze(-1).tolist() == [0, 1, 2, 3]


def _rotated_dot(rope: RotaryEmbedding, q: torch.Tensor, k: torch.Tensor, pq, pk) -> torch.Tensor:
    positions = torch.tensor([pq, pk], dtype=torch.float32)
    freqs = rope(positions)
    x = torch.stack([q, k])[None, None]  # (1, 1, 2, head_dim)
    rotated = apply_rotary(x, freqs)[0, 0]
    return rotated[0] @ rotated[1]


@pytest.mark.parametrize("axes", [1, 2, 3])
def test_rotary_dot_product_depends_only_on_position_difference(axes: int) -> None:
    rope = RotaryEmbedding(head_dim=12, axes=axes)
    q, k = torch.randn(12), torch.randn(12)
    base_q, base_k = [3.0, 1.0, 4.0][:axes], [1.0, 5.0, 2.0][:axes]
    shift = [7.0, -2.0, 11.0][:axes]
    moved_q = [a + s for a, s in zip(base_q, shift, strict=True)]
    moved_k = [a + s for a, s in zip(base_k, shift, strict=True)]
    before = _rotated_dot(rope, q, k, base_q, base_k)
    after = _rotated_dot(rope, q, k, moved_q, moved_k)
    torch.testing.assert_close(before, after, rtol=1e-4, atol=1e-4)
    # A different offset changes the score, so the test above is not vacuous.
    other = _rotated_dot(rope, q, k, moved_q, base_k)
    assert not torch.allclose(before, other, atol=1e-3)


def test_rotary_preserves_vector_norms_and_is_identity_at_origin() -> None:
    rope = RotaryEmbedding(head_dim=8, axes=2)
    x = torch.randn(2, 3, 5, 8)
    positions = torch.randint(0, 50, (5, 2))
    rotated = apply_rotary(x, rope(positions))
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))
    at_origin = apply_rotary(x, rope(torch.zeros(5, 2)))
    torch.testing.assert_close(at_origin, x)


def test_rotary_accepts_per_sample_positions() -> None:
    rope = RotaryEmbedding(head_dim=8, axes=1)
    x = torch.randn(2, 2, 4, 8)
    positions = torch.stack([torch.arange(4), torch.arange(4) + 3])[..., None]  # (B, L, 1)
    batched = apply_rotary(x, rope(positions))
    torch.testing.assert_close(batched[1], apply_rotary(x[1:], rope(positions[1]))[0])


def test_rotary_keeps_dtype_of_low_precision_inputs() -> None:
    rope = RotaryEmbedding(head_dim=4, axes=1)
    x = torch.randn(1, 1, 3, 4, dtype=torch.bfloat16)
    assert apply_rotary(x, rope(grid_positions((3,)))).dtype == torch.bfloat16


def test_rotary_frequencies_survive_half_precision_module_casts() -> None:
    positions = torch.tensor([[1000.0, 3.0]])
    full = RotaryEmbedding(head_dim=8, axes=2)(positions)
    cast = RotaryEmbedding(head_dim=8, axes=2).to(torch.bfloat16)(positions)
    torch.testing.assert_close(cast, full)


def test_rotary_rejects_head_dim_too_small_for_axes_and_wrong_positions() -> None:
    with pytest.raises(ValueError, match="dimension 4"):
        RotaryEmbedding(head_dim=4, axes=3)
    with pytest.raises(ValueError, match="positions"):
        RotaryEmbedding(head_dim=8, axes=2)(torch.zeros(5, 3))


# --- attention -----------------------------------------------------------------------------


def test_self_attention_matches_softmax_formula() -> None:
    attn = Attention(dim=8, heads=2)
    x = torch.randn(2, 5, 8)
    q, k, v = attn.to_qkv(x).chunk(3, dim=-1)
    q, k, v = (t.view(2, 5, 2, 4).transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(4), dim=-1)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(2, 5, 8))
    torch.testing.assert_close(attn(x), expected)


def test_cross_attention_reads_context_of_another_width() -> None:
    attn = Attention(dim=8, heads=2, context_dim=6)
    out = attn(torch.randn(2, 5, 8), context=torch.randn(2, 3, 6))
    assert out.shape == (2, 5, 8)


def test_padded_keys_get_no_attention_weight() -> None:
    attn = Attention(dim=8, heads=2, context_dim=6)
    x, context = torch.randn(2, 4, 8), torch.randn(2, 5, 6)
    key_mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    out = attn(x, context, key_mask=key_mask)
    # Garbage in the padded slots changes nothing, and equals attending to the real keys only.
    context_noisy = context.clone()
    context_noisy[0, 3:] = 1e3 * torch.randn(2, 6)
    torch.testing.assert_close(attn(x, context_noisy, key_mask=key_mask), out)
    torch.testing.assert_close(attn(x[:1], context[:1, :3]), out[:1])


def test_fully_padded_row_outputs_zeros_without_nan() -> None:
    attn = Attention(dim=8, heads=2, context_dim=6, qk_norm=True)
    x = torch.randn(2, 4, 8, requires_grad=True)
    key_mask = torch.tensor([[False] * 3, [True, False, True]])
    out = attn(x, torch.randn(2, 3, 6), key_mask=key_mask)
    out.sum().backward()
    assert torch.all(out[0] == 0)
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("qk_norm", [True, "rms", "layer"])
def test_qk_norm_variants_normalise_per_head(qk_norm: bool | str) -> None:
    attn = Attention(dim=8, heads=2, qk_norm=qk_norm)
    assert attn.q_norm.normalized_shape == (4,)
    assert attn(torch.randn(1, 3, 8)).shape == (1, 3, 8)


def test_attention_rejects_misuse() -> None:
    rope = RotaryEmbedding(4, axes=1)(grid_positions((3,)))
    with pytest.raises(ValueError, match="self-attention"):
        Attention(8, 2, context_dim=6)(torch.randn(1, 3, 8), torch.randn(1, 2, 6), rope=rope)
    with pytest.raises(ValueError, match="key_mask"):
        Attention(8, 2)(torch.randn(1, 3, 8), key_mask=torch.ones(1, 3))
    with pytest.raises(ValueError, match="not divisible"):
        Attention(10, 4)


# --- DiT -----------------------------------------------------------------------------------


def test_fresh_dit_block_is_identity() -> None:
    block = DiTBlock(dim=16, heads=2, context_dim=8)
    x = torch.randn(2, 5, 16)
    out = block(x, torch.randn(2, 16), context=torch.randn(2, 3, 8))
    torch.testing.assert_close(out, x)


def test_fresh_final_layer_and_dit_output_zeros() -> None:
    assert torch.all(FinalLayer(16, 3)(torch.randn(2, 4, 16), torch.randn(2, 16)) == 0)
    model = DiT(in_dim=3, out_dim=3, dim=16, depth=2, heads=2, context_dim=8, rope_axes=1)
    out = model(torch.randn(2, 6, 3), torch.tensor([1.0, 900.0]), context=torch.randn(2, 4, 8))
    assert out.shape == (2, 6, 3)
    assert torch.all(out == 0)


def test_dit_without_positions_is_permutation_equivariant() -> None:
    model = randomize_(DiT(in_dim=3, out_dim=3, dim=16, depth=2, heads=2)).eval()
    points, t = torch.randn(2, 7, 3), torch.tensor([10.0, 500.0])
    perm = torch.randperm(7)
    torch.testing.assert_close(model(points[:, perm], t), model(points, t)[:, perm])


def test_dit_with_rope_is_equivariant_only_when_positions_move_with_tokens() -> None:
    model = randomize_(DiT(in_dim=3, out_dim=3, dim=16, depth=1, heads=2, rope_axes=2)).eval()
    tokens, t = torch.randn(1, 6, 3), torch.tensor([10.0])
    positions = grid_positions((2, 3))
    perm = torch.randperm(6)
    out = model(tokens, t, positions=positions)
    torch.testing.assert_close(model(tokens[:, perm], t, positions=positions[perm]), out[:, perm])
    assert not torch.allclose(model(tokens[:, perm], t, positions=positions), out[:, perm])


@pytest.mark.parametrize("rope_axes", [0, 1])
def test_dit_padded_tokens_do_not_affect_real_tokens(rope_axes: int) -> None:
    model = randomize_(
        DiT(in_dim=4, out_dim=4, dim=16, depth=2, heads=2, context_dim=6, rope_axes=rope_axes)
    ).eval()
    tokens, t, context = torch.randn(2, 6, 4), torch.tensor([3.0, 700.0]), torch.randn(2, 2, 6)
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    out = model(tokens, t, context, mask=mask)
    garbage = tokens.clone()
    garbage[0, 4:] = 100 * torch.randn(2, 4)
    out_garbage = model(garbage, t, context, mask=mask)
    torch.testing.assert_close(out_garbage, out)
    torch.testing.assert_close(model(tokens[:1, :4], t[:1], context[:1]), out[:1, :4])
    assert torch.all(out[0, 4:] == 0)


def test_dit_ignores_padded_text_tokens() -> None:
    model = randomize_(DiT(in_dim=4, out_dim=4, dim=16, depth=1, heads=2, context_dim=6)).eval()
    tokens, t = torch.randn(1, 5, 4), torch.tensor([50.0])
    context, context_mask = torch.randn(1, 4, 6), torch.tensor([[True, True, False, False]])
    out = model(tokens, t, context, context_mask)
    torch.testing.assert_close(model(tokens, t, context[:, :2]), out)
    assert not torch.allclose(model(tokens, t, context), out)


def test_dit_pooled_conditioning_changes_the_output() -> None:
    model = randomize_(DiT(in_dim=4, out_dim=4, dim=16, depth=1, heads=2, cond_dim=5)).eval()
    tokens, t = torch.randn(1, 3, 4), torch.tensor([50.0])
    out_a = model(tokens, t, pooled=torch.randn(1, 5))
    out_b = model(tokens, t, pooled=torch.randn(1, 5))
    assert not torch.allclose(out_a, out_b)
    with pytest.raises(ValueError, match="pooled"):
        model(tokens, t)


def test_sincos_position_embedding_of_grid_cells_is_the_grid_table() -> None:
    positions = grid_positions((2, 3, 4))
    table = sincos_position_embedding(positions, 30)
    torch.testing.assert_close(table, sincos_pos_embed(30, (2, 3, 4)))
    per_sample = sincos_position_embedding(positions[None].expand(2, -1, -1), 30)
    torch.testing.assert_close(per_sample, table[None].expand(2, -1, -1))
    with pytest.raises(ValueError, match="positions must be"):
        sincos_position_embedding(torch.zeros(5, 4), 30)


def test_rotary_alone_cannot_tell_where_identical_tokens_are_absolute_positions_can() -> None:
    # Rotary attention sees offsets only: a sequence of identical tokens gives every interior
    # token the same output. Absolute positions make each token know where it is.
    tokens, t = torch.ones(1, 9, 3), torch.tensor([100.0])
    positions = grid_positions((9,))
    rotary = randomize_(DiT(3, 3, 16, 1, 2, rope_axes=1)).eval()
    out = rotary(tokens, t, positions=positions)[0]
    torch.testing.assert_close(out[3], out[5])
    absolute = randomize_(DiT(3, 3, 16, 1, 2, rope_axes=1, absolute_positions=True)).eval()
    out = absolute(tokens, t, positions=positions)[0]
    assert not torch.allclose(out[3], out[5], atol=1e-4)
    with pytest.raises(ValueError, match="absolute_positions needs"):
        DiT(3, 3, 16, 1, 2, absolute_positions=True)


def test_dit_rejects_missing_or_unexpected_positions() -> None:
    tokens, t = torch.randn(1, 4, 3), torch.tensor([1.0])
    with pytest.raises(ValueError, match="needs positions"):
        DiT(3, 3, 16, 1, 2, rope_axes=2)(tokens, t)
    with pytest.raises(ValueError, match="rope_axes=0"):
        DiT(3, 3, 16, 1, 2)(tokens, t, positions=grid_positions((4,)))


def test_dit_gradient_checkpointing_gives_identical_gradients() -> None:
    model = randomize_(DiT(4, 4, dim=16, depth=2, heads=2, context_dim=6, rope_axes=1))
    tokens, t, context = torch.randn(2, 5, 4), torch.tensor([3.0, 700.0]), torch.randn(2, 3, 6)
    mask = torch.tensor([[True] * 3 + [False] * 2, [True] * 5])
    results = []
    for enabled in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = enabled
        model(tokens, t, context, mask=mask).square().sum().backward()
        results.append(grads(model))
    plain, checkpointed = results
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)


def test_gradient_checkpointing_is_used_only_in_training(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real_checkpoint = _utils.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return real_checkpoint(*args, **kwargs)

    monkeypatch.setattr(_utils, "checkpoint", counting_checkpoint)
    model = DiT(4, 4, dim=16, depth=2, heads=2, gradient_checkpointing=True)
    tokens, t = torch.randn(1, 3, 4), torch.tensor([1.0])
    model.eval()(tokens, t)
    assert calls == []
    model.train()(tokens, t)
    assert calls == [False, False]


# --- patchify ------------------------------------------------------------------------------


def test_patchify_1d_round_trips_and_groups_consecutive_samples() -> None:
    x = torch.randn(2, 3, 12)
    tokens = patchify_1d(x, 4)
    assert tokens.shape == (2, 3, 12)
    torch.testing.assert_close(tokens[:, 1].view(2, 3, 4), x[:, :, 4:8])
    torch.testing.assert_close(unpatchify_1d(tokens, 4, length=12, c=3), x)


def test_patchify_2d_round_trips_with_row_major_patch_order() -> None:
    x = torch.randn(2, 3, 4, 6)
    tokens = patchify_2d(x, 2)
    assert tokens.shape == (2, 6, 12)
    # Token 1 is the patch at grid row 0, column 1.
    torch.testing.assert_close(tokens[:, 1].view(2, 3, 2, 2), x[:, :, 0:2, 2:4])
    torch.testing.assert_close(unpatchify_2d(tokens, 2, h=4, w=6, c=3), x)


def test_spacetime_patchify_round_trips_with_time_slowest() -> None:
    x = torch.randn(1, 2, 4, 4, 6)
    tokens = spacetime_patchify(x, (2, 2, 3))
    assert tokens.shape == (1, 2 * 2 * 2, 2 * 2 * 2 * 3)
    # Token 4 is the first tubelet of the second time slab.
    torch.testing.assert_close(tokens[:, 4].view(1, 2, 2, 2, 3), x[:, :, 2:4, 0:2, 0:3])
    torch.testing.assert_close(spacetime_unpatchify(tokens, (2, 2, 3), 4, 4, 6, c=2), x)


def test_patchify_errors_name_the_offending_sizes() -> None:
    with pytest.raises(ValueError, match="length 10 is not divisible by patch size 4"):
        patchify_1d(torch.randn(1, 1, 10), 4)
    with pytest.raises(ValueError, match="width 5 is not divisible by patch size 2"):
        patchify_2d(torch.randn(1, 1, 4, 5), 2)
    with pytest.raises(ValueError, match="frames 3 is not divisible by patch size 2"):
        spacetime_patchify(torch.randn(1, 1, 3, 4, 4), (2, 2, 2))
    with pytest.raises(ValueError, match=r"expected tokens of shape \(B, 4, 12\)"):
        unpatchify_2d(torch.randn(1, 4, 8), 2, h=4, w=4, c=3)


@pytest.mark.parametrize(
    ("dims", "shape", "patch", "tokens"),
    [(1, (2, 3, 8), 2, 4), (2, (2, 3, 4, 4), 2, 4), (3, (2, 3, 2, 4, 4), (1, 2, 2), 8)],
)
def test_patch_embed_maps_signals_to_tokens(dims, shape, patch, tokens) -> None:
    embed = PatchEmbed(in_ch=3, dim=16, patch=patch, dims=dims)
    assert embed(torch.randn(shape)).shape == (2, tokens, 16)


# --- U-Net ---------------------------------------------------------------------------------


def tiny_unet(**kwargs) -> UNet:
    config = {
        "base_channels": 8,
        "channel_mult": (1, 2),
        "num_res_blocks": 1,
        "attention_levels": (1,),
    }
    config.update(kwargs)
    return UNet(**config)


@pytest.mark.parametrize(("dims", "shape"), [(2, (2, 3, 8, 8)), (1, (2, 3, 16))])
def test_unet_preserves_shape_and_outputs_zeros_at_init(dims: int, shape) -> None:
    model = tiny_unet(in_channels=3, out_channels=3, dims=dims)
    out = model(torch.randn(shape), torch.tensor([0.0, 999.0]))
    assert out.shape == shape
    assert torch.all(out == 0)


def test_unet_output_channels_can_differ_from_input() -> None:
    model = tiny_unet(in_channels=2, out_channels=4, dims=1, channel_mult=(1, 2, 2))
    assert model(torch.randn(1, 2, 8), torch.tensor([5.0])).shape == (1, 4, 8)


def test_unet_rejects_sizes_not_divisible_by_downsampling_factor() -> None:
    model = tiny_unet(in_channels=3, out_channels=3, channel_mult=(1, 2, 2))
    with pytest.raises(ValueError, match=r"\(8, 6\) must be divisible by 4"):
        model(torch.randn(1, 3, 8, 6), torch.tensor([1.0]))


def test_unet_cross_attention_uses_only_real_text_tokens() -> None:
    model = randomize_(tiny_unet(in_channels=2, out_channels=2, context_dim=6), std=0.1).eval()
    x, t = torch.randn(1, 2, 4, 4), torch.tensor([10.0])
    context, context_mask = torch.randn(1, 3, 6), torch.tensor([[True, True, False]])
    out = model(x, t, context, context_mask)
    torch.testing.assert_close(model(x, t, context[:, :2]), out)
    assert not torch.allclose(model(x, t, torch.randn(1, 3, 6), context_mask), out)


def test_unet_timestep_changes_the_output() -> None:
    model = randomize_(tiny_unet(in_channels=2, out_channels=2, dims=1), std=0.1).eval()
    x = torch.randn(1, 2, 8)
    assert not torch.allclose(model(x, torch.tensor([1.0])), model(x, torch.tensor([800.0])))


def test_unet_gradient_checkpointing_gives_identical_gradients() -> None:
    model = randomize_(tiny_unet(in_channels=2, out_channels=2, context_dim=6), std=0.1)
    x, t, context = torch.randn(2, 2, 4, 4), torch.tensor([3.0, 700.0]), torch.randn(2, 3, 6)
    results = []
    for enabled in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = enabled
        model(x, t, context).square().sum().backward()
        results.append(grads(model))
    plain, checkpointed = results
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)


# --- factorised space/time attention -----------------------------------------------------


def test_factorised_attention_equals_full_attention_restricted_to_a_frame_or_a_place():
    from polydiff.core.blocks import attend_along

    torch.manual_seed(0)
    grid = (3, 2, 4)  # T, H, W
    attn = Attention(16, 2)
    x = torch.randn(2, 24, 16)
    rope = RotaryEmbedding(8, 3)(grid_positions(grid))
    frame = grid_positions(grid)[:, 0]
    place = grid_positions(grid)[:, 1] * 4 + grid_positions(grid)[:, 2]
    for axis, group in (("space", frame), ("time", place)):
        out = attend_along(attn, x, grid, axis, rope=rope)
        for g in group.unique():
            members = (group == g).nonzero().squeeze(1)
            alone = attn(x[:, members], rope=rope[members])
            torch.testing.assert_close(out[:, members], alone, rtol=1e-5, atol=1e-5)


def test_factorised_dit_block_needs_the_grid_and_starts_as_identity():
    block = DiTBlock(16, 2, attention="factorised")
    x, c = torch.randn(2, 24, 16), torch.randn(2, 16)
    torch.testing.assert_close(block(x, c, grid=(3, 2, 4)), x)  # adaLN-Zero: gates are 0
    with pytest.raises(ValueError, match="grid"):
        block(x, c)
    with pytest.raises(ValueError, match="attention must be one of"):
        DiTBlock(16, 2, attention="sparse")
