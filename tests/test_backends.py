"""The build, the ISA dispatch and the backend choice."""
import pytest
import torch

import fastad
from fastad import _ext
from fastad._backend import resolve_backend

from conftest import compiled_isas, requires_cpu_ext


def test_backends_report_every_backend_with_a_reason():
    status = fastad.backends()
    assert set(status) == {"reference", "cpu", "triton", "cuda"}
    assert status["reference"].available
    for s in status.values():
        assert isinstance(s.reason, str) and s.reason


@requires_cpu_ext
def test_extension_reports_isa_and_accepts_only_supported_levels():
    assert _ext._C.cpu_isa() in compiled_isas()
    with pytest.raises(ValueError, match="unknown ISA"):
        _ext._C.set_cpu_isa("sse9")
    if _ext._C.supported_isa() != "avx512":
        with pytest.raises(ValueError, match="above"):
            _ext._C.set_cpu_isa("avx512")


def test_default_backend_per_device():
    cpu = torch.device("cpu")
    want = "cpu" if fastad.backends()["cpu"].available else "reference"
    assert resolve_backend("x", None, cpu, ("reference", "cpu", "triton")) == want
    assert resolve_backend("x", None, cpu, ("reference",)) == "reference"
    assert resolve_backend("x", "reference", cpu, ("reference", "cpu")) == "reference"


def test_explicit_backend_errors_are_clear():
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        resolve_backend("nn_distance", "gpu", cpu, ("reference",))
    with pytest.raises(fastad.BackendUnavailableError, match="has no 'cpu' backend"):
        resolve_backend("nn_distance", "cpu", cpu, ("reference",))
    if not torch.cuda.is_available():
        with pytest.raises(fastad.BackendUnavailableError, match="cuda"):
            resolve_backend("nn_distance", "cuda", cpu, ("reference", "cuda"))


def test_kernels_package_is_inside_fastad():
    import importlib.util

    assert importlib.util.find_spec("fastad.kernels") is not None
