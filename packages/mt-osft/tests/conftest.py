import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """The test matrices are tiny: one thread avoids OpenMP start-up and spinning on a busy
    machine. Restored afterwards, so other packages' tests in the same session are unaffected."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
