"""Shared fixtures: a small sample dataset (generated once per session), hypothesis profiles."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# rich wraps at the terminal width; pin it so CLI output assertions never depend on the runner
os.environ.setdefault("COLUMNS", "200")
os.environ.setdefault("TERM", "dumb")

settings.register_profile("default", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "ci", max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("nightly", max_examples=1000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory) -> Path:
    """A small Cityscapes-layout sample dataset: 6 train + 2 val images of 64x128."""
    from cache_tools.datasets import write_sample_dataset

    root = tmp_path_factory.mktemp("sample")
    write_sample_dataset(root, num_train=6, num_val=2, size=(64, 128), seed=3)
    return root


@pytest.fixture(autouse=True)
def _torch_threads():
    """Keep tests deterministic and light on the 2-core CI machine."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(min(n, 2))
    yield
    torch.set_num_threads(n)
