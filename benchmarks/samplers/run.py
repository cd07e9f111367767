"""Sampler benchmark: accuracy against the exact ODE solution, and per-step overhead.

1. Accuracy. Data from a Gaussian mixture, so the denoiser is exact and the probability-flow
   ODE can be integrated to 1e-10. From the same noise at t = 999 of DDPM's linear schedule
   (an eps-prediction model), every sampler configuration of polydiff and of diffusers is run at
   NFE 5, 10, 20 and 50; the error is ||x - x_exact|| / ||x_exact|| at sigma = 0. diffusers gets
   its best settings: every scheduler, order, spacing and sigma option is tried and the best
   one per NFE is reported (an oracle choice in its favour).
2. Overhead. A trivial model (returns its input) isolates the sampler's own cost per step, for
   a 1x4x8x8 latent and a 16x4x64x64 batch; polydiff and diffusers alternate in one run.

Writes a table to stdout and ``out/accuracy.png``, ``out/overhead.png``, ``out/results.json``.
Run: ``python benchmarks/samplers/run.py`` (``--quick`` for a short smoke run).
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
from collections.abc import Callable
from pathlib import Path

import torch

from polydiff.core import sample, schedules
from polydiff.core.analytic import GaussianMixture

warnings.filterwarnings("ignore")
OUT = Path(__file__).resolve().parent / "out"
NFES = (5, 10, 20, 50)


# --------------------------------------------------------------------------- accuracy


def polydiff_configs() -> list[tuple[str, str, float | None]]:
    """(sampler, spacing, shift): every sampler with every spacing, the time shift swept."""
    samplers = ["ddim", "heun", "dpmpp_2m", "dpmpp_3m", "unipc"]
    spacings = [(s, None) for s in ("linspace", "trailing", "leading", "karras", "logsnr")]
    spacings += [("flow_shift", shift) for shift in (0.3, 0.5, 0.7, 2.0)]
    return [(sampler, spacing, shift) for sampler in samplers for spacing, shift in spacings]


def steps_for(sampler: str, nfe: int) -> int:
    """Steps that use at most ``nfe`` model evaluations (Heun needs 2 * steps - 1)."""
    return (nfe + 1) // 2 if "heun" in sampler.lower() else nfe


def diffusers_configs() -> list[tuple[str, Callable[[], object]]]:
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


def run_diffusers(scheduler, model, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """diffusers' pipeline loop: latents = noise * init_noise_sigma, scale input, step."""
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, t)
        tt = torch.full((x.shape[0],), float(t), dtype=torch.float32)
        x = scheduler.step(model(inp, tt), t, x).prev_sample
    return x


def accuracy(quick: bool) -> dict:
    schedule = schedules.linear()
    mixture = GaussianMixture.random(8, 8, seed=0, spread=1.0, std=(0.1, 0.5))
    model = mixture.model(schedule, "eps")
    n = 64 if quick else 256
    noise = torch.randn(n, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t0 = torch.tensor(999.0, dtype=torch.float64)
    alpha, sigma = float(schedule.alpha(t0)), float(schedule.sigma(t0))
    exact = mixture.ode_solve(noise, alpha, sigma)

    def err(x: torch.Tensor) -> float:
        return ((x.double() - exact).norm() / exact.norm()).item()

    nfes = (5, 10) if quick else NFES
    rows: dict[str, dict[str, dict[int, float]]] = {"polydiff": {}, "diffusers": {}}
    for sampler, spacing, shift in polydiff_configs():
        name = f"{sampler} {spacing}" + (f" {shift}" if shift else "")
        rows["polydiff"][name] = {
            nfe: err(
                sample(
                    model,
                    noise,
                    schedule=schedule,
                    sampler=sampler,
                    shift=shift,
                    steps=steps_for(sampler, nfe),
                    spacing=spacing,
                )
            )
            for nfe in nfes
        }
    for name, make in diffusers_configs():
        results = {}
        for nfe in nfes:
            try:
                results[nfe] = err(run_diffusers(make(), model, noise, steps_for(name, nfe)))
            except Exception:  # some option combinations are refused by diffusers
                results[nfe] = math.inf
        rows["diffusers"][name] = results
    best = {
        lib: {
            nfe: min(((cfg, r[nfe]) for cfg, r in table.items()), key=lambda p: p[1])
            for nfe in nfes
        }
        for lib, table in rows.items()
    }
    print("\nAccuracy: relative error vs the exact ODE solution (Gaussian mixture, D=8, K=8)")
    print(
        f"{'NFE':>4} | {'polydiff best':<26} {'error':>9} | {'diffusers best':<30} "
        f"{'error':>9} | ratio"
    )
    for nfe in nfes:
        (pc, pe), (dc, de) = best["polydiff"][nfe], best["diffusers"][nfe]
        print(f"{nfe:>4} | {pc:<26} {pe:9.2e} | {dc:<30} {de:9.2e} | {pe / de:5.2f}x")
    print("\nSame solver, each library's best setting per NFE (polydiff vs diffusers):")
    pairs = [
        ("ddim", "DDIM"),
        ("heun", "Heun"),
        ("dpmpp_2m", "DPM++2M"),
        ("dpmpp_3m", "DPM++3M"),
        ("unipc", "UniPC"),
    ]
    for ours, theirs in pairs:
        cells = []
        for nfe in nfes:
            mine = min(v[nfe] for k, v in rows["polydiff"].items() if k.split()[0] == ours)
            their = min(v[nfe] for k, v in rows["diffusers"].items() if k.startswith(theirs))
            cells.append(f"NFE {nfe}: {mine:8.2e} vs {their:8.2e}")
        print(f"  {ours:<9} " + " | ".join(cells))
    return {
        "rows": rows,
        "best": {lib: {str(k): v for k, v in b.items()} for lib, b in best.items()},
    }


def plot_accuracy(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for lib, style in (("polydiff", "-o"), ("diffusers", "--s")):
        best = result["best"][lib]
        nfes = sorted(int(k) for k in best)
        ax.plot(nfes, [best[str(n)][1] for n in nfes], style, label=f"{lib} (best per NFE)")
    for name in ("dpmpp_2m trailing", "unipc trailing", "unipc flow_shift 0.5"):
        series = result["rows"]["polydiff"][name]
        nfes = sorted(series)
        ax.plot(nfes, [series[n] for n in nfes], ":", alpha=0.7, label=f"polydiff {name}")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="model evaluations (NFE)",
        ylabel="relative error vs exact ODE",
        title="Sampler accuracy, Gaussian mixture",
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
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
    parser.add_argument("--quick", action="store_true", help="fewer points, NFEs and repeats")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    acc = accuracy(args.quick)
    plot_accuracy(acc, args.out / "accuracy.png")
    ovh = overhead(args.quick)
    plot_overhead(ovh, args.out / "overhead.png")
    (args.out / "results.json").write_text(
        json.dumps({"accuracy": acc, "overhead": ovh}, indent=1, default=str)
    )
    print(f"\nwrote {args.out}/accuracy.png, overhead.png, results.json")


if __name__ == "__main__":
    main()
