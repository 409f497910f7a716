// Bindings of the sparsemax / dictionary-lookup CPU kernels (csrc/cpu/sparsemax_kernel.cpp).
// Python (fastad/ops/sparsemax.py) validates first; these checks make a wrong
// direct call raise ValueError instead of crashing.
#include <cstdint>
#include <string>
#include <vector>

#include "common.h"
#include "isa.h"
#include "registry.h"

FASTAD_DECLARE_KERNEL(int sparsemax_rows(const void* x, int dtype, int64_t R, int64_t L, float* y, int nthreads,
                                         int64_t* bad_row));
FASTAD_DECLARE_KERNEL(int dict_topk(const void* q, int qdt, int64_t R, int64_t C, const void* keys, int kdt,
                                    int64_t M, const uint8_t* mask, float scale, int K, float* out_vals,
                                    int64_t* out_idx, int nthreads));
FASTAD_DECLARE_KERNEL(void dict_gather(const float* w, const int64_t* idx, int64_t R, int64_t kk,
                                       int64_t rows_per_batch, const void* v, int vdt, int64_t Bv, int64_t M,
                                       int64_t Cv, float* out, int nthreads));
FASTAD_DECLARE_KERNEL(void dict_sparse_backward(const void* q, const void* k, const void* v, int dt, int64_t B,
                                                int64_t N, int64_t C, int64_t Cv, int64_t M, int64_t Bk,
                                                int64_t Bv, const int64_t* idx, const float* w, int64_t kk,
                                                const float* g, float scale, int sparsemax_mode, float* gq,
                                                float* gk, float* gv, int nthreads));
FASTAD_DECLARE_KERNEL(int dict_softmax_fwd(const void* q, int dt, int64_t R, int64_t C, const void* keys,
                                            const void* values, int64_t M, int64_t Cv, const uint8_t* mask,
                                            float scale, float* out, float* lse, int nthreads));

FASTAD_DECLARE_KERNEL(int all_finite(const void* x, int dtype, int64_t n, int nthreads));

namespace fastad {
namespace {

// Optional key mask [Bm, M] of bool / uint8 (Bm = 1 or B); nullptr when None.
const uint8_t* mask_arg(const char* fn, const py::object& obj, int64_t B, int64_t M, int64_t* Bm) {
  *Bm = 0;
  if (obj.is_none()) return nullptr;
  py::array a = py::reinterpret_borrow<py::array>(obj);
  if (a.itemsize() != 1 || (a.dtype().kind() != 'b' && a.dtype().kind() != 'u'))
    fail(fn, "argument 'key_mask' must be bool or uint8, got dtype " + std::string(py::str(a.dtype())) +
                 " shape " + shape_str(a));
  if (a.ndim() != 2 || (a.shape(0) != 1 && a.shape(0) != B) || a.shape(1) != M)
    fail(fn, "argument 'key_mask' must have shape (1 or " + std::to_string(B) + ", " + std::to_string(M) +
                 "), got " + shape_str(a));
  if (!(a.flags() & py::array::c_style)) fail(fn, "argument 'key_mask' must be C-contiguous");
  *Bm = a.shape(0);
  return static_cast<const uint8_t*>(a.data());
}

void check_batch(const char* fn, const char* name, int64_t got, int64_t B) {
  if (got != 1 && got != B)
    fail(fn, std::string("argument '") + name + "' must have batch size 1 or " + std::to_string(B) + ", got " +
                 std::to_string(got));
}

void check_indices(const char* fn, const int64_t* idx, int64_t n, int64_t M) {
  for (int64_t i = 0; i < n; ++i)
    if (idx[i] < -1 || idx[i] >= M)
      fail(fn, "argument 'idx' holds " + std::to_string(idx[i]) + ", outside [-1, " + std::to_string(M) + ")");
}

}  // namespace
}  // namespace fastad

FASTAD_REGISTER(sparsemax) {
  using namespace fastad;

  m.def(
      "sparsemax_rows",
      [](const py::array& x, int dtype, py::array& y, int nthreads) {
        const char* fn = "sparsemax_rows";
        FloatArg a = float_arg(fn, "x", x, dtype, 2, 2);
        float* out = float_out(fn, "y", y, a.shape);
        int64_t bad = 0;
        int status;
        {
          py::gil_scoped_release nogil;
          status = FASTAD_DISPATCH_KERNEL(sparsemax_rows, a.data, dtype, a.dim(0), a.dim(1), out,
                                          resolve_threads(nthreads), &bad);
        }
        if (status == 1) fail(fn, "row " + std::to_string(bad) + " of 'x' contains NaN or +inf");
        if (status == 2) fail(fn, "row " + std::to_string(bad) + " of 'x' is -inf everywhere (no entry to keep)");
      },
      py::arg("x"), py::arg("dtype"), py::arg("y"), py::arg("nthreads"),
      "y[R, L] = sparsemax of each row of x[R, L] (float32 out); exact, partial selection");

  m.def(
      "dict_topk",
      [](const py::array& q, const py::array& keys, const py::object& key_mask, int dtype, float scale, int K,
         py::array& vals, py::array& idx, int nthreads) {
        const char* fn = "dict_topk";
        FloatArg qa = float_arg(fn, "q", q, dtype, 3, 3);
        FloatArg ka = float_arg(fn, "keys", keys, dtype, 3, 3);
        const int64_t B = qa.dim(0), N = qa.dim(1), C = qa.dim(2), Bk = ka.dim(0), M = ka.dim(1);
        check_batch(fn, "keys", Bk, B);
        if (ka.dim(2) != C) fail(fn, "'keys' has " + std::to_string(ka.dim(2)) + " channels, 'q' has " + std::to_string(C));
        if (K < 1) fail(fn, "K must be >= 1, got " + std::to_string(K));
        if (M >= (int64_t{1} << 31)) fail(fn, "at most 2^31 - 1 keys");
        int64_t Bm = 0;
        const uint8_t* mask = mask_arg(fn, key_mask, B, M, &Bm);
        float* ov = float_out(fn, "vals", vals, {B, N, K});
        int64_t* oi = int64_out(fn, "idx", idx, {B, N, K});
        const int T = resolve_threads(nthreads);
        const size_t es = dtype == kFloat32 ? 4 : 2;
        int status = 0;
        {
          py::gil_scoped_release nogil;
          if (Bk == 1 && Bm <= 1) {
            status = FASTAD_DISPATCH_KERNEL(dict_topk, qa.data, dtype, B * N, C, ka.data, dtype, M, mask, scale, K,
                                            ov, oi, T);
          } else {
            for (int64_t b = 0; b < B && status == 0; ++b) {
              const char* qb = static_cast<const char*>(qa.data) + static_cast<size_t>(b * N * C) * es;
              const char* kb = static_cast<const char*>(ka.data) + static_cast<size_t>((Bk == 1 ? 0 : b) * M * C) * es;
              const uint8_t* mb = mask == nullptr ? nullptr : mask + (Bm == 1 ? 0 : b) * M;
              status = FASTAD_DISPATCH_KERNEL(dict_topk, qb, dtype, N, C, kb, dtype, M, mb, scale, K, ov + b * N * K,
                                              oi + b * N * K, T);
            }
          }
        }
        if (status) fail(fn, "a logit of an unmasked key is NaN or infinite (check query and keys for NaN / inf)");
      },
      py::arg("q"), py::arg("keys"), py::arg("key_mask"), py::arg("dtype"), py::arg("scale"), py::arg("K"),
      py::arg("vals"), py::arg("idx"), py::arg("nthreads"),
      "top-K logits q.k*scale per row (vals descending, ties by lower key), fused GEMM; q [B,N,C], keys [1|B,M,C]");

  m.def(
      "dict_gather",
      [](const py::array& w, const py::array& idx, const py::array& values, int dtype, py::array& out,
         int nthreads) {
        const char* fn = "dict_gather";
        FloatArg wa = float_arg(fn, "w", w, kFloat32, 3, 3);
        FloatArg va = float_arg(fn, "values", values, dtype, 3, 3);
        const int64_t B = wa.dim(0), N = wa.dim(1), kk = wa.dim(2), Bv = va.dim(0), M = va.dim(1), Cv = va.dim(2);
        check_batch(fn, "values", Bv, B);
        const int64_t* ia = int64_arg(fn, "idx", idx, {B, N, kk});
        check_indices(fn, ia, B * N * kk, M);
        float* o = float_out(fn, "out", out, {B, N, Cv});
        py::gil_scoped_release nogil;
        FASTAD_DISPATCH_KERNEL(dict_gather, static_cast<const float*>(wa.data), ia, B * N, kk, N, va.data, dtype, Bv,
                               M, Cv, o, resolve_threads(nthreads));
      },
      py::arg("w"), py::arg("idx"), py::arg("values"), py::arg("dtype"), py::arg("out"), py::arg("nthreads"),
      "out[b, n] = sum_s w[b, n, s] * values[b, idx[b, n, s]] (idx -1 = empty slot)");

  m.def(
      "dict_sparse_backward",
      [](const py::array& q, const py::array& keys, const py::array& values, int dtype, const py::array& idx,
         const py::array& w, const py::array& g, float scale, bool sparsemax_mode, py::array& gq, py::array& gk,
         py::array& gv, int nthreads) {
        const char* fn = "dict_sparse_backward";
        FloatArg qa = float_arg(fn, "q", q, dtype, 3, 3);
        FloatArg ka = float_arg(fn, "keys", keys, dtype, 3, 3);
        FloatArg va = float_arg(fn, "values", values, dtype, 3, 3);
        const int64_t B = qa.dim(0), N = qa.dim(1), C = qa.dim(2), Bk = ka.dim(0), M = ka.dim(1);
        const int64_t Bv = va.dim(0), Cv = va.dim(2);
        check_batch(fn, "keys", Bk, B);
        check_batch(fn, "values", Bv, B);
        if (ka.dim(2) != C || va.dim(1) != M)
          fail(fn, "shapes of q " + shape_str(q) + ", keys " + shape_str(keys) + ", values " + shape_str(values) +
                       " do not match");
        FloatArg wa = float_arg(fn, "w", w, kFloat32, 3, 3);
        if (wa.dim(0) != B || wa.dim(1) != N) fail(fn, "argument 'w' must have shape (B, N, k), got " + shape_str(w));
        const int64_t kk = wa.dim(2);
        const int64_t* ia = int64_arg(fn, "idx", idx, {B, N, kk});
        check_indices(fn, ia, B * N * kk, M);
        FloatArg ga = float_arg(fn, "g", g, kFloat32, 3, 3);
        if (ga.shape != std::vector<int64_t>{B, N, Cv}) fail(fn, "argument 'g' must have shape (B, N, Cv), got " + shape_str(g));
        float* oq = float_out(fn, "gq", gq, {B, N, C});
        float* ok = float_out(fn, "gk", gk, {Bk, M, C});
        float* ov = float_out(fn, "gv", gv, {Bv, M, Cv});
        py::gil_scoped_release nogil;
        FASTAD_DISPATCH_KERNEL(dict_sparse_backward, qa.data, ka.data, va.data, dtype, B, N, C, Cv, M, Bk, Bv, ia,
                               static_cast<const float*>(wa.data), kk, static_cast<const float*>(ga.data), scale,
                               sparsemax_mode ? 1 : 0, oq, ok, ov, resolve_threads(nthreads));
      },
      py::arg("q"), py::arg("keys"), py::arg("values"), py::arg("dtype"), py::arg("idx"), py::arg("w"), py::arg("g"),
      py::arg("scale"), py::arg("sparsemax_mode"), py::arg("gq"), py::arg("gk"), py::arg("gv"), py::arg("nthreads"),
      "gradients of the sparse lookup for q, keys, values (float32 out), O(rows * k * C)");

  m.def(
      "dict_softmax_fwd",
      [](const py::array& q, const py::array& keys, const py::array& values, const py::object& key_mask, int dtype,
         float scale, py::array& out, py::array& lse, int nthreads) {
        const char* fn = "dict_softmax_fwd";
        FloatArg qa = float_arg(fn, "q", q, dtype, 3, 3);
        FloatArg ka = float_arg(fn, "keys", keys, dtype, 3, 3);
        FloatArg va = float_arg(fn, "values", values, dtype, 3, 3);
        const int64_t B = qa.dim(0), N = qa.dim(1), C = qa.dim(2), Bk = ka.dim(0), M = ka.dim(1);
        const int64_t Bv = va.dim(0), Cv = va.dim(2);
        check_batch(fn, "keys", Bk, B);
        check_batch(fn, "values", Bv, B);
        if (ka.dim(2) != C || va.dim(1) != M)
          fail(fn, "shapes of q " + shape_str(q) + ", keys " + shape_str(keys) + ", values " + shape_str(values) +
                       " do not match");
        int64_t Bm = 0;
        const uint8_t* mask = mask_arg(fn, key_mask, B, M, &Bm);
        float* o = float_out(fn, "out", out, {B, N, Cv});
        float* l = float_out(fn, "lse", lse, {B, N});
        const int T = resolve_threads(nthreads);
        const size_t es = dtype == kFloat32 ? 4 : 2;
        int status = 0;
        {
          py::gil_scoped_release nogil;
          if (Bk == 1 && Bv == 1 && Bm <= 1) {
            status = FASTAD_DISPATCH_KERNEL(dict_softmax_fwd, qa.data, dtype, B * N, C, ka.data, va.data, M, Cv, mask,
                                            scale, o, l, T);
          } else {
            for (int64_t b = 0; b < B && status == 0; ++b) {
              const char* qb = static_cast<const char*>(qa.data) + static_cast<size_t>(b * N * C) * es;
              const char* kb = static_cast<const char*>(ka.data) + static_cast<size_t>((Bk == 1 ? 0 : b) * M * C) * es;
              const char* vb = static_cast<const char*>(va.data) + static_cast<size_t>((Bv == 1 ? 0 : b) * M * Cv) * es;
              const uint8_t* mb = mask == nullptr ? nullptr : mask + (Bm == 1 ? 0 : b) * M;
              status = FASTAD_DISPATCH_KERNEL(dict_softmax_fwd, qb, dtype, N, C, kb, vb, M, Cv, mb, scale,
                                              o + b * N * Cv, l + b * N, T);
            }
          }
        }
        if (status) fail(fn, "a logit of an unmasked key is NaN or infinite (check query and keys for NaN / inf)");
      },
      py::arg("q"), py::arg("keys"), py::arg("values"), py::arg("key_mask"), py::arg("dtype"), py::arg("scale"),
      py::arg("out"), py::arg("lse"), py::arg("nthreads"),
      "softmax lookup out = softmax(q.k*scale) v and its log-sum-exp per row, online over key blocks");

  m.def(
      "all_finite",
      [](const py::array& x, int dtype, int nthreads) {
        FloatArg a = float_arg("all_finite", "x", x, dtype, 0, 32);
        py::gil_scoped_release nogil;
        return FASTAD_DISPATCH_KERNEL(all_finite, a.data, dtype, a.numel(), resolve_threads(nthreads)) != 0;
      },
      py::arg("x"), py::arg("dtype"), py::arg("nthreads"), "True when no element of x is NaN or infinite");
}
