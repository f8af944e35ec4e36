import os

import pytest
import torch

# Two test workers share two cores: one intra-op thread each keeps them from fighting.
torch.set_num_threads(int(os.environ.get("LMLAB_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
