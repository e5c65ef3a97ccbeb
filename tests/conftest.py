import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def pytest_configure(config):
    """Under pytest-xdist (README's command runs two workers) every worker and every process a test starts
    computes on one thread: two workers × two OpenMP threads on two cores spin against each other, and a
    run of the tiny model then took about 10× longer. Tiny tensors gain little from a second thread anyway."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[name] = "1"
        torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fp32_cpu_defaults():
    """Every test starts from fp32 defaults; tests that need determinism seed themselves."""
    torch.set_default_dtype(torch.float32)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors on a shared 2-core machine: one torch thread is fastest and immune to contention.
    A module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
