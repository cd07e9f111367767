"""Autouse fixtures every modality package's tests share; each modality's conftest imports
them (``from tests.modality_fixtures import offline, one_thread``), so the core tests keep
their own thread settings."""

from __future__ import annotations

import pytest
import torch

__all__ = ["offline", "one_thread"]


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
