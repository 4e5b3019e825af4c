import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from helpers import SHARED_DATA, make_mnist  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _fused_routing_kernel():
    """Build the fused routing kernel (about 30 s on a new machine) before any test spawns or times a run,
    so no subprocess test pays for it inside its own time limit."""
    from capsnet.routing import fused_cpu

    fused_cpu.available()


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def tiny_data(tmp_path):
    """A data root holding small synthetic MNIST-format files."""
    return make_mnist(tmp_path / "data")


@pytest.fixture
def real_data():
    if not (SHARED_DATA / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        pytest.skip(f"real MNIST not found under {SHARED_DATA} (set CAPSNET_SHARED_DATA)")
    return SHARED_DATA
