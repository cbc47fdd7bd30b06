import os

import pytest
import torch

os.environ.setdefault("LABKIT_STATIC", "1")  # widgets draw once, no live sliders, in tests
if not torch.cuda.is_available():
    # Triton kernels run in the interpreter on CPU tensors; must be set before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def nano():
    """A small random LabGPT (seeded): fast, and exercises every code path."""
    from labkit.model import LabGPT, get_config

    torch.manual_seed(0)
    return LabGPT(get_config("nano")).eval()
