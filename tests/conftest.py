"""Test setup: Triton kernels run in the CPU interpreter when there is no GPU,
nothing is downloaded, and every compiled CPU ISA variant can be exercised."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Must be set before triton-decorated kernels are imported.
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastad  # noqa: E402
from fastad import _ext  # noqa: E402

ISA_ORDER = ("generic", "avx2", "avx512")


def compiled_isas() -> list[str]:
    """ISA variants of the C++ kernels this build and CPU can run."""
    if _ext._C is None:
        return []
    top = ISA_ORDER.index(_ext._C.supported_isa())
    return list(ISA_ORDER[: top + 1])


@pytest.fixture(params=compiled_isas() or ["none"])
def cpu_isa(request):
    """Run a test once per compiled ISA variant of the C++ kernels."""
    if request.param == "none":
        pytest.skip(_ext.C_ERROR or "fastad._C missing")
    before = _ext._C.cpu_isa()
    _ext._C.set_cpu_isa(request.param)
    yield request.param
    _ext._C.set_cpu_isa(before)


def backend_available(name: str) -> bool:
    return fastad.backends()[name].available


requires_cpu_ext = pytest.mark.skipif(not backend_available("cpu"), reason=str(fastad.backends()["cpu"].reason))
requires_triton = pytest.mark.skipif(not backend_available("triton"), reason=str(fastad.backends()["triton"].reason))
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(scope="session")
def ray_local():
    """One embedded local Ray (2 CPUs) shared by the tests/test_ray_*.py modules."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        yield ray
        return
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=256 * 2**20)
    yield ray
    ray.shutdown()
