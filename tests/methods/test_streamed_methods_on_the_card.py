"""The merge-method suite (``test_streamed_methods.py``) again with every pass computed by ``CudaBackend`` on
a real CUDA card: the same fp64 references and byte checks, now holding for the GPU's kernels.
Run by bench/gpu_check.sh (ASTOLFO_TEST_CUDA=real); skipped elsewhere, CI having no GPU (the
suite's own CUDA legs run over the CPU test double there)."""

from __future__ import annotations

import pytest
from cuda_double import ON_THE_CARD, backend_factory

from engine.merge import run as merge_run

from .test_streamed_methods import *  # noqa: F403 (the suite's tests and fixtures, collected again here)

pytestmark = pytest.mark.skipif(not ON_THE_CARD, reason="needs a CUDA card and ASTOLFO_TEST_CUDA=real")


@pytest.fixture(autouse=True)
def _every_pass_on_the_card(monkeypatch):
    monkeypatch.setattr(merge_run, "open_backend", backend_factory())
