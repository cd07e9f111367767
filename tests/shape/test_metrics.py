"""Shape metrics of polydiff.shape.metrics: Chamfer and earth mover's distances against brute
force, MMD / COV / 1-NNA against loops, the evaluation normalisation, and the bundled
evaluator on held-out rendered primitives."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree

from polydiff.shape import metrics
from polydiff.shape.data import normalize_points, sample_surface
from polydiff.shape.metrics import (
    AUCTION_TOLERANCE,
    ShapeEvaluator,
    chamfer_distance,
    coverage,
    earth_movers_distance,
    load_evaluator,
    mmd,
    normalize_for_evaluation,
    one_nna,
    pairwise_distances,
    prompt_adherence,
    rendered_shapes,
    shape_metrics,
    train_evaluator,
)
from polydiff.shape.synthetic import CAPTIONS, render

HELD_OUT_SEED = 1234  # the evaluator trains on seed 0 and reports on seed 1


def _clouds(count: int, points: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, points, 3, generator=torch.Generator().manual_seed(seed))


def _shapes(captions: list[str], points: int, seed: int = HELD_OUT_SEED) -> torch.Tensor:
    """Surface samples of rendered primitives, unnormalised, (len(captions), points, 3)."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(
        np.stack([sample_surface(render(c, rng), points, rng) for c in captions])
    ).float()


# --- brute force -----------------------------------------------------------------------------


def _brute_chamfer(a: torch.Tensor, b: torch.Tensor) -> float:
    """Python loops over all points, float64."""
    a, b = a.double().numpy(), b.double().numpy()
    to_b = [min(float(((p - q) ** 2).sum()) for q in b) for p in a]
    to_a = [min(float(((p - q) ** 2).sum()) for p in a) for q in b]
    return sum(to_b) / len(to_b) + sum(to_a) / len(to_a)


def _brute_emd(a: torch.Tensor, b: torch.Tensor) -> float:
    """The best of all matchings (itertools.permutations), float64."""
    a, b = a.double().numpy(), b.double().numpy()
    return min(
        sum(math.dist(a[i], b[j]) for i, j in enumerate(order)) / len(a)
        for order in itertools.permutations(range(len(b)))
    )


# --- normalisation ---------------------------------------------------------------------------


def test_evaluation_normalisation_fits_each_cloud_into_the_unit_box_keeping_proportions():
    clouds = _clouds(3, 50) * torch.tensor([4.0, 1.0, 2.0]) + torch.tensor([10.0, -3.0, 0.5])
    out = normalize_for_evaluation(clouds)
    low, high = out.amin(dim=1), out.amax(dim=1)
    torch.testing.assert_close((low + high) / 2, torch.zeros(3, 3), atol=1e-6, rtol=0)
    torch.testing.assert_close((high - low).amax(dim=1), torch.full((3,), 2.0))
    # Proportions are kept: one scale for all three axes.
    ratio = (high - low) / (clouds.amax(dim=1) - clouds.amin(dim=1))
    torch.testing.assert_close(ratio, ratio[:, :1].expand(-1, 3))


def test_evaluation_normalisation_is_the_data_packages_box_mode():
    clouds = _shapes(["a chair", "a mug"], 300)
    out = normalize_for_evaluation(clouds)
    for cloud, normalised in zip(clouds, out, strict=True):
        expected = normalize_points(cloud.numpy(), "box")
        np.testing.assert_allclose(normalised.numpy(), expected, atol=1e-6)


def test_evaluation_normalisation_only_centres_a_cloud_collapsed_to_a_point():
    out = normalize_for_evaluation(torch.full((1, 5, 3), 7.0))
    assert torch.equal(out, torch.zeros(1, 5, 3))


def test_evaluation_normalisation_refuses_non_finite_points():
    clouds = _clouds(1, 4)
    clouds[0, 2, 1] = math.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        normalize_for_evaluation(clouds)


# --- Chamfer distance ------------------------------------------------------------------------


def test_chamfer_distance_matches_a_brute_force_loop_over_all_points():
    a, b = _clouds(3, 7, seed=1), _clouds(3, 5, seed=2)
    got = chamfer_distance(a, b)
    want = [_brute_chamfer(x, y) for x, y in zip(a, b, strict=True)]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)


def test_chamfer_distance_is_symmetric_and_zero_for_identical_clouds():
    a, b = _clouds(4, 40, seed=3), _clouds(4, 30, seed=4)
    torch.testing.assert_close(chamfer_distance(a, b), chamfer_distance(b, a))
    assert torch.equal(chamfer_distance(a, a[:, torch.randperm(40)]), torch.zeros(4))


def test_chamfer_distance_of_large_clouds_is_computed_in_chunks_and_stays_exact():
    # 3000 x 3000 distances span several chunks (2^18 entries on a CPU): the running
    # minimum over chunks must agree with a KD-tree's exact nearest neighbours.
    a, b = _clouds(1, 3000, seed=5), _clouds(1, 3000, seed=6)
    x, y = a[0].double().numpy(), b[0].double().numpy()
    to_b, _ = cKDTree(y).query(x)
    to_a, _ = cKDTree(x).query(y)
    want = (to_b**2).mean() + (to_a**2).mean()
    assert chamfer_distance(a, b).item() == pytest.approx(want, rel=1e-4)


def test_chamfer_distance_has_the_gradient_of_the_full_distance_matrix_formula():
    a = _clouds(2, 9, seed=7).double().requires_grad_()
    b = _clouds(2, 6, seed=8).double().requires_grad_()
    chamfer_distance(a, b).sum().backward()
    got_a, got_b = a.grad.clone(), b.grad.clone()
    a.grad, b.grad = None, None
    full = (a[:, :, None] - b[:, None]).square().sum(-1)
    (full.amin(dim=2).mean(dim=1) + full.amin(dim=1).mean(dim=1)).sum().backward()
    torch.testing.assert_close(got_a, a.grad)
    torch.testing.assert_close(got_b, b.grad)


def test_chamfer_distance_refuses_clouds_that_are_not_batches_of_3d_points():
    with pytest.raises(ValueError, match=r"\(B, N, 3\)"):
        chamfer_distance(torch.zeros(5, 3), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="same"):
        chamfer_distance(torch.zeros(2, 5, 3), torch.zeros(3, 5, 3))


# --- earth mover's distance ------------------------------------------------------------------


def test_emd_matches_the_best_of_all_permutations_on_tiny_sets():
    a, b = _clouds(3, 6, seed=9), _clouds(3, 6, seed=10)
    got = earth_movers_distance(a, b)
    want = [_brute_emd(x, y) for x, y in zip(a, b, strict=True)]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)


@pytest.mark.parametrize("exact_max", [1024, 0], ids=["exact", "auction"])
def test_emd_of_a_cloud_and_its_permutation_is_zero(exact_max):
    a = _clouds(2, 64, seed=11)
    distance = earth_movers_distance(a, a[:, torch.randperm(64)], exact_max)
    assert torch.equal(distance, torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize("exact_max", [1024, 0], ids=["exact", "auction"])
def test_emd_is_symmetric(exact_max):
    a, b = _clouds(3, 50, seed=12), _clouds(3, 50, seed=13)
    torch.testing.assert_close(
        earth_movers_distance(a, b, exact_max), earth_movers_distance(b, a, exact_max),
        rtol=2 * AUCTION_TOLERANCE, atol=0,
    )  # fmt: skip


def test_the_auction_is_within_its_certified_tolerance_above_the_exact_emd():
    # Rendered primitives of every kind, normalised as for evaluation, 256 points: the same
    # kind (close shapes, the hard case) and, from the seventh on, the next kind.
    kinds = list(CAPTIONS)
    a = normalize_for_evaluation(_shapes(kinds, 256, seed=21))
    b = normalize_for_evaluation(_shapes(kinds[:6] + kinds[7:] + kinds[6:7], 256, seed=22))
    exact = earth_movers_distance(a, b, exact_max=256)
    approx = earth_movers_distance(a, b, exact_max=255)
    largest = torch.cdist(a.double(), b.double()).flatten(1).amax(dim=1)
    assert bool((approx >= exact - 1e-6).all())  # a real matching: never below the optimum
    assert bool((approx <= exact + AUCTION_TOLERANCE * largest + 1e-6).all())
    assert float(((approx - exact) / exact).max()) < 1e-4


def test_emd_refuses_clouds_of_unequal_size():
    with pytest.raises(ValueError, match="equal size"):
        earth_movers_distance(torch.zeros(1, 5, 3), torch.zeros(1, 6, 3))
    with pytest.raises(ValueError, match="equal size"):
        pairwise_distances(_clouds(2, 5), _clouds(2, 6), metric="emd")


# --- distance matrices -----------------------------------------------------------------------


PAIRWISE = [("cd", "kdtree"), ("cd", "torch"), ("emd", "auto")]


@pytest.mark.parametrize(("metric", "backend"), PAIRWISE)
def test_pairwise_distances_agree_with_one_call_per_pair(metric, backend):
    samples, refs = _clouds(3, 20, seed=14), _clouds(4, 24 if metric == "cd" else 20, seed=15)
    distance = chamfer_distance if metric == "cd" else earth_movers_distance
    want = torch.tensor([[float(distance(s[None], r[None])) for r in refs] for s in samples])
    got = pairwise_distances(samples, refs, metric=metric, batch_size=5, backend=backend)
    torch.testing.assert_close(got, want.double(), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize(("metric", "backend"), PAIRWISE)
def test_pairwise_distances_within_one_set_fill_both_triangles_from_one(metric, backend):
    clouds = _clouds(5, 16, seed=16)
    within = pairwise_distances(clouds, clouds, metric=metric, backend=backend)
    across = pairwise_distances(clouds, clouds.clone(), metric=metric, backend=backend)
    torch.testing.assert_close(within, within.T)
    assert torch.equal(within.diagonal(), torch.zeros(5, dtype=torch.float64))
    torch.testing.assert_close(within, across, rtol=1e-6, atol=1e-9)


def test_pairwise_distances_refuse_an_unknown_metric_or_backend():
    with pytest.raises(ValueError, match="unknown distance 'l2'"):
        pairwise_distances(_clouds(2, 4), _clouds(2, 4), metric="l2")
    with pytest.raises(ValueError, match="unknown backend 'faiss'"):
        pairwise_distances(_clouds(2, 4), _clouds(2, 4), backend="faiss")


# --- MMD, COV, 1-NNA -------------------------------------------------------------------------


def _random_setup(seed: int, count_s: int = 7, count_r: int = 9):
    rng = np.random.default_rng(seed)
    d_ss, d_rr = rng.random((count_s, count_s)), rng.random((count_r, count_r))
    d_ss, d_rr = d_ss + d_ss.T, d_rr + d_rr.T  # symmetric, like real distances
    return d_ss, d_rr, rng.random((count_s, count_r))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mmd_coverage_and_one_nna_match_loops_over_the_distance_matrices(seed):
    d_ss, d_rr, d_sr = _random_setup(seed)
    count_s, count_r = d_sr.shape
    want_mmd = sum(min(d_sr[i, j] for i in range(count_s)) for j in range(count_r)) / count_r
    nearest_refs = {min(range(count_r), key=lambda j: d_sr[i, j]) for i in range(count_s)}
    correct = 0
    for i in range(count_s):  # a sample is right when its nearest other cloud is a sample
        others = [(d_ss[i, k], "s") for k in range(count_s) if k != i]
        others += [(d_sr[i, j], "r") for j in range(count_r)]
        correct += min(others)[1] == "s"
    for j in range(count_r):
        others = [(d_rr[j, k], "r") for k in range(count_r) if k != j]
        others += [(d_sr[i, j], "s") for i in range(count_s)]
        correct += min(others)[1] == "r"
    as_tensor = [torch.from_numpy(d) for d in (d_ss, d_rr, d_sr)]
    assert mmd(as_tensor[2]) == pytest.approx(want_mmd)
    assert coverage(as_tensor[2]) == pytest.approx(len(nearest_refs) / count_r)
    assert one_nna(*as_tensor) == pytest.approx(correct / (count_s + count_r))


def test_samples_equal_to_the_references_cover_them_all_at_zero_distance():
    refs = _shapes(list(CAPTIONS[:6]), 128)
    report = shape_metrics(refs.clone(), refs)
    assert set(report) == {"MMD-CD", "COV-CD", "1-NNA-CD", "MMD-EMD", "COV-EMD", "1-NNA-EMD"}
    assert report["COV-CD"] == report["COV-EMD"] == 1.0
    assert report["MMD-CD"] == report["MMD-EMD"] == 0.0


def test_samples_far_from_the_references_are_told_apart_every_time():
    # After normalisation "far" means another kind: flat boxes against spheres.
    samples = _shapes(["a flat box"] * 5, 128, seed=1)
    refs = _shapes(["a sphere"] * 6, 128, seed=2)
    report = shape_metrics(samples, refs, metrics=("cd",))
    assert report["1-NNA-CD"] == 1.0
    assert set(report) == {"MMD-CD", "COV-CD", "1-NNA-CD"}


def test_shape_metrics_normalise_the_clouds_first():
    samples, refs = _shapes(["a cone"] * 3, 64, seed=3), _shapes(["a cone"] * 4, 64, seed=4)
    moved = shape_metrics(samples * 5.0 + 2.0, refs * 0.1 - 1.0, metrics=("cd",))
    assert moved == pytest.approx(shape_metrics(samples, refs, metrics=("cd",)), rel=1e-5)


def test_set_metrics_refuse_matrices_that_do_not_fit_together():
    d_ss, d_rr, d_sr = (torch.from_numpy(d) for d in _random_setup(0))
    with pytest.raises(ValueError, match="do not agree"):
        one_nna(d_rr, d_ss, d_sr)
    with pytest.raises(ValueError, match="unknown distance"):
        shape_metrics(_clouds(2, 4), _clouds(2, 4), metrics=("cd", "hausdorff"))


# --- the evaluator ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def evaluator() -> ShapeEvaluator:
    return load_evaluator()


def test_the_bundled_evaluator_names_held_out_rendered_primitives(evaluator):
    points, labels = rendered_shapes(44, seed=HELD_OUT_SEED)
    predicted = evaluator(points).argmax(dim=1)
    assert float((predicted == labels).float().mean()) >= 0.9


def test_prompt_adherence_reports_overall_and_per_prompt_shares(evaluator):
    captions = ["a torus", "a table", "a cone"] * 2
    clouds = _shapes(captions, 2048) * 3.0 + 1.0  # any frame, more points than 512
    report = prompt_adherence(clouds, captions, evaluator)
    assert set(report) == {"accuracy", "a torus", "a table", "a cone"}
    assert report["accuracy"] == 1.0
    wrong = prompt_adherence(clouds, ["a sphere"] * 6, evaluator)
    assert wrong["accuracy"] == 0.0


def test_prompt_adherence_refuses_prompts_outside_the_evaluators_vocabulary(evaluator):
    with pytest.raises(ValueError, match="not evaluator classes"):
        prompt_adherence(_clouds(2, 64), ["a sphere", "a teapot"], evaluator)
    with pytest.raises(ValueError, match="2 clouds but 1 prompts"):
        prompt_adherence(_clouds(2, 64), ["a sphere"], evaluator)


def test_the_evaluator_ignores_point_order_position_and_scale(evaluator):
    points = _shapes(["a chair", "a mug"], 512)
    logits = evaluator(points)
    shuffled = evaluator(points[:, torch.randperm(512)] * 2.5 - 4.0)
    torch.testing.assert_close(shuffled, logits, rtol=1e-4, atol=1e-4)


def test_the_bundled_evaluator_is_small():
    folder = Path(metrics.__file__).parent / "bundled" / "evaluator"
    assert sum(f.stat().st_size for f in folder.iterdir()) < 1_000_000


def test_train_evaluator_writes_a_checkpoint_that_load_evaluator_reads(tmp_path):
    trained = train_evaluator(
        tmp_path / "evaluator", steps=2, count=22, held_out=11, log=lambda _: None
    )
    loaded = load_evaluator(tmp_path / "evaluator")
    assert loaded.classes == CAPTIONS
    points, _ = rendered_shapes(11, seed=5, points=64)
    torch.testing.assert_close(loaded(points), trained(points))


def test_the_bundled_evaluator_still_names_shapes_through_generation_noise(evaluator):
    points, labels = rendered_shapes(44, seed=HELD_OUT_SEED + 1)
    generator = torch.Generator().manual_seed(0)
    noisy = points + 0.03 * torch.randn(points.shape, generator=generator)
    strays = torch.rand(points.shape[:2], generator=generator) < 0.03
    noisy = torch.where(
        strays[..., None], torch.rand(points.shape, generator=generator) * 2 - 1, noisy
    )
    assert float((evaluator(noisy).argmax(dim=1) == labels).float().mean()) >= 0.9
