import os
import sys

# Two torch threads spin-waiting for each other waste CPU on a 2-core machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Triton kernels run through Triton's CPU interpreter where there is no GPU. The mode is
# read when Triton's JIT objects are created, so it must be set before anything (torch.compile
# included) imports triton.
if not os.path.exists("/dev/nvidia0") and not os.environ.get("CUDA_VISIBLE_DEVICES"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
# Under pytest-xdist (`make test` runs two workers, a test file each) one thread per worker.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-model tests (``pytestmark = usefixtures``)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _always_disable():
    """No test leaves RAS enabled on a pipeline (a failing test would leak it into the next)."""
    yield
    rp = sys.modules.get("rasfx.pipeline")
    for pipe in list(rp._STATES.keys()) if rp is not None else []:
        rp.disable(pipe)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# The tiny SD3 and its transforms shared by the tests of one module (test_module, test_active_index,
# test_caches, test_runtime): a capture costs 1-3 s per input signature, so they are built once per
# module and every test that reuses one starts with ``reset()``.


@pytest.fixture(scope="module")
def sd3():
    from reference_ras import make_sd3_tiny

    return make_sd3_tiny(0)


@pytest.fixture(scope="module")
def ras(sd3):
    """One transformed SD3 shared by the tests of a module (its captures are reused)."""
    import rasfx

    return rasfx.transform(sd3, rasfx.TransformConfig(max_captures=32))


@pytest.fixture(scope="module")
def ras_other():
    """A transformed SD3 with other weights (for the isolation tests)."""
    import rasfx
    from reference_ras import make_sd3_tiny

    return rasfx.transform(make_sd3_tiny(1))
