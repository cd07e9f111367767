"""Behaviour of polydiff.core.pretrained: folder checkpoints (model.safetensors + config.json)."""

from __future__ import annotations

import json
import os
import sys
import types

import pytest
import safetensors.torch
import torch
from torch import nn

from polydiff.core import pretrained
from polydiff.core.pretrained import (
    CheckpointError,
    Configurable,
    from_pretrained,
    save_pretrained,
)


class Net(Configurable, nn.Module):
    def __init__(self, dim: int = 8, extra: bool = False, tied: bool = True) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, dim)
        self.out = nn.Linear(dim, 5, bias=False)
        if tied:
            self.out.weight = self.emb.weight  # shared tensor, stored once on disk
        self.extra = nn.Linear(dim, dim) if extra else None
        self.register_buffer("scale", torch.full((dim,), 2.0))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids) * self.scale
        if self.extra is not None:
            h = self.extra(h)
        return self.out(h)


class WiderNet(Net):
    def __init__(self, width: int = 16, **kwargs) -> None:
        super().__init__(dim=width, **kwargs)


def snapshot(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def listing(folder) -> list[str]:
    return sorted(os.listdir(folder))


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = Net(dim=8).eval()
    return model, save_pretrained(model, tmp_path / "ckpt")


# --- Configurable -----------------------------------------------------------------


def test_configurable_records_constructor_kwargs_with_defaults():
    assert Net(dim=4).config == {"dim": 4, "extra": False, "tied": True}
    assert Net(4, True).config == {"dim": 4, "extra": True, "tied": True}


def test_configurable_records_the_most_derived_constructor_and_flattens_kwargs():
    assert WiderNet(width=6, tied=False).config == {"width": 6, "tied": False}


# --- round trip -------------------------------------------------------------------


def test_round_trip_rebuilds_the_model_and_reproduces_its_outputs(saved):
    model, folder = saved
    assert listing(folder) == ["config.json", "model.safetensors"]
    loaded = from_pretrained(folder, Net)
    assert isinstance(loaded, Net) and not loaded.training
    assert loaded.config == model.config
    ids = torch.tensor([[0, 1, 2, 3, 4]])
    assert torch.equal(loaded(ids), model(ids))
    assert loaded.out.weight is loaded.emb.weight  # ties come from the constructor


def test_config_json_records_class_config_and_version(saved):
    _, folder = saved
    record = json.loads((folder / "config.json").read_text())
    assert record["class"] == f"{Net.__module__}:Net"
    assert record["config"] == {"dim": 8, "extra": False, "tied": True}
    assert isinstance(record["polydiff_version"], str)


def test_any_module_can_be_saved_with_an_explicit_config(tmp_path):
    model = nn.Linear(3, 2)
    folder = save_pretrained(model, tmp_path / "lin", config={"in_features": 3, "out_features": 2})
    assert torch.equal(from_pretrained(folder, nn.Linear).weight, model.weight)


def test_config_that_does_not_fit_the_constructor(tmp_path):
    folder = save_pretrained(nn.Linear(3, 2), tmp_path / "lin", config={"in_features": 3})
    with pytest.raises(CheckpointError, match=r"does not fit Linear's constructor"):
        from_pretrained(folder, nn.Linear)


def test_wrapped_models_are_saved_as_their_bare_module(tmp_path):
    model = Net()
    folder = save_pretrained(nn.DataParallel(model), tmp_path / "ckpt")
    assert torch.equal(from_pretrained(folder, Net).emb.weight, model.emb.weight)


def test_class_is_imported_from_the_polydiff_namespace_when_cls_is_none(tmp_path, monkeypatch):
    fake = types.ModuleType("polydiff.core._fake_models")

    class Model(Net):
        pass

    Model.__module__ = fake.__name__
    Model.__qualname__ = "Model"
    fake.Model = Model
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    folder = save_pretrained(Model(dim=3), tmp_path / "ckpt")
    loaded = from_pretrained(folder)
    assert type(loaded) is Model and loaded.emb.weight.shape == (5, 3)


def test_saving_over_an_existing_checkpoint_replaces_it_and_keeps_other_files(saved):
    _, folder = saved
    (folder / "notes.txt").write_text("keep me")
    newer = Net(dim=8)
    save_pretrained(newer, folder)
    assert listing(folder) == ["config.json", "model.safetensors", "notes.txt"]
    assert torch.equal(from_pretrained(folder, Net).emb.weight, newer.emb.weight)


# --- errors: each names the problem and the path ----------------------------------


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="folder not found.*nope"):
        from_pretrained(tmp_path / "nope", Net)


def test_path_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a folder"):
        from_pretrained(tmp_path / "file", Net)


def test_missing_config(saved):
    _, folder = saved
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config missing.*config\.json"):
        from_pretrained(folder, Net)


@pytest.mark.parametrize("text", ["{not json", "\xff\xfe", ""])
def test_garbage_config_json(saved, text):
    _, folder = saved
    (folder / "config.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(CheckpointError, match=r"not valid JSON.*config\.json"):
        from_pretrained(folder, Net)


@pytest.mark.parametrize("record", [[1, 2], {"config": {}}, {"class": "x:Y", "config": []}])
def test_config_json_with_the_wrong_structure(saved, record):
    _, folder = saved
    (folder / "config.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match=r"config\.json"):
        from_pretrained(folder, Net)


def test_missing_weights(saved):
    _, folder = saved
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"weights missing.*model\.safetensors"):
        from_pretrained(folder, Net)


@pytest.mark.parametrize("keep", [0, 5, -16], ids=["empty", "header-cut", "data-cut"])
def test_truncated_weights(saved, keep):
    _, folder = saved
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    with pytest.raises(CheckpointError, match=r"corrupt.*model\.safetensors"):
        from_pretrained(folder, Net)


def test_garbage_weights(saved):
    _, folder = saved
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        from_pretrained(folder, Net)


def test_class_mismatch(saved):
    _, folder = saved
    with pytest.raises(CheckpointError, match="class mismatch.*WiderNet"):
        from_pretrained(folder, WiderNet)


def test_classes_outside_polydiff_are_never_imported_from_a_file(saved):
    _, folder = saved
    record = json.loads((folder / "config.json").read_text())
    for path in ("this:Zen", "polydiffx.evil:Model", Net.__module__ + ":Net"):
        record["class"] = path
        (folder / "config.json").write_text(json.dumps(record))
        was_imported = "this" in sys.modules
        with pytest.raises(CheckpointError, match="refusing to import"):
            from_pretrained(folder)
        assert was_imported or "this" not in sys.modules


def test_unimportable_polydiff_class(saved):
    _, folder = saved
    record = json.loads((folder / "config.json").read_text())
    record["class"] = "polydiff.core.pretrained:NoSuchModel"
    (folder / "config.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="cannot import"):
        from_pretrained(folder)


def edit_config(folder, **changes) -> None:
    record = json.loads((folder / "config.json").read_text())
    record["config"].update(changes)
    (folder / "config.json").write_text(json.dumps(record))


def test_misshaped_keys_are_listed_with_both_shapes(saved):
    _, folder = saved
    edit_config(folder, dim=4)
    with pytest.raises(CheckpointError, match=r"mis-shaped keys: emb\.weight: file \(5, 8\)"):
        from_pretrained(folder, Net)


def test_unexpected_keys_are_listed(tmp_path):
    folder = save_pretrained(Net(extra=True), tmp_path / "ckpt")
    edit_config(folder, extra=False)
    with pytest.raises(CheckpointError, match=r"unexpected keys: extra\.bias, extra\.weight"):
        from_pretrained(folder, Net)


def test_missing_keys_are_listed(tmp_path):
    folder = save_pretrained(Net(extra=False), tmp_path / "ckpt")
    edit_config(folder, extra=True)
    with pytest.raises(CheckpointError, match=r"missing keys: extra\.bias, extra\.weight"):
        from_pretrained(folder, Net)


def test_untied_model_needs_both_tensors(tmp_path):
    folder = save_pretrained(Net(tied=True), tmp_path / "ckpt")
    edit_config(folder, tied=False)
    with pytest.raises(CheckpointError, match="missing keys: out.weight"):
        from_pretrained(folder, Net)


def test_torn_checkpoint_from_an_interrupted_overwrite_is_detected(tmp_path):
    a = save_pretrained(Net(), tmp_path / "a")
    b = save_pretrained(Net(), tmp_path / "b")
    (a / "model.safetensors").write_bytes((b / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="torn"):
        from_pretrained(a, Net)


def test_model_without_config_cannot_be_saved(tmp_path):
    with pytest.raises(CheckpointError, match="no dict attribute `config`"):
        save_pretrained(nn.Linear(2, 2), tmp_path / "ckpt")
    assert listing(tmp_path) == []


def test_unserialisable_config_is_rejected_before_writing(tmp_path):
    with pytest.raises(CheckpointError, match="not JSON-serialisable"):
        save_pretrained(Net(), tmp_path / "ckpt", config={"dim": torch.tensor(3)})
    assert listing(tmp_path) == []


# --- atomic writes ----------------------------------------------------------------


def failing_writer(model, filename, metadata=None, **kwargs):
    with open(filename, "wb") as f:
        f.write(b"partial")  # what a crash mid-write would leave behind
    raise OSError("disk full")


def test_failed_write_of_a_new_checkpoint_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(safetensors.torch, "save_model", failing_writer)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(Net(), tmp_path / "ckpt")
    assert listing(tmp_path) == []  # neither the target nor a temp folder


def test_failed_overwrite_leaves_the_previous_checkpoint_intact(saved, monkeypatch):
    model, folder = saved
    before = snapshot(folder)
    monkeypatch.setattr(safetensors.torch, "save_model", failing_writer)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(Net(), folder)
    assert snapshot(folder) == before  # no temp files either
    monkeypatch.undo()
    assert torch.equal(from_pretrained(folder, Net).emb.weight, model.emb.weight)


def test_failure_between_the_two_renames_is_caught_at_load_time(saved, monkeypatch):
    _, folder = saved
    real_replace = os.replace
    calls = []

    def crash_on_second_replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("power cut")
        real_replace(src, dst)

    monkeypatch.setattr(pretrained.os, "replace", crash_on_second_replace)
    with pytest.raises(OSError, match="power cut"):
        save_pretrained(Net(), folder)
    monkeypatch.undo()
    assert listing(folder) == ["config.json", "model.safetensors"]
    with pytest.raises(CheckpointError, match="torn"):
        from_pretrained(folder, Net)


def test_a_recorded_class_must_be_defined_in_a_polydiff_module():
    # polydiff.image.model imports torch.nn as nn: following attributes reaches nn.Linear.
    from polydiff.core.pretrained import import_class

    with pytest.raises(CheckpointError, match="torch.nn.modules.linear.Linear"):
        import_class("polydiff.image.model:nn.Linear")
    assert import_class("polydiff.image.model:PixelUNet").__name__ == "PixelUNet"
