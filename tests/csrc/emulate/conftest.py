"""Fixtures of the CUDA-emulation tests: the emulated kernels, built once per session (cached on disk)."""
from __future__ import annotations

import pytest

import cuda_emulation


@pytest.fixture(scope="session")
def emulated():
    """The emulated kernels' module (tests/cuda_emulation.py); skips when there is no C++ compiler."""
    if cuda_emulation.compiler() is None:
        pytest.skip(cuda_emulation.no_compiler_reason())
    return cuda_emulation.load()


@pytest.fixture
def schedule(request, emulated):
    """Parametrise with indirect=True: ("inorder" | "shuffled" | "threaded", seed)."""
    name, seed = request.param if isinstance(request.param, tuple) else (request.param, 0)
    emulated.configure(name, seed)
    yield name
    emulated.configure("inorder", 0)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """The references are many tiny CPU ops: on a busy 2-core machine, intra-op threads make them ~50x slower."""
    yield
