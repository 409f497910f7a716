// Argument checking for the bindings. Python validates first (fastad/_ext.py);
// these checks make a wrong direct call of fastad._C raise ValueError, never crash.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

namespace fastad {
namespace py = pybind11;

// Element types the kernels accept. 2-byte floats travel as int16 numpy views
// (numpy has no bfloat16) with this code saying how to read them.
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

const char* dtype_name(int dtype);
std::string shape_str(const py::array& a);

// Raises ValueError("fastad._C.<fn>: <msg>").
[[noreturn]] void fail(const char* fn, const std::string& msg);

struct FloatArg {
  const void* data = nullptr;
  std::vector<int64_t> shape;
  int dtype = kFloat32;
  int64_t dim(int i) const { return shape[static_cast<size_t>(i)]; }
  int ndim() const { return static_cast<int>(shape.size()); }
  int64_t numel() const;
};

// A C-contiguous array of float32 (dtype == kFloat32), float16 or int16 bits
// (kFloat16) or int16 bits (kBFloat16), with ndim in [min_ndim, max_ndim].
FloatArg float_arg(const char* fn, const char* name, const py::array& a, int dtype, int min_ndim,
                   int max_ndim);

// The same for a writable float32 output of exactly `shape`.
float* float_out(const char* fn, const char* name, py::array& a, const std::vector<int64_t>& shape);

// C-contiguous integer arrays (int64 or int32, read-only or writable).
const int64_t* int64_arg(const char* fn, const char* name, const py::array& a,
                         const std::vector<int64_t>& shape);
int64_t* int64_out(const char* fn, const char* name, py::array& a, const std::vector<int64_t>& shape);
const int32_t* int32_arg(const char* fn, const char* name, const py::array& a,
                         const std::vector<int64_t>& shape);

// Threads for an OpenMP region: n >= 1, else the OpenMP default.
int resolve_threads(int n);

}  // namespace fastad
