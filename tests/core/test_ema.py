"""Behaviour of polydiff.core.ema.EMA."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from polydiff.core.ema import EMA, unwrap_model


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.norm = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.lin(x))


def fill_(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


def test_shadow_is_an_fp32_copy_of_the_parameters_even_for_bf16_models():
    model = Tiny().to(torch.bfloat16)
    ema = EMA(model)
    assert set(ema.shadow) == {n for n, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        assert ema.shadow[name].dtype == torch.float32
        assert torch.equal(ema.shadow[name], p.float())
        assert ema.shadow[name].data_ptr() != p.data_ptr()


def test_closed_form_after_k_updates_with_constant_weights_and_no_warmup():
    model = Tiny()
    fill_(model, 1.0)  # shadow starts at a = 1
    ema = EMA(model, decay=0.9, warmup_steps=0)
    fill_(model, 3.0)  # constant target b = 3
    k = 7
    for _ in range(k):
        ema.update(model)
    expected = 3.0 + 0.9**k * (1.0 - 3.0)  # b + decay^k (a - b)
    for s in ema.shadow.values():
        torch.testing.assert_close(s, torch.full_like(s, expected))
    assert ema.num_updates == k


def test_warmup_decay_grows_from_zero_towards_decay_and_is_capped():
    ema = EMA(Tiny(), decay=0.9, warmup_steps=10)
    assert ema.decay_at(0) == 0.0
    assert ema.decay_at(10) == pytest.approx(0.5)  # half-way at n = warmup_steps
    assert ema.decay_at(50) == pytest.approx(50 / 60)
    assert ema.decay_at(10**6) == 0.9  # capped
    decays = [ema.decay_at(n) for n in range(200)]
    assert decays == sorted(decays)
    assert EMA(Tiny(), decay=0.9, warmup_steps=0).decay_at(0) == 0.9  # no warm-up


def test_first_update_copies_the_weights_exactly():
    model = Tiny()
    ema = EMA(model, decay=0.999, warmup_steps=5)
    fill_(model, 0.123)
    ema.update(model)
    for name, p in model.named_parameters():
        assert torch.equal(ema.shadow[name], p)


def test_warmup_of_one_step_is_the_running_mean_until_the_cap():
    model = Tiny()
    ema = EMA(model, decay=0.99, warmup_steps=1)
    values = [2.0, -1.0, 5.0, 0.5]
    for v in values:
        fill_(model, v)
        ema.update(model)
    mean = sum(values) / len(values)
    for s in ema.shadow.values():
        torch.testing.assert_close(s, torch.full_like(s, mean))


def test_buffers_are_copied_not_averaged():
    model = Tiny()
    ema = EMA(model, decay=0.9, warmup_steps=0)
    model.train()
    model(torch.randn(8, 3))  # moves the BatchNorm running stats
    ema.update(model)
    for name, b in model.named_buffers():
        assert torch.equal(ema.copied[name], b), name
    assert ema.copied["norm.num_batches_tracked"].dtype == torch.int64


def test_tied_parameters_are_averaged_once_and_stay_tied_after_copy_to():
    model = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 5, bias=False))
    model[1].weight = model[0].weight
    ema = EMA(model, warmup_steps=0)
    assert list(ema.shadow) == ["0.weight"]
    ema.copy_to(model)
    assert model[1].weight is model[0].weight


def test_copy_to_writes_the_ema_weights_in_the_model_dtype():
    model = Tiny()
    fill_(model, 1.0)
    ema = EMA(model, decay=0.5, warmup_steps=0)
    fill_(model, 3.0)
    ema.update(model)  # shadow = 2
    target = Tiny().to(torch.float64)
    ema.copy_to(target)
    for p in target.parameters():
        assert p.dtype == torch.float64
        assert torch.all(p == 2.0)


def test_swapped_into_uses_ema_weights_inside_and_restores_training_weights_exactly():
    model = Tiny().to(torch.bfloat16)
    ema = EMA(model, decay=0.5, warmup_steps=0)
    fill_(model, 0.7)
    ema.update(model)
    training = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.swapped_into(model) as inner:
        assert inner is model
        for name, p in model.named_parameters():
            assert torch.equal(p, ema.shadow[name].to(p.dtype))
    for k, v in model.state_dict().items():
        assert torch.equal(v, training[k]), k


def test_swapped_into_restores_even_when_the_block_raises():
    model = Tiny()
    ema = EMA(model, warmup_steps=0)
    fill_(model, 5.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="boom"), ema.swapped_into(model):
        raise RuntimeError("boom")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_state_dict_round_trip_resumes_identically():
    model = Tiny()
    ema = EMA(model, decay=0.95, warmup_steps=3)
    for v in (1.0, 2.0, 3.0):
        fill_(model, v)
        ema.update(model)
    buf = io.BytesIO()
    torch.save(ema.state_dict(), buf)
    buf.seek(0)

    resumed = EMA(Tiny(), decay=0.5, warmup_steps=0)  # settings come from the state
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert (resumed.num_updates, resumed.decay, resumed.warmup_steps) == (3, 0.95, 3)
    fill_(model, 4.0)
    ema.update(model)
    resumed.update(model)
    for name in ema.shadow:
        assert torch.equal(resumed.shadow[name], ema.shadow[name])


def test_load_state_dict_rejects_foreign_or_misshaped_state():
    ema = EMA(Tiny())
    state = ema.state_dict()
    other = EMA(nn.Linear(3, 4)).state_dict()
    with pytest.raises(ValueError, match="names differ"):
        ema.load_state_dict(other)
    bad = {**state, "shadow": {**state["shadow"], "lin.weight": torch.zeros(2, 2)}}
    with pytest.raises(ValueError, match="lin.weight"):
        ema.load_state_dict(bad)


def test_update_rejects_a_different_model():
    ema = EMA(Tiny())
    with pytest.raises(ValueError, match="does not match"):
        ema.update(nn.Linear(3, 4))


class DeepSpeedEngine(nn.Module):
    """Stand-in for deepspeed's engine: the real model lives in `.module`."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


# torch.compile's first use imports dynamo, which emits torch-internal deprecation warnings.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize(
    "wrap",
    [nn.DataParallel, DeepSpeedEngine, torch.compile, lambda m: DeepSpeedEngine(torch.compile(m))],
    ids=["DataParallel", "DeepSpeed", "compile", "nested"],
)
def test_wrapped_models_are_tracked_through_their_bare_module(wrap):
    bare = Tiny()
    wrapped = wrap(bare)
    assert unwrap_model(wrapped) is bare
    ema = EMA(wrapped, decay=0.5, warmup_steps=0)
    assert set(ema.shadow) == {n for n, _ in bare.named_parameters()}
    fill_(bare, 2.0)
    ema.update(wrapped)
    ema.update(bare)  # the bare module is interchangeable with its wrapper
    with ema.swapped_into(wrapped) as inner:
        assert inner is bare
    ema.copy_to(wrapped)
    assert torch.equal(bare.lin.bias, ema.shadow["lin.bias"])


def test_invalid_settings_are_rejected():
    with pytest.raises(ValueError, match="decay"):
        EMA(Tiny(), decay=1.0)
    with pytest.raises(ValueError, match="warmup_steps"):
        EMA(Tiny(), warmup_steps=-1)


def test_shadow_can_live_on_another_device():
    model = Tiny()
    ema = EMA(model, device="cpu").to("cpu")
    assert all(s.device.type == "cpu" for s in ema.shadow.values())
    ema.update(model)
