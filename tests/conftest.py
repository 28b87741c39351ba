"""Test-session setup.

Without a GPU, the Triton kernels run under the interpreter: TRITON_INTERPRET must be set before triton
is imported (torch does not import it on `import torch`), so it is set here, first thing.

torch.compile's on-disk cache (inductor) is keyed on the traced graph, not on a custom op's fake kernel: a
cache left by another build of augkd._C (whose ops return other shapes) would be replayed and fail. Each
test session therefore compiles into a cache directory of its own, removed at exit.
"""

import atexit
import os
import shutil
import sys
import tempfile

if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _inductor_cache = tempfile.mkdtemp(prefix="augkd-test-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _inductor_cache
    atexit.register(shutil.rmtree, _inductor_cache, True)

import torch  # noqa: E402

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
