"""Shared test settings: deterministic, offline, fast, on few threads."""

import os

os.environ.setdefault("DGM_FAST", "1")

import matplotlib  # noqa: E402

matplotlib.use("Agg")  # in this process only: executed notebooks keep the inline backend and their figures

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every notebook test is also ``slow``: ``pytest -m "not slow"`` is the quick tier (maths, CLI, policies)."""
    for item in items:
        if item.get_closest_marker("notebook") is not None:
            item.add_marker(pytest.mark.slow)
