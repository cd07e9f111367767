"""Tuned step grids (polydiff.core.step_grids): the DP over a teacher trajectory, the
refinement, and the grids file. Exact Gaussian-mixture denoisers, so nothing is trained."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from polydiff.core import sample, schedules
from polydiff.core.analytic import GaussianMixture
from polydiff.core.sampling import make_grid, timesteps
from polydiff.core.step_grids import (
    GRIDS_NAME,
    GridError,
    TunedGrid,
    _golden_section,
    dp_grid,
    find_grid,
    first_order_step,
    nfe_of,
    read_grids,
    steps_for,
    teacher_times,
    tune_grid,
    write_grid,
)

MIXTURE = GaussianMixture.random(6, 4, seed=3, spread=1.0, std=(0.1, 0.4))
FAMILIES = {"vp": (schedules.linear(), "eps"), "flow": (schedules.flow(), "flow")}


def noise(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def trajectory_of(schedule, prediction, z):
    model = MIXTURE.model(schedule, prediction)

    def trajectory(sampler, times):
        states, x0s = [], []

        def record(_i, _t, x, x0):
            states.append(x.clone())
            x0s.append(x0.clone())

        out = sample(model, z, schedule=schedule, sampler=sampler, steps=len(times),
                     timesteps=times, prediction=prediction, callback=record)  # fmt: skip
        return states, x0s, out

    return trajectory


def error(x, reference):
    return float((x - reference).norm() / reference.norm())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_tuned_grid_beats_the_default_on_noise_it_was_not_tuned_on(family):
    schedule, prediction = FAMILIES[family]
    grid = tune_grid(schedule, trajectory_of(schedule, prediction, noise(128, 0)), "unipc", 6,
                     teacher_steps=40, sweeps=1, evals=5)  # fmt: skip
    assert grid.steps == 6 and len(grid.timesteps) == 6
    assert grid.error <= grid.default_error
    held_out = noise(128, 1)
    default = timesteps(schedule, 6).tolist()
    assert grid.timesteps[0] == default[0]  # starts where the default does
    # The reference: 200 log-SNR steps of the third-order sampler (2e-4 from the exact ODE).
    fine = teacher_times(schedule, default[0], 200)
    exact = trajectory_of(schedule, prediction, held_out)("exp_ab3", fine)[2]
    run = lambda times: sample(  # noqa: E731
        MIXTURE.model(schedule, prediction), held_out, schedule=schedule, sampler="unipc",
        steps=6, timesteps=times, prediction=prediction,
    )  # fmt: skip
    # Flow's default grid is already close to its best on this mixture (see benchmarks/samplers).
    margin = {"vp": 0.8, "flow": 0.95}[family]
    assert error(run(grid.timesteps), exact) < margin * error(run(default), exact)


def test_the_tuning_cost_counts_every_model_evaluation():
    schedule, prediction = FAMILIES["vp"]
    calls = []
    inner = trajectory_of(schedule, prediction, noise(16, 0))

    def counted(sampler, times):
        calls.append(nfe_of(sampler, len(times)))
        return inner(sampler, times)

    grid = tune_grid(schedule, counted, "dpmpp_2m", 4, teacher_steps=20, sweeps=1, evals=3)
    assert grid.model_evaluations == sum(calls)
    assert grid.teacher == {"sampler": "exp_ab3", "steps": 20, "spacing": "logsnr"}


def test_the_dp_finds_the_cheapest_path_of_first_order_jumps():
    schedule, prediction = FAMILIES["vp"]
    times = teacher_times(schedule, 999.0, 9)
    states, x0s, final = trajectory_of(schedule, prediction, noise(8, 0))("unipc", times)
    levels = make_grid(schedule, times).levels
    targets = [*states, final]

    def cost(path):  # path: indices of the evaluated levels, then the clean one (9)
        total = 0.0
        for i, j in itertools.pairwise([*path, 9]):
            jump = first_order_step(states[i], x0s[i], levels[i], levels[j])
            total += float((jump - targets[j]).pow(2).sum())
        return total

    brute = min(([0, *rest] for rest in itertools.combinations(range(1, 9), 3)), key=cost)
    assert dp_grid(schedule, times, states, x0s, final, 4) == [times[i] for i in brute]


def test_golden_section_finds_the_minimum_of_a_unimodal_function():
    where, value = _golden_section(lambda v: (v - 0.3) ** 2, -2.0, 5.0, 30)
    assert where == pytest.approx(0.3, abs=1e-5) and value == pytest.approx(0.0, abs=1e-10)


def test_heun_counts_two_evaluations_a_step_but_the_last():
    assert nfe_of("heun", 5) == 9 and steps_for("heun", 10) == 5
    assert nfe_of("unipc", 5) == 5 and steps_for("unipc", 5) == 5


def test_stochastic_samplers_and_short_teachers_are_refused():
    schedule, prediction = FAMILIES["vp"]
    trajectory = trajectory_of(schedule, prediction, noise(4, 0))
    with pytest.raises(ValueError, match="deterministic"):
        tune_grid(schedule, trajectory, "lcm", 4)
    with pytest.raises(ValueError, match="teacher_steps"):
        tune_grid(schedule, trajectory, "unipc", 10, teacher_steps=12)


def _grid(sampler="unipc", steps=3, times=(999.0, 500.0, 100.0)) -> TunedGrid:
    return TunedGrid(sampler=sampler, steps=steps, timesteps=times, error=0.1,
                     default_error=0.2, model_evaluations=100)  # fmt: skip


def test_grids_file_keeps_one_grid_per_sampler_and_steps(tmp_path):
    write_grid(tmp_path, _grid())
    write_grid(tmp_path, _grid(steps=2, times=(999.0, 300.0)))
    write_grid(tmp_path, _grid(times=(999.0, 400.0, 50.0)))  # replaces unipc @ 3
    grids = read_grids(tmp_path)
    assert len(grids) == 2
    assert find_grid(grids, "unipc", 3).timesteps == (999.0, 400.0, 50.0)
    assert find_grid(grids, "unipc", 4) is None and find_grid(grids, "ddim", 3) is None
    assert not list(tmp_path.glob(".*partial"))
    assert json.loads((tmp_path / GRIDS_NAME).read_text())["grids"][0]["nfe"] == 2


@pytest.mark.parametrize(
    "text,message",
    [
        ("{not json", "not a readable JSON"),
        ('{"format": "other", "grids": []}', "not a polydiff grids file"),
        ('{"format": "polydiff-grids/1", "grids": {}}', "must be a list"),
        ('{"format": "polydiff-grids/1", "grids": [{"sampler": "unipc"}]}', "grids[0]"),
    ],
)
def test_a_corrupt_grids_file_is_refused_naming_it(tmp_path, text, message):
    (tmp_path / GRIDS_NAME).write_text(text)
    with pytest.raises(GridError, match=message.replace("[", r"\[")) as caught:
        read_grids(tmp_path)
    assert GRIDS_NAME in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "change",
    [{"timesteps": [100.0, 500.0, 999.0]}, {"timesteps": [999.0, 1.0]}, {"sampler": "plms"},
     {"timesteps": [999.0, float("nan"), 1.0]}],
)  # fmt: skip
def test_invalid_records_are_refused(tmp_path, change):
    record = {**_grid().to_json(), **change}
    (tmp_path / GRIDS_NAME).write_text(json.dumps({"format": "polydiff-grids/1",
                                                   "grids": [record]}))  # fmt: skip
    with pytest.raises(GridError):
        read_grids(tmp_path)
