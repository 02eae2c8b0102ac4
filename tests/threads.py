"""A fixture for test folders of tiny tensors, where intra-op threads only add contention on a small CPU box."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Run the test with one intra-op thread, restoring the previous count after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
