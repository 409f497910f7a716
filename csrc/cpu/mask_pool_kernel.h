// Arguments shared by the mask_pool bindings (csrc/mask_pool.cpp) and the
// per-ISA kernels (csrc/cpu/mask_pool_kernel.cpp). Plain data, checked by the
// bindings before any kernel runs; the tables are built in fastad/ops/mask_pool.py.
#pragma once
#include <cstdint>

namespace fastad {

enum MaskDType : int { kMaskF32 = 0, kMaskF16 = 1, kMaskBF16 = 2, kMaskU8 = 3 };

// How a mask is resized to the pooling grid; each reproduces F.interpolate's rounding.
enum MaskResize : int {
  kResizeIdentity = 0,   // mask grid == pooling grid: no interpolation
  kResizeSeparable = 1,  // bilinear, horizontal pass then vertical pass (torch's generic kernel)
  kResizePointwise = 2,  // bilinear, four products per pixel (torch's channels-last kernel)
  kResizeNearest = 3,
  kResizeArea = 4,       // adaptive average pooling, row-major window sums
};

// Formulas of torch's pointwise bilinear kernel (a,b,c,d = top-left, top-right,
// bottom-left, bottom-right source values; wXY their weights).
enum PointwiseFormula : int {
  kPwVecPlain = 0,  // a*w00 + (b*w01 + (c*w10 + d*w11))
  kPwVecFma = 1,    // fma(a,w00, fma(b,w01, fma(d,w11, c*w10)))
  kPwTailPlain = 2, // ((a*w00 + b*w01) + c*w10) + d*w11
  kPwTailFma = 3,   // fma(d,w11, fma(c,w10, fma(a,w00, b*w01)))
};

enum MaskComplement : int { kComplementNone = 0, kComplementOverlap = 1, kComplementPartition = 2 };

struct MaskPoolArgs {
  // masks [N, Hm, Wm]
  const void* masks = nullptr;
  int mask_dtype = kMaskF32;
  int64_t N = 0, Hm = 0, Wm = 0;
  // pooling grid and resize tables: idx/lam are [2, Hp] and [2, Wp]
  // (bilinear: index0/index1, lambda0/lambda1; nearest: index0; area: start/end)
  int64_t Hp = 0, Wp = 0;
  int mode = kResizeIdentity;
  const int32_t* y_idx = nullptr;
  const float* y_lam = nullptr;
  const int32_t* x_idx = nullptr;
  const float* x_lam = nullptr;
  bool sep_fma = true;
  int pw_vec = kPwVecFma, pw_tail = kPwTailFma;
  int64_t r_first = 0, r_total = 1, vec_limit = 0;  // mask n has index r = (r_first + n) % r_total
  // binarisation (hard) or soft weights, and the complement rule
  bool hard = true;
  float threshold = 0.f;
  int complement = kComplementNone;
  // adjoint of the feature resize U (pooling grid <- feature grid [H, W]):
  // rows of Uy (taps of each pooling row) and columns of Ux (band of pooling columns of each feature column)
  int64_t H = 0, W = 0;
  const int32_t* v_lo = nullptr;
  const int32_t* v_len = nullptr;
  const float* v_w = nullptr;  // [Hp, KY]
  int64_t KY = 0;
  const int32_t* h_lo = nullptr;
  const int32_t* h_len = nullptr;
  const float* h_w = nullptr;  // [W, KX], KX a multiple of 8
  int64_t KX = 0;
  // outputs: weights [N, nout, H, W], counts [N, nout]; or resized masks [N, Hp, Wp]
  float* weights = nullptr;
  float* counts = nullptr;
  float* resized = nullptr;
  bool one_minus = false;  // mask_resize only: resize 1 - m instead of m
};

}  // namespace fastad
