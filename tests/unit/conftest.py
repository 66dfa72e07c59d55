import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Unit tests use tiny tensors: OpenMP hand-offs between threads cost more than the math, and a shared
    2-core CI box is noisy. Restores the thread count afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
