"""Behaviour of polydiff.core.guidance: classifier-free guidance as samplers see it (batched
calls, the guided x0, negative prompts, rescale, intervals, CFG++), custom guiders, argument
checks, ``concat_cond`` and conditioning dropout for CFG training."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch

from polydiff.core import CFG, SAMPLERS, CFGPlusPlus, sample, schedules, timesteps
from polydiff.core.guidance import as_guider, concat_cond, drop_conditioning
from polydiff.core.schedules import Level

B, D = 3, 4
VP = schedules.linear()
DIRECTION = torch.linspace(-1.0, 1.0, D, dtype=torch.float64)
COND = {"label": torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)}
NULL = {"label": torch.zeros(1, dtype=torch.float64)}  # batch 1: expanded to B by guidance


def x0_net(x, t, label):
    """A clean-sample prediction that depends on the label (prediction="x0")."""
    return label.view(-1, 1) * DIRECTION + 0.2 * torch.tanh(x) * (1 + t.view(-1, 1) / 1000)


def eps_net(x, t, label):
    """A smooth, label-dependent noise prediction (prediction="eps")."""
    return torch.tanh(0.7 * x) * (1 + t.view(-1, 1) / 1000) + 0.3 * label.view(-1, 1) * DIRECTION


class Recorder:
    """Wraps a deterministic model and records the batch size, times, labels and inputs of every
    call."""

    def __init__(self, net=x0_net):
        self.net = net
        self.batches: list[int] = []
        self.times: list[float] = []
        self.labels: list[torch.Tensor] = []
        self.inputs: list[torch.Tensor] = []

    def __call__(self, x, t, label):
        assert label.shape == (x.shape[0],)
        self.batches.append(x.shape[0])
        self.times.append(t[0].item())
        self.labels.append(label.clone())
        self.inputs.append(x.clone())
        return self.net(x, t, label)


def noise(seed: int = 0, n: int = B) -> torch.Tensor:
    return torch.randn(n, D, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def run(model, guidance, *, uncond=NULL, steps=5, sampler="ddim", prediction="x0", **kwargs):
    return sample(
        model,
        noise(),
        schedule=kwargs.pop("schedule", VP),
        sampler=sampler,
        steps=steps,
        prediction=prediction,
        guidance=guidance,
        cond=COND,
        uncond=uncond,
        generator=torch.Generator().manual_seed(1),
        **kwargs,
    )


def both_x0(x, t, uncond_label=NULL["label"]):
    """The model's conditional and unconditional clean estimates at state ``x``, time ``t``."""
    tt = torch.full((x.shape[0],), t, dtype=torch.float32)
    return x0_net(x, tt, COND["label"]), x0_net(x, tt, uncond_label.expand(x.shape[0]))


# --------------------------------------------------------------------------- CFG in sample


def test_cfg_with_scale_one_makes_single_batch_conditional_calls_only():
    model = Recorder()
    out = run(model, CFG(scale=1.0))
    assert model.batches == [B] * 5
    assert all(torch.equal(label, COND["label"]) for label in model.labels)
    assert torch.equal(out, run(Recorder(), None))


def test_cfg_makes_one_call_per_step_with_cond_and_uncond_batched_together():
    model = Recorder()
    run(model, CFG(scale=4.0))
    assert model.batches == [2 * B] * 5
    expected = torch.cat([COND["label"], NULL["label"].expand(B)])
    assert all(torch.equal(label, expected) for label in model.labels)
    # both halves see the same state
    assert all(torch.equal(x[:B], x[B:]) for x in model.inputs)


@pytest.mark.parametrize("scale", [0.0, 2.5, 7.0])
def test_guided_x0_is_u_plus_scale_times_c_minus_u(scale):
    seen = []
    run(Recorder(), CFG(scale=scale), callback=lambda i, t, x, x0: seen.append((t, x, x0)))
    assert len(seen) == 5
    for t, x, x0 in seen:
        c, u = both_x0(x, t)
        torch.testing.assert_close(x0, u + scale * (c - u), rtol=1e-12, atol=1e-12)


def test_a_number_as_guidance_means_cfg_with_that_scale():
    assert as_guider(3.0) == CFG(3.0) and as_guider(2) == CFG(2.0)
    plain, number = Recorder(), Recorder()
    assert torch.equal(run(plain, CFG(3.0)), run(number, 3.0))
    assert plain.batches == number.batches == [2 * B] * 5


def test_negative_conditioning_is_the_uncond_input_and_guidance_pushes_away_from_it():
    negative = {"label": torch.full((B,), -3.0, dtype=torch.float64)}
    model, seen = Recorder(), []
    run(
        model,
        CFG(scale=3.0),
        uncond=negative,
        callback=lambda i, t, x, x0: seen.append((t, x, x0)),
    )
    assert all(torch.equal(label[B:], negative["label"]) for label in model.labels)
    for t, x, x0 in seen:
        c, n = both_x0(x, t, negative["label"])
        # the guided estimate lies beyond the conditional one, on the far side from the negative
        assert torch.all(((x0 - c) * (c - n)).sum(-1) > 0)
        assert torch.all((x0 - n).norm(dim=-1) > (c - n).norm(dim=-1))
    # stronger guidance ends further from the negative prompt (label -3 lies along -DIRECTION)
    along = [
        (run(Recorder(), CFG(scale=w), uncond=negative) * DIRECTION).sum(-1)
        for w in (1.0, 2.0, 4.0)
    ]
    assert torch.all(along[0] < along[1]) and torch.all(along[1] < along[2])


def level_at(t: float) -> Level:
    return schedules.levels(VP, torch.tensor([t]))[0]


def fixed_predict(c: torch.Tensor, u: torch.Tensor):
    """A predict(x, level, cond) that answers c for the cond half and u for the uncond half."""
    calls = []

    def predict(x, level, cond):
        calls.append(x.shape[0])
        return torch.cat([c, u]) if x.shape[0] == 2 * c.shape[0] else c

    predict.calls = calls
    return predict


def test_guidance_rescale_one_restores_the_conditional_std_per_sample():
    g = torch.Generator().manual_seed(0)
    c = torch.randn(B, 8, generator=g, dtype=torch.float64)
    u = 0.5 * torch.randn(B, 8, generator=g, dtype=torch.float64)
    x, level = torch.zeros(B, 8, dtype=torch.float64), level_at(500.0)
    _, plain = CFG(scale=6.0)(fixed_predict(c, u), x, level, COND, NULL)
    _, full = CFG(scale=6.0, rescale=1.0)(fixed_predict(c, u), x, level, COND, NULL)
    _, half = CFG(scale=6.0, rescale=0.5)(fixed_predict(c, u), x, level, COND, NULL)
    torch.testing.assert_close(plain, u + 6.0 * (c - u))
    torch.testing.assert_close(full.std(dim=1), c.std(dim=1))
    assert not torch.allclose(plain.std(dim=1), c.std(dim=1))
    # rescale blends the rescaled and the plain guided estimates
    torch.testing.assert_close(half, 0.5 * (full + plain))


def test_guidance_rescale_in_sample_matches_the_cond_std_at_every_step():
    seen = []
    run(
        Recorder(),
        CFG(scale=5.0, rescale=1.0),
        callback=lambda i, t, x, x0: seen.append((t, x, x0)),
    )
    for t, x, x0 in seen:
        c, _ = both_x0(x, t)
        torch.testing.assert_close(x0.std(dim=1), c.std(dim=1))


@pytest.mark.parametrize("guider_cls", [CFG, CFGPlusPlus])
def test_guidance_interval_guides_only_at_noise_levels_inside_it(guider_cls):
    low, high = 1.0, 8.0  # sigma / alpha
    model = Recorder()
    run(model, guider_cls(scale=0.5, interval=(low, high)), steps=10)
    levels = VP.noise_level(timesteps(VP, 10))
    expected = [2 * B if low <= float(nl) <= high else B for nl in levels]
    assert model.batches == expected
    assert 0 < expected.count(2 * B) < len(expected)  # both cases occur on this grid
    assert model.times == pytest.approx(timesteps(VP, 10).tolist(), rel=1e-6)  # float32 times


# --------------------------------------------------------------------------- CFG++


def test_cfg_plus_plus_ddim_step_renoises_with_the_unconditional_noise():
    lam, times = 0.6, [800.0, 400.0]
    model = Recorder(eps_net)
    out = run(model, CFGPlusPlus(scale=lam), prediction="eps", timesteps=times)
    assert model.batches == [2 * B, 2 * B]

    def estimates(x, t, a, s):
        tt = torch.full((B,), t, dtype=torch.float32)
        eps_c, eps_u = eps_net(x, tt, COND["label"]), eps_net(x, tt, NULL["label"].expand(B))
        x0_c, x0_u = (x - s * eps_c) / a, (x - s * eps_u) / a
        return x0_u + lam * (x0_c - x0_u), eps_u

    (a0, s0), (a1, s1) = ((float(VP.alpha(t)), float(VP.sigma(t))) for t in times)
    x = noise() * math.hypot(a0, s0)
    x0_g, eps_u = estimates(x, times[0], a0, s0)
    x1 = a1 * x0_g + s1 * eps_u
    torch.testing.assert_close(model.inputs[1][:B], x1, rtol=1e-12, atol=1e-12)
    # plain CFG with the same guided x0 would renoise with the guided noise instead
    eps_g = (x - a0 * x0_g) / s0
    assert not torch.allclose(model.inputs[1][:B], a1 * x0_g + s1 * eps_g)
    # the last step lands on the guided x0 of the second evaluation
    final_x0, _ = estimates(x1, times[1], a1, s1)
    torch.testing.assert_close(out, final_x0, rtol=1e-12, atol=1e-12)


def test_cfg_plus_plus_returns_the_moved_state_and_the_guided_x0():
    c, u = torch.ones(B, D, dtype=torch.float64), torch.zeros(B, D, dtype=torch.float64)
    x, level = noise(), level_at(300.0)
    state, x0 = CFGPlusPlus(scale=0.4)(fixed_predict(c, u), x, level, COND, NULL)
    torch.testing.assert_close(x0, torch.full_like(x, 0.4))
    torch.testing.assert_close(state, x + level.alpha * (x0 - u))


# --------------------------------------------------------------------------- custom guiders


@dataclass
class SeparateCallsCFG:
    """CFG written from scratch with two forward passes instead of one batched pass."""

    scale: float

    def __call__(self, predict, x, level, cond, uncond):
        c = predict(x, level, cond)
        u = predict(x, level, {"label": uncond["label"].expand(x.shape[0])})
        return x, u + self.scale * (c - u)


@dataclass
class EveryOtherCallGuider:
    """Guides (one batched pass) on even calls only, conditional-only on odd calls, and
    removes the part of the guidance direction parallel to the conditional estimate."""

    scale: float = 3.0
    returned: list[torch.Tensor] = field(default_factory=list)

    def __call__(self, predict, x, level, cond, uncond):
        if len(self.returned) % 2:
            x0 = predict(x, level, cond)
        else:
            both = predict(torch.cat([x, x]), level, concat_cond(cond, uncond))
            c, u = both.chunk(2)
            diff = c - u
            along = (diff * c).sum(-1, keepdim=True) / (c * c).sum(-1, keepdim=True) * c
            x0 = c + (self.scale - 1) * (diff - along)
        self.returned.append(x0)
        return x, x0


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_a_new_guider_equal_to_cfg_gives_cfgs_samples_in_every_sampler(sampler):
    kwargs = dict(sampler=sampler, prediction="eps", steps=6)
    ours = run(Recorder(eps_net), CFG(scale=3.0), **kwargs)
    model = Recorder(eps_net)
    custom = run(model, SeparateCallsCFG(scale=3.0), **kwargs)
    torch.testing.assert_close(custom, ours, rtol=1e-10, atol=1e-10)
    assert set(model.batches) == {B}


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_a_new_guider_class_plugs_into_every_sampler(sampler):
    guider, model, seen = EveryOtherCallGuider(), Recorder(eps_net), []
    out = run(
        model,
        guider,
        sampler=sampler,
        prediction="eps",
        steps=6,
        callback=lambda i, t, x, x0: seen.append(x0),
    )
    evaluations = 2 * 6 - 1 if sampler == "heun" else 6
    assert len(guider.returned) == evaluations
    assert model.batches == [2 * B if k % 2 == 0 else B for k in range(evaluations)]
    # the sampler steps towards exactly what the guider returned
    assert len(seen) == evaluations and all(
        a is b for a, b in zip(seen, guider.returned, strict=True)
    )
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, run(Recorder(eps_net), None, sampler=sampler, prediction="eps"))


# --------------------------------------------------------------------------- argument checks


@pytest.mark.parametrize("guidance", [CFG(3.0), 3.0, CFGPlusPlus(0.5)])
def test_guidance_without_an_uncond_raises(guidance):
    with pytest.raises(ValueError, match="uncond"):
        run(Recorder(), guidance, uncond=None)


def test_cfg_with_scale_one_needs_no_uncond():
    model = Recorder()
    run(model, CFG(1.0), uncond=None)
    assert model.batches == [B] * 5


@pytest.mark.parametrize(
    "make",
    [
        lambda: CFG(scale=-1.0),
        lambda: CFG(scale=math.nan),
        lambda: CFG(scale=math.inf),
        lambda: CFG(scale=3.0, rescale=1.5),
        lambda: CFG(scale=3.0, rescale=-0.1),
        lambda: CFG(scale=3.0, rescale=math.nan),
        lambda: CFG(scale=3.0, interval=(5.0, 1.0)),
        lambda: CFGPlusPlus(scale=-0.5),
        lambda: CFGPlusPlus(scale=math.nan),
        lambda: CFGPlusPlus(scale=0.5, interval=(5.0, 1.0)),
        lambda: as_guider(-2.0),
        lambda: as_guider("strong"),
    ],
)
def test_out_of_range_guidance_settings_raise(make):
    with pytest.raises(ValueError):
        make()


def test_a_bad_scale_given_to_sample_raises():
    with pytest.raises(ValueError, match="scale"):
        run(Recorder(), -2.0)


# --------------------------------------------------------------------------- concat_cond


def test_concat_cond_stacks_cond_then_uncond_and_expands_a_batch_one_uncond():
    tokens = torch.randn(B, 5, 2)
    null = torch.randn(1, 5, 2)
    out = concat_cond({"tokens": tokens, "mode": "text"}, {"tokens": null, "mode": "text"})
    assert out["tokens"].shape == (2 * B, 5, 2) and out["mode"] == "text"
    assert torch.equal(out["tokens"][:B], tokens)
    assert torch.equal(out["tokens"][B:], null.expand(B, 5, 2))
    full = torch.randn(B, 5, 2)
    assert torch.equal(concat_cond({"tokens": tokens}, {"tokens": full})["tokens"][B:], full)


def test_concat_cond_rejects_mismatched_keys_shapes_and_values():
    tokens = torch.randn(B, 5, 2)
    with pytest.raises(ValueError, match=r"same keys.*\['mask', 'tokens'\].*\['tokens'\]"):
        concat_cond({"tokens": tokens, "mask": torch.ones(B, 5)}, {"tokens": tokens})
    with pytest.raises(ValueError, match=r"\(3, 5, 2\).*\(3, 7, 2\)"):
        concat_cond({"tokens": tokens}, {"tokens": torch.randn(B, 7, 2)})
    with pytest.raises(ValueError, match=r"\(3, 5, 2\).*\(2, 5, 2\)"):
        concat_cond({"tokens": tokens}, {"tokens": torch.randn(2, 5, 2)})
    with pytest.raises(ValueError, match="differs"):
        concat_cond({"mode": "text"}, {"mode": "image"})


# --------------------------------------------------------------------------- dropout


def dropout_cond(n: int):
    g = torch.Generator().manual_seed(7)
    return {
        "tokens": torch.randn(n, 4, 3, generator=g) + 5.0,  # never equal to the null tokens
        "mask": torch.ones(n, 4, dtype=torch.bool),
        "name": "prompt",
    }


NULL_TOKENS = {"tokens": torch.zeros(1, 4, 3), "mask": torch.tensor([[True, False, False, False]])}


def test_drop_conditioning_replaces_about_p_of_the_samples():
    n, p = 4000, 0.3
    _, dropped = drop_conditioning(
        dropout_cond(n), NULL_TOKENS, p, generator=torch.Generator().manual_seed(0)
    )
    assert dropped.dtype == torch.bool and dropped.shape == (n,)
    sd = math.sqrt(p * (1 - p) / n)
    assert abs(dropped.float().mean().item() - p) < 4 * sd


def test_drop_conditioning_replaces_exactly_the_flagged_samples_in_every_tensor():
    cond = dropout_cond(64)
    out, dropped = drop_conditioning(
        cond, NULL_TOKENS, 0.5, generator=torch.Generator().manual_seed(1)
    )
    assert 0 < dropped.sum() < 64
    assert torch.equal(
        out["tokens"][dropped], NULL_TOKENS["tokens"].expand(int(dropped.sum()), 4, 3)
    )
    assert torch.equal(out["tokens"][~dropped], cond["tokens"][~dropped])
    # bool masks are replaced the same way, and stay bool
    assert out["mask"].dtype == torch.bool
    assert torch.equal(out["mask"][dropped], NULL_TOKENS["mask"].expand(int(dropped.sum()), 4))
    assert out["mask"][~dropped].all()
    assert out["name"] == "prompt"  # non-tensors are kept


def test_drop_conditioning_accepts_a_full_batch_null_and_is_reproducible():
    cond = dropout_cond(16)
    null = {"tokens": torch.randn(16, 4, 3), "mask": torch.zeros(16, 4, dtype=torch.bool)}
    out, dropped = drop_conditioning(cond, null, 0.5, generator=torch.Generator().manual_seed(2))
    assert torch.equal(out["tokens"][dropped], null["tokens"][dropped])
    again, dropped_again = drop_conditioning(
        cond, null, 0.5, generator=torch.Generator().manual_seed(2)
    )
    assert torch.equal(dropped, dropped_again) and torch.equal(out["tokens"], again["tokens"])


def test_drop_conditioning_with_p_zero_keeps_everything_and_p_one_drops_everything():
    cond = dropout_cond(32)
    kept, none_dropped = drop_conditioning(cond, NULL_TOKENS, 0.0)
    assert not none_dropped.any()
    assert torch.equal(kept["tokens"], cond["tokens"]) and torch.equal(kept["mask"], cond["mask"])
    gone, all_dropped = drop_conditioning(cond, NULL_TOKENS, 1.0)
    assert all_dropped.all()
    assert torch.equal(gone["tokens"], NULL_TOKENS["tokens"].expand(32, 4, 3))


def test_drop_conditioning_rejects_bad_arguments():
    cond = dropout_cond(4)
    for p in (-0.1, 1.5):
        with pytest.raises(ValueError, match="probability"):
            drop_conditioning(cond, NULL_TOKENS, p)
    with pytest.raises(ValueError, match="lacks key 'mask'"):
        drop_conditioning(cond, {"tokens": NULL_TOKENS["tokens"]}, 0.5)
    with pytest.raises(ValueError, match="null"):
        drop_conditioning(cond, {**NULL_TOKENS, "tokens": torch.zeros(1, 5, 3)}, 0.5)
    with pytest.raises(ValueError, match="null"):
        drop_conditioning(cond, {**NULL_TOKENS, "tokens": torch.zeros(3, 4, 3)}, 0.5)
    with pytest.raises(ValueError, match="no tensors"):
        drop_conditioning({"name": "prompt"}, {}, 0.5)
