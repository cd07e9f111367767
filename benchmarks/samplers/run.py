"""Sampler benchmark: accuracy on several exact problems, a defaults study, observed orders of
convergence, and per-step overhead.

1. Accuracy. Data from Gaussian mixtures of several shapes (dimension, component count, widths,
   spread), so the denoiser is exact and the probability-flow ODE can be integrated to 1e-10.
   Each mixture is run on DDPM's linear VP schedule (an eps-prediction model) and on flow
   matching (a velocity model, t = 1000 * sigma). From the same noise at pure noise (t = 999 for
   VP, t = 1000 for flow), the error is ||x - x_exact|| / ||x_exact|| at sigma = 0, at NFE 5, 10
   and 20 (``--full`` adds 50), for:
   (a) polydiff's default: ``unipc`` on the schedule's default grid (what a user gets);
   (b) polydiff's best fixed setting: 6 samplers x every spacing and time shift;
   (c) a grid tuned by :func:`polydiff.core.step_grids.tune_grid` at NFE 5 and 10 for unipc
       and exp_ab3 (``--full``: also NFE 20 and dpmpp_2m), on separate noise, scored on the
       benchmark noise; "tuned" is the
       sampler whose grid scored best on the tuning noise (no look at the benchmark noise), and
       its cost is counted in model evaluations per sample;
   (d) diffusers' best per NFE: every scheduler, order, spacing, sigma option and flow shift is
       tried and the best one per NFE is kept (an oracle choice in its favour; for its flow
       multistep schedulers, which hand the model integer timesteps, also with the exact time
       1000 * sigma).
2. Defaults study: every fixed polydiff setting ranked, per schedule kind, by how often it is no
   worse than diffusers' best at NFE 10 and by its geometric-mean ratio to diffusers' best.
3. Orders: the slope of log error vs log steps (20 to 160 log-SNR steps) against the exact ODE
   solution to the grid's last level followed by the same x0 step.
4. Overhead. A trivial model (returns its input) isolates the sampler's own cost per step, for
   a 1x4x8x8 latent and a 16x4x64x64 batch; polydiff and diffusers alternate in one run.

Writes tables to stdout and ``out/accuracy.png`` (ratios to diffusers' best), ``out/errors.png``
(error vs NFE per problem), ``out/overhead.png``, ``out/results.json``.
Run: ``python benchmarks/samplers/run.py`` (~15 min on 2 CPU cores; ``--quick``: a smoke run of
3 problems in a few minutes; ``--full``: the larger sweep).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from polydiff.core import sample, schedules, timesteps
from polydiff.core.analytic import GaussianMixture
from polydiff.core.predictions import check_prediction, target
from polydiff.core.sampling import make_grid
from polydiff.core.schedules import Schedule
from polydiff.core.step_grids import TunedGrid, steps_for, tune_grid

warnings.filterwarnings("ignore")
OUT = Path(__file__).resolve().parent / "out"
SHIFTS = (0.3, 0.5, 0.7, 1.0, 2.0, 3.0)
SAMPLERS = ("ddim", "heun", "dpmpp_2m", "dpmpp_3m", "exp_ab3", "unipc")
DEFAULT_SAMPLER = "unipc"  # the model configs' default (ModelConfig.sampler)

Setting = tuple[str, str | None, float | None]  # (sampler, spacing, shift); None: the default
Errors = dict[int, float]  # NFE -> relative error


# --------------------------------------------------------------------------- problems


class Mixture(GaussianMixture):
    """:class:`GaussianMixture` with the same closed-form posterior written as (N, K) x (K, D)
    matrix products, and a model that computes the batch's one time once: the benchmark makes
    millions of denoiser calls, and the broadcast (N, K, D) form is ~20x slower at D = 64,
    K = 32. :meth:`check` holds it to the parent's.
    """

    def posterior(self, x: Tensor, alpha: float, sigma: float) -> tuple[Tensor, Tensor]:
        x = x.to(torch.float64)
        mu, var = alpha * self.means, (alpha * self.stds) ** 2 + sigma**2  # (K, D)
        inv = 1.0 / var
        # sum_d (x_d - mu_kd)^2 / var_kd, expanded into matrix products over d.
        quad = (x * x) @ inv.T - 2.0 * x @ (mu * inv).T + (mu * mu * inv).sum(1)
        log_p = torch.log(self.weights) - 0.5 * (quad + torch.log(2 * math.pi * var).sum(1))
        resp = torch.softmax(log_p, dim=1)  # (N, K)
        gain = alpha * self.stds**2 * inv  # E[x0 | x, k] = means + gain * (x - mu)
        x0 = resp @ (self.means - gain * mu) + x * (resp @ gain)
        eps = sigma * (x * (resp @ inv) - resp @ (mu * inv))
        return x0, eps

    def model(self, schedule: Schedule, prediction: str = "eps") -> Callable[..., Tensor]:
        check_prediction(prediction)
        grouped = super().model(schedule, prediction)

        def predict(x: Tensor, t: Tensor, **_: object) -> Tensor:
            if bool((t != t[0]).any()):
                return grouped(x, t)
            a, s = schedule.scales(float(t[0]))
            x0, eps = self.posterior(x.reshape(x.shape[0], -1), a, s)
            return target(x0, eps, a, s, prediction).to(x.dtype).view_as(x)

        return predict

    def check(self, n: int = 64) -> None:
        """Raise unless this posterior is the parent's to 1e-9 at noise levels across [0, 1]."""
        gen = torch.Generator().manual_seed(0)
        x = self.sample(n, gen) + torch.randn(n, self.dim, generator=gen, dtype=torch.float64)
        for s in (1.0, 0.9, 0.5, 0.1, 0.01):
            fast, slow = self.posterior(x, 1.0 - s, s), GaussianMixture.posterior(self, x, 1 - s, s)
            for a, b in zip(fast, slow, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@dataclass(frozen=True)
class Problem:
    """A reproducible random mixture: means ~ N(0, spread^2), stds ~ U(std) per dimension."""

    dim: int
    components: int
    std: tuple[float, float]
    spread: float
    seed: int = 0

    @property
    def name(self) -> str:
        lo, hi = self.std
        return f"D{self.dim} K{self.components} std {lo:g}-{hi:g} spread {self.spread:g}"

    def mixture(self) -> Mixture:
        return Mixture.random(
            self.components, self.dim, seed=self.seed, spread=self.spread, std=self.std
        )


PROBLEMS: tuple[Problem, ...] = (
    Problem(8, 8, (0.1, 0.5), 1.0),  # the original benchmark problem
    Problem(2, 2, (0.3, 0.8), 2.0, seed=1),
    Problem(2, 32, (0.02, 0.1), 2.0, seed=2),
    Problem(16, 32, (0.05, 0.2), 1.0, seed=3),
    Problem(16, 8, (0.02, 0.05), 3.0, seed=4),
    Problem(64, 8, (0.1, 0.4), 1.0, seed=5),
    Problem(64, 32, (0.3, 0.8), 2.0, seed=6),
)
#: kind -> (schedule, prediction, description)
FAMILIES: dict[str, tuple[Schedule, str, str]] = {
    "vp": (schedules.linear(), "eps", "VP: DDPM linear betas, eps prediction"),
    "flow": (schedules.flow(), "flow", "flow matching, velocity prediction"),
}


@dataclass(frozen=True)
class Size:
    """How much a run measures (``--quick``, the default, ``--full``)."""

    problems: tuple[Problem, ...]
    nfes: tuple[int, ...]
    tuned_nfes: tuple[int, ...]
    tuned: tuple[str, ...]  # samplers whose grids are tuned
    samples: int  # benchmark noise
    tuning_samples: int  # the separate noise grids are tuned on
    tune_options: dict[str, int]  # tune_grid's teacher_steps / sweeps / evals (its defaults: {})
    order_steps: tuple[int, ...]
    order_samples: int
    quick: bool = False


SIZES: dict[str, Size] = {
    "quick": Size(
        (PROBLEMS[0], PROBLEMS[2], PROBLEMS[5]), (5, 10), (5, 10), ("unipc", "exp_ab3"), 64, 32,
        {"teacher_steps": 40, "sweeps": 1, "evals": 5}, (20, 40, 80), 32, quick=True,
    ),
    "default": Size(
        PROBLEMS, (5, 10, 20), (5, 10), ("unipc", "exp_ab3"), 256, 128, {}, (20, 40, 80, 160), 64
    ),
    "full": Size(
        PROBLEMS, (5, 10, 20, 50), (5, 10, 20), ("unipc", "exp_ab3", "dpmpp_2m"), 256, 128, {},
        (20, 40, 80, 160), 64,
    ),
}  # fmt: skip


def relative_error(x: Tensor, exact: Tensor) -> float:
    return ((x.double() - exact).norm() / exact.norm()).item()


def start_state(schedule: Schedule, noise: Tensor) -> tuple[Tensor, float, float]:
    """The state at pure noise (t_max) that every sampler here starts from, and its level."""
    alpha, sigma = schedule.scales(schedule.t_max)
    return noise * math.hypot(alpha, sigma), alpha, sigma


# --------------------------------------------------------------------------- polydiff


def polydiff_settings() -> list[Setting]:
    """Every sampler with every spacing, the time shift swept."""
    spacings: list[tuple[str, float | None]] = [
        (s, None) for s in ("linspace", "trailing", "leading", "karras", "logsnr")
    ]
    spacings += [("flow_shift", shift) for shift in SHIFTS]
    return [(sampler, spacing, shift) for sampler in SAMPLERS for spacing, shift in spacings]


def setting_name(setting: Setting) -> str:
    sampler, spacing, shift = setting
    return " ".join([sampler, spacing or "default", *([f"{shift:g}"] if shift else [])])


class Runner:
    """Runs polydiff samplers on one problem and schedule from fixed noise, scoring each
    (sampler, grid) once: spacings that coincide (flow's linspace, trailing and flow_shift 1)
    are run once and named as aliases."""

    def __init__(self, model, schedule: Schedule, prediction: str, noise: Tensor, exact: Tensor):
        self.model, self.schedule, self.prediction = model, schedule, prediction
        self.noise, self.exact = noise, exact
        self.scores: dict[tuple[str, tuple[float, ...]], float] = {}

    def error(self, sampler: str, times: Sequence[float]) -> float:
        key = (sampler, tuple(float(t) for t in times))
        if key not in self.scores:
            steps, times = len(key[1]), key[1]
            out = sample(self.model, self.noise, schedule=self.schedule, sampler=sampler,
                         steps=steps, timesteps=times, prediction=self.prediction)  # fmt: skip
            self.scores[key] = relative_error(out, self.exact)
        return self.scores[key]

    def times(self, setting: Setting, nfe: int) -> tuple[float, ...]:
        sampler, spacing, shift = setting
        steps = steps_for(sampler, nfe)
        values = timesteps(self.schedule, steps, spacing, shift=shift).tolist()
        # flow_shift can overshoot t_max by one rounding (1000.0000000000001 at shift 0.3 on
        # flow), which make_grid refuses; the grid meant is the one that starts at t_max.
        return tuple(min(t, self.schedule.t_max) for t in values)

    def sweep(self, settings: Sequence[Setting], nfes: Sequence[int]) -> dict[str, Errors]:
        """Errors per setting and NFE; settings with the same grids at every NFE share a row,
        named by the first with the others in brackets (recorded in ``self.names``)."""
        groups: dict[tuple[str, tuple], list[str]] = {}
        for setting in settings:
            grids = tuple(self.times(setting, nfe) for nfe in nfes)
            groups.setdefault((setting[0], grids), []).append(setting_name(setting))
        rows: dict[str, Errors] = {}
        self.names: dict[tuple[str, tuple], str] = {}
        for (sampler, grids), names in groups.items():
            aliases = [name.split(" ", 1)[1] for name in names[1:]]
            name = names[0] + (f" (= {', '.join(aliases)})" if aliases else "")
            self.names[(sampler, grids)] = name
            rows[name] = {nfe: self.error(sampler, g) for nfe, g in zip(nfes, grids, strict=True)}
        return rows


def trajectory_of(model, schedule: Schedule, prediction: str, noise: Tensor):
    """``tune_grid``'s trajectory: the state and x0 estimate at every level, and the output."""

    def trajectory(sampler: str, times: Sequence[float]):
        states: list[Tensor] = []
        x0s: list[Tensor] = []

        def record(_i: int, _t: float, x: Tensor, x0: Tensor) -> None:
            states.append(x.clone())
            x0s.append(x0.clone())

        out = sample(model, noise, schedule=schedule, sampler=sampler, steps=len(times),
                     timesteps=times, prediction=prediction, callback=record)  # fmt: skip
        return states, x0s, out

    return trajectory


def tune(runner: Runner, tuning_noise: Tensor, size: Size) -> dict[str, dict[int, dict]]:
    """Grids tuned on ``tuning_noise`` per sampler and NFE, scored on the runner's noise."""
    trajectory = trajectory_of(runner.model, runner.schedule, runner.prediction, tuning_noise)
    out: dict[str, dict[int, dict]] = {}
    for sampler in size.tuned:
        out[sampler] = {}
        for nfe in size.tuned_nfes:
            grid: TunedGrid = tune_grid(
                runner.schedule, trajectory, sampler, nfe, **size.tune_options
            )
            out[sampler][nfe] = {
                "error": runner.error(sampler, grid.timesteps),
                "tuning_error": grid.error,
                "evaluations": grid.model_evaluations,
                "timesteps": list(grid.timesteps),
            }
    return out


def pick_tuned(tuned: dict[str, dict[int, dict]], nfe: int) -> tuple[str, dict]:
    """The tuned sampler a user would keep: the best on the tuning noise (not the benchmark's)."""
    name = min(tuned, key=lambda s: tuned[s][nfe]["tuning_error"])
    return name, tuned[name][nfe]


# --------------------------------------------------------------------------- diffusers


def diffusers_vp_configs() -> list[tuple[str, Callable[[], object]]]:
    """diffusers' DDPM-schedule solvers x spacings x sigma options (eps prediction)."""
    import diffusers as d

    base = dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, num_train_timesteps=1000)
    configs: list[tuple[str, Callable[[], object]]] = []
    sigma_kinds = {
        "": {},
        "karras": {"use_karras_sigmas": True},
        "exp": {"use_exponential_sigmas": True},
    }
    for spacing in ("linspace", "leading", "trailing"):
        configs.append(
            (
                f"DDIM {spacing}",
                lambda s=spacing: d.DDIMScheduler(
                    **base, timestep_spacing=s, clip_sample=False, set_alpha_to_one=True
                ),
            )
        )
        for kind, extra in sigma_kinds.items():
            for cls in (d.EulerDiscreteScheduler, d.HeunDiscreteScheduler):
                configs.append(
                    (
                        f"{cls.__name__[:-16]} {spacing} {kind}".strip(),
                        lambda c=cls, s=spacing, e=extra: c(**base, timestep_spacing=s, **e),
                    )
                )
            for order in (2, 3):
                configs.append(
                    (
                        f"DPM++{order}M {spacing} {kind}".strip(),
                        lambda o=order, s=spacing, e=extra: d.DPMSolverMultistepScheduler(
                            **base,
                            timestep_spacing=s,
                            solver_order=o,
                            algorithm_type="dpmsolver++",
                            final_sigmas_type="zero",
                            **e,
                        ),
                    )
                )
                configs.append(
                    (
                        f"UniPC-{order} {spacing} {kind}".strip(),
                        lambda o=order, s=spacing, e=extra: d.UniPCMultistepScheduler(
                            **base,
                            timestep_spacing=s,
                            solver_order=o,
                            final_sigmas_type="zero",
                            **e,
                        ),
                    )
                )
                configs.append(
                    (
                        f"DEIS-{order} {spacing} {kind}".strip(),
                        lambda o=order, s=spacing, e=extra: d.DEISMultistepScheduler(
                            **base, timestep_spacing=s, solver_order=o, **e
                        ),
                    )
                )
        for order in (2, 3):
            configs.append(
                (
                    f"DPM++{order}M {spacing} lu-lambdas",
                    lambda o=order, s=spacing: d.DPMSolverMultistepScheduler(
                        **base,
                        timestep_spacing=s,
                        solver_order=o,
                        use_lu_lambdas=True,
                        algorithm_type="dpmsolver++",
                        final_sigmas_type="zero",
                    ),
                )
            )
    return configs


def diffusers_flow_configs() -> list[tuple[str, Callable[[], object]]]:
    """diffusers' flow-matching solvers: FlowMatch Euler (x Karras / exponential sigmas) and
    Heun, and UniPC, DPM-Solver++ and DEIS on flow sigmas, each x the time shifts; the
    multistep ones hand the model integer timesteps, so they are also run with the exact
    time 1000 * sigma (``exact-t``; see :func:`run_diffusers`)."""
    import diffusers as d

    configs: list[tuple[str, Callable[[], object]]] = []
    sigma_kinds = {
        "": {},
        "karras": {"use_karras_sigmas": True},
        "exp": {"use_exponential_sigmas": True},
    }
    flow = dict(use_flow_sigmas=True, prediction_type="flow_prediction")
    multistep = {
        "DPM++{}M": lambda o, k: d.DPMSolverMultistepScheduler(
            **flow,
            flow_shift=k,
            solver_order=o,
            algorithm_type="dpmsolver++",
            final_sigmas_type="zero",
        ),
        "UniPC-{}": lambda o, k: d.UniPCMultistepScheduler(
            **flow, flow_shift=k, solver_order=o, final_sigmas_type="zero"
        ),
        "DEIS-{}": lambda o, k: d.DEISMultistepScheduler(**flow, flow_shift=k, solver_order=o),
    }
    for shift in SHIFTS:
        for kind, extra in sigma_kinds.items():
            configs.append(
                (
                    f"FlowEuler shift {shift:g} {kind}".strip(),
                    lambda k=shift, e=extra: d.FlowMatchEulerDiscreteScheduler(shift=k, **e),
                )
            )
        configs.append(
            (f"FlowHeun shift {shift:g}", lambda k=shift: d.FlowMatchHeunDiscreteScheduler(shift=k))
        )
        for (label, make), order, exact in itertools.product(
            multistep.items(), (2, 3), ("", " exact-t")
        ):
            configs.append(
                (
                    f"{label.format(order)} shift {shift:g}{exact}",
                    lambda m=make, o=order, k=shift: m(o, k),
                )
            )
    return configs


def diffusers_steps(name: str, nfe: int) -> int:
    """Steps of a diffusers config within ``nfe`` evaluations (Heun: 2 * steps - 1)."""
    return steps_for("heun" if "heun" in name.lower() else name, nfe)


def run_diffusers(scheduler, model, noise: Tensor, steps: int, exact_time: bool = False) -> Tensor:
    """diffusers' pipeline loop: latents = noise * init_noise_sigma, scale input, step.

    The model gets the scheduler's timestep, as a pipeline passes it; with ``exact_time`` (flow
    multistep only, where sigmas[i] belongs to timesteps[i]) the model time of the sigma it
    steps on instead, 1000 * sigma, which diffusers' int64 timesteps truncate.
    """
    scheduler.set_timesteps(steps)
    x = noise * getattr(scheduler, "init_noise_sigma", 1.0)
    scale = getattr(scheduler, "scale_model_input", None)
    for i, t in enumerate(scheduler.timesteps):
        inp = scale(x, t) if scale else x
        value = 1000.0 * float(scheduler.sigmas[i]) if exact_time else float(t)
        tt = torch.full((x.shape[0],), value, dtype=torch.float32)
        x = scheduler.step(model(inp, tt), t, x).prev_sample
    return x


def diffusers_sweep(
    kind: str, model, noise: Tensor, exact: Tensor, nfes: Sequence[int]
) -> dict[str, Errors]:
    """Errors of every diffusers config for schedule ``kind`` (inf where diffusers refuses)."""
    configs = diffusers_vp_configs() if kind == "vp" else diffusers_flow_configs()
    rows: dict[str, Errors] = {}
    for name, make in configs:
        rows[name] = {}
        for nfe in nfes:
            try:
                out = run_diffusers(make(), model, noise, diffusers_steps(name, nfe),
                                    exact_time=name.endswith("exact-t"))  # fmt: skip
                error = relative_error(out, exact)
                rows[name][nfe] = error if math.isfinite(error) else math.inf
            except Exception:  # some option combinations are refused by diffusers
                rows[name][nfe] = math.inf
    return rows


# --------------------------------------------------------------------------- accuracy


def geo(values: Sequence[float]) -> float:
    return math.exp(statistics.fmean(math.log(v) for v in values))


def best(rows: dict[str, Errors], nfe: int) -> tuple[str, float]:
    return min(((name, r[nfe]) for name, r in rows.items()), key=lambda p: p[1])


def noise_for(problem: Problem, n: int, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, problem.dim, dtype=torch.float64, generator=gen)


def run_case(problem: Problem, kind: str, size: Size) -> dict:
    """Every measurement of one problem on one schedule kind."""
    started = time.perf_counter()
    schedule, prediction, _ = FAMILIES[kind]
    mixture = problem.mixture()
    model = mixture.model(schedule, prediction)
    nfes = size.nfes
    noise = noise_for(problem, size.samples, seed=0)
    tuning_noise = noise_for(problem, size.tuning_samples, seed=1)
    exact = mixture.ode_solve(*start_state(schedule, noise))
    runner = Runner(model, schedule, prediction, noise, exact)
    ours = runner.sweep(polydiff_settings(), nfes)
    default = (DEFAULT_SAMPLER, None, None)
    default_grids = tuple(runner.times(default, nfe) for nfe in nfes)
    tuned = tune(runner, tuning_noise, size)
    theirs = diffusers_sweep(kind, model, noise, exact, nfes)
    return {
        "problem": problem.name,
        "kind": kind,
        "default_setting": runner.names.get((DEFAULT_SAMPLER, default_grids), "?"),
        "default": {
            nfe: runner.error(DEFAULT_SAMPLER, g)
            for nfe, g in zip(nfes, default_grids, strict=True)
        },
        "polydiff": ours,
        "tuned": tuned,
        "diffusers": theirs,
        "seconds": time.perf_counter() - started,
    }


def ratios(case: dict, nfe: int) -> dict[str, float]:
    """default, best fixed and tuned error over diffusers' best error at ``nfe``."""
    theirs = best(case["diffusers"], nfe)[1]
    out = {
        "default": case["default"][nfe] / theirs,
        "fixed": best(case["polydiff"], nfe)[1] / theirs,
    }
    if nfe in next(iter(case["tuned"].values())):
        out["tuned"] = pick_tuned(case["tuned"], nfe)[1]["error"] / theirs
    return out


def print_case(case: dict, nfes: Sequence[int]) -> None:
    print(f"\n{case['problem']} | {FAMILIES[case['kind']][2]} "
          f"(default: {case['default_setting']}; {case['seconds']:.0f} s)")  # fmt: skip
    print(f"{'NFE':>4} | {'default':>8} | {'polydiff best fixed':<34} {'error':>8} | "
          f"{'tuned':>8} {'sampler':<8} {'cost':>6} | {'diffusers best':<28} {'error':>8} | "
          "ratio: default fixed tuned")  # fmt: skip
    for nfe in nfes:
        (pc, pe), (dc, de) = best(case["polydiff"], nfe), best(case["diffusers"], nfe)
        r = ratios(case, nfe)
        if "tuned" in r:
            sampler, t = pick_tuned(case["tuned"], nfe)
            tuned = f"{t['error']:8.2e} {sampler:<8} {t['evaluations']:6d}"
        else:
            tuned = f"{'-':>8} {'':<8} {'':>6}"
        cells = "  ".join(
            f"{r[k]:5.2f}x" if k in r else "     -" for k in ("default", "fixed", "tuned")
        )
        print(f"{nfe:>4} | {case['default'][nfe]:8.2e} | {pc[:34]:<34} {pe:8.2e} | {tuned} | "
              f"{dc[:28]:<28} {de:8.2e} | {cells}")  # fmt: skip


def summarize(cases: list[dict], nfes: Sequence[int]) -> dict:
    """Per kind and NFE: geometric mean and worst ratio over problems; and the goals."""
    print("\nSummary: error / diffusers' best error at the same NFE, over problems: "
          "geometric mean [worst]")  # fmt: skip
    print(f"{'kind':<5} {'NFE':>4} | {'default':<15} | {'best fixed':<15} | {'tuned':<15} | "
          "tuning cost (evals/sample, median)")  # fmt: skip
    table: dict = {}
    for kind, nfe in itertools.product(FAMILIES, nfes):
        group = [ratios(c, nfe) for c in cases if c["kind"] == kind]
        cells, row = [], {}
        for key in ("default", "fixed", "tuned"):
            values = [r[key] for r in group if key in r]
            row[key] = (geo(values), max(values)) if values else None
            cells.append(f"{row[key][0]:5.2f}x [{row[key][1]:5.2f}x]" if values else f"{'-':<15}")
        costs = [pick_tuned(c["tuned"], nfe)[1]["evaluations"] for c in cases
                 if c["kind"] == kind and nfe in next(iter(c["tuned"].values()))]  # fmt: skip
        cost = f"{statistics.median(costs):.0f}" if costs else "-"
        print(f"{kind:<5} {nfe:>4} | " + " | ".join(cells) + f" | {cost}")
        table[f"{kind} {nfe}"] = row
    everything = [ratios(c, nfe) for c in cases for nfe in nfes]
    n10 = [ratios(c, 10) for c in cases] if 10 in nfes else []
    goals = {
        "default_nfe10_le_1x": (sum(r["default"] <= 1.0 for r in n10), len(n10)),
        "tuned_nfe5_10_le_0.6x": (
            sum(ratios(c, n)["tuned"] <= 0.6 for c in cases for n in (5, 10) if n in nfes),
            len(cases) * len([n for n in (5, 10) if n in nfes]),
        ),
    }
    print(f"Goal 'default at NFE 10 <= diffusers' best': met on {goals['default_nfe10_le_1x'][0]}"
          f" of {goals['default_nfe10_le_1x'][1]} problem x schedule cases")  # fmt: skip
    print(f"Goal 'tuned at NFE 5 and 10 <= 0.6x diffusers' best': met on "
          f"{goals['tuned_nfe5_10_le_0.6x'][0]} of {goals['tuned_nfe5_10_le_0.6x'][1]} "
          "(case, NFE) pairs")  # fmt: skip
    fixed = geo([r["fixed"] for r in everything])
    print(f"Best fixed setting (oracle per case and NFE), all cases and NFEs: {fixed:.2f}x")
    return {"table": table, "goals": goals}


def same_solver(case: dict, nfes: Sequence[int]) -> None:
    """Each library's best setting of the same solver (the original problem, VP)."""
    print(f"\nSame solver, each library's best setting per NFE ({case['problem']}, VP):")
    pairs = [("ddim", "DDIM"), ("heun", "Heun"), ("dpmpp_2m", "DPM++2M"),
             ("dpmpp_3m", "DPM++3M"), ("unipc", "UniPC")]  # fmt: skip
    for ours, theirs in pairs:
        cells = []
        for nfe in nfes:
            mine = min(v[nfe] for k, v in case["polydiff"].items() if k.split()[0] == ours)
            their = min(v[nfe] for k, v in case["diffusers"].items() if k.startswith(theirs))
            cells.append(f"NFE {nfe}: {mine:8.2e} vs {their:8.2e}")
        print(f"  {ours:<9} " + " | ".join(cells))


def accuracy(size: Size) -> dict:
    cases = []
    print("\nAccuracy: relative error vs the exact ODE solution from pure noise; 'cost' is the "
          "tuning's model evaluations per sample")  # fmt: skip
    for problem in size.problems:
        problem.mixture().check()
        for kind in FAMILIES:
            cases.append(run_case(problem, kind, size))
            print_case(cases[-1], size.nfes)
    same_solver(cases[0], size.nfes)
    summary = summarize(cases, size.nfes)
    return {"cases": cases, "summary": summary}


# --------------------------------------------------------------------------- defaults


def defaults_study(cases: list[dict], kind: str, nfes: Sequence[int], top: int = 10) -> dict:
    """Rank every fixed setting as the one default for all problems of ``kind``: first by the
    number of problems where it is no worse than diffusers' best at NFE 10, then by the
    geometric-mean ratio at NFE 5 and 10."""
    group = [c for c in cases if c["kind"] == kind]
    low = [n for n in (5, 10) if n in nfes]
    rows = []
    for name in group[0]["polydiff"]:
        r = {n: [c["polydiff"][name][n] / best(c["diffusers"], n)[1] for c in group] for n in nfes}
        rows.append({
            "setting": name,
            "wins10": sum(v <= 1.0 for v in r.get(10, [])),
            "geo": {n: geo(r[n]) for n in nfes},
            "worst": {n: max(r[n]) for n in nfes},
            "geo_5_10": geo([v for n in low for v in r[n]]),
        })  # fmt: skip
    rows.sort(key=lambda row: (-row["wins10"], row["geo_5_10"]))
    default = next(i for i, row in enumerate(rows) if row["setting"] == group[0]["default_setting"])
    print(f"\nDefaults study, {FAMILIES[kind][2]}: one setting for all {len(group)} problems, "
          "error / diffusers' best")  # fmt: skip
    head = (
        " ".join(f"{'gm' + str(n):>6}" for n in nfes)
        + " "
        + " ".join(f"{'worst' + str(n):>7}" for n in nfes)
    )
    print(f"{'rank':>4}  {'setting':<44} {'<=1x@10':>7} {'gm5-10':>6} {head}")

    def line(i: int, row: dict) -> str:
        gms = " ".join(f"{row['geo'][n]:6.2f}" for n in nfes)
        worst = " ".join(f"{row['worst'][n]:7.2f}" for n in nfes)
        wins = f"{row['wins10']}/{len(group)}"
        return (
            f"{i + 1:>4}  {row['setting'][:44]:<44} {wins:>7} {row['geo_5_10']:6.2f} {gms} {worst}"
        )

    for i, row in enumerate(rows[:top]):
        print(line(i, row))
    if default >= top:
        print(line(default, rows[default]) + "   <- the current default")
    else:
        print(f"  (the current default, {rows[default]['setting']}, is rank {default + 1})")
    pick = rows[0]
    closest = min(rows, key=lambda row: row["worst"].get(10, math.inf))
    print(f"Recommendation ({kind}): {pick['setting']}: no worse than diffusers' best at NFE 10 "
          f"on {pick['wins10']} of {len(group)} problems, geometric mean {pick['geo_5_10']:.2f}x "
          f"at NFE 5-10 (the current default: {rows[default]['wins10']} of {len(group)}, "
          f"{rows[default]['geo_5_10']:.2f}x).")  # fmt: skip
    if 10 in nfes and pick["wins10"] < len(group):
        print(f"  No fixed setting is no worse than diffusers' best at NFE 10 on every problem; "
              f"the smallest worst case at NFE 10 is {closest['worst'][10]:.2f}x "
              f"({closest['setting']}).")  # fmt: skip
    return {"ranking": rows, "default_rank": default + 1, "recommendation": pick["setting"]}


# --------------------------------------------------------------------------- orders


def observed_orders(size: Size) -> dict:
    """Slope of log error vs log steps on log-SNR grids, against the exact ODE solution to the
    grid's last noisy level followed by the same x0 step (the samplers' own last step)."""
    problem = PROBLEMS[0]
    mixture = problem.mixture()
    counts = size.order_steps
    samplers = ("dpmpp_2m", "dpmpp_3m", "exp_ab3", "unipc")
    noise = noise_for(problem, size.order_samples, seed=0)
    result: dict = {}
    for kind, (schedule, prediction, _) in FAMILIES.items():
        model = mixture.model(schedule, prediction)
        errors: dict[str, list[float]] = {s: [] for s in samplers}
        for n in counts:
            times = timesteps(schedule, n, "logsnr")
            first, last = (
                make_grid(schedule, times).levels[0],
                make_grid(schedule, times).levels[-2],
            )
            x_last = mixture.ode_solve(noise * math.hypot(first.alpha, first.sigma), first.alpha,
                                       first.sigma, last.alpha, last.sigma, tol=1e-12)  # fmt: skip
            reference = mixture.posterior(x_last, last.alpha, last.sigma)[0]
            for sampler in samplers:
                out = sample(model, noise, schedule=schedule, sampler=sampler, steps=n,
                             timesteps=times, prediction=prediction)  # fmt: skip
                errors[sampler].append(relative_error(out, reference))
        result[kind] = {
            s: {"order": -float(np.polyfit(np.log(counts), np.log(e), 1)[0]), "errors": e}
            for s, e in errors.items()
        }
    print(f"\nObserved order of convergence ({problem.name}, log-SNR grids of "
          f"{', '.join(map(str, counts))} steps, error vs the exact ODE)")  # fmt: skip
    print(f"{'sampler':<9} | {'VP order':>8}  {'errors':<40} | {'flow order':>10}  errors")
    for s in samplers:
        cells = [
            f"{result[k][s]['order']:8.2f}  " + " ".join(f"{e:.1e}" for e in result[k][s]["errors"])
            for k in FAMILIES
        ]
        print(f"{s:<9} | {cells[0]:<50} | {cells[1]}")
    return {"steps": list(counts), "problem": problem.name, **result}


# --------------------------------------------------------------------------- plots


def plot_accuracy(cases: list[dict], nfes: Sequence[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, len(FAMILIES), figsize=(11, 4.5), sharey=True)
    styles = {
        "default": ("tab:red", "polydiff default"),
        "fixed": ("tab:blue", "polydiff best fixed"),
        "tuned": ("tab:green", "polydiff tuned grid"),
    }
    for ax, kind in zip(axes, FAMILIES, strict=True):
        group = [c for c in cases if c["kind"] == kind]
        for key, (color, label) in styles.items():
            points = [n for n in nfes if key in ratios(group[0], n)]
            for c in group:
                ax.plot(points, [ratios(c, n)[key] for n in points], color=color, alpha=0.2, lw=1)
            ax.plot(points, [geo([ratios(c, n)[key] for c in group]) for n in points], "-o",
                    color=color, lw=2.5, label=f"{label} (geometric mean)")  # fmt: skip
        ax.axhline(1.0, color="k", ls="--", lw=1, label="diffusers' best per NFE")
        ax.axhline(0.6, color="tab:green", ls=":", lw=1, label="0.6x (tuned-grid goal)")
        ax.set(xscale="log", yscale="log", xlabel="model evaluations (NFE)",
               title=f"{FAMILIES[kind][2]}, {len(group)} mixtures")  # fmt: skip
        ax.set_xticks(list(nfes), [str(n) for n in nfes])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("error / diffusers' best error")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_errors(cases: list[dict], nfes: Sequence[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    problems = list(dict.fromkeys(c["problem"] for c in cases))
    fig, axes = plt.subplots(len(FAMILIES), len(problems), figsize=(3.2 * len(problems), 6.5),
                             squeeze=False)  # fmt: skip
    for case in cases:
        ax = axes[list(FAMILIES).index(case["kind"])][problems.index(case["problem"])]
        tuned = [n for n in nfes if n in next(iter(case["tuned"].values()))]
        series = {
            "polydiff default": (nfes, [case["default"][n] for n in nfes], "-o"),
            "polydiff best fixed": (nfes, [best(case["polydiff"], n)[1] for n in nfes], "-s"),
            "polydiff tuned": (
                tuned,
                [pick_tuned(case["tuned"], n)[1]["error"] for n in tuned],
                "-^",
            ),
            "diffusers best": (nfes, [best(case["diffusers"], n)[1] for n in nfes], "--k"),
        }
        for label, (xs, ys, style) in series.items():
            ax.plot(xs, ys, style, label=label, ms=4)
        ax.set(xscale="log", yscale="log", title=f"{case['kind']}: {case['problem']}")
        ax.set_xticks(list(nfes), [str(n) for n in nfes])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.title.set_fontsize(8)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.supxlabel("model evaluations (NFE)")
    fig.supylabel("relative error vs exact ODE")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- overhead


def trivial(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A model that costs nothing, so only the sampler's own work is timed."""
    return x


def run_polydiff(name: str, z: torch.Tensor, steps: int, schedule, prediction: str) -> None:
    sample(
        trivial,
        z,
        schedule=schedule,
        sampler=name,
        steps=steps,
        prediction=prediction,
        generator=torch.Generator().manual_seed(0),
    )


def run_diffusers_trivial(
    name: str, make: Callable[[], object], z: torch.Tensor, steps: int
) -> None:
    scheduler = make()
    scheduler.set_timesteps(steps)
    x, gen = z, torch.Generator().manual_seed(0)
    kwargs = {"generator": gen} if name in ("euler_ancestral", "lcm") else {}
    scale = getattr(scheduler, "scale_model_input", None)
    for t in scheduler.timesteps:
        inp = scale(x, t) if scale else x
        x = scheduler.step(trivial(inp, t), t, x, **kwargs).prev_sample


def overhead(quick: bool) -> dict:
    import diffusers as d

    schedule = schedules.linear()
    base = dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    pairs: list[tuple[str, dict, Callable[[], object]]] = [
        (
            "ddim",
            {},
            lambda: d.DDIMScheduler(
                **base, timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True
            ),
        ),
        ("euler", {}, lambda: d.EulerDiscreteScheduler(**base, timestep_spacing="trailing")),
        (
            "euler_ancestral",
            {},
            lambda: d.EulerAncestralDiscreteScheduler(**base, timestep_spacing="trailing"),
        ),
        ("heun", {}, lambda: d.HeunDiscreteScheduler(**base, timestep_spacing="trailing")),
        (
            "dpmpp_2m",
            {},
            lambda: d.DPMSolverMultistepScheduler(
                **base, timestep_spacing="trailing", final_sigmas_type="zero"
            ),
        ),
        (
            "dpmpp_3m",
            {},
            lambda: d.DPMSolverMultistepScheduler(
                **base, timestep_spacing="trailing", solver_order=3, final_sigmas_type="zero"
            ),
        ),
        (
            "unipc",
            {},
            lambda: d.UniPCMultistepScheduler(
                **base, timestep_spacing="trailing", solver_order=3, final_sigmas_type="zero"
            ),
        ),
        ("lcm", {}, lambda: d.LCMScheduler(**base)),
        ("euler", {"flow": True}, lambda: d.FlowMatchEulerDiscreteScheduler()),
    ]

    shapes = [(1, 4, 8, 8), (16, 4, 64, 64)]
    steps, repeats = 20, (3 if quick else 7)
    table = []
    for shape, (name, opts, make) in itertools.product(shapes, pairs):
        z = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        flow = opts.get("flow", False)
        nfe = 2 * steps - 1 if name == "heun" else steps
        ours = functools.partial(
            run_polydiff,
            name,
            z,
            steps,
            schedules.flow() if flow else schedule,
            "flow" if flow else "eps",
        )
        theirs = functools.partial(run_diffusers_trivial, name, make, z, steps)
        times: dict[str, list[float]] = {"polydiff": [], "diffusers": []}
        ours(), theirs()  # warm up
        for _ in range(repeats):  # alternate so both see the same machine noise
            for label, fn in (("polydiff", ours), ("diffusers", theirs)):
                start = time.perf_counter()
                fn()
                times[label].append((time.perf_counter() - start) / nfe)
        p, q = statistics.median(times["polydiff"]), statistics.median(times["diffusers"])
        label = f"{name}{' (flow)' if flow else ''}"
        table.append(
            {
                "shape": "x".join(map(str, shape)),
                "sampler": label,
                "polydiff_us": p * 1e6,
                "diffusers_us": q * 1e6,
                "ratio": p / q,
            }
        )
    print("\nPer-step overhead with a trivial model (median of alternating runs, microseconds)")
    print(f"{'shape':<12} {'sampler':<18} {'polydiff':>10} {'diffusers':>10} {'ratio':>7}")
    for row in table:
        print(
            f"{row['shape']:<12} {row['sampler']:<18} {row['polydiff_us']:10.1f} "
            f"{row['diffusers_us']:10.1f} {row['ratio']:6.2f}x"
        )
    for shape in {r["shape"] for r in table}:
        ratios = [r["ratio"] for r in table if r["shape"] == shape]
        geo = math.exp(statistics.fmean(math.log(r) for r in ratios))
        print(f"  {shape}: geometric-mean ratio {geo:.2f}x, worst {max(ratios):.2f}x")
    return {"rows": table}


def plot_overhead(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({r["shape"] for r in result["rows"]}, key=len)
    fig, axes = plt.subplots(1, len(shapes), figsize=(11, 4))
    for ax, shape in zip(axes, shapes, strict=True):
        rows = [r for r in result["rows"] if r["shape"] == shape]
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [r["polydiff_us"] for r in rows], 0.4, label="polydiff")
        ax.bar([x + 0.2 for x in xs], [r["diffusers_us"] for r in rows], 0.4, label="diffusers")
        ax.set_xticks(list(xs), [r["sampler"] for r in rows], rotation=45, ha="right")
        ax.set(title=f"per-step time, {shape}", ylabel="microseconds per step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--quick", action="store_true", help="3 problems, NFE 5 and 10, fewer samples"
    )
    group.add_argument(
        "--full", action="store_true", help="also NFE 50, tuning at NFE 20, dpmpp_2m"
    )
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    size = SIZES["quick" if args.quick else "full" if args.full else "default"]
    args.out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    # The accuracy runs' tensors are small (256 x 64 at most): one thread, where a second one
    # costs more in synchronisation than it gains (25x slower on a busy 2-core machine).
    torch.set_num_threads(1)
    started = time.perf_counter()
    acc = accuracy(size)
    defaults = {kind: defaults_study(acc["cases"], kind, size.nfes) for kind in FAMILIES}
    plot_accuracy(acc["cases"], size.nfes, args.out / "accuracy.png")
    plot_errors(acc["cases"], size.nfes, args.out / "errors.png")
    orders = observed_orders(size)
    torch.set_num_threads(threads)
    ovh = overhead(size.quick)
    plot_overhead(ovh, args.out / "overhead.png")
    results = {"nfes": list(size.nfes), "accuracy": acc, "defaults": defaults, "orders": orders,
               "overhead": ovh}  # fmt: skip
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"\nwrote {args.out}/accuracy.png, errors.png, overhead.png, results.json "
          f"({time.perf_counter() - started:.0f} s)")  # fmt: skip


if __name__ == "__main__":
    main()
