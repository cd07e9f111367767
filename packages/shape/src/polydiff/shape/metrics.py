"""Shape metrics: distances between point clouds, the set metrics of point-cloud generation
papers (MMD, COV, 1-NNA), and a trained evaluator for prompt adherence.

Protocol (PointFlow, Yang et al. 2019; PVD; LION). Before any distance, every cloud,
generated or reference, is normalised into the axis-aligned bounding box [-1, 1]^3: its
bounding box is centred on the origin and it is divided by half its largest extent
(:func:`normalize_for_evaluation`, the ``"box"`` mode of
:func:`polydiff.shape.data.normalize_points`). :func:`shape_metrics` does this itself; the
distance functions take the clouds as they are.

Distances (batched torch, clouds ``(B, N, 3)``):

* :func:`chamfer_distance` - ``CD(a, b) = mean over a of the squared distance to the nearest
  point of b + mean over b of the squared distance to the nearest point of a`` (squared
  units). Nearest neighbours are found in chunks (bounded memory) without gradient; the
  distances to them are then recomputed exactly from the coordinates, so the value is
  differentiable (it is also the point autoencoder's training loss).
* :func:`earth_movers_distance` - ``EMD(a, b) = the mean Euclidean distance between matched
  points under the optimal one-to-one assignment`` (equal sizes; units). Exact
  (``scipy.optimize.linear_sum_assignment``, threads across clouds) up to ``exact_max``
  points; beyond, an epsilon-scaling auction (its doc gives the certified bound and the
  measured error).

Set metrics, from distance matrices (``d_sr[i, j]`` between sample i and reference j):

* MMD (minimum matching distance): mean over references of the distance to the nearest
  sample - fidelity; lower is better.
* COV (coverage): the fraction of references that are the nearest reference of at least
  one sample - diversity; higher is better (1 at most).
* 1-NNA: accuracy of the leave-one-out 1-nearest-neighbour classifier that tells samples
  from references over their union; 0.5 is ideal (the two sets are indistinguishable), 1
  means every cloud's nearest neighbour is in its own set.

Papers' tables report CD x 10^3 and EMD x 10^2 (so MMD-CD x 10^3, MMD-EMD x 10^2) and COV
and 1-NNA in percent; every function here returns raw values (squared units, units,
fractions). :func:`pairwise_distances` is where the time goes: S x R pairs, vectorised in
batches (``benchmarks/shape/metrics_speed.py`` measures it against a loop over pairs).

Prompt adherence: :class:`ShapeEvaluator` is a small PointNet (shared per-point MLP, max
pool, MLP head) trained on rendered primitives (:mod:`polydiff.shape.synthetic`) to name
their caption, with noise, outliers and random point counts so that a generator's
imprecision does not hide what the shape is. It is bundled in ``bundled/evaluator``,
reproduced by ``OMP_NUM_THREADS=1 python -m polydiff.shape.metrics --train-evaluator DIR``;
:func:`prompt_adherence` is the share of clouds it names with their prompt.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree
from torch import Tensor, nn

from polydiff.core.pretrained import Configurable, from_pretrained, save_pretrained

from .data import sample_surface
from .synthetic import CAPTIONS, render

__all__ = [
    "AUCTION_TOLERANCE",
    "CD_BACKENDS",
    "DISTANCES",
    "ShapeEvaluator",
    "chamfer_distance",
    "coverage",
    "earth_movers_distance",
    "evaluator_accuracy",
    "load_evaluator",
    "mmd",
    "normalize_for_evaluation",
    "one_nna",
    "pairwise_distances",
    "prompt_adherence",
    "rendered_shapes",
    "shape_metrics",
    "train_evaluator",
]

DISTANCES = ("cd", "emd")
CD_BACKENDS = ("auto", "kdtree", "torch")
# The auction's epsilon at its last phase, as a fraction of the pair's largest point distance:
# the matched mean is certified within it of the optimum (earth_movers_distance's doc).
AUCTION_TOLERANCE = 1e-4
_ELEMENTS = 1 << 24  # distance-matrix entries held at once (64 MB of float32)
# Chamfer's chunks on a CPU: a quarter of a million entries (1 MB) stay in cache between the
# matrix product and the two reductions (about 2x faster than 64 MB chunks); a GPU wants
# few large kernels.
_CPU_CHUNK = 1 << 18
_AUCTION_PHASES = 4  # epsilon from 1/32 of the largest distance down to the tolerance
_AUCTION_START = 1.0 / 32


# --- clouds ----------------------------------------------------------------------------------


def _clouds(points: Any, name: str, finite: bool = True) -> Tensor:
    """``points`` checked as a (B, N, 3) floating tensor with N >= 1 (and finite values)."""
    if not isinstance(points, Tensor):
        raise ValueError(f"{name} must be a (B, N, 3) tensor, got {type(points).__name__}")
    if points.dim() != 3 or points.shape[-1] != 3 or points.shape[1] == 0:
        raise ValueError(f"{name} must be (B, N, 3) with N >= 1, got {tuple(points.shape)}")
    if not points.is_floating_point():
        points = points.float()
    if finite and not bool(torch.isfinite(points).all()):
        raise ValueError(f"{name} holds NaN or infinite coordinates")
    return points


def normalize_for_evaluation(points: Tensor) -> Tensor:
    """(B, N, 3) -> (B, N, 3): each cloud's axis-aligned bounding box centred on the origin
    and the cloud divided by half its largest extent, so it fits [-1, 1]^3 with its
    proportions kept (PointFlow's protocol; :func:`polydiff.shape.data.normalize_points`
    mode ``"box"``, batched). A cloud whose points all coincide is only centred.
    Differentiable; keeps the dtype and device."""
    points = _clouds(points, "points")
    low, high = points.amin(dim=1, keepdim=True), points.amax(dim=1, keepdim=True)
    half = (high - low).amax(dim=2, keepdim=True) / 2
    half = torch.where(half > 0, half, torch.ones_like(half))
    return (points - (low + high) / 2) / half


def _sphere_normalized(points: Tensor) -> Tensor:
    """(B, N, 3): bounding-box centre at the origin, farthest point at radius 1 (the
    training normalisation, ``normalize_points(..., "sphere")``, batched)."""
    low, high = points.amin(dim=1, keepdim=True), points.amax(dim=1, keepdim=True)
    centred = points - (low + high) / 2
    radius = centred.norm(dim=2, keepdim=True).amax(dim=1, keepdim=True)
    return centred / torch.where(radius > 0, radius, torch.ones_like(radius))


# --- Chamfer distance ------------------------------------------------------------------------


@torch.no_grad()
def _nearest_indices(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """(B, N) index of each a-point's nearest b-point and (B, M) of each b-point's nearest
    a-point, by ``|a|^2 + |b|^2 - 2 a.b`` in float32, a chunk of a-points at a time."""
    # Centred on b's mean: the expansion's round-off grows with |a|^2, not with the distances.
    offset = b.mean(dim=1, keepdim=True)
    a, b = (a - offset).float(), (b - offset).float()
    batch, n, m = a.shape[0], a.shape[1], b.shape[1]
    a_sq, b_sq = a.square().sum(-1), b.square().sum(-1)
    b_t = b.transpose(1, 2)
    to_b = torch.empty(batch, n, dtype=torch.long, device=a.device)
    best_to_a = torch.full((batch, m), math.inf, device=a.device)
    to_a = torch.zeros(batch, m, dtype=torch.long, device=a.device)
    budget = _CPU_CHUNK if a.device.type == "cpu" else _ELEMENTS
    chunk = max(1, budget // max(1, batch * m))
    for start in range(0, n, chunk):
        part = a[:, start : start + chunk]
        sq = torch.baddbmm(b_sq[:, None, :], part, b_t, alpha=-2.0)
        sq.add_(a_sq[:, start : start + chunk, None])
        to_b[:, start : start + chunk] = sq.argmin(dim=2)
        value, index = sq.min(dim=1)
        closer = value < best_to_a
        best_to_a = torch.where(closer, value, best_to_a)
        to_a = torch.where(closer, index + start, to_a)
    return to_b, to_a


def _nearest_squared(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """(B, N) squared distance of each a-point to its nearest b-point, and (B, M) the other
    way. The expanded form can pick a neighbour at most ~1e-6 (squared units) farther than
    the nearest when two are nearly tied; the distances to the picked ones are exact."""
    to_b, to_a = _nearest_indices(a, b)
    nearest_b = b.gather(1, to_b[..., None].expand(-1, -1, 3))
    nearest_a = a.gather(1, to_a[..., None].expand(-1, -1, 3))
    return (a - nearest_b).square().sum(-1), (b - nearest_a).square().sum(-1)


def chamfer_distance(a: Tensor, b: Tensor) -> Tensor:
    """Chamfer distance of each pair of clouds: (B, N, 3), (B, M, 3) -> (B,).

    ``mean_i min_j |a_i - b_j|^2 + mean_j min_i |a_i - b_j|^2`` in squared units (tables
    report it x 10^3 on clouds normalised by :func:`normalize_for_evaluation`). Symmetric, 0
    for identical clouds. Memory is bounded (at most ~64 MB of distances at a time);
    differentiable in both clouds (gradients flow through the nearest points' coordinates),
    so it is also a training loss: NaN coordinates give NaN rather than an error.

    Raises:
        ValueError: clouds that are not (B, *, 3) or whose batch sizes differ.
    """
    a, b = _clouds(a, "a", finite=False), _clouds(b, "b", finite=False)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"a and b hold {a.shape[0]} and {b.shape[0]} clouds; need the same")
    to_b, to_a = _nearest_squared(a, b)
    return to_b.mean(dim=1) + to_a.mean(dim=1)


# --- Earth mover's distance ------------------------------------------------------------------


def _exact_emd_one(cost: np.ndarray) -> float:
    rows, cols = linear_sum_assignment(cost)
    return float(cost[rows, cols].mean())


def _workers(count: int) -> int:
    # linear_sum_assignment releases the GIL: one thread per torch thread (the user's budget).
    return max(1, min(count, torch.get_num_threads()))


def _exact_emd(a: Tensor, b: Tensor) -> Tensor:
    """(B, N, 3), (B, N, 3) -> (B,) float64, exact: a few clouds' cost matrices at a time
    (float64), their assignments solved in threads."""
    values: list[float] = []
    workers = _workers(a.shape[0])
    group = max(workers, _ELEMENTS // (2 * a.shape[1] * a.shape[1]))
    with ThreadPoolExecutor(workers) as pool:
        for start in range(0, a.shape[0], group):
            costs = torch.cdist(
                a[start : start + group].detach().double().cpu(),
                b[start : start + group].detach().double().cpu(),
                compute_mode="donot_use_mm_for_euclid_dist",
            ).numpy()
            values += pool.map(_exact_emd_one, list(costs))
    return torch.tensor(values, dtype=torch.float64, device=a.device)


@torch.no_grad()
def _auction_assignment(cost: Tensor, tolerance: float = AUCTION_TOLERANCE) -> Tensor:
    """(P, N, N) costs -> (P, N) column of each row, by Bertsekas' forward auction with
    epsilon scaling, all P problems bid together (Jacobi rounds: every unassigned row bids at
    once, each column goes to its highest bidder).

    A row bids for its cheapest column (cost + price) and raises that column's price by the
    gap to its second cheapest plus epsilon; the displaced owner bids again. Each phase ends
    with every row assigned and epsilon-complementary slackness (each row's column within
    epsilon of its cheapest), so the assignment's total cost is within N x epsilon of the
    optimum; epsilon falls geometrically from 1/32 of the pair's largest cost to ``tolerance``
    times it over the phases, prices carried from one phase to the next.
    """
    pairs, n, m = cost.shape
    flat = cost.reshape(pairs * n, m)
    scale = cost.flatten(1).amax(dim=1).clamp_min(torch.finfo(cost.dtype).tiny)
    eps_start, eps_end = scale * _AUCTION_START, scale * tolerance
    price = torch.zeros(pairs * m, dtype=cost.dtype, device=cost.device)
    owner = torch.empty(pairs * m, dtype=torch.long, device=cost.device)
    column = torch.empty(pairs * n, dtype=torch.long, device=cost.device)
    for phase in range(_AUCTION_PHASES):
        eps = eps_start * (eps_end / eps_start) ** (phase / (_AUCTION_PHASES - 1))
        owner.fill_(-1)
        column.fill_(-1)
        bidders = torch.arange(pairs * n, device=cost.device)
        while bidders.numel():
            pair = bidders // n
            offers = flat[bidders] + price.view(pairs, m)[pair]
            cheapest, cols = offers.topk(2, dim=1, largest=False)
            key = pair * m + cols[:, 0]
            bid = price[key] + (cheapest[:, 1] - cheapest[:, 0]) + eps[pair]
            objects, slot = torch.unique(key, return_inverse=True)
            top = torch.full((objects.numel(),), -math.inf, dtype=bid.dtype, device=bid.device)
            wins = bid >= top.scatter_reduce(0, slot, bid, "amax")[slot]
            # Equal bids for one column: the highest row index takes it, so one winner each.
            chosen = torch.full_like(objects, -1).scatter_reduce(
                0, slot[wins], bidders[wins], "amax"
            )
            wins &= bidders == chosen[slot]
            won, winners = key[wins], bidders[wins]
            displaced = owner[won]
            owner[won] = winners
            column[winners] = cols[wins, 0]
            price[won] = bid[wins]
            bidders = torch.cat([bidders[~wins], displaced[displaced >= 0]])
    return column.view(pairs, n)


def _auction_emd(a: Tensor, b: Tensor) -> Tensor:
    """(B, N, 3), (B, N, 3) -> (B,) float64: the auction's assignment, a few pairs at a time;
    the matched distances are recomputed from the coordinates."""
    values = []
    group = max(1, _ELEMENTS // (a.shape[1] * a.shape[1]))
    for start in range(0, a.shape[0], group):
        pa, pb = (
            a[start : start + group].detach().float(),
            b[start : start + group].detach().float(),
        )
        cost = torch.cdist(pa, pb, compute_mode="donot_use_mm_for_euclid_dist")
        column = _auction_assignment(cost)
        matched = pb.gather(1, column[..., None].expand(-1, -1, 3))
        values.append((pa.double() - matched.double()).norm(dim=2).mean(dim=1))
    return torch.cat(values)


def earth_movers_distance(a: Tensor, b: Tensor, exact_max: int = 1024) -> Tensor:
    """Earth mover's distance of each pair of clouds of equal size: (B, N, 3), (B, N, 3) ->
    (B,) float64.

    The mean Euclidean distance between matched points under the optimal one-to-one
    assignment, in units (tables report it x 10^2 on clouds normalised by
    :func:`normalize_for_evaluation`). Symmetric; 0 when b is a permutation of a. Not
    differentiable (an evaluation metric).

    * N <= ``exact_max``: exact, ``scipy.optimize.linear_sum_assignment`` on float64 costs
      (about 0.1-0.2 s per pair at 1024 points and 1-2 s at 2048 on one core; cubic in N),
      the pairs solved in ``torch.get_num_threads()`` threads.
    * N > ``exact_max``: an epsilon-scaling auction (:func:`_auction_assignment`), batched
      torch on the clouds' device. Certified: the matched mean is a real matching's, so never
      below the exact EMD, and at most ``AUCTION_TOLERANCE`` (1e-4) times the pair's largest
      point distance above it (<= 3.5e-4 for normalised clouds). Measured against the exact
      EMD on normalised rendered primitives at the switch size (1024 points, 44 pairs: each
      kind against itself twice and two other kinds; EMD 0.07-0.65): relative error at most
      5.4e-5, mean 1.3e-5. Speed on one CPU core: about half the exact solver's at 1024
      points and about the same at 2048 (0.96-1.28x over 64-pair samples,
      ``benchmarks/shape/metrics_speed.py``); its work grows as N^2 x rounds where the
      exact solver's grows as N^3, and it runs batched on the clouds' device.

    Raises:
        ValueError: unequal cloud sizes or batch sizes, or clouds that are not (B, N, 3).
    """
    a, b = _clouds(a, "a"), _clouds(b, "b")
    if a.shape != b.shape:
        raise ValueError(
            f"earth_movers_distance needs clouds of equal size, got {tuple(a.shape)} and "
            f"{tuple(b.shape)}"
        )
    if a.shape[1] <= max(exact_max, 1):
        return _exact_emd(a, b)
    return _auction_emd(a, b)


# --- distance matrices and set metrics -------------------------------------------------------


def _kd_tree_chamfer(a: Tensor, b: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """Chamfer distances (P,) float64 of the pairs ``a[rows[p]]``, ``b[cols[p]]`` on a CPU:
    one KD-tree per cloud, exact nearest neighbours in float64 (O(N log N) per pair where
    the torch path is O(N M)), pairs queried in threads (scipy releases the GIL)."""
    a_np, b_np = a.detach().double().cpu().numpy(), b.detach().double().cpu().numpy()
    rows_np, cols_np = rows.cpu().numpy(), cols.cpu().numpy()
    workers = _workers(rows_np.size)
    with ThreadPoolExecutor(workers) as pool:
        used_a, used_b = np.unique(rows_np), np.unique(cols_np)
        trees_a = dict(zip(used_a, pool.map(cKDTree, a_np[used_a]), strict=True))
        trees_b = dict(zip(used_b, pool.map(cKDTree, b_np[used_b]), strict=True))

        def one(pair: int) -> float:
            i, j = rows_np[pair], cols_np[pair]
            to_b, _ = trees_b[j].query(a_np[i])
            to_a, _ = trees_a[i].query(b_np[j])
            return float(np.mean(to_b**2) + np.mean(to_a**2))

        values = list(pool.map(one, range(rows_np.size)))
    return torch.tensor(values, dtype=torch.float64, device=a.device)


def _pair_distances(
    a: Tensor, b: Tensor, rows: Tensor, cols: Tensor, metric: str, batch_size: int | None,
    exact_max: int, backend: str,
) -> Tensor:  # fmt: skip
    """Distances (P,) between clouds ``a[rows[p]]`` and ``b[cols[p]]``, pairs in batches."""
    n, m = a.shape[1], b.shape[1]
    if metric == "cd" and (backend == "kdtree" or (backend == "auto" and a.device.type == "cpu")):
        return _kd_tree_chamfer(a, b, rows, cols)
    if batch_size is None:
        # CD and the auction hold a few (N, M) matrices per pair; exact EMD costs are
        # computed a group at a time inside earth_movers_distance.
        batch_size = max(1, _ELEMENTS // (n * m)) if metric == "cd" or n > exact_max else 256
    out = []
    for start in range(0, rows.numel(), batch_size):
        left, right = a[rows[start : start + batch_size]], b[cols[start : start + batch_size]]
        if metric == "cd":
            with torch.no_grad():
                out.append(chamfer_distance(left, right).double())
        else:
            out.append(earth_movers_distance(left, right, exact_max=exact_max))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64, device=a.device)


def pairwise_distances(
    samples: Tensor,
    refs: Tensor,
    metric: str = "cd",
    batch_size: int | None = None,
    exact_max: int = 1024,
    backend: str = "auto",
) -> Tensor:
    """Distance matrix between two sets of clouds: (S, N, 3), (R, M, 3) -> (S, R) float64.

    ``metric``: ``"cd"`` (Chamfer, as :func:`chamfer_distance`) or ``"emd"``
    (:func:`earth_movers_distance` with ``exact_max``; needs M == N). ``backend`` says how CD
    finds nearest neighbours: ``"kdtree"`` (a scipy KD-tree per cloud, exact in float64,
    pairs queried in ``torch.get_num_threads()`` threads; 4-5x faster than torch at 2048
    points on a CPU core), ``"torch"`` (batched :func:`chamfer_distance`, ``batch_size`` pairs at
    a time, default as many as fit ~64 MB of distances), ``"auto"``: KD-trees for clouds on
    a CPU, torch on other devices. EMD pairs go ``batch_size`` at a time too (default: ~64 MB
    of costs for the auction, 256 for exact EMD).

    When ``refs is samples`` only the pairs i < j are computed (both distances are
    symmetric) and the diagonal is 0. Clouds are taken as they are (normalise them first,
    as :func:`shape_metrics` does).

    Raises:
        ValueError: an unknown metric or backend, clouds that are not (*, *, 3), or EMD with
            M != N.
    """
    if metric not in DISTANCES:
        raise ValueError(f"unknown distance {metric!r}; valid: {', '.join(DISTANCES)}")
    if backend not in CD_BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(CD_BACKENDS)}")
    same = refs is samples
    samples = _clouds(samples, "samples")
    refs = samples if same else _clouds(refs, "refs")
    if metric == "emd" and samples.shape[1] != refs.shape[1]:
        raise ValueError(
            f"EMD needs clouds of equal size: samples hold {samples.shape[1]} points, refs "
            f"{refs.shape[1]}"
        )
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    count_s, count_r = samples.shape[0], refs.shape[0]
    device = samples.device
    if same:
        rows, cols = torch.triu_indices(count_s, count_s, offset=1, device=device)
    else:
        grid = torch.arange(count_s * count_r, device=device)
        rows, cols = grid // count_r, grid % count_r
    values = _pair_distances(samples, refs, rows, cols, metric, batch_size, exact_max, backend)
    matrix = torch.zeros(count_s, count_r, dtype=torch.float64, device=device)
    matrix[rows, cols] = values
    if same:
        matrix[cols, rows] = values
    return matrix


def _matrix(d: Any, name: str) -> Tensor:
    d = torch.as_tensor(d, dtype=torch.float64)
    if d.dim() != 2 or 0 in d.shape:
        raise ValueError(f"{name} must be a non-empty 2-D distance matrix, got {tuple(d.shape)}")
    return d


def mmd(d_sr: Tensor) -> float:
    """Minimum matching distance from an (S, R) sample-to-reference distance matrix: the
    mean over references of the distance to their nearest sample (distance units)."""
    return float(_matrix(d_sr, "d_sr").amin(dim=0).mean())


def coverage(d_sr: Tensor) -> float:
    """Coverage from an (S, R) sample-to-reference distance matrix: the fraction of
    references that are the nearest reference of at least one sample, in [0, min(S, R) / R]."""
    d_sr = _matrix(d_sr, "d_sr")
    return d_sr.argmin(dim=1).unique().numel() / d_sr.shape[1]


def one_nna(d_ss: Tensor, d_rr: Tensor, d_sr: Tensor) -> float:
    """1-nearest-neighbour accuracy: the share of the S + R clouds whose nearest other cloud
    (leave-one-out: the diagonals are ignored) belongs to their own set. 0.5 is ideal; 1 when
    the sets lie apart.

    Args:
        d_ss: (S, S) distances among samples; d_rr: (R, R) among references; d_sr: (S, R)
            from samples to references.
    """
    d_ss, d_rr, d_sr = _matrix(d_ss, "d_ss"), _matrix(d_rr, "d_rr"), _matrix(d_sr, "d_sr")
    count_s, count_r = d_sr.shape
    if d_ss.shape != (count_s, count_s) or d_rr.shape != (count_r, count_r):
        raise ValueError(
            f"distance matrices do not agree: d_ss {tuple(d_ss.shape)}, d_rr "
            f"{tuple(d_rr.shape)}, d_sr {tuple(d_sr.shape)}"
        )
    if count_s + count_r < 2:
        raise ValueError("1-NNA needs at least two clouds in all")
    union = torch.cat([torch.cat([d_ss, d_sr], dim=1), torch.cat([d_sr.T, d_rr], dim=1)])
    union.fill_diagonal_(math.inf)
    is_sample = torch.arange(count_s + count_r) < count_s
    nearest = union.argmin(dim=1)
    return float((is_sample[nearest] == is_sample).double().mean())


def shape_metrics(
    samples: Tensor,
    refs: Tensor,
    metrics: Sequence[str] = DISTANCES,
    batch_size: int | None = None,
    exact_max: int = 1024,
    backend: str = "auto",
) -> dict[str, float]:
    """MMD, COV and 1-NNA of generated clouds against reference clouds, per distance.

    Both sets are normalised first (:func:`normalize_for_evaluation`), then for each
    distance in ``metrics`` the three matrices (samples-refs, samples-samples, refs-refs) are
    computed with :func:`pairwise_distances`.

    Args:
        samples: (S, N, 3) generated clouds; refs: (R, M, 3) reference clouds (M == N for
            EMD). Papers use 2048 points each.
        metrics: distances among ``"cd"``, ``"emd"`` (or one of them).
        batch_size, exact_max, backend: as :func:`pairwise_distances`.

    Returns:
        ``{"MMD-CD": ..., "COV-CD": ..., "1-NNA-CD": ..., "MMD-EMD": ..., ...}``: MMD in the
        distance's raw units (tables: CD x 10^3, EMD x 10^2), COV and 1-NNA as fractions.

    Raises:
        ValueError: an unknown distance, or invalid clouds.
    """
    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    unknown = [m for m in metrics if m not in DISTANCES]
    if unknown:
        raise ValueError(f"unknown distance(s) {unknown}; valid: {', '.join(DISTANCES)}")
    if not metrics:
        raise ValueError(f"metrics must name at least one distance of {', '.join(DISTANCES)}")
    samples = normalize_for_evaluation(samples)
    refs = normalize_for_evaluation(refs)
    report: dict[str, float] = {}
    for metric in dict.fromkeys(metrics):
        options = {"metric": metric, "batch_size": batch_size, "exact_max": exact_max,
                   "backend": backend}  # fmt: skip
        d_sr = pairwise_distances(samples, refs, **options)
        d_ss = pairwise_distances(samples, samples, **options)
        d_rr = pairwise_distances(refs, refs, **options)
        name = metric.upper()
        report[f"MMD-{name}"] = mmd(d_sr)
        report[f"COV-{name}"] = coverage(d_sr)
        report[f"1-NNA-{name}"] = one_nna(d_ss, d_rr, d_sr)
    return report


# --- prompt adherence: an evaluator trained on rendered primitives ---------------------------
class ShapeEvaluator(Configurable, nn.Module):
    """A small PointNet that names the synthetic caption of a point cloud (prompt adherence).

    Input: (B, N, 3) clouds in any frame, any N >= 1 (trained on 128-1024 points; 512 is
    the reference count); :meth:`forward` normalises each into the unit sphere first (the
    training normalisation, ``normalize_points(..., "sphere")``). A shared per-point MLP
    lifts each point to ``feature_dim`` features, a max over points pools them (so the
    output does not depend on the points' order), and an MLP head gives the logits.
    """

    def __init__(self, classes: Sequence[str] = CAPTIONS, width: int = 64,
                 feature_dim: int = 256, points: int = 512) -> None:  # fmt: skip
        super().__init__()
        self.classes = tuple(classes)
        self.points = points
        self.point_mlp = nn.Sequential(
            nn.Linear(3, width), nn.LayerNorm(width), nn.GELU(),
            nn.Linear(width, 2 * width), nn.LayerNorm(2 * width), nn.GELU(),
            nn.Linear(2 * width, feature_dim),
        )  # fmt: skip
        self.head = nn.Sequential(
            nn.LayerNorm(feature_dim), nn.Linear(feature_dim, 128), nn.GELU(),
            nn.Linear(128, len(self.classes)),
        )  # fmt: skip

    def features(self, points: Tensor) -> Tensor:
        """(B, N, 3) -> (B, feature_dim) max-pooled point features."""
        return self.point_mlp(_sphere_normalized(points.float())).amax(dim=1)

    def forward(self, points: Tensor) -> Tensor:
        """(B, N, 3) -> (B, classes) logits."""
        return self.head(self.features(points))


def rendered_shapes(count: int, seed: int = 0, points: int = 512) -> tuple[Tensor, Tensor]:
    """``count`` rendered primitives, the classes in turn, as surface samples: (count,
    points, 3) float32 clouds normalised into the unit sphere and (count,) class indices
    into :data:`~polydiff.shape.synthetic.CAPTIONS`."""
    rng = np.random.default_rng(seed)
    labels = torch.arange(count) % len(CAPTIONS)
    clouds = [sample_surface(render(CAPTIONS[int(k)], rng), points, rng) for k in labels]
    stacked = torch.from_numpy(np.stack(clouds)).float()
    return _sphere_normalized(stacked), labels


def _augment(clean: Tensor, generator: torch.Generator) -> Tensor:
    """A generator's imprecision on (B, N, 3) unit-sphere clouds: a slight tilt, per-axis
    scale within 5 %, Gaussian jitter of 0-0.05 per shape and, on half of the shapes, up
    to 10 % of the points replaced by uniform outliers in [-1, 1]^3 (which also shrink the
    shape when it is normalised again)."""
    batch, count, _ = clean.shape
    tilt = torch.empty(batch, 2).uniform_(-0.08, 0.08, generator=generator)  # radians
    cos, sin = tilt.cos(), tilt.sin()
    one, zero = torch.ones(batch), torch.zeros(batch)
    about_x = torch.stack([one, zero, zero, zero, cos[:, 0], -sin[:, 0],
                           zero, sin[:, 0], cos[:, 0]], dim=1).view(batch, 3, 3)  # fmt: skip
    about_z = torch.stack([cos[:, 1], -sin[:, 1], zero, sin[:, 1], cos[:, 1], zero,
                           zero, zero, one], dim=1).view(batch, 3, 3)  # fmt: skip
    scale = torch.empty(batch, 1, 3).uniform_(0.95, 1.05, generator=generator)
    points = clean @ (about_x @ about_z).transpose(1, 2) * scale
    sigma = torch.empty(batch, 1, 1).uniform_(0.0, 0.05, generator=generator)
    points = points + sigma * torch.randn(points.shape, generator=generator)
    share = torch.empty(batch, 1).uniform_(0.0, 0.1, generator=generator)
    share = share * (torch.rand(batch, 1, generator=generator) < 0.5)
    outlier = torch.rand(batch, count, generator=generator) < share
    uniform = torch.empty(points.shape).uniform_(-1.0, 1.0, generator=generator)
    return torch.where(outlier[..., None], uniform, points)


def train_evaluator(out: str | os.PathLike[str], *, steps: int = 1500, count: int = 2200,
                    seed: int = 0, held_out: int = 440,
                    log: Any = print) -> ShapeEvaluator:  # fmt: skip
    """Train the evaluator on ``count`` freshly rendered primitives (2048 surface samples
    each, the classes in turn, rng ``seed``) and save it to ``out``.

    Each step takes 64 shapes, a random subset of 128-1024 of their points, and
    :func:`_augment`-ed noise; AdamW with a one-cycle learning rate. Logs the accuracy on
    ``held_out`` shapes rendered with seed ``seed + 1``, clean and with that noise.
    """
    torch.manual_seed(seed)
    pool, labels = rendered_shapes(count, seed=seed, points=2048)
    model = ShapeEvaluator()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(0, count, (64,), generator=generator)
        points = int(torch.randint(128, 1025, (1,), generator=generator))
        subset = torch.rand(64, pool.shape[1], generator=generator).argsort(dim=1)[:, :points]
        clean = pool[idx].gather(1, subset[..., None].expand(-1, -1, 3))
        loss = F.cross_entropy(model(_augment(clean, generator)), labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"step {step}: loss {loss.item():.3f}")
    model.eval()
    clean, held_labels = rendered_shapes(held_out, seed=seed + 1)
    noisy = _augment(clean, torch.Generator().manual_seed(seed + 1))
    log(
        f"held-out accuracy (seed {seed + 1}): clean "
        f"{evaluator_accuracy(model, clean, held_labels):.3f}, noisy "
        f"{evaluator_accuracy(model, noisy, held_labels):.3f}"
    )
    save_pretrained(model, out)
    return model


@torch.no_grad()
def evaluator_accuracy(model: ShapeEvaluator, points: Tensor, labels: Tensor) -> float:
    """Share of the (B, N, 3) clouds classified as their (B,) class indices."""
    return float((model(points).argmax(dim=1) == labels).float().mean())


_BUNDLED_EVALUATOR = Path(__file__).resolve().parent / "bundled" / "evaluator"


def load_evaluator(folder: str | os.PathLike[str] | None = None) -> ShapeEvaluator:
    """A trained :class:`ShapeEvaluator` (None: the bundled one), in eval mode."""
    model = from_pretrained(_BUNDLED_EVALUATOR if folder is None else folder)
    if not isinstance(model, ShapeEvaluator):
        raise ValueError(f"{folder} is not a ShapeEvaluator checkpoint")
    return model.eval()


@torch.no_grad()
def prompt_adherence(points: Tensor, prompts: Sequence[str],
                     evaluator: ShapeEvaluator | None = None) -> dict[str, float]:  # fmt: skip
    """Share of clouds the evaluator names with their prompt.

    Args:
        points: (B, N, 3) generated clouds, any frame (the evaluator normalises them); when
            N exceeds the evaluator's ``points`` (512) a fixed random subset of that many
            is used (the same for every call).
        prompts: B prompts, each one of the evaluator's classes (the synthetic captions).
        evaluator: default the bundled one (:func:`load_evaluator`).

    Returns:
        ``{"accuracy": share over all clouds, "<prompt>": share of that prompt's clouds, ...}``.

    Raises:
        ValueError: a prompt the evaluator does not know, B != len(prompts), or bad clouds.
    """
    model = evaluator or load_evaluator()
    points = _clouds(points, "points")
    if len(prompts) != points.shape[0]:
        raise ValueError(f"{points.shape[0]} clouds but {len(prompts)} prompts")
    unknown = sorted(set(prompts) - set(model.classes))
    if unknown:
        raise ValueError(f"prompt(s) {unknown} are not evaluator classes: {model.classes}")
    if points.shape[1] > model.points:
        keep = torch.randperm(points.shape[1], generator=torch.Generator().manual_seed(0))
        points = points[:, keep[: model.points].to(points.device)]
    predicted = model(points.to(next(model.parameters()).device)).argmax(dim=1).tolist()
    hits = [model.classes[p] == prompt for p, prompt in zip(predicted, prompts, strict=True)]
    report = {"accuracy": float(np.mean(hits))}
    for prompt in dict.fromkeys(prompts):
        report[prompt] = float(
            np.mean([h for h, q in zip(hits, prompts, strict=True) if q == prompt])
        )
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m polydiff.shape.metrics --train-evaluator DIR``: reproduce the bundled one."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m polydiff.shape.metrics")
    parser.add_argument("--train-evaluator", metavar="DIR", required=True)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    train_evaluator(args.train_evaluator, steps=args.steps, seed=args.seed)
    return 0


if __name__ == "__main__":
    # Run from the imported module, so the checkpoint records the class as
    # "polydiff.shape.metrics:ShapeEvaluator" rather than "__main__:ShapeEvaluator".
    from polydiff.shape.metrics import main as _main

    raise SystemExit(_main())
