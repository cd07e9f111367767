"""Shape metrics speed: distance matrices of :func:`polydiff.shape.metrics.pairwise_distances`
against a python loop over pairs, as the number of clouds grows.

S = R = ``count`` clouds of ``points`` surface points (rendered primitives, the 11 kinds in
turn, normalised as for evaluation; samples rng seed 1, references seed 2), one (S, R)
matrix per method:

* CD: ``pairwise_distances(metric="cd")`` with its CPU default (one scipy KD-tree per
  cloud, ``backend="kdtree"``) and with ``backend="torch"`` (batched ``chamfer_distance``,
  the path GPUs take), against a double loop calling ``chamfer_distance`` on one pair.
* EMD: ``pairwise_distances(metric="emd")`` (exact up to 1024 points, the auction above),
  against a double loop calling ``scipy.optimize.linear_sum_assignment`` on one pair's
  float64 cost matrix. EMD costs about a second a pair at 2048 points, so beyond
  ``emd_pairs`` pairs both EMD methods run on the first rows of the matrix only and their
  time is scaled to all pairs (each pair costs the same); such rows say ``extrapolated``.

Each method's values are checked against the loop's (largest relative difference). One
thread (``torch.set_num_threads(1)``) unless ``--threads``: the KD-tree and exact-EMD paths
spread pairs over that many threads.

Run: ``python benchmarks/shape/metrics_speed.py`` (``--quick``: counts 4 and 8, fewer EMD
pairs). Prints the table; writes ``out/metrics_speed.png`` and ``out/metrics_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist
from torch import Tensor

from polydiff.shape.data import sample_surface
from polydiff.shape.metrics import chamfer_distance, normalize_for_evaluation, pairwise_distances
from polydiff.shape.synthetic import CAPTIONS, render

OUT = Path(__file__).resolve().parent / "out"
SAMPLE_SEED, REFERENCE_SEED = 1, 2


def rendered_clouds(count: int, points: int, seed: int) -> Tensor:
    """(count, points, 3) surface samples of rendered primitives (kinds in turn), normalised
    into [-1, 1]^3 as for evaluation."""
    rng = np.random.default_rng(seed)
    clouds = [
        sample_surface(render(CAPTIONS[i % len(CAPTIONS)], rng), points, rng) for i in range(count)
    ]
    return normalize_for_evaluation(torch.from_numpy(np.stack(clouds)).float())


def naive_chamfer(samples: Tensor, refs: Tensor) -> Tensor:
    """(S, R) by a python double loop over pairs, one ``chamfer_distance`` call each."""
    return torch.tensor(
        [[float(chamfer_distance(s[None], r[None])) for r in refs] for s in samples],
        dtype=torch.float64,
    )


def naive_emd(samples: Tensor, refs: Tensor) -> Tensor:
    """(S, R) by a python double loop over pairs, one exact assignment each."""
    rows = []
    for s in samples.double().numpy():
        row = []
        for r in refs.double().numpy():
            cost = cdist(s, r)
            matched_rows, matched_cols = linear_sum_assignment(cost)
            row.append(float(cost[matched_rows, matched_cols].mean()))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float64)


def _timed(fn: Callable[[], Tensor]) -> tuple[Tensor, float]:
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def metrics_speed(
    counts: Sequence[int] = (8, 16, 32, 64), points: int = 2048, emd_pairs: int = 64
) -> list[dict[str, Any]]:
    """Seconds to fill an S x R distance matrix (S = R = count) per distance and method.

    Returns:
        One row per (metric, method, count): ``{"metric": "cd" | "emd", "method", "count",
        "pairs", "points", "seconds", "measured_pairs", "extrapolated", "speedup" (the naive
        loop's seconds over this method's), "max_rel_diff" (against the naive loop)}``.
    """
    largest = max(counts)
    all_samples = rendered_clouds(largest, points, SAMPLE_SEED)
    all_refs = rendered_clouds(largest, points, REFERENCE_SEED)
    rows: list[dict[str, Any]] = []
    for count in counts:
        samples, refs = all_samples[:count], all_refs[:count]
        pairs = count * count
        chamfer = {
            "naive loop": lambda s=samples, r=refs: naive_chamfer(s, r),
            "pairwise (kdtree)": lambda s=samples, r=refs: pairwise_distances(s, r, "cd"),
            "pairwise (torch)": lambda s=samples, r=refs: pairwise_distances(
                s, r, "cd", backend="torch"
            ),
        }
        # EMD: the first `kept` rows of the matrix when all pairs would take too long.
        kept = count if pairs <= emd_pairs else max(1, emd_pairs // count)
        emd = {
            "naive loop": lambda s=samples[:kept], r=refs: naive_emd(s, r),
            "pairwise": lambda s=samples[:kept], r=refs: pairwise_distances(s, r, "emd"),
        }
        for metric, methods, measured in (("cd", chamfer, count), ("emd", emd, kept)):
            results = {name: _timed(fn) for name, fn in methods.items()}
            reference, naive_seconds = results["naive loop"]
            scale = count / measured
            for name, (value, seconds) in results.items():
                rel = (value - reference).abs() / reference.abs().clamp_min(1e-12)
                rows.append({
                    "metric": metric, "method": name, "count": count, "pairs": pairs,
                    "points": points, "seconds": seconds * scale,
                    "measured_pairs": measured * count, "extrapolated": measured < count,
                    "speedup": naive_seconds / seconds, "max_rel_diff": float(rel.max()),
                })  # fmt: skip
            line = "  ".join(f"{n} {s * scale:8.2f} s" for n, (_, s) in results.items())
            print(f"  {metric} count {count:3d}: {line}", flush=True)
    return rows


def print_table(rows: Sequence[dict[str, Any]]) -> None:
    print(
        f"{'metric':6} {'method':18} {'count':>5} {'pairs':>6} {'seconds':>9} {'ms/pair':>8} "
        f"{'x naive':>8} {'max rel diff':>12}"
    )
    for row in rows:
        mark = "~" if row["extrapolated"] else " "
        print(
            f"{row['metric']:6} {row['method']:18} {row['count']:5d} {row['pairs']:6d} "
            f"{mark}{row['seconds']:8.2f} {1000 * row['seconds'] / row['pairs']:8.2f} "
            f"{row['speedup']:8.2f} {row['max_rel_diff']:12.1e}"
        )
    if any(row["extrapolated"] for row in rows):
        print("~ extrapolated from the first rows of the matrix (measured_pairs pairs)")


def plot(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Seconds against the number of clouds, one panel per distance, one line per method
    (log-log; hollow markers: extrapolated). Writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(dict.fromkeys(row["metric"] for row in rows))
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        mine = [row for row in rows if row["metric"] == metric]
        for method in dict.fromkeys(row["method"] for row in mine):
            line = [row for row in mine if row["method"] == method]
            (drawn,) = ax.plot([r["count"] for r in line], [r["seconds"] for r in line],
                               label=method)  # fmt: skip
            for row in line:
                face = "none" if row["extrapolated"] else drawn.get_color()
                ax.plot(row["count"], row["seconds"], "o", color=drawn.get_color(), mfc=face)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("clouds per set (S = R)")
        ax.set_ylabel("seconds for the S x R matrix")
        ax.set_title(f"{metric.upper()}, {mine[0]['points']} points per cloud")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="counts 4 and 8, 8 EMD pairs")
    parser.add_argument("--points", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    counts, emd_pairs = ((4, 8), 8) if args.quick else ((8, 16, 32, 64), 64)
    print(f"{args.points} points per cloud, {args.threads} thread(s)")
    rows = metrics_speed(counts, args.points, emd_pairs)
    print_table(rows)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "metrics_speed.json").write_text(json.dumps(rows, indent=2))
    print(f"wrote {plot(rows, OUT / 'metrics_speed.png')}")


if __name__ == "__main__":
    main()
