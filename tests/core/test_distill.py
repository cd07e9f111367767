"""Consistency distillation (polydiff.core.train.distill): the objective on an exactly
solvable teacher, the distill: section's refusals, LoRA, and real DeepSpeed runs that distil
tiny image and video teachers into few-step students that ``generate`` loads.

The run tests start real ``deepspeed`` processes (CPU, gloo, ~20 s each); the teachers are
freshly initialised tiny models (the runs test the plumbing, benchmarks/distill the quality).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import Tensor, nn

from polydiff.core import schedules
from polydiff.core.analytic import GaussianMixture
from polydiff.core.data import write_shards
from polydiff.core.modality import GenerationRequest, generate, load_modality
from polydiff.core.predictions import target, to_eps
from polydiff.core.pretrained import from_pretrained
from polydiff.core.sampling import timesteps
from polydiff.core.train import ConfigError, launch, load_config
from polydiff.core.train.distill import (
    add_lora,
    consistency_loss,
    lcm_grids,
    merge_lora,
    previous_time,
)
from polydiff.core.train.trainer import write_final

REPO = Path(__file__).resolve().parents[2]
ZERO0 = str(REPO / "shared" / "configs" / "deepspeed" / "zero0_fp32.json")
ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
BUNDLED_VIDEO = REPO / "packages/video/src/polydiff/video/bundled/moving-shapes"


# --- the teacher ODE grid ---------------------------------------------------------------------


def _chain(schedule: schedules.Schedule, t: float, steps: int) -> list[float]:
    """Model times visited stepping down from ``t`` one interval at a time, to the clean end."""
    visited = [t]
    while True:
        s, clean = previous_time(schedule, torch.tensor([visited[-1]], dtype=torch.float64), steps)
        if bool(clean):
            return visited
        visited.append(float(s))


@pytest.mark.parametrize(
    "schedule", [schedules.cosine(), schedules.flow(shift=4.0)], ids=["vp", "flow-shift-4"]
)
def test_the_teacher_grid_holds_the_few_step_grids_stored_with_the_student(schedule):
    spacing = "trailing" if schedule.kind == "vp" else None  # LCM's grid; flow's default
    grid = _chain(schedule, schedule.t_max if schedule.kind == "flow" else 999.0, 40)
    assert grid == pytest.approx(timesteps(schedule, 40, spacing).tolist(), abs=1e-6)
    stored = {g.steps: g for g in lcm_grids(schedule, 40)}
    assert sorted(stored) == [1, 2, 4, 8]
    for steps, record in stored.items():  # every lcm grid lies on the 40 intervals
        assert record.sampler == "lcm" and len(record.timesteps) == steps
        assert list(record.timesteps) == pytest.approx(timesteps(schedule, steps, spacing).tolist())
        for t in record.timesteps:
            assert min(abs(t - g) for g in grid) < 1e-6


# --- the objective on an exactly solvable teacher ---------------------------------------------

MIXTURES = {label: GaussianMixture.random(3, 4, seed=label) for label in (0, 1)}
NULL = 2  # the unconditional input: both classes' mixture
BOTH = GaussianMixture(
    torch.cat([MIXTURES[0].means, MIXTURES[1].means]),
    torch.cat([MIXTURES[0].stds, MIXTURES[1].stds]),
    torch.cat([MIXTURES[0].weights, MIXTURES[1].weights]),
)


def exact_teacher(schedule: schedules.Schedule, prediction: str):
    """An exact class-conditional denoiser: label 0 / 1 its mixture, ``NULL`` their union."""
    models = {k: m.model(schedule, prediction) for k, m in {**MIXTURES, NULL: BOTH}.items()}

    def teacher(x: Tensor, t: Tensor, label: Tensor) -> Tensor:
        out = torch.empty_like(x)
        for value in label.unique().tolist():
            rows = label == value
            out[rows] = models[value](x[rows], t[rows])
        return out

    return teacher


def _guided(teacher, schedule, prediction, x, t, label, w):
    a, s = schedule.alpha(t.double())[:, None], schedule.sigma(t.double())[:, None]

    def x0_of(lab: Tensor) -> Tensor:
        out = teacher(x, t, label=lab).double()
        x0 = {"v": a * x - s * out, "flow": x - s * out, "eps": (x - s * out) / a}[prediction]
        return x0

    return torch.lerp(x0_of(torch.full_like(label, NULL)), x0_of(label), w)


def discrete_consistency_function(teacher, schedule, prediction, w, steps, wobble=0.0):
    """The student the objective is minimised by: it walks the teacher's guided DDIM chain from
    (x, t) down the grid to the clean level and predicts that end point (``wobble`` adds a
    t-dependent error, which no consistency function has)."""

    def student(x: Tensor, t: Tensor, label: Tensor) -> Tensor:
        state, now = x.double(), t.double()
        done = torch.zeros(len(x), dtype=torch.bool)
        end = torch.zeros_like(state)
        while not done.all():
            x0 = _guided(teacher, schedule, prediction, state.float(), now.float(), label, w)
            s, clean = previous_time(schedule, now, steps)
            finish = clean & ~done
            end[finish] = x0[finish]
            done |= clean
            a, sg = schedule.alpha(now)[:, None], schedule.sigma(now)[:, None]
            s = s.clamp(min=schedule.t_min)
            a2, sg2 = schedule.alpha(s)[:, None], schedule.sigma(s)[:, None]
            eps = (state - a * x0) / sg
            state = torch.where(done[:, None], state, a2 * x0 + sg2 * eps)
            now = torch.where(done, now, s)
        end = end + wobble * torch.sin(t.double() / 50.0)[:, None]
        a, sg = schedule.alpha(t.double())[:, None], schedule.sigma(t.double())[:, None]
        eps = to_eps(end, x.double(), a, sg)
        return target(end, eps, a, sg, prediction).to(x.dtype)

    return student


def _noisy(schedule: schedules.Schedule, t: Tensor, label: Tensor) -> Tensor:
    g = torch.Generator().manual_seed(1)
    x0 = torch.stack([MIXTURES[int(k)].sample(1, g)[0] for k in label])
    a, s = schedule.alpha(t.double())[:, None], schedule.sigma(t.double())[:, None]
    return (a * x0 + s * torch.randn(x0.shape, generator=g, dtype=torch.float64)).float()


def _loss(student, teacher, schedule, prediction, t, label, w=3.0, **kw) -> float:
    x = _noisy(schedule, t, label)
    loss, _ = consistency_loss(
        student, teacher, x, t, {"label": label}, {"label": torch.full_like(label, NULL)},
        schedule=schedule, prediction=prediction, guidance=w, ode_steps=8, **kw,
    )  # fmt: skip
    return float(loss)


CASES = [(schedules.cosine(), "v"), (schedules.flow(shift=3.0), "flow")]


@pytest.mark.parametrize(("schedule", "prediction"), CASES, ids=["vp-v", "flow"])
def test_the_teachers_consistency_function_has_zero_loss_and_perturbed_ones_do_not(
    schedule, prediction
):
    teacher = exact_teacher(schedule, prediction)
    t = torch.linspace(schedule.t_min + 1.0, schedule.t_max, 32).float()
    label = torch.arange(32) % 2
    exact = discrete_consistency_function(teacher, schedule, prediction, 3.0, 8)
    for distance in ("mse", "pseudo_huber"):
        assert _loss(exact, teacher, schedule, prediction, t, label, distance=distance) < 1e-5
    wobbly = discrete_consistency_function(teacher, schedule, prediction, 3.0, 8, wobble=0.3)
    assert _loss(wobbly, teacher, schedule, prediction, t, label, distance="mse") > 1e-3
    # The guidance is folded in: the consistency function of the unguided teacher is wrong.
    unguided = discrete_consistency_function(teacher, schedule, prediction, 1.0, 8)
    assert _loss(unguided, teacher, schedule, prediction, t, label, distance="mse") > 1e-3
    # A plain denoiser (the teacher itself) is no consistency function either.
    assert _loss(teacher, teacher, schedule, prediction, t, label, distance="mse") > 1e-3


def test_at_the_last_interval_the_target_is_the_teachers_ode_state_not_the_student():
    schedule, prediction = schedules.cosine(), "v"
    teacher = exact_teacher(schedule, prediction)
    t = torch.arange(1, 125, 4).float()  # 8 intervals of 125: every step lands on clean
    label = torch.arange(len(t)) % 2

    def student(x: Tensor, t: Tensor, label: Tensor) -> Tensor:
        # The guided teacher's x0 at t >= 1, nonsense at 0 (where the clean targets would
        # have asked it, had they used it).
        x0 = _guided(teacher, schedule, prediction, x, t, label, 3.0).float()
        a, s = schedule.alpha(t.double())[:, None], schedule.sigma(t.double())[:, None]
        v = target(x0.double(), to_eps(x0.double(), x.double(), a, s), a, s, "v").float()
        return torch.where((t >= 1)[:, None], v, torch.full_like(v, 1e3))

    x = _noisy(schedule, t, label)
    loss, extras = consistency_loss(
        student, teacher, x, t, {"label": label}, {"label": torch.full_like(label, NULL)},
        schedule=schedule, prediction=prediction, guidance=3.0, ode_steps=8, distance="mse",
    )  # fmt: skip
    assert float(extras["boundary"]) == 1.0
    assert float(loss) < 1e-10


def test_padding_is_ignored_and_stays_out_of_the_gradient():
    schedule = schedules.cosine()
    net = nn.Linear(4, 4)

    def student(x, t, valid):
        return torch.where(valid, net(x), torch.nan)  # NaN at padding must not leak

    x, t = torch.randn(6, 4), torch.full((6,), 500.0)
    valid = torch.tensor([[True, True, False, False]]).expand(6, 4)
    loss, _ = consistency_loss(
        student, student, torch.where(valid, x, 0.0), t, {}, {},
        schedule=schedule, prediction="v", guidance=1.0, ode_steps=8, valid=valid,
    )  # fmt: skip
    loss.backward()
    assert math.isfinite(float(loss.detach())) and torch.isfinite(net.weight.grad).all()


# --- LoRA ---------------------------------------------------------------------------------


class _Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.grouped = nn.Conv2d(6, 6, 3, padding=1, groups=3)
        self.line = nn.Conv1d(6, 5, 2, stride=2)
        self.attn = nn.MultiheadAttention(5, 1, batch_first=True)  # reads out_proj.weight
        self.norm = nn.LayerNorm(5)
        self.head = nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.grouped(self.conv(x)).flatten(2)  # (B, 6, 64)
        h = self.line(h).transpose(1, 2)  # (B, 32, 5)
        return self.head(self.norm(self.attn(h, h, h)[0]))


def test_lora_adapts_linear_and_conv_weights_and_merges_into_the_same_function():
    torch.manual_seed(0)
    model = _Mixed()
    keys = set(model.state_dict())
    x = torch.randn(2, 3, 8, 8)
    before = model(x)
    adapted = add_lora(model, rank=2, alpha=4.0)
    assert adapted == ["conv", "grouped", "line", "attn.out_proj", "head"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        f"{n}.parametrizations.weight.0.{k}" for n in adapted for k in ("down", "up")
    }
    torch.testing.assert_close(model(x), before)  # up starts at 0
    for name in adapted:  # as if trained
        nn.init.normal_(model.get_submodule(name).parametrizations.weight[0].up, std=0.3)
    tuned = model(x)
    assert not torch.allclose(tuned, before)
    merge_lora(model)
    assert set(model.state_dict()) == keys and type(model.conv) is nn.Conv2d
    assert all(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(model(x), tuned, rtol=1e-5, atol=1e-5)


# --- the distill: section -----------------------------------------------------------------


@pytest.fixture(scope="module")
def image_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A freshly initialised tiny image denoiser, saved as a final/ folder."""
    return _teacher(tmp_path_factory.mktemp("image-teacher") / "final", "image")


@pytest.fixture(scope="module")
def video_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _teacher(tmp_path_factory.mktemp("video-teacher") / "final", "video")


def _teacher(folder: Path, name: str) -> Path:
    cls = load_modality(name)
    recipe = cls.from_config({**cls.example_config, "guidance": 2.0})
    torch.manual_seed(0)
    return write_final(recipe.build_model(), folder, name, recipe.config)


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("image-shards")
    write_shards(load_modality("image").synthetic("digits", 24), out, maxcount=8)
    return out


@pytest.fixture(scope="module")
def video_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("video-shards")
    write_shards(load_modality("video").synthetic("moving-shapes", 8), out, maxcount=4)
    return out


TRAIN = {
    "max_steps": 4, "decay_steps": 4, "batch_size": 2, "lr": 1e-3, "warmup_steps": 1,
    "ema_decay": 0.5,
    "log_every": 1, "preview_every": 4, "checkpoint_every": 2, "keep_checkpoints": 0,
}  # fmt: skip


def distill_config(folder: Path, teacher: Path | str, shards: Path, modality="image", **change):
    """A distillation YAML in ``folder``; ``change`` replaces whole top-level sections, or
    ``distill`` keys (``distill={...}`` is merged into the default one)."""
    config: dict[str, Any] = {
        "modality": modality,
        "distill": {"teacher": str(teacher), "ode_steps": 8, **change.pop("distill", {})},
        "data": {"shards": str(shards)},
        "train": TRAIN,
        "deepspeed": ZERO0,
        **change,
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def test_the_student_config_is_the_teachers_with_the_model_keys_laid_over(
    tmp_path, image_teacher, image_shards
):
    cfg = load_config(distill_config(tmp_path, image_teacher, image_shards))
    recorded = json.loads((image_teacher / "config.json").read_text())["model"]
    assert cfg.model == recorded  # no model: section
    assert cfg.distill.teacher == str(image_teacher.resolve())
    assert cfg.distill.guidance == 2.0  # the teacher's scale unless given
    over = {"cond_drop": 0.0, "unet": {"dropout": 0.1}}
    cfg = load_config(distill_config(tmp_path, image_teacher, image_shards, model=over))
    assert cfg.model["cond_drop"] == 0.0
    assert cfg.model["unet"] == {**recorded["unet"], "dropout": 0.1}  # merged key by key
    bundled = load_config(distill_config(tmp_path, "bundled", image_shards))
    assert Path(bundled.distill.teacher).name == "digits"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"distill": {"teacher": "nowhere"}}, r"distill\.teacher in .*no checkpoint folder"),
        (
            {"distill": {"teacher": str(BUNDLED_VIDEO)}},
            r"distill\.teacher in .*holds a 'video' model, but modality is 'image'",
        ),
        ({"distill": {"ode_step": 4}}, r"unknown config key distill\.ode_step"),
        ({"distill": {"ode_steps": 0}}, r"distill\.ode_steps .*must be >= 1"),
        ({"distill": {"distance": "l1"}}, r"distill\.distance .*pseudo_huber, mse"),
        ({"distill": {"lora_rank": -1}}, r"distill\.lora_rank"),
        ({"distill": {"guidance": 80}}, r"distill\.guidance"),
        ({"model": {"schedule": "nope"}}, r"model\.schedule"),
    ],
)
def test_a_bad_distill_section_is_one_line_naming_the_key_before_any_process(
    tmp_path, image_teacher, image_shards, change, message
):
    path = distill_config(tmp_path, image_teacher, image_shards, **change)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=message) as caught:
        launch(path, out=tmp_path / "run", extra_env=ENV)
    assert "\n" not in str(caught.value)
    assert time.perf_counter() - start < 10 and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("remove", "message"),
    [
        ("model.safetensors", "has no model.safetensors"),
        ("model-section", "records no model config"),
    ],
)
def test_a_folder_that_is_no_trained_checkpoint_is_refused(
    tmp_path, image_teacher, image_shards, remove, message
):
    broken = shutil.copytree(image_teacher, tmp_path / "broken")
    if remove == "model.safetensors":
        (broken / remove).unlink()
    else:
        record = json.loads((broken / "config.json").read_text())
        del record["model"]
        (broken / "config.json").write_text(json.dumps(record))
    with pytest.raises(ConfigError, match=message):
        load_config(distill_config(tmp_path, broken, image_shards))


# --- real runs ------------------------------------------------------------------------------


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


@pytest.fixture(scope="module")
def image_run(tmp_path_factory, image_teacher, image_shards) -> Path:
    folder = tmp_path_factory.mktemp("image-run")
    config = distill_config(folder, image_teacher, image_shards)
    assert launch(config, out=folder / "run", extra_env=ENV) == 0
    return folder / "run"


def test_a_distillation_run_writes_a_plain_few_step_checkpoint_of_the_teachers_modality(
    image_run, image_teacher
):
    losses = _losses(image_run)
    assert sorted(losses) == [1, 2, 3, 4] and all(math.isfinite(v) for v in losses.values())
    assert (image_run / "previews" / "step_000004" / "digits.png").is_file()
    final = image_run / "final"
    record = json.loads((final / "config.json").read_text())
    teacher = json.loads((image_teacher / "config.json").read_text())
    assert record["class"] == teacher["class"] and record["modality"] == "image"
    assert {k: record["model"][k] for k in ("sampler", "sample_steps", "guidance")} == {
        "sampler": "lcm", "sample_steps": 4, "guidance": 1.0,
    }  # fmt: skip
    made = record["distilled_from"]
    assert made["teacher"] == str(image_teacher.resolve()) and made["guidance"] == 2.0
    assert made["teacher_checkpoint_id"] == teacher["checkpoint_id"]
    original = from_pretrained(image_teacher).state_dict()
    student = from_pretrained(final, type(from_pretrained(image_teacher))).state_dict()
    assert any(not torch.equal(student[k], original[k]) for k in original)  # it trained

    made = generate("image", GenerationRequest.of(
        ["a handwritten digit 3", "a handwritten digit 8"], checkpoint=final, steps=2,
        sampler="lcm",
    ))  # fmt: skip
    assert len(made.outputs) == 2 and made.outputs[0].size == (8, 8)
    assert made.metadata[0]["sampler"] == "lcm" and made.metadata[0]["steps"] == 2
    # It samples on the grid it was distilled on (stored beside it), not the default one.
    assert made.metadata[0]["grid"] == "tuned"
    assert made.metadata[0]["timesteps"] == [999.0, 499.0]


def test_a_resumed_distillation_equals_an_uninterrupted_one_exactly(
    tmp_path, image_run, image_teacher, image_shards
):
    config = distill_config(tmp_path, image_teacher, image_shards)
    run = tmp_path / "run"
    assert launch(config, out=run, max_steps=2, extra_env=ENV) == 0
    assert max(_losses(run)) == 2
    assert launch(config, out=run, resume=True, extra_env=ENV) == 0
    assert _losses(run) == _losses(image_run)  # every step, bit for bit
    a = from_pretrained(run / "final").state_dict()
    b = from_pretrained(image_run / "final").state_dict()
    assert all(torch.equal(a[k], v) for k, v in b.items())


def test_a_lora_distillation_of_a_video_model_merges_into_the_teachers_class(
    tmp_path, video_teacher, video_shards
):
    config = distill_config(
        tmp_path, video_teacher, video_shards, modality="video",
        distill={"lora_rank": 2, "sample_steps": 2},
        data={"shards": str(video_shards), "num_workers": 1},  # the recipe goes to a worker
        train={**TRAIN, "max_steps": 2, "checkpoint_every": 0, "preview_every": 0},
    )  # fmt: skip
    run = tmp_path / "run"
    assert launch(config, out=run, extra_env=ENV) == 0
    teacher = from_pretrained(video_teacher)
    student = from_pretrained(run / "final", type(teacher))  # plain: no adapter keys
    assert student.config == teacher.config
    changed = [
        k for k, v in teacher.state_dict().items() if not torch.equal(v, student.state_dict()[k])
    ]
    assert changed and all(k.endswith("weight") for k in changed)  # merged updates, no biases
    made = generate("video", GenerationRequest.of(
        "a red circle moving left", checkpoint=run / "final", steps=2,
    ))  # fmt: skip
    assert made.metadata[0]["sampler"] == "lcm" and made.outputs[0].shape[1] == 8


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
