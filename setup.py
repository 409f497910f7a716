"""Build fastad._C (C++ CPU kernels, optional CUDA kernels) with CMake.

Environment flags:
  FASTAD_BUILD_CUDA=1|0   force the CUDA sources on / off (default: on when nvcc
                          is found and the torch in the build environment is a CUDA build)
  FASTAD_NATIVE=1         compile for the build machine only (-march=native) instead of
                          the portable build with runtime ISA dispatch
  FASTAD_BUILD_TYPE       CMake build type (default Release)
  FASTAD_BUILD_JOBS       parallel compile jobs (default: CPU count)
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _find_nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    for cand in (shutil.which("nvcc"), os.path.join(home, "bin", "nvcc")):
        if cand and os.path.exists(cand):
            return cand
    return None


def _want_cuda():
    """(build?, reason) for the CUDA sources."""
    flag = os.environ.get("FASTAD_BUILD_CUDA")
    nvcc = _find_nvcc()
    if flag == "0":
        return False, "FASTAD_BUILD_CUDA=0", nvcc
    if flag == "1":
        if nvcc is None:
            raise RuntimeError("FASTAD_BUILD_CUDA=1 but nvcc was not found (set CUDA_HOME)")
        return True, "FASTAD_BUILD_CUDA=1", nvcc
    if nvcc is None:
        return False, "nvcc not found", None
    try:
        import torch  # noqa: F401  (only visible when building without isolation)
    except Exception:
        return False, "torch is not importable in the build environment (build with --no-build-isolation or set FASTAD_BUILD_CUDA=1)", nvcc
    if torch.version.cuda is None:
        return False, "torch %s is a CPU build" % torch.__version__, nvcc
    return True, "nvcc and CUDA torch %s found" % torch.__version__, nvcc


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import pybind11

        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        cuda, why, nvcc = _want_cuda()
        print("fastad: CUDA kernels %s (%s)" % ("ON" if cuda else "skipped", why), flush=True)
        args = [
            "-S", str(ROOT), "-B", str(build_dir),
            "-DCMAKE_BUILD_TYPE=%s" % os.environ.get("FASTAD_BUILD_TYPE", "Release"),
            "-DPython_EXECUTABLE=%s" % sys.executable,
            "-Dpybind11_DIR=%s" % pybind11.get_cmake_dir(),
            "-DFASTAD_OUTPUT_DIR=%s" % out.parent,
            "-DFASTAD_OUTPUT_NAME=%s" % out.name,
            "-DFASTAD_CUDA=%s" % ("ON" if cuda else "OFF"),
            "-DFASTAD_NATIVE=%s" % ("ON" if os.environ.get("FASTAD_NATIVE") == "1" else "OFF"),
        ]
        if cuda:
            args.append("-DCMAKE_CUDA_COMPILER=%s" % nvcc)
        subprocess.check_call(["cmake", *args])
        jobs = os.environ.get("FASTAD_BUILD_JOBS", str(os.cpu_count() or 1))
        subprocess.check_call(["cmake", "--build", str(build_dir), "-j", jobs])


setup(ext_modules=[CMakeExtension("fastad._C")], cmdclass={"build_ext": CMakeBuild})
