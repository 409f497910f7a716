// mask_pool CPU kernel: for each mask, stream its rows through the resize to the
// pooling grid, binarise, and project the binary rows back onto the feature grid
// with the adjoint of the feature resize (pool(U F, m) = (U^T m) F / |m|): each
// pooling row is added into the (at most a few) feature rows it reaches,
// Z = Uy^T B ([H, Wp]), and Z is projected once per mask, weights = Z Ux.
// Neither the resized masks nor the upsampled features are ever materialised.
//
// Binarisation must agree with `F.interpolate(...) > threshold` bit for bit, so
// the resize reproduces torch's rounding: which products are fused (fma) is a
// parameter, and automatic contraction is switched off for this file.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/mask_pool_kernel.h"

#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace fastad {
namespace FASTAD_ISA_NS {
namespace {

inline float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (man << 13));
  if (exp != 0) return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
  if (man == 0) return bits_to_float(sign);
  uint32_t e = 113;  // subnormal half: shift the mantissa up to its leading one
  while (!(man & 0x400u)) {
    man <<= 1;
    --e;
  }
  return bits_to_float(sign | (e << 23) | ((man & 0x3ffu) << 13));
#endif
}

inline float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

void load_row(const MaskPoolArgs& a, int64_t n, int64_t row, float* dst) {
  const int64_t off = (n * a.Hm + row) * a.Wm;
  const int64_t w = a.Wm;
  switch (a.mask_dtype) {
    case kMaskF32:
      std::memcpy(dst, static_cast<const float*>(a.masks) + off, sizeof(float) * static_cast<size_t>(w));
      break;
    case kMaskF16: {
      const uint16_t* s = static_cast<const uint16_t*>(a.masks) + off;
      for (int64_t i = 0; i < w; ++i) dst[i] = half_to_float(s[i]);
      break;
    }
    case kMaskBF16: {
      const uint16_t* s = static_cast<const uint16_t*>(a.masks) + off;
      for (int64_t i = 0; i < w; ++i) dst[i] = bf16_to_float(s[i]);
      break;
    }
    default: {
      const uint8_t* s = static_cast<const uint8_t*>(a.masks) + off;
      for (int64_t i = 0; i < w; ++i) dst[i] = static_cast<float>(s[i]);
      break;
    }
  }
}

inline float dot(const float* w, const float* b, int64_t K) {
#if defined(__AVX2__)
  __m256 acc = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(b + k), acc);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
#else
  float s = 0.f;
  for (int64_t k = 0; k < K; ++k) s += w[k] * b[k];
  return s;
#endif
}

inline float pointwise(int f, float a, float b, float c, float d, float w00, float w01, float w10, float w11) {
  switch (f) {
    case kPwVecPlain: return a * w00 + (b * w01 + (c * w10 + d * w11));
    case kPwVecFma: return std::fma(a, w00, std::fma(b, w01, std::fma(d, w11, c * w10)));
    case kPwTailPlain: return ((a * w00 + b * w01) + c * w10) + d * w11;
    default: return std::fma(d, w11, std::fma(c, w10, std::fma(a, w00, b * w01)));
  }
}

// Per-thread scratch: two cached source rows (raw and 1 - raw), two cached
// horizontally resized rows, the current pooling row, binary rows, and the
// accumulator z = Uy^T B of the mask (and of its complement).
struct Work {
  std::vector<float> raw[2], raw_om[2], hres[2], hres_om[2];
  int64_t raw_key[2] = {-1, -1}, hres_key[2] = {-1, -1};
  std::vector<float> v, vc, acc, acc_c, tmp, ones;
  std::vector<float> b[2];
  std::vector<float> z[2];          // Uy^T B: [H, Wp + KX], rows padded for the band dots
  std::vector<char> touched[2];     // rows of z written since the last reset

  explicit Work(const MaskPoolArgs& a) {
    const size_t wm = static_cast<size_t>(a.Wm), wp = static_cast<size_t>(a.Wp);
    for (int s = 0; s < 2; ++s) {
      raw[s].assign(wm, 0.f);
      raw_om[s].assign(wm, 0.f);
      hres[s].assign(wp, 0.f);
      hres_om[s].assign(wp, 0.f);
      b[s].assign(wp, 0.f);
    }
    v.assign(wp, 0.f);
    vc.assign(wp, 0.f);
    acc.assign(wp, 0.f);
    acc_c.assign(wp, 0.f);
    tmp.assign(wm, 0.f);
    ones.assign(wp, 1.f);
    if (a.H > 0) {
      for (int s = 0; s < 2; ++s) {
        z[s].assign(static_cast<size_t>(a.H) * (wp + static_cast<size_t>(a.KX)), 0.f);
        touched[s].assign(static_cast<size_t>(a.H), 0);
      }
    }
  }
  void reset() { raw_key[0] = raw_key[1] = hres_key[0] = hres_key[1] = -1; }
};

// Slot holding source row `row` (as float, and 1 - m when `om`), loaded if
// needed into the slot that does not hold `keep`.
int fetch_raw(const MaskPoolArgs& a, Work& w, int64_t n, int64_t row, int64_t keep, bool om) {
  for (int s = 0; s < 2; ++s)
    if (w.raw_key[s] == row) return s;
  const int s = (w.raw_key[0] == keep) ? 1 : 0;
  load_row(a, n, row, w.raw[s].data());
  if (om)
    for (int64_t i = 0; i < a.Wm; ++i) w.raw_om[s][i] = 1.0f - w.raw[s][i];
  w.raw_key[s] = row;
  return s;
}

void hresize(const MaskPoolArgs& a, const float* src, float* dst) {
  const int32_t* i0 = a.x_idx;
  const int32_t* i1 = a.x_idx + a.Wp;
  const float* l0 = a.x_lam;
  const float* l1 = a.x_lam + a.Wp;
  if (a.sep_fma) {
    for (int64_t x = 0; x < a.Wp; ++x) dst[x] = std::fma(src[i0[x]], l0[x], src[i1[x]] * l1[x]);
  } else {
    for (int64_t x = 0; x < a.Wp; ++x) dst[x] = src[i0[x]] * l0[x] + src[i1[x]] * l1[x];
  }
}

int fetch_hres(const MaskPoolArgs& a, Work& w, int64_t n, int64_t row, int64_t keep, bool om) {
  for (int s = 0; s < 2; ++s)
    if (w.hres_key[s] == row) return s;
  const int s = (w.hres_key[0] == keep) ? 1 : 0;
  const int r = fetch_raw(a, w, n, row, -1, om);
  hresize(a, w.raw[r].data(), w.hres[s].data());
  if (om) hresize(a, w.raw_om[r].data(), w.hres_om[s].data());
  w.hres_key[s] = row;
  return s;
}

// Pooling row yp of resize(m) into w.v, and of resize(1 - m) into w.vc when `om`.
void resize_row(const MaskPoolArgs& a, Work& w, int64_t n, int64_t yp, bool om) {
  const int64_t Wp = a.Wp;
  float* v = w.v.data();
  float* vc = w.vc.data();
  switch (a.mode) {
    case kResizeIdentity: {
      load_row(a, n, yp, v);
      if (om)
        for (int64_t x = 0; x < Wp; ++x) vc[x] = 1.0f - v[x];
      return;
    }
    case kResizeSeparable: {
      const int64_t r0 = a.y_idx[yp], r1 = a.y_idx[a.Hp + yp];
      const float l0 = a.y_lam[yp], l1 = a.y_lam[a.Hp + yp];
      const int s0 = fetch_hres(a, w, n, r0, r1, om);
      const int s1 = fetch_hres(a, w, n, r1, r0, om);
      const float* h0 = w.hres[s0].data();
      const float* h1 = w.hres[s1].data();
      if (a.sep_fma) {
        for (int64_t x = 0; x < Wp; ++x) v[x] = std::fma(h0[x], l0, h1[x] * l1);
      } else {
        for (int64_t x = 0; x < Wp; ++x) v[x] = h0[x] * l0 + h1[x] * l1;
      }
      if (om) {
        const float* c0 = w.hres_om[s0].data();
        const float* c1 = w.hres_om[s1].data();
        if (a.sep_fma) {
          for (int64_t x = 0; x < Wp; ++x) vc[x] = std::fma(c0[x], l0, c1[x] * l1);
        } else {
          for (int64_t x = 0; x < Wp; ++x) vc[x] = c0[x] * l0 + c1[x] * l1;
        }
      }
      return;
    }
    case kResizePointwise: {
      const int64_t r0 = a.y_idx[yp], r1 = a.y_idx[a.Hp + yp];
      const float l0 = a.y_lam[yp], l1 = a.y_lam[a.Hp + yp];
      const int s0 = fetch_raw(a, w, n, r0, r1, om);
      const int s1 = fetch_raw(a, w, n, r1, r0, om);
      const int64_t r = (a.r_first + n) % a.r_total;
      const int f = r < a.vec_limit ? a.pw_vec : a.pw_tail;
      const int32_t* i0 = a.x_idx;
      const int32_t* i1 = a.x_idx + Wp;
      const float* xl0 = a.x_lam;
      const float* xl1 = a.x_lam + Wp;
      for (int pass = 0; pass < (om ? 2 : 1); ++pass) {
        const float* top = pass ? w.raw_om[s0].data() : w.raw[s0].data();
        const float* bot = pass ? w.raw_om[s1].data() : w.raw[s1].data();
        float* dst = pass ? vc : v;
        for (int64_t x = 0; x < Wp; ++x) {
          const float w00 = l0 * xl0[x], w01 = l0 * xl1[x], w10 = l1 * xl0[x], w11 = l1 * xl1[x];
          dst[x] = pointwise(f, top[i0[x]], top[i1[x]], bot[i0[x]], bot[i1[x]], w00, w01, w10, w11);
        }
      }
      return;
    }
    case kResizeNearest: {
      const int s = fetch_raw(a, w, n, a.y_idx[yp], -1, om);
      const float* src = w.raw[s].data();
      for (int64_t x = 0; x < Wp; ++x) v[x] = src[a.x_idx[x]];
      if (om) {
        const float* src_c = w.raw_om[s].data();
        for (int64_t x = 0; x < Wp; ++x) vc[x] = src_c[a.x_idx[x]];
      }
      return;
    }
    default: {  // area: torch sums each window in row-major order, then / kh / kw
      const int64_t ys = a.y_idx[yp], ye = a.y_idx[a.Hp + yp];
      float* acc = w.acc.data();
      float* acc_c = w.acc_c.data();
      std::fill(acc, acc + Wp, 0.f);
      std::fill(acc_c, acc_c + Wp, 0.f);
      float* src = w.tmp.data();
      for (int64_t ih = ys; ih < ye; ++ih) {
        load_row(a, n, ih, src);
        for (int64_t x = 0; x < Wp; ++x) {
          const int64_t xs = a.x_idx[x], xe = a.x_idx[Wp + x];
          float s = acc[x];
          for (int64_t iw = xs; iw < xe; ++iw) s += src[iw];
          acc[x] = s;
          if (om) {
            float c = acc_c[x];
            for (int64_t iw = xs; iw < xe; ++iw) c += 1.0f - src[iw];
            acc_c[x] = c;
          }
        }
      }
      const float kh = static_cast<float>(ye - ys);
      for (int64_t x = 0; x < Wp; ++x) {
        const float kw = static_cast<float>(a.x_idx[Wp + x] - a.x_idx[x]);
        v[x] = acc[x] / kh / kw;
        if (om) vc[x] = acc_c[x] / kh / kw;
      }
      return;
    }
  }
}

// Fill b (pooling row o of the mask: inside or complement) and return its sum.
double select_row(const MaskPoolArgs& a, const Work& w, int o, float* b) {
  const float* v = w.v.data();
  const float* vc = w.vc.data();
  const float thr = a.threshold;
  const int64_t Wp = a.Wp;
  double sum = 0.0;
  if (o == 0 || a.complement == kComplementOverlap) {
    const float* src = o == 0 ? v : vc;
    if (a.hard) {
      int64_t c = 0;
      for (int64_t x = 0; x < Wp; ++x) {
        const bool in = src[x] > thr;
        b[x] = in ? 1.f : 0.f;
        c += in;
      }
      return static_cast<double>(c);
    }
    for (int64_t x = 0; x < Wp; ++x) {
      b[x] = src[x];
      sum += src[x];
    }
    return sum;
  }
  if (a.hard) {  // partition: the pixels the inside row leaves out
    int64_t c = 0;
    for (int64_t x = 0; x < Wp; ++x) {
      const bool in = !(v[x] > thr);
      b[x] = in ? 1.f : 0.f;
      c += in;
    }
    return static_cast<double>(c);
  }
  for (int64_t x = 0; x < Wp; ++x) {
    b[x] = 1.0f - v[x];
    sum += b[x];
  }
  return sum;
}

// Add pooling row yp of B (b, with sum `sum`) into the feature rows it reaches: z += Uy[yp, :]^T b.
void accumulate_row(const MaskPoolArgs& a, Work& w, int o, int64_t yp, const float* b, double sum) {
  if (a.hard && sum == 0.0) return;
  if (!a.hard) {
    bool any = false;
    for (int64_t x = 0; x < a.Wp && !any; ++x) any = b[x] != 0.f;
    if (!any) return;
  }
  const int64_t stride = a.Wp + a.KX;
  const int64_t lo = a.v_lo[yp], len = a.v_len[yp];
  for (int64_t k = 0; k < len; ++k) {
    const float wk = a.v_w[yp * a.KY + k];
    float* dst = w.z[o].data() + (lo + k) * stride;
    for (int64_t x = 0; x < a.Wp; ++x) dst[x] += wk * b[x];
    w.touched[o][static_cast<size_t>(lo + k)] = 1;
  }
}

// weights = z Ux (a band dot per feature pixel) for the touched rows; clears z.
void project(const MaskPoolArgs& a, Work& w, int o, float* out) {
  const int64_t stride = a.Wp + a.KX;
  for (int64_t y = 0; y < a.H; ++y) {
    float* dst = out + y * a.W;
    if (!w.touched[o][static_cast<size_t>(y)]) {
      std::fill(dst, dst + a.W, 0.f);
      continue;
    }
    float* zr = w.z[o].data() + y * stride;
    for (int64_t x = 0; x < a.W; ++x) dst[x] = dot(a.h_w + x * a.KX, zr + a.h_lo[x], a.KX);
    std::fill(zr, zr + a.Wp, 0.f);
    w.touched[o][static_cast<size_t>(y)] = 0;
  }
}

// Byte masks on the pooling grid: `float(v) > thr`, `1 - float(v) > thr` and
// `!(float(v) > thr)` each select an interval [lo, hi] of byte values, so rows are
// counted with byte compares and only rows neither empty nor full become floats.
struct ByteRule {
  int lo = 256, hi = -1;  // empty when lo > hi
};

ByteRule byte_rule(float thr, int which) {
  ByteRule r;
  for (int v = 0; v < 256; ++v) {
    const float f = static_cast<float>(v);
    const bool in = which == kComplementOverlap ? (1.0f - f) > thr
                    : which == kComplementPartition ? !(f > thr)
                                                    : f > thr;
    if (in) {
      r.lo = std::min(r.lo, v);
      r.hi = std::max(r.hi, v);
    }
  }
  return r;
}

int64_t count_bytes(const uint8_t* s, int64_t n, ByteRule r) {
  if (r.lo > r.hi) return 0;
  int64_t c = 0, i = 0;
#if defined(__AVX2__)
  const __m256i lo = _mm256_set1_epi8(static_cast<char>(r.lo)), hi = _mm256_set1_epi8(static_cast<char>(r.hi));
  while (i + 32 <= n) {
    __m256i acc = _mm256_setzero_si256();  // per-byte counters, flushed before they can wrap
    for (int it = 0; it < 255 && i + 32 <= n; ++it, i += 32) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i));
      const __m256i in = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_max_epu8(x, lo), x),
                                          _mm256_cmpeq_epi8(_mm256_min_epu8(x, hi), x));
      acc = _mm256_sub_epi8(acc, in);
    }
    const __m256i sums = _mm256_sad_epu8(acc, _mm256_setzero_si256());
    c += _mm256_extract_epi64(sums, 0) + _mm256_extract_epi64(sums, 1) + _mm256_extract_epi64(sums, 2) +
         _mm256_extract_epi64(sums, 3);
  }
#endif
  for (; i < n; ++i) c += s[i] >= r.lo && s[i] <= r.hi;
  return c;
}

void pool_one(const MaskPoolArgs& a, Work& w, int64_t n) {
  const int nout = a.complement == kComplementNone ? 1 : 2;
  const int64_t HW = a.H * a.W;
  float* out = a.weights + n * nout * HW;
  w.reset();
  double total[2] = {0.0, 0.0};
  if (a.mode == kResizeIdentity && a.hard && a.mask_dtype == kMaskU8) {
    const ByteRule rules[2] = {byte_rule(a.threshold, kComplementNone), byte_rule(a.threshold, a.complement)};
    const uint8_t* bytes = static_cast<const uint8_t*>(a.masks) + n * a.Hm * a.Wm;
    for (int64_t yp = 0; yp < a.Hp; ++yp) {
      const uint8_t* src = bytes + yp * a.Wm;
      for (int o = 0; o < nout; ++o) {
        const ByteRule r = rules[o];
        const int64_t c = count_bytes(src, a.Wp, r);
        total[o] += static_cast<double>(c);
        if (c == 0) continue;
        float* b = w.ones.data();
        if (c < a.Wp) {
          b = w.b[o].data();
          for (int64_t x = 0; x < a.Wp; ++x) b[x] = (src[x] >= r.lo && src[x] <= r.hi) ? 1.f : 0.f;
        }
        accumulate_row(a, w, o, yp, b, static_cast<double>(c));
      }
    }
  } else {
    const bool om = a.complement == kComplementOverlap;
    for (int64_t yp = 0; yp < a.Hp; ++yp) {
      resize_row(a, w, n, yp, om);
      for (int o = 0; o < nout; ++o) {
        float* b = w.b[o].data();
        const double sum = select_row(a, w, o, b);
        total[o] += sum;
        accumulate_row(a, w, o, yp, b, sum);
      }
    }
  }
  for (int o = 0; o < nout; ++o) {
    project(a, w, o, out + o * HW);
    a.counts[n * nout + o] = static_cast<float>(total[o]);
  }
}

}  // namespace

bool mask_pool_weights_kernel(const MaskPoolArgs& a, int nthreads) {
  bool ok = true;
#pragma omp parallel num_threads(nthreads)
  {
    Work* w = nullptr;
    try {
      w = new Work(a);
    } catch (...) {
#pragma omp atomic write
      ok = false;
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t n = 0; n < a.N; ++n)
      if (w) pool_one(a, *w, n);
    delete w;
  }
  return ok;
}

bool mask_resize_kernel(const MaskPoolArgs& a, int nthreads) {
  bool ok = true;
#pragma omp parallel num_threads(nthreads)
  {
    Work* w = nullptr;
    try {
      w = new Work(a);
    } catch (...) {
#pragma omp atomic write
      ok = false;
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t n = 0; n < a.N; ++n) {
      if (!w) continue;
      w->reset();
      for (int64_t yp = 0; yp < a.Hp; ++yp) {
        resize_row(a, *w, n, yp, a.one_minus);
        const float* src = a.one_minus ? w->vc.data() : w->v.data();
        std::memcpy(a.resized + (n * a.Hp + yp) * a.Wp, src, sizeof(float) * static_cast<size_t>(a.Wp));
      }
    }
    delete w;
  }
  return ok;
}

}  // namespace FASTAD_ISA_NS
}  // namespace fastad
