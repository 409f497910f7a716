// Bindings of the k-center greedy kernel: a stateful selection object, so that
// Python can advance it in chunks of steps (progress bar) without per-step Python.
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "common.h"
#include "isa.h"
#include "registry.h"

FASTAD_DECLARE_KERNEL(void* kcenter_create(const void* x, int dtype, int64_t B, int64_t N, int64_t C,
                                           const int64_t* forced, int64_t M, int64_t picks, int storage,
                                           const float* mu, const double* U, int64_t m, const float* sig));
FASTAD_DECLARE_KERNEL(std::string kcenter_advance(void* state, int64_t nsteps, int nthreads, int64_t* done));
FASTAD_DECLARE_KERNEL(void kcenter_result(void* state, int64_t* indices, float* radius));
FASTAD_DECLARE_KERNEL(void kcenter_destroy(void* state));

namespace fastad {
namespace {

// Calls the variant of `fn` compiled for `isa` (fixed when the selection starts).
#define KCENTER_CALL(isa, fn, ...)                                                          \
  [&]() {                                                                                   \
    switch (isa) {                                                                          \
      FASTAD_IF_AVX512(case ::fastad::Isa::avx512: return ::fastad::isa_avx512::fn(__VA_ARGS__);) \
      FASTAD_IF_AVX2(case ::fastad::Isa::avx2: return ::fastad::isa_avx2::fn(__VA_ARGS__);)       \
      default: return ::fastad::isa_generic::fn(__VA_ARGS__);                               \
    }                                                                                       \
  }()

constexpr const char* kFn = "KCenter";

class KCenter {
 public:
  KCenter(const py::array& x, int dtype, const py::array& forced, int64_t picks, int storage, const py::array& mu,
          const py::array& basis, const py::array& sig)
      : x_(x), mu_(mu), basis_(basis), sig_(sig), isa_(cpu_isa()) {
    FloatArg xa = float_arg(kFn, "x", x, dtype, 3, 3);
    B_ = xa.dim(0);
    N_ = xa.dim(1);
    C_ = xa.dim(2);
    if (N_ < 1 || C_ < 1) fail(kFn, "x must have at least one point and one feature, got shape " + shape_str(x));
    if (N_ > 2147483647) fail(kFn, "x has more than 2^31 - 1 points per problem: " + shape_str(x));
    if (forced.ndim() != 2 || forced.shape(0) != B_)
      fail(kFn, "forced must have shape (B, M) with B = " + std::to_string(B_) + ", got " + shape_str(forced));
    M_ = forced.shape(1);
    const int64_t* f = int64_arg(kFn, "forced", forced, {B_, M_});
    if (storage < 0 || storage > 3) fail(kFn, "storage must be 0 (auto), 1 (input), 2 (fp16) or 3 (bf16)");
    if (picks < 0) fail(kFn, "picks must be >= 0, got " + std::to_string(picks));
    for (int64_t b = 0; b < B_; ++b) {
      std::vector<int64_t> u(f + b * M_, f + (b + 1) * M_);
      for (int64_t v : u)
        if (v < 0 || v >= N_)
          fail(kFn, "forced index " + std::to_string(v) + " out of range [0, " + std::to_string(N_) + ")");
      std::sort(u.begin(), u.end());
      const int64_t distinct = std::unique(u.begin(), u.end()) - u.begin();
      if (picks > N_ - distinct)
        fail(kFn, "cannot pick " + std::to_string(picks) + " more points from " + std::to_string(N_) +
                      " with " + std::to_string(distinct) + " already selected (problem " + std::to_string(b) + ")");
    }
    picks_ = picks;
    FloatArg ma = float_arg(kFn, "mu", mu, kFloat32, 2, 2);
    if (ma.dim(0) != B_ || ma.dim(1) != C_)
      fail(kFn, "mu must have shape (" + std::to_string(B_) + ", " + std::to_string(C_) + "), got " + shape_str(mu));
    const double* U = nullptr;
    const float* sg = nullptr;
    int64_t m = 0;
    if (basis.ndim() != 3 || basis.shape(0) != B_ || basis.shape(1) != C_ || basis.shape(2) > C_ ||
        !basis.dtype().is(py::dtype::of<double>()) || !(basis.flags() & py::array::c_style))
      fail(kFn, "basis must be a C-contiguous float64 array of shape (" + std::to_string(B_) + ", " +
                    std::to_string(C_) + ", m <= C), got " + shape_str(basis));
    m = basis.shape(2);
    if (m > 0) {
      FloatArg sa = float_arg(kFn, "sig", sig, kFloat32, 1, 1);
      if (sa.dim(0) != B_) fail(kFn, "sig must have shape (" + std::to_string(B_) + ",), got " + shape_str(sig));
      sg = static_cast<const float*>(sa.data);
      for (int64_t b = 0; b < B_; ++b)
        if (!(sg[b] >= 1.f) || !std::isfinite(sg[b])) fail(kFn, "sig must be finite and >= 1");
      U = static_cast<const double*>(basis.data());
    }
    state_ = KCENTER_CALL(isa_, kcenter_create, xa.data, dtype, B_, N_, C_, f, M_, picks, storage,
                          static_cast<const float*>(ma.data), U, m, sg);
  }

  KCenter(const KCenter&) = delete;
  KCenter& operator=(const KCenter&) = delete;
  ~KCenter() { KCENTER_CALL(isa_, kcenter_destroy, state_); }

  // Adds the forced centers (first call) and up to nsteps picks per problem; returns
  // the picks done so far (the least over the problems).
  int64_t advance(int64_t nsteps, int nthreads) {
    if (nsteps < 0) fail(kFn, "nsteps must be >= 0");
    const int nt = resolve_threads(nthreads);
    int64_t done = 0;
    std::string err;
    {
      py::gil_scoped_release release;
      err = KCENTER_CALL(isa_, kcenter_advance, state_, nsteps, nt, &done);
    }
    if (!err.empty()) fail(kFn, err);
    return done;
  }

  void result(py::array& indices, py::array& radius) {
    int64_t* idx = int64_out(kFn, "indices", indices, {B_, picks_});
    float* rad = float_out(kFn, "radius", radius, {B_});
    KCENTER_CALL(isa_, kcenter_result, state_, idx, rad);
  }

 private:
  py::array x_, mu_, basis_, sig_;  // keep the inputs alive while the selection runs
  Isa isa_;
  void* state_ = nullptr;
  int64_t B_ = 0, N_ = 0, C_ = 0, M_ = 0, picks_ = 0;
};

}  // namespace
}  // namespace fastad

FASTAD_REGISTER(kcenter) {
  namespace py = pybind11;
  using fastad::KCenter;
  py::class_<KCenter>(m, "KCenter",
                      "k-center greedy selection over B problems x [B, N, C]: adds the forced centers "
                      "[B, M], then `picks` farthest points per problem (ties to the lowest index).")
      .def(py::init<const py::array&, int, const py::array&, int64_t, int, const py::array&, const py::array&,
                    const py::array&>(),
           py::arg("x"), py::arg("dtype"), py::arg("forced"), py::arg("picks"), py::arg("storage"), py::arg("mu"),
           py::arg("basis"), py::arg("sig"),
           "mu [B, C] float32 centres the approximate copy; basis [B, C, m] float64 with orthonormal columns "
           "rotates its first m coordinates (m = 0: none); sig [B] >= 1 bounds the distortion of that map.")
      .def("advance", &KCenter::advance, py::arg("nsteps"), py::arg("nthreads"))
      .def("result", &KCenter::result, py::arg("indices"), py::arg("radius"));
}
