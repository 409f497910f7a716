#include "common.h"

#include <omp.h>

#include <sstream>

namespace fastad {

const char* dtype_name(int dtype) {
  switch (dtype) {
    case kFloat32: return "float32";
    case kFloat16: return "float16";
    case kBFloat16: return "bfloat16";
    default: return "unknown";
  }
}

std::string shape_str(const py::array& a) {
  std::ostringstream s;
  s << "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s << (i ? ", " : "") << a.shape(i);
  s << ")";
  return s.str();
}

static std::string shape_str(const std::vector<int64_t>& shape) {
  std::ostringstream s;
  s << "(";
  for (size_t i = 0; i < shape.size(); ++i) s << (i ? ", " : "") << shape[i];
  s << ")";
  return s.str();
}

void fail(const char* fn, const std::string& msg) {
  throw py::value_error(std::string("fastad._C.") + fn + ": " + msg);
}

int64_t FloatArg::numel() const {
  int64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}

static std::string describe(const py::array& a) {
  return "dtype " + std::string(py::str(a.dtype())) + " shape " + shape_str(a);
}

static void check_contiguous(const char* fn, const char* name, const py::array& a) {
  if (!(a.flags() & py::array::c_style))
    fail(fn, std::string("argument '") + name + "' must be C-contiguous, got " + describe(a));
}

FloatArg float_arg(const char* fn, const char* name, const py::array& a, int dtype, int min_ndim,
                   int max_ndim) {
  const bool bits16 = (a.dtype().kind() == 'i' || a.dtype().kind() == 'u') && a.itemsize() == 2;
  bool ok = false;
  switch (dtype) {
    case kFloat32: ok = a.dtype().is(py::dtype::of<float>()); break;
    case kFloat16: ok = bits16 || (a.dtype().kind() == 'f' && a.itemsize() == 2); break;
    case kBFloat16: ok = bits16; break;
    default: fail(fn, "unknown dtype code " + std::to_string(dtype) + " for argument '" + name + "'");
  }
  if (!ok)
    fail(fn, std::string("argument '") + name + "' must hold " + dtype_name(dtype) + " data, got " + describe(a));
  if (a.ndim() < min_ndim || a.ndim() > max_ndim)
    fail(fn, std::string("argument '") + name + "' must have " + std::to_string(min_ndim) +
                 (min_ndim == max_ndim ? "" : " to " + std::to_string(max_ndim)) + " dimensions, got " +
                 describe(a));
  check_contiguous(fn, name, a);
  FloatArg r;
  r.data = a.data();
  r.dtype = dtype;
  for (py::ssize_t i = 0; i < a.ndim(); ++i) r.shape.push_back(a.shape(i));
  return r;
}

static void check_shape(const char* fn, const char* name, const py::array& a, const std::vector<int64_t>& shape) {
  bool ok = a.ndim() == static_cast<py::ssize_t>(shape.size());
  for (size_t i = 0; ok && i < shape.size(); ++i) ok = a.shape(i) == shape[i];
  if (!ok) fail(fn, std::string("argument '") + name + "' must have shape " + shape_str(shape) + ", got " + describe(a));
  check_contiguous(fn, name, a);
}

float* float_out(const char* fn, const char* name, py::array& a, const std::vector<int64_t>& shape) {
  if (!a.dtype().is(py::dtype::of<float>()))
    fail(fn, std::string("output '") + name + "' must be float32, got " + describe(a));
  check_shape(fn, name, a, shape);
  if (!a.writeable()) fail(fn, std::string("output '") + name + "' is read-only");
  return static_cast<float*>(a.mutable_data());
}

const int64_t* int64_arg(const char* fn, const char* name, const py::array& a, const std::vector<int64_t>& shape) {
  if (!a.dtype().is(py::dtype::of<int64_t>()))
    fail(fn, std::string("argument '") + name + "' must be int64, got " + describe(a));
  check_shape(fn, name, a, shape);
  return static_cast<const int64_t*>(a.data());
}

int64_t* int64_out(const char* fn, const char* name, py::array& a, const std::vector<int64_t>& shape) {
  if (!a.dtype().is(py::dtype::of<int64_t>()))
    fail(fn, std::string("output '") + name + "' must be int64, got " + describe(a));
  check_shape(fn, name, a, shape);
  if (!a.writeable()) fail(fn, std::string("output '") + name + "' is read-only");
  return static_cast<int64_t*>(a.mutable_data());
}

const int32_t* int32_arg(const char* fn, const char* name, const py::array& a, const std::vector<int64_t>& shape) {
  if (!a.dtype().is(py::dtype::of<int32_t>()))
    fail(fn, std::string("argument '") + name + "' must be int32, got " + describe(a));
  check_shape(fn, name, a, shape);
  return static_cast<const int32_t*>(a.data());
}

int resolve_threads(int n) { return n >= 1 ? n : omp_get_max_threads(); }

}  // namespace fastad
