// Bindings of the mask_pool CPU kernels. fastad/ops/mask_pool.py builds the
// resize and adjoint tables; everything is re-checked here so that a wrong
// direct call raises ValueError instead of reading out of bounds.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>
#include <vector>

#include "common.h"
#include "cpu/mask_pool_kernel.h"
#include "isa.h"
#include "registry.h"

FASTAD_DECLARE_KERNEL(bool mask_pool_weights_kernel(const ::fastad::MaskPoolArgs& a, int nthreads))
FASTAD_DECLARE_KERNEL(bool mask_resize_kernel(const ::fastad::MaskPoolArgs& a, int nthreads))

namespace fastad {
namespace {

const char* const kWeights = "mask_pool_weights";
const char* const kResizeFn = "mask_resize";

std::string dims(const py::array& a) { return "dtype " + std::string(py::str(a.dtype())) + " shape " + shape_str(a); }

void check_contiguous(const char* fn, const char* name, const py::array& a) {
  if (!(a.flags() & py::array::c_style))
    fail(fn, std::string("argument '") + name + "' must be C-contiguous, got " + dims(a));
}

void check_masks(const char* fn, const py::array& masks, int dtype, MaskPoolArgs& a) {
  bool ok = false;
  const char kind = masks.dtype().kind();
  switch (dtype) {
    case kMaskF32: ok = masks.dtype().is(py::dtype::of<float>()); break;
    case kMaskF16: ok = (kind == 'f' || kind == 'i' || kind == 'u') && masks.itemsize() == 2; break;
    case kMaskBF16: ok = (kind == 'i' || kind == 'u') && masks.itemsize() == 2; break;
    case kMaskU8: ok = (kind == 'u' || kind == 'b') && masks.itemsize() == 1; break;
    default: fail(fn, "unknown mask dtype code " + std::to_string(dtype) + " (0 float32, 1 float16, 2 bfloat16, 3 uint8)");
  }
  if (!ok) fail(fn, "argument 'masks' does not hold data of mask dtype code " + std::to_string(dtype) + ", got " + dims(masks));
  if (masks.ndim() != 3) fail(fn, "argument 'masks' must have 3 dimensions [N, Hm, Wm], got " + dims(masks));
  check_contiguous(fn, "masks", masks);
  a.masks = masks.data();
  a.mask_dtype = dtype;
  a.N = masks.shape(0);
  a.Hm = masks.shape(1);
  a.Wm = masks.shape(2);
  if (a.Hm < 1 || a.Wm < 1) fail(fn, "argument 'masks' must have Hm, Wm >= 1, got " + dims(masks));
}

template <typename T>
const T* typed(const char* fn, const char* name, const py::array& a, const std::vector<int64_t>& shape) {
  if (!a.dtype().is(py::dtype::of<T>()))
    fail(fn, std::string("argument '") + name + "' must be " + std::string(py::str(py::dtype::of<T>())) + ", got " + dims(a));
  bool ok = a.ndim() == static_cast<py::ssize_t>(shape.size());
  for (size_t i = 0; ok && i < shape.size(); ++i) ok = a.shape(static_cast<py::ssize_t>(i)) == shape[i];
  if (!ok) {
    std::string want = "(";
    for (size_t i = 0; i < shape.size(); ++i) want += (i ? ", " : "") + std::to_string(shape[i]);
    fail(fn, std::string("argument '") + name + "' must have shape " + want + "), got " + dims(a));
  }
  check_contiguous(fn, name, a);
  return static_cast<const T*>(a.data());
}

// Resize tables: idx [2, n] int32 and lam [2, n] float32 for one axis of the pooling grid.
void check_axis(const char* fn, const char* axis, int mode, const py::array& idx, const py::array& lam, int64_t src,
                const int32_t*& idx_out, const float*& lam_out, int64_t& n_out) {
  if (idx.ndim() != 2 || idx.shape(0) != 2 || idx.shape(1) < 1)
    fail(fn, std::string("argument '") + axis + "_idx' must have shape (2, n) with n >= 1, got " + dims(idx));
  const int64_t n = idx.shape(1);
  const std::string iname = std::string(axis) + "_idx", lname = std::string(axis) + "_lam";
  idx_out = typed<int32_t>(fn, iname.c_str(), idx, {2, n});
  lam_out = typed<float>(fn, lname.c_str(), lam, {2, n});
  n_out = n;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t i0 = idx_out[i], i1 = idx_out[n + i];
    bool ok = true;
    switch (mode) {
      case kResizeIdentity: ok = n == src && i0 == i; break;
      case kResizeSeparable:
      case kResizePointwise: ok = i0 >= 0 && i0 < src && i1 >= 0 && i1 < src; break;
      case kResizeNearest: ok = i0 >= 0 && i0 < src; break;
      default: ok = i0 >= 0 && i0 < i1 && i1 <= src; break;
    }
    if (!ok)
      fail(fn, std::string("argument '") + iname + "' has an entry out of range for a source size " +
                   std::to_string(src) + " at position " + std::to_string(i));
  }
}

void check_resize(const char* fn, MaskPoolArgs& a, int mode, const py::array& y_idx, const py::array& y_lam,
                  const py::array& x_idx, const py::array& x_lam, bool sep_fma, int pw_vec, int pw_tail,
                  int64_t r_first, int64_t r_total, int64_t vec_limit) {
  if (mode < kResizeIdentity || mode > kResizeArea) fail(fn, "unknown resize mode " + std::to_string(mode));
  if (pw_vec < kPwVecPlain || pw_vec > kPwTailFma || pw_tail < kPwVecPlain || pw_tail > kPwTailFma)
    fail(fn, "unknown pointwise formula code");
  if (r_total < 1 || r_first < 0) fail(fn, "r_total must be >= 1 and r_first >= 0");
  a.mode = mode;
  check_axis(fn, "y", mode, y_idx, y_lam, a.Hm, a.y_idx, a.y_lam, a.Hp);
  check_axis(fn, "x", mode, x_idx, x_lam, a.Wm, a.x_idx, a.x_lam, a.Wp);
  a.sep_fma = sep_fma;
  a.pw_vec = pw_vec;
  a.pw_tail = pw_tail;
  a.r_first = r_first;
  a.r_total = r_total;
  a.vec_limit = vec_limit;
}

// Band tables: lo [n] int32, len [n] int32, w [n, K] float32, each band inside [0, extent).
void check_bands(const char* fn, const char* name, const py::array& lo, const py::array& len, const py::array& w,
                 int64_t n, int64_t extent, const int32_t*& lo_out, const int32_t*& len_out, const float*& w_out,
                 int64_t& K) {
  if (w.ndim() != 2 || w.shape(0) != n)
    fail(fn, std::string("argument '") + name + "_w' must have shape (" + std::to_string(n) + ", K), got " + dims(w));
  K = w.shape(1);
  const std::string lo_name = std::string(name) + "_lo", len_name = std::string(name) + "_len",
                    w_name = std::string(name) + "_w";
  lo_out = typed<int32_t>(fn, lo_name.c_str(), lo, {n});
  len_out = typed<int32_t>(fn, len_name.c_str(), len, {n});
  w_out = typed<float>(fn, w_name.c_str(), w, {n, K});
  for (int64_t i = 0; i < n; ++i) {
    if (lo_out[i] < 0 || len_out[i] < 0 || len_out[i] > K || lo_out[i] + len_out[i] > extent)
      fail(fn, std::string("band ") + std::to_string(i) + " of '" + name + "' lies outside [0, " +
                   std::to_string(extent) + ") or is longer than K = " + std::to_string(K));
  }
}

void run(const char* fn, bool (*kernel)(const MaskPoolArgs&, int), const MaskPoolArgs& a, int nthreads) {
  bool ok;
  {
    py::gil_scoped_release release;
    ok = kernel(a, resolve_threads(nthreads));
  }
  if (!ok) fail(fn, "out of memory for the per-thread scratch rows");
}

bool weights_dispatch(const MaskPoolArgs& a, int nthreads) { return FASTAD_DISPATCH_KERNEL(mask_pool_weights_kernel, a, nthreads); }
bool resize_dispatch(const MaskPoolArgs& a, int nthreads) { return FASTAD_DISPATCH_KERNEL(mask_resize_kernel, a, nthreads); }

void mask_pool_weights(const py::array& masks, int mask_dtype, int mode, const py::array& y_idx,
                       const py::array& y_lam, const py::array& x_idx, const py::array& x_lam, bool sep_fma,
                       int pw_vec, int pw_tail, int64_t r_first, int64_t r_total, int64_t vec_limit, bool hard,
                       float threshold, int complement, const py::array& v_lo, const py::array& v_len,
                       const py::array& v_w, const py::array& h_lo, const py::array& h_len, const py::array& h_w,
                       py::array& weights, py::array& counts, int nthreads) {
  const char* fn = kWeights;
  MaskPoolArgs a;
  check_masks(fn, masks, mask_dtype, a);
  check_resize(fn, a, mode, y_idx, y_lam, x_idx, x_lam, sep_fma, pw_vec, pw_tail, r_first, r_total, vec_limit);
  if (complement < kComplementNone || complement > kComplementPartition)
    fail(fn, "complement must be 0 (none), 1 (overlap) or 2 (partition), got " + std::to_string(complement));
  a.hard = hard;
  a.threshold = threshold;
  a.complement = complement;
  const int64_t nout = complement == kComplementNone ? 1 : 2;
  if (weights.ndim() != 4 || weights.shape(0) != a.N || weights.shape(1) != nout)
    fail(fn, "output 'weights' must have shape (N, nout, H, W) = (" + std::to_string(a.N) + ", " +
                 std::to_string(nout) + ", H, W), got " + dims(weights));
  a.H = weights.shape(2);
  a.W = weights.shape(3);
  if (a.H < 1 || a.W < 1) fail(fn, "output 'weights' must have H, W >= 1, got " + dims(weights));
  a.weights = float_out(fn, "weights", weights, {a.N, nout, a.H, a.W});
  a.counts = float_out(fn, "counts", counts, {a.N, nout});
  check_bands(fn, "v", v_lo, v_len, v_w, a.Hp, a.H, a.v_lo, a.v_len, a.v_w, a.KY);
  check_bands(fn, "h", h_lo, h_len, h_w, a.W, a.Wp, a.h_lo, a.h_len, a.h_w, a.KX);
  if (a.KX < 8 || a.KX % 8 != 0) fail(fn, "argument 'h_w' must have K a positive multiple of 8, got K = " + std::to_string(a.KX));
  run(fn, &weights_dispatch, a, nthreads);
}

void mask_resize(const py::array& masks, int mask_dtype, int mode, const py::array& y_idx, const py::array& y_lam,
                 const py::array& x_idx, const py::array& x_lam, bool sep_fma, int pw_vec, int pw_tail,
                 int64_t r_first, int64_t r_total, int64_t vec_limit, bool one_minus, py::array& out, int nthreads) {
  const char* fn = kResizeFn;
  MaskPoolArgs a;
  check_masks(fn, masks, mask_dtype, a);
  check_resize(fn, a, mode, y_idx, y_lam, x_idx, x_lam, sep_fma, pw_vec, pw_tail, r_first, r_total, vec_limit);
  a.one_minus = one_minus;
  a.resized = float_out(fn, "out", out, {a.N, a.Hp, a.Wp});
  run(fn, &resize_dispatch, a, nthreads);
}

}  // namespace
}  // namespace fastad

FASTAD_REGISTER(mask_pool) {
  using namespace pybind11::literals;
  m.def("mask_pool_weights", &fastad::mask_pool_weights, "masks"_a, "mask_dtype"_a, "mode"_a, "y_idx"_a, "y_lam"_a,
        "x_idx"_a, "x_lam"_a, "sep_fma"_a, "pw_vec"_a, "pw_tail"_a, "r_first"_a, "r_total"_a, "vec_limit"_a,
        "hard"_a, "threshold"_a, "complement"_a, "v_lo"_a, "v_len"_a, "v_w"_a, "h_lo"_a, "h_len"_a, "h_w"_a,
        "weights"_a, "counts"_a, "nthreads"_a,
        "Adjoint-projected mask weights on the feature grid ([N, nout, H, W]) and pooling-grid pixel counts "
        "([N, nout]) of masks [N, Hm, Wm]; see fastad/ops/mask_pool.py");
  m.def("mask_resize", &fastad::mask_resize, "masks"_a, "mask_dtype"_a, "mode"_a, "y_idx"_a, "y_lam"_a, "x_idx"_a,
        "x_lam"_a, "sep_fma"_a, "pw_vec"_a, "pw_tail"_a, "r_first"_a, "r_total"_a, "vec_limit"_a, "one_minus"_a,
        "out"_a, "nthreads"_a,
        "Masks [N, Hm, Wm] (or 1 - masks) resized to the pooling grid exactly as mask_pool_weights sees them");
}
