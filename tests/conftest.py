"""Test-session setup.

Without a GPU, the Triton kernels run under the interpreter: TRITON_INTERPRET must be set before triton
is imported (torch does not import it on `import torch`), so it is set here, first thing.
"""

import os
import sys

import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny tensors: when the cores are shared with other work, handing tiny tensors between
    intra-op threads costs far more than the work (seconds instead of milliseconds), so such a module runs
    single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
