"""Shared test set-up: GPU tests skip cleanly without CUDA; caches go to a per-session tmp dir."""
import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep the embedded corpus cache of a test session out of the user's ~/.cache."""
    if "MMM_CACHE_DIR" not in os.environ:
        os.environ["MMM_CACHE_DIR"] = str(tmp_path_factory.mktemp("mmm_cache"))
    yield
