import os

import pytest
import torch

if not torch.cuda.is_available():
    # GPU kernels run on the CPU through Triton's interpreter; set before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
