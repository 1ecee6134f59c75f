import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # These tests run many small float64 convolutions; on a busy 2-core machine OpenMP threads
    # oversubscribe and run 50x slower, while one thread is fast and deterministic.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
