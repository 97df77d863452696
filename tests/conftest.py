"""Shared fixtures: deterministic seeds, restored default dtype, clean skipping of GPU tests, and a cache
directory of the session's own (the digits feature network is trained into it, not into ~/.cache)."""

import os
import tempfile

import pytest
import torch

from lina_pl.metrics.features import CACHE_ENV

os.environ.setdefault(CACHE_ENV, tempfile.mkdtemp(prefix="lina_cache_"))  # inherited by `lina` runs


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (run on a GPU machine: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed_and_dtype():
    torch.manual_seed(0)
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private cache directory (digits network, reference statistics) for one test module, also seen by the
    `lina` runs it starts."""
    path = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(path))
        yield path
