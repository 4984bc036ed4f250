"""The whole merge suite (``test_merge.py``: fp64 references, dtypes, NaN policy, restarts,
cancel, resume, metadata) again, with every pass computed by ``CudaBackend`` over the CPU test
double of the CUDA runtime (``cuda_double.CudaRuntimeDouble``, random schedule, one seed per
backend) instead of the CPU backend. What differs between the two runs is the backend only:
the same expectations hold for both. With ASTOLFO_TEST_CUDA=real on a machine with a GPU
(bench/gpu_check.sh) the passes run on the card itself."""

from __future__ import annotations

import pytest
from cuda_double import backend_factory

from engine.merge import run as merge_run

from .test_merge import *  # noqa: F403 (the tests and fixtures of the merge suite, collected again here)
from .test_merge import _merge, _recipe

_cuda_over_double = backend_factory()


@pytest.fixture(autouse=True)
def cuda_backends(monkeypatch) -> list:
    """Every pass of every merge here is computed by CudaBackend over the double."""
    made: list = []

    def factory(*args):
        made.append(_cuda_over_double(*args))
        return made[-1]

    monkeypatch.setattr(merge_run, "open_backend", factory)
    return made


def test_this_module_merges_on_the_cuda_backend(models, tmp_path, cuda_backends):
    _merge(_recipe(models, tmp_path))
    assert cuda_backends and all(b.name == "cuda" and b._count > 0 for b in cuda_backends)
