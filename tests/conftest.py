import os
import sys

import pytest
import torch

# Tests import the flat top-level files (`import dit`), wherever pytest is started from.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def randomised(model, seed=0, std=0.1):
    """Random weights everywhere (zero-init convs too), so every cached path carries signal."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model.eval()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is faster than two contending ones on a busy 2-core CPU.
    Restored after each test, since the pipeline sets its own thread count."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
