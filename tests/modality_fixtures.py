"""What every modality package's tests share: autouse fixtures (each modality's conftest
imports them: ``from tests.modality_fixtures import offline, one_thread``, so the core tests
keep their own thread settings) and helpers for tiny models and preset training runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

__all__ = ["jitter", "made_shards", "metric_rows", "offline", "one_thread", "preset"]

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    # Nothing may download: the bundled MiniLM loads from its package.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny tensors gain nothing from intra-op threads, and on a busy small machine their
    # synchronisation makes these tests ten times slower; restored after each module.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def jitter(model: torch.nn.Module) -> None:
    """Nonzero adaLN/final layers, so an untrained model's output depends on its inputs."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)


def made_shards(modality: str, source: str, out: Path, maxcount: int = 8) -> Path:
    """``out`` filled by ``polydiff data make-shards`` (the CLI, as a user runs it) from
    ``source`` (e.g. ``synthetic:sounds:32``), ``maxcount`` samples a shard."""
    from polydiff.cli.main import main

    command = ["data", "make-shards", "--modality", modality, "--source", source,
               "--out", str(out), "--maxcount", str(maxcount)]  # fmt: skip
    assert main(command) == 0
    return out


def preset(modality: str, name: str, folder: Path, shards: Path, **changes: Any) -> Path:
    """``shared/configs/<modality>/<name>`` written into ``folder`` with its data on ``shards``
    and the sections' keys in ``changes`` replaced (``train={"max_steps": 8}``)."""
    config = yaml.safe_load((REPO / "shared/configs" / modality / name).read_text())
    config["deepspeed"] = str(REPO / "shared/configs/deepspeed" / Path(config["deepspeed"]).name)
    config["data"]["shards"] = str(shards)
    for section, values in changes.items():
        config[section].update(values)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(config))
    return path


def metric_rows(run: Path) -> list[dict[str, Any]]:
    """The rows of a training run's ``metrics.jsonl``."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
