"""What variable-length modalities need from the core: a valid-token mask (``valid=``) in
sampling, guidance and training, batch-1 conditioning broadcast against a batch-N state, and
models that return diffusers-style output objects or tuples.

Padded batches here are (B, C, T) sequences with a (B, 1, T) mask, as motion and audio have."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from polydiff.core import CFG, SAMPLERS, CFGPlusPlus, invert, sample, schedules
from polydiff.core.blocks import DiT
from polydiff.core.guidance import NoGuidance, broadcast_cond, concat_cond, valid_mask
from polydiff.core.objectives import diffusion_loss
from polydiff.core.predictions import model_output
from polydiff.core.schedules import Level

VP = schedules.linear()
C, T = 3, 9  # channels, padded length
LENGTHS = [9, 6, 2]  # real frames per sample
DETERMINISTIC = ["ddim", "euler", "heun", "dpmpp_2m", "dpmpp_3m", "unipc"]
WAVE = torch.sin(0.7 * torch.arange(32, dtype=torch.float64)) + torch.arange(C).view(C, 1) * 0.5


def lengths_mask(lengths, length=T) -> torch.Tensor:
    """(B, 1, length) bool, True at the first ``lengths[k]`` frames of sample k."""
    return (torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]).unsqueeze(1)


def randn(*shape, seed=0) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def labels(n: int, seed: int = 3) -> torch.Tensor:
    return torch.linspace(-1.0, 1.5, n, dtype=torch.float64) + 0.1 * seed


NULL = {"label": torch.zeros(1, dtype=torch.float64)}


def pointwise_x0(x, t, label, valid=None):
    """An x0 prediction in which every position depends only on itself (and the label)."""
    wave = WAVE[:, : x.shape[-1]]
    return label.view(-1, 1, 1) * wave + 0.3 * torch.tanh(x) * (1 + t.view(-1, 1, 1) / 1000)


def garbage_eps(x, t, label, valid=None):
    """An eps prediction that is far from 0 everywhere, padding included."""
    return torch.tanh(x) + 3.0 + 0.1 * label.view(-1, 1, 1)


class Spy:
    """Records the inputs and keyword arguments of every model call."""

    def __init__(self, net):
        self.net, self.inputs, self.kwargs = net, [], []

    def __call__(self, x, t, **kwargs):
        self.inputs.append(x.clone())
        self.kwargs.append(kwargs)
        return self.net(x, t, **kwargs)


class TinyDiT(nn.Module):
    """A (B, C, T) denoiser from polydiff.core.blocks.DiT: attention mixes all frames, so its
    output at real frames depends on padded ones unless it passes ``valid`` as the DiT mask."""

    def __init__(self, honour: bool = True, seed: int = 0):
        super().__init__()
        self.net = DiT(C, C, dim=16, depth=2, heads=2, rope_axes=1, cond_dim=1).double()
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # the zero-initialised layers would make the output exactly 0
            for p in self.net.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        self.honour = honour

    def forward(self, x, t, label, valid=None):
        mask = valid[:, 0] if self.honour and valid is not None else None  # (B, T) token mask
        out = self.net(x.transpose(1, 2), t, pooled=label.view(-1, 1), mask=mask)
        return out.transpose(1, 2)


def padded_inputs(lengths=LENGTHS, length=T, seed=0):
    """Noise that is NOT zero at padding, the mask, and the per-sample labels."""
    return randn(len(lengths), C, length, seed=seed), lengths_mask(lengths, length)


def run(model, noise, *, valid=None, guidance=None, sampler="ddim", steps=6, **kwargs):
    n = noise.shape[0]
    return sample(
        model,
        noise,
        schedule=kwargs.pop("schedule", VP),
        sampler=sampler,
        steps=steps,
        prediction=kwargs.pop("prediction", "eps"),
        guidance=guidance,
        cond=kwargs.pop("cond", {"label": labels(n)}),
        uncond=kwargs.pop("uncond", NULL),
        valid=valid,
        generator=torch.Generator().manual_seed(1),
        **kwargs,
    )


# --------------------------------------------------------------------------- the state at padding

GUIDERS = [None, CFG(3.0, rescale=0.7), CFGPlusPlus(0.5)]


@pytest.mark.parametrize("guidance", GUIDERS, ids=["unguided", "cfg_rescale", "cfg_pp"])
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_padded_positions_stay_exactly_zero_through_every_step_of_every_sampler(sampler, guidance):
    noise, valid = padded_inputs()
    model, seen = Spy(garbage_eps), []
    out = run(
        model,
        noise,
        valid=valid,
        guidance=guidance,
        sampler=sampler,
        callback=lambda i, t, x, x0: seen.append((x, x0)),
    )
    pad = ~valid.expand_as(noise)
    assert torch.count_nonzero(out[pad]) == 0
    assert torch.isfinite(out).all() and (out[~pad] != 0).all()
    for x in model.inputs:  # what the model sees, every call (guided: both halves)
        assert torch.count_nonzero(x[pad.repeat(x.shape[0] // noise.shape[0], 1, 1)]) == 0
    for x, x0 in seen:
        assert torch.count_nonzero(x[pad]) == 0 and torch.count_nonzero(x0[pad]) == 0
    evaluations = 2 * 6 - 1 if sampler == "heun" else 6
    assert len(model.inputs) == len(seen) == evaluations


def test_without_valid_the_same_padded_run_is_not_zero_at_padding():
    noise, valid = padded_inputs()
    out = run(garbage_eps, noise)
    assert (out[~valid.expand_as(noise)] != 0).all()


def test_the_model_gets_valid_only_when_the_caller_gives_it():
    noise, valid = padded_inputs()

    def no_valid_keyword(x, t, label):
        return garbage_eps(x, t, label)

    run(no_valid_keyword, noise)  # unchanged call without valid
    model = Spy(garbage_eps)
    run(model, noise, valid=valid)
    assert all(set(kw) == {"label", "valid"} for kw in model.kwargs)
    got = model.kwargs[0]["valid"]
    assert got.dtype == torch.bool and got.shape == (3, 1, T) and torch.equal(got, valid)
    guided = Spy(garbage_eps)
    run(guided, noise, valid=valid.float(), guidance=CFG(2.0))  # 0/1 floats work the same
    both = guided.kwargs[0]["valid"]
    assert both.shape == (6, 1, T) and torch.equal(both, torch.cat([valid, valid]))
    # a mask for all samples at once broadcasts to the batch
    shared = Spy(garbage_eps)
    run(shared, noise, valid=torch.arange(T) < 5)
    assert shared.kwargs[0]["valid"].shape == (3, 1, T)


def test_bad_valid_masks_raise_value_errors():
    noise, valid = padded_inputs()
    with pytest.raises(ValueError, match="broadcast"):
        run(garbage_eps, noise, valid=valid[:, :, :4])
    with pytest.raises(ValueError, match="broadcast"):
        run(garbage_eps, noise, valid=valid[None])
    with pytest.raises(ValueError, match="only 0 and 1"):
        run(garbage_eps, noise, valid=valid.float() * 0.5)
    with pytest.raises(ValueError, match="valid="):
        run(garbage_eps, noise, valid=valid, cond={"label": labels(3), "valid": valid})


def test_valid_mask_normalises_shapes_and_dtypes():
    like = torch.zeros(2, C, T)
    assert valid_mask(torch.ones(T), like).shape == (2, 1, T)
    assert valid_mask(torch.ones(1, 1, T, dtype=torch.int64), like).dtype == torch.bool
    got = valid_mask(lengths_mask([4, 9]).float(), like)
    assert torch.equal(got, lengths_mask([4, 9])) and got.is_contiguous()


# --------------------------------------------------------------------------- padding vs real


def alone_and_padded(model, lengths, length, *, guidance, sampler, valid=True, steps=6):
    """Each sample run alone at its own length, and all of them padded into one batch."""
    noise, mask = padded_inputs(lengths, length, seed=4)
    label = labels(len(lengths))
    common = dict(guidance=guidance, sampler=sampler, steps=steps, prediction="v")
    padded = run(model, noise, valid=mask if valid else None, cond={"label": label}, **common)
    alone = [
        run(model, noise[k : k + 1, :, :n], cond={"label": label[k : k + 1]}, **common)
        for k, n in enumerate(lengths)
    ]
    return padded, alone


@pytest.mark.parametrize("guidance", [None, CFG(3.0, rescale=0.7)], ids=["unguided", "cfg"])
@pytest.mark.parametrize("sampler", DETERMINISTIC)
def test_padding_never_influences_real_positions_of_a_dit_that_honours_the_mask(sampler, guidance):
    padded, alone = alone_and_padded(TinyDiT(), LENGTHS, T, guidance=guidance, sampler=sampler)
    for k, n in enumerate(LENGTHS):
        torch.testing.assert_close(padded[k, :, :n], alone[k][0], rtol=1e-9, atol=1e-9)
        assert torch.equal(padded[k, :, n:], torch.zeros(C, T - n, dtype=padded.dtype))


def test_a_dit_that_ignores_the_mask_lets_padding_change_real_positions():
    # The same check with a model that attends to padded frames: the test can fail.
    padded, alone = alone_and_padded(
        TinyDiT(honour=False), LENGTHS, T, guidance=None, sampler="ddim"
    )
    for k, n in enumerate(LENGTHS[1:], start=1):
        assert (padded[k, :, :n] - alone[k][0]).abs().max() > 1e-3


def test_invert_keeps_padding_at_zero_and_inverts_real_positions_independently_of_it():
    model = TinyDiT()
    data, valid = padded_inputs(seed=5)
    label = labels(3)
    kwargs = dict(schedule=VP, steps=8, prediction="v")
    noise = invert(model, data, cond={"label": label}, valid=valid, **kwargs)
    pad = ~valid.expand_as(data)
    assert torch.equal(noise[pad], torch.zeros(int(pad.sum()), dtype=noise.dtype))
    for k, n in enumerate(LENGTHS):
        one = invert(model, data[k : k + 1, :, :n], cond={"label": label[k : k + 1]}, **kwargs)
        torch.testing.assert_close(noise[k, :, :n], one[0], rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------- guidance statistics


def level_at(t: float) -> Level:
    return schedules.levels(VP, torch.tensor([t]))[0]


def fixed_predict(c, u):
    def predict(x, level, cond):
        return torch.cat([c, u]) if x.shape[0] == 2 * c.shape[0] else c

    return predict


@pytest.mark.parametrize("rescale", [0.7, 1.0])
def test_cfg_rescale_with_valid_equals_the_rescale_of_each_unpadded_sample(rescale):
    _, valid = padded_inputs()
    c, u = randn(3, C, T, seed=1), 0.4 * randn(3, C, T, seed=2)
    c, u = c + 10 * ~valid, u - 7 * ~valid  # garbage at padding: it must not count
    x, level, guider = (
        torch.zeros(3, C, T, dtype=torch.float64),
        level_at(500.0),
        CFG(6.0, rescale=rescale),
    )
    _, masked = guider(fixed_predict(c, u), x, level, {}, {}, valid=valid)
    _, unmasked = guider(fixed_predict(c, u), x, level, {}, {})
    for k, n in enumerate(LENGTHS):
        one = (slice(k, k + 1), slice(None), slice(0, n))
        _, ref = guider(fixed_predict(c[one], u[one]), x[one], level, {}, {})
        torch.testing.assert_close(masked[one], ref, rtol=1e-12, atol=1e-12)
        if n < T:
            assert not torch.allclose(unmasked[one], ref)
    if rescale == 1.0:  # the guided std over real frames is the conditional one
        for k, n in enumerate(LENGTHS):
            torch.testing.assert_close(masked[k, :, :n].std(), c[k, :, :n].std())


@pytest.mark.parametrize("pad", [1, 4, 11])
def test_cfg_rescale_in_sample_does_not_depend_on_the_padding_length(pad):
    lengths = [7, 3]
    guider = CFG(4.0, rescale=0.7)
    common = dict(guidance=guider, sampler="dpmpp_2m", steps=8)
    noise, valid = padded_inputs(lengths, 7 + pad, seed=6)
    label = {"label": labels(2)}
    kw = dict(prediction="x0", cond=label)
    with_valid = run(pointwise_x0, noise, valid=valid, **kw, **common)
    without = run(pointwise_x0, noise, **kw, **common)
    plain = run(pointwise_x0, noise, **kw, **{**common, "guidance": CFG(4.0)})
    for k, n in enumerate(lengths):
        one = noise[k : k + 1, :, :n]
        cond = {"label": label["label"][k : k + 1]}
        alone = run(pointwise_x0, one, prediction="x0", cond=cond, **common)[0]
        torch.testing.assert_close(with_valid[k, :, :n], alone, rtol=1e-10, atol=1e-10)
        # without the mask the rescale's std takes in the padding (the pointwise model itself
        # cannot see it: without rescale, real positions agree)
        assert (without[k, :, :n] - alone).abs().max() > 1e-3
        plain_alone = run(
            pointwise_x0, one, prediction="x0", cond=cond, **{**common, "guidance": CFG(4.0)}
        )[0]
        torch.testing.assert_close(plain[k, :, :n], plain_alone, rtol=1e-10, atol=1e-10)


def test_every_builtin_guider_accepts_valid_and_cfg_plus_plus_keeps_padding_at_zero():
    _, valid = padded_inputs()
    pad = ~valid.expand(3, C, T)
    c, u = randn(3, C, T, seed=1) * valid, randn(3, C, T, seed=2) * valid  # as predict gives
    x, level = randn(3, C, T, seed=3) * valid, level_at(300.0)
    for guider in [NoGuidance(), CFG(3.0), CFG(3.0, rescale=0.5), CFGPlusPlus(0.5)]:
        state, x0 = guider(fixed_predict(c, u), x, level, {}, {}, valid=valid)
        assert state.shape == x0.shape == x.shape
        assert (state[pad] == 0).all() and (x0[pad] == 0).all(), guider
    # CFG++ takes no statistics: valid changes nothing
    plain = CFGPlusPlus(0.5)(fixed_predict(c, u), x, level, {}, {})
    masked = CFGPlusPlus(0.5)(fixed_predict(c, u), x, level, {}, {}, valid=valid)
    assert all(torch.equal(a, b) for a, b in zip(plain, masked, strict=True))


# --------------------------------------------------------------------------- inpainting + valid


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "unipc", "heun", "ddpm"])
def test_inpainting_and_img2img_combine_with_valid(sampler):
    noise, valid = padded_inputs()
    init = randn(3, C, T, seed=8) + 5.0  # nonzero at padding: it must be ignored there
    mask = torch.zeros(1, C, 1)
    mask[:, 0] = 1.0  # generate channel 0, keep the others
    out = run(garbage_eps, noise, valid=valid, sampler=sampler, init=init, mask=mask)
    pad = ~valid.expand_as(noise)
    keep = (mask == 0).expand_as(noise) & ~pad
    assert torch.equal(out[pad], torch.zeros(int(pad.sum()), dtype=out.dtype))
    assert torch.equal(out[keep], init[keep])
    generate = (mask == 1).expand_as(noise) & ~pad
    assert not torch.allclose(out[generate], init[generate])
    partial = run(garbage_eps, noise, valid=valid, sampler=sampler, init=init, strength=0.5)
    assert torch.equal(partial[pad], torch.zeros(int(pad.sum()), dtype=out.dtype))


# --------------------------------------------------------------------------- batch-1 cond


B, D = 3, 4
DIRECTION = torch.linspace(-1.0, 1.0, D, dtype=torch.float64)


class LabelNet:
    """An x0 prediction (B, D) that insists on a (batch,) label."""

    def __init__(self):
        self.labels = []

    def __call__(self, x, t, label):
        assert label.shape == (x.shape[0],), (label.shape, x.shape)
        self.labels.append(label.clone())
        return label.view(-1, 1) * DIRECTION + 0.2 * torch.tanh(x)


def flat_run(model, cond, uncond=None, guidance=None, n=B):
    return sample(
        model,
        randn(n, D, seed=0),
        schedule=VP,
        sampler="dpmpp_2m",
        steps=5,
        prediction="x0",
        guidance=guidance,
        cond=cond,
        uncond=uncond,
    )


def test_a_batch_one_cond_is_expanded_in_the_unguided_path():
    model = LabelNet()
    one = flat_run(model, {"label": torch.tensor([2.0], dtype=torch.float64)})
    assert all(
        torch.equal(label, torch.full((B,), 2.0, dtype=torch.float64)) for label in model.labels
    )
    full = flat_run(LabelNet(), {"label": torch.full((B,), 2.0, dtype=torch.float64)})
    assert torch.equal(one, full)


@pytest.mark.parametrize("cond_batch,uncond_batch", [(1, 1), (1, B), (B, 1), (B, B)])
def test_batch_one_cond_and_uncond_are_expanded_under_guidance(cond_batch, uncond_batch):
    c = torch.full((cond_batch,), 2.0, dtype=torch.float64)
    u = torch.full((uncond_batch,), -1.0, dtype=torch.float64)
    model = LabelNet()
    out = flat_run(model, {"label": c}, {"label": u}, CFG(3.0))
    expected = torch.cat([torch.full((B,), 2.0), torch.full((B,), -1.0)]).double()
    assert all(torch.equal(label, expected) for label in model.labels)
    full = flat_run(LabelNet(), {"label": c.expand(B)}, {"label": u.expand(B)}, CFG(3.0))
    assert torch.equal(out, full)


def test_conditioning_with_a_wrong_batch_raises_before_the_model_runs():
    model = LabelNet()
    two = {"label": torch.ones(2, dtype=torch.float64)}
    with pytest.raises(ValueError, match=r"cond\['label'\].*\(2,\).*1 or 3"):
        flat_run(model, two)
    with pytest.raises(ValueError, match=r"uncond\['label'\].*\(2,\).*1 or 3"):
        flat_run(model, {"label": torch.ones(1, dtype=torch.float64)}, two, CFG(3.0))
    assert model.labels == []


def test_concat_cond_and_broadcast_cond_expand_batch_one_tensors_to_the_batch_of_x():
    tokens, null = torch.randn(1, 5, 2), torch.randn(1, 5, 2)
    out = concat_cond({"tokens": tokens, "mode": "a"}, {"tokens": null, "mode": "a"}, batch=B)
    assert out["tokens"].shape == (2 * B, 5, 2) and out["mode"] == "a"
    assert torch.equal(out["tokens"], torch.cat([tokens.expand(B, 5, 2), null.expand(B, 5, 2)]))
    wide = torch.randn(B, 5, 2)
    assert torch.equal(
        concat_cond({"tokens": tokens}, {"tokens": wide})["tokens"][:B], tokens.expand(B, 5, 2)
    )
    with pytest.raises(ValueError, match=r"\(2, 5, 2\).*\(1, 5, 2\).*1 or 3 \(the batch of x\)"):
        concat_cond({"tokens": torch.randn(2, 5, 2)}, {"tokens": null}, batch=B)
    with pytest.raises(ValueError, match="same length"):
        concat_cond({"tokens": tokens}, {"tokens": torch.randn(1, 4, 2)}, batch=B)
    got = broadcast_cond({"tokens": tokens, "scale": torch.tensor(2.0), "name": "x"}, B)
    assert got["tokens"].shape == (B, 5, 2) and got["tokens"].is_contiguous()
    assert got["scale"].ndim == 0 and got["name"] == "x"
    with pytest.raises(ValueError, match=r"uncond\['tokens'\]"):
        broadcast_cond({"tokens": torch.randn(2, 5, 2)}, B, name="uncond")


# --------------------------------------------------------------------------- output objects


@dataclass
class Output:
    """Like diffusers' UNet2DOutput: the prediction is ``.sample``."""

    sample: torch.Tensor


@pytest.mark.parametrize(
    "wrap", [Output, lambda t: (t,), lambda t: [t, "extra"]], ids=["object", "tuple", "list"]
)
@pytest.mark.parametrize("guidance", [None, CFG(3.0)], ids=["unguided", "cfg"])
def test_a_model_returning_an_output_object_or_a_tuple_samples_like_a_tensor_model(wrap, guidance):
    noise, _ = padded_inputs()

    def wrapped(x, t, label):
        return wrap(garbage_eps(x, t, label))

    expected = run(garbage_eps, noise, guidance=guidance, sampler="unipc")
    assert torch.equal(run(wrapped, noise, guidance=guidance, sampler="unipc"), expected)


def test_diffusers_unet2doutput_is_accepted():
    outputs = pytest.importorskip("diffusers.models.unets.unet_2d")
    noise, valid = padded_inputs()

    def wrapped(x, t, label, valid=None):
        return outputs.UNet2DOutput(sample=garbage_eps(x, t, label))

    torch.testing.assert_close(
        run(wrapped, noise, valid=valid), run(garbage_eps, noise, valid=valid), rtol=0, atol=0
    )
    value = torch.ones(2)
    assert model_output(outputs.UNet2DOutput(sample=value)) is value


def test_model_output_rejects_other_return_values():
    value = torch.ones(2)
    assert model_output(value) is value and model_output((value, None)) is value
    for bad in [None, {"sample": value}, (), ("text",)]:
        with pytest.raises(TypeError, match="expected a tensor"):
            model_output(bad)
    with pytest.raises(TypeError, match="dict"):
        run(lambda x, t, label: {"sample": x}, padded_inputs()[0])


def loss_batch(seed=0):
    x0, valid = padded_inputs(seed=seed)
    return x0, randn(3, C, T, seed=seed + 1), valid, torch.tensor([10.0, 500.0, 900.0])


def test_diffusion_loss_accepts_output_objects_and_tuples():
    x0, noise, _, t = loss_batch()
    net = nn.Linear(T, T).double()

    def plain(x, t_):
        return net(x)

    expected = diffusion_loss(plain, x0, VP, t=t, noise=noise)
    for wrap in (Output, lambda v: (v,)):
        got = diffusion_loss(lambda x, t_, w=wrap: w(plain(x, t_)), x0, VP, t=t, noise=noise)
        assert torch.equal(got, expected)


# --------------------------------------------------------------------------- valid in training


def test_valid_in_the_loss_scores_what_mask_scores_zeroes_the_input_and_reaches_the_model():
    x0, noise, valid, t = loss_batch()
    spy = Spy(lambda x, t_, **kw: pointwise_x0(x, t_, torch.ones(3, dtype=x.dtype)))
    kwargs = dict(prediction="x0", t=t, noise=noise, reduction="none")
    by_valid = diffusion_loss(spy, x0, VP, valid=valid, **kwargs)
    assert torch.equal(spy.kwargs[0]["valid"], valid) and spy.kwargs[0]["valid"].dtype == torch.bool
    pad = ~valid.expand_as(x0)
    assert torch.equal(spy.inputs[0][pad], torch.zeros(int(pad.sum()), dtype=x0.dtype))
    by_mask = diffusion_loss(spy, x0, VP, mask=valid, **kwargs)
    assert "valid" not in spy.kwargs[1]  # mask is a loss mask only: the model never sees it
    torch.testing.assert_close(by_valid, by_mask, rtol=1e-12, atol=0)
    # both: only elements where both are 1 count
    first_channel = torch.zeros(1, C, 1)
    first_channel[:, 0] = 1
    both = diffusion_loss(spy, x0, VP, valid=valid, mask=first_channel, **kwargs)
    combined = diffusion_loss(spy, x0, VP, mask=first_channel * valid, **kwargs)
    torch.testing.assert_close(both, combined, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="valid="):
        diffusion_loss(spy, x0, VP, valid=valid, cond={"valid": valid}, t=t, noise=noise)
    with pytest.raises(ValueError, match="no unmasked elements"):
        diffusion_loss(spy, x0, VP, valid=valid & (torch.arange(3) != 1).view(3, 1, 1), **kwargs)


def test_a_dit_honouring_valid_has_the_same_loss_and_gradient_alone_and_padded():
    model = TinyDiT()
    x0, noise, valid, t = loss_batch(seed=2)
    x0 = x0 + 100.0 * ~valid  # garbage where the batch is padded
    label = labels(3)
    padded = diffusion_loss(
        model,
        x0,
        VP,
        prediction="v",
        cond={"label": label},
        valid=valid,
        t=t,
        noise=noise,
        reduction="none",
    )
    for k, n in enumerate(LENGTHS):
        model.zero_grad()
        padded[k].backward(retain_graph=True)
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        alone = diffusion_loss(
            model,
            x0[k : k + 1, :, :n],
            VP,
            prediction="v",
            cond={"label": label[k : k + 1]},
            t=t[k : k + 1],
            noise=noise[k : k + 1, :, :n],
        )
        alone.backward()
        # the loss is taken in float32
        torch.testing.assert_close(padded[k], alone, rtol=1e-5, atol=1e-6)
        for g, p in zip(grads, model.parameters(), strict=True):
            torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-6)


def test_nan_from_the_model_at_padding_with_valid_reaches_neither_loss_nor_gradient():
    x0, noise, valid, t = loss_batch()
    weight = nn.Parameter(torch.ones(1, dtype=torch.float64))

    def model(x, t_, valid):
        return torch.where(valid, x * weight, math.nan)

    loss = diffusion_loss(model, x0, VP, valid=valid, t=t, noise=noise)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(weight.grad).all() and weight.grad.abs() > 0
