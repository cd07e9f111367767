"""Shape benchmark: the bundled point model and latent model side by side, on held-out primitives.

Everything runs on the CPU with one thread (``torch.set_num_threads(1)``), in one process, so
the side-by-side numbers share the machine's load.

1. Set metrics (PointFlow's protocol, :func:`polydiff.shape.metrics.shape_metrics`): each
   model makes ``--per-caption`` shapes of each of the 11 captions (default steps and
   guidance, seed 0); the references are as many held-out rendered primitives (rng seed
   1234, which no training run uses), surface-sampled. MMD / COV / 1-NNA with Chamfer at
   ``--points`` points and with EMD at ``--emd-points`` (a random subset of the same clouds;
   exact EMD costs O(N^3) a pair). A second held-out real set (seed 4321) against the
   references is the floor: what a perfect generator would score with these counts.
2. Prompt adherence: the bundled evaluator's share of shapes named with their prompt, per
   caption and overall, next to the real held-out shapes.
3. Speed: seconds a shape of sampling (a batch of 11, default steps) and of meshing one shape
   (the point model's reconstruction from its cloud; the latent model's field + marching
   cubes), median over ``--repeats``.
4. The metrics' own speed against a naive loop over pairs as the set count grows
   (``metrics_speed.py``; plot ``out/metrics_speed.png``).

Run: ``python benchmarks/shape/run.py`` (``--quick``: fewer shapes, points and repeats).
Prints the tables; writes ``out/results.json``, ``out/adherence_per_caption.png`` and
``out/metrics_speed.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from polydiff.core.modality import Sampling, load_trained
from polydiff.shape.metrics import load_evaluator, prompt_adherence, rendered_shapes, shape_metrics
from polydiff.shape.pipeline import sample_shapes
from polydiff.shape.recipe import ShapeRecipe
from polydiff.shape.synthetic import CAPTIONS

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from metrics_speed import metrics_speed, plot, print_table  # noqa: E402

BUNDLED = Path(ShapeRecipe.bundled[0]).parent
HELD_OUT_SEED, SECOND_REAL_SEED = 1234, 4321


def _median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _subset(clouds: torch.Tensor, count: int) -> torch.Tensor:
    """A fixed random subset of ``count`` points of every cloud."""
    generator = torch.Generator().manual_seed(0)
    index = torch.randperm(clouds.shape[1], generator=generator)[:count]
    return clouds[:, index]


def _set_metrics(samples: torch.Tensor, refs: torch.Tensor, emd_points: int) -> dict[str, float]:
    cd = shape_metrics(samples, refs, metrics=("cd",))
    emd = shape_metrics(_subset(samples, emd_points), _subset(refs, emd_points), metrics=("emd",))
    return {**cd, **emd}


def generate_clouds(folder: Path, prompts: Sequence[str], points: int) -> torch.Tensor:
    model, recipe = load_trained(folder, ShapeRecipe)
    with torch.inference_mode():
        shapes = sample_shapes(model, recipe.config, list(prompts), seed=0, points=points)
    return torch.from_numpy(np.stack([s.points for s in shapes]))


def speed(folder: Path, points: int, repeats: int) -> dict[str, float]:
    model, recipe = load_trained(folder, ShapeRecipe)
    options = Sampling.resolve(recipe.config, None, len(CAPTIONS))
    made: list[Any] = []

    def sample() -> None:
        with torch.inference_mode():
            made[:] = sample_shapes(model, recipe.config, list(CAPTIONS), seed=0,
                                    options=options, points=points)  # fmt: skip

    sampling = _median_seconds(sample, repeats) / len(CAPTIONS)
    meshing = _median_seconds(lambda: made[6].with_mesh(), repeats)  # "a torus"
    return {
        "sample_s_per_shape": sampling,
        "mesh_s_per_shape": meshing,
        "steps": options.steps,
        "mesh_resolution": recipe.config["mesh_resolution"],
    }


def _plot_adherence(rows: dict[str, dict[str, float]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    width = 0.8 / len(rows)
    for i, (name, shares) in enumerate(rows.items()):
        x = np.arange(len(CAPTIONS)) + i * width
        axes.bar(x, [100 * shares[c] for c in CAPTIONS], width, label=name)
    axes.set_xticks(np.arange(len(CAPTIONS)) + 0.4 - width / 2, CAPTIONS, rotation=30,
                    ha="right")  # fmt: skip
    axes.set_ylabel("named with its prompt (%)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes, points, repeats")
    parser.add_argument("--per-caption", type=int, default=None, help="shapes a caption (4)")
    parser.add_argument("--points", type=int, default=None, help="points a cloud (2048)")
    parser.add_argument("--emd-points", type=int, default=None, help="EMD subset (512)")
    parser.add_argument("--repeats", type=int, default=None, help="speed repeats (3)")
    parser.add_argument("--points-model", type=Path, default=BUNDLED / "points")
    parser.add_argument("--latent-model", type=Path, default=BUNDLED / "latent")
    args = parser.parse_args()
    per_caption = args.per_caption or (2 if args.quick else 4)
    points = args.points or (1024 if args.quick else 2048)
    emd_points = args.emd_points or (256 if args.quick else 512)
    repeats = args.repeats or (1 if args.quick else 3)
    torch.set_num_threads(1)
    out = HERE / "out"
    out.mkdir(exist_ok=True)

    count = per_caption * len(CAPTIONS)
    prompts = [CAPTIONS[i % len(CAPTIONS)] for i in range(count)]
    refs, _ = rendered_shapes(count, seed=HELD_OUT_SEED, points=points)
    second, _ = rendered_shapes(count, seed=SECOND_REAL_SEED, points=points)
    clouds = {"real (seed 4321)": second}
    models = {"points": args.points_model, "latent": args.latent_model}
    for name, folder in models.items():
        clouds[name] = generate_clouds(folder, prompts, points)

    results: dict[str, Any] = {"per_caption": per_caption, "points": points,
                               "emd_points": emd_points, "set_metrics": {}, "adherence": {},
                               "speed": {}}  # fmt: skip
    evaluator = load_evaluator()
    print(f"\n1. Set metrics vs {count} held-out primitives ({points} points; EMD on "
          f"{emd_points}); CD x 10^3, EMD x 10^2, COV and 1-NNA in %")  # fmt: skip
    header = ("set", "MMD-CD", "COV-CD", "1-NNA-CD", "MMD-EMD", "COV-EMD", "1-NNA-EMD")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for name, samples in clouds.items():
        m = _set_metrics(samples, refs, emd_points)
        results["set_metrics"][name] = m
        print(f"| {name} | {1e3 * m['MMD-CD']:.2f} | {100 * m['COV-CD']:.1f} | "
              f"{100 * m['1-NNA-CD']:.1f} | {1e2 * m['MMD-EMD']:.2f} | "
              f"{100 * m['COV-EMD']:.1f} | {100 * m['1-NNA-EMD']:.1f} |")  # fmt: skip

    print("\n2. Prompt adherence (bundled evaluator), % named with their prompt")
    adherence = {"real (seed 1234)": prompt_adherence(refs, prompts, evaluator)}
    for name in models:
        adherence[name] = prompt_adherence(clouds[name], prompts, evaluator)
    results["adherence"] = adherence
    print("| caption | " + " | ".join(adherence) + " |\n|---|" + "---|" * len(adherence))
    for caption in (*CAPTIONS, "accuracy"):
        row = " | ".join(f"{100 * shares[caption]:.0f}" for shares in adherence.values())
        print(f"| {caption if caption != 'accuracy' else '**all**'} | {row} |")
    _plot_adherence(adherence, out / "adherence_per_caption.png")

    print(f"\n3. Speed, one thread: seconds a shape ({points} points)")
    print("| model | steps | sampling s/shape | mesh s/shape (resolution) |\n|---|---|---|---|")
    for name, folder in models.items():
        s = speed(folder, points, repeats)
        results["speed"][name] = s
        print(f"| {name} | {s['steps']} | {s['sample_s_per_shape']:.3f} | "
              f"{s['mesh_s_per_shape']:.3f} ({s['mesh_resolution']}^3) |")  # fmt: skip

    print("\n4. Metrics speed: pairwise_distances vs a loop over pairs")
    counts = (4, 8) if args.quick else (8, 16, 32)
    rows = metrics_speed(counts=counts, points=512 if args.quick else 1024,
                         emd_pairs=8 if args.quick else 32)  # fmt: skip
    print_table(rows)
    results["metrics_speed"] = rows
    plot(rows, out / "metrics_speed.png")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(
        f"\nwrote {out / 'results.json'}, {out / 'adherence_per_caption.png'}, "
        f"{out / 'metrics_speed.png'}"
    )


if __name__ == "__main__":
    main()
