"""Shared test settings: deterministic, offline, fast, on few threads."""

import os

os.environ.setdefault("DGM_FAST", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
