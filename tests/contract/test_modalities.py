"""Every installed modality keeps the contract: validate, build, decode a synthetic sample, one
loss step per part, one preview, one generation written as files with their provenance.

It runs over the entry points in ``polydiff.modalities``, so a new modality is checked the
moment it is registered; each brings its own small ``example_config``.
"""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from polydiff.core.modality import (
    GenerationRequest,
    Modality,
    available_modalities,
    generate_files,
    load_modality,
)
from polydiff.core.train.trainer import write_final
from tests.modality_fixtures import offline, one_thread  # noqa: F401 (autouse)

MODALITIES = available_modalities()


def test_image_and_video_are_registered():
    assert {"image", "video"} <= set(MODALITIES)


@pytest.fixture(scope="module", params=MODALITIES)
def modality(request) -> type[Modality]:
    cls = load_modality(request.param)
    assert issubclass(cls, Modality) and cls.name == request.param
    return cls


@pytest.fixture(scope="module")
def bound(modality):
    assert modality.example_config, f"{modality.name} declares no example_config"
    return modality.from_config(modality.example_config)


@pytest.fixture(scope="module")
def model(bound):
    torch.manual_seed(0)
    return bound.build_model()


def test_validation_is_idempotent_and_json_serialisable(modality, bound):
    assert modality.validate(bound.config) == bound.config
    assert json.loads(json.dumps(bound.config)) == bound.config


def test_unknown_model_keys_are_refused_naming_them(modality):
    from polydiff.core.modality import ConfigError

    with pytest.raises(ConfigError, match="no_such_key"):
        modality.validate({**modality.example_config, "no_such_key": 1})


def test_a_synthetic_batch_decodes_and_every_part_trains_one_step(modality, bound, model):
    assert modality.synthetic_sets, f"{modality.name} has no synthetic set"
    name = next(iter(modality.synthetic_sets))
    raw = list(itertools.islice(modality.synthetic(name, 4), 2))
    assert len(raw) == 2
    keys = {bound.bucket(sample) for sample in raw}  # hashable, from raw metadata alone
    batch = bound.collate([bound.decode(s) for s in raw if bound.bucket(s) == next(iter(keys))])
    parts = bound.parts(model)
    assert bound.ema_part in parts
    for part, module in parts.items():
        model.zero_grad(set_to_none=True)
        out = bound.loss(model, batch, torch.Generator().manual_seed(0), part)
        loss = out[0] if isinstance(out, tuple) else out
        assert loss.ndim == 0 and torch.isfinite(loss)
        loss.backward()
        assert any(p.grad is not None for p in module.parameters() if p.requires_grad)


def test_a_preview_writes_files(bound, model, tmp_path):
    model.eval()
    with torch.no_grad():
        files = bound.preview(model, tmp_path, step=1)
    model.train()
    assert files and all(f.is_file() and f.stat().st_size > 0 for f in files)


def test_generation_writes_every_output_with_its_provenance(modality, bound, model, tmp_path):
    folder = tmp_path / "final"
    write_final(model, folder, modality.name, bound.config)
    suffix = modality.output_suffixes[0]
    request = GenerationRequest(
        prompts=("one", "two"), num=2, steps=2, seed=3, checkpoint=str(folder)
    )
    paths = generate_files(modality, request, tmp_path / f"out{suffix}")
    assert [p.name for p in paths] == [f"out_{i}{suffix}" for i in range(4)]
    for i, path in enumerate(paths):
        assert path.is_file() and path.stat().st_size > 0
        record = json.loads(path.with_name(path.name + ".json").read_text())
        assert record["prompt"] == ["one", "two"][i // 2] and record["seed"] == 3
        assert record["steps"] == 2 and record["modality"] == modality.name


def test_a_bad_output_suffix_is_refused_before_anything_is_loaded(modality, tmp_path):
    request = GenerationRequest(prompts=("x",))
    with pytest.raises(ValueError, match="suffix"):
        generate_files(modality, request, tmp_path / "out.xyz")
    assert not list(tmp_path.iterdir())


def test_a_grid_tuned_to_the_checkpoint_is_what_generation_then_uses(modality, bound, model,
                                                                     tmp_path):  # fmt: skip
    from polydiff.core.modality import generate, tune_steps

    folder = tmp_path / "final"
    write_final(model, folder, modality.name, bound.config)
    request = GenerationRequest(prompts=("one", "two"), seed=1, checkpoint=str(folder))
    grid = tune_steps(request, "ddim", 2, teacher_steps=10, sweeps=1, evals=3)
    assert (folder / "grids.json").is_file() and grid.steps == 2
    assert grid.error <= grid.default_error and grid.context["modality"] == modality.name
    tuned = generate(modality, GenerationRequest(prompts=("one",), sampler="ddim", steps=2,
                                                 checkpoint=str(folder)))  # fmt: skip
    record = tuned.metadata[0]
    assert record["grid"] == "tuned" and record["timesteps"] == pytest.approx(grid.timesteps)
    assert record["tuned_grid"]["default_error"] == grid.default_error
    other = generate(modality, GenerationRequest(prompts=("one",), sampler="ddim", steps=3,
                                                 checkpoint=str(folder)))  # fmt: skip
    assert other.metadata[0]["grid"] == "default" and len(other.metadata[0]["timesteps"]) == 3
