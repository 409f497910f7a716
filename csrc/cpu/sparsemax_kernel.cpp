// Sparsemax and the DictAS dictionary lookup on the CPU, compiled once per ISA.
//
// sparsemax_rows: exact sparsemax of each row by partial selection. The
//   threshold tau lies in [max - 1, max), so only entries above max - 1 can be
//   in the support; tau is found on those candidates by Michelot's fixed point,
//   never by sorting the row.
// dict_topk: logits q . k * scale of every row against every key by a blocked
//   fp32 FMA GEMM (6 x 16 register tile, packed panels, KC-deep passes), fused
//   with a running per-row top-K; the N x M logits are never stored.
// dict_gather / dict_sparse_backward: the weighted sum of the few supported
//   values and the sparse backward, O(rows * k * C).
// dict_softmax_fwd: online-softmax (flash-style) lookup over key blocks.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <utility>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace fastad {
namespace FASTAD_ISA_NS {

namespace {

constexpr int kF32 = 0, kF16 = 1, kBF16 = 2;  // csrc/common.h DType
constexpr int MR = 6;    // query rows per register tile
constexpr int NR = 16;   // keys per register tile
constexpr int NC = 64;   // keys per packed block: NC * C floats stay in L2
constexpr int KC = 256;  // depth per pass: the 16 x KC key slice stays in L1 across query panels
constexpr int PB = 16;   // query panels per row block: their 6 x KC slices (96 KiB) stay in L2
constexpr int64_t RC = 2304;  // query rows packed at a time (bounds the packed copy)
constexpr float kInf = std::numeric_limits<float>::infinity();

// 64-byte aligned float buffer (the packed panels are read with aligned loads).
struct FloatBuf {
  std::unique_ptr<float[]> raw;
  float* p = nullptr;
  explicit FloatBuf(int64_t n = 0) { resize(n); }
  void resize(int64_t n) {
    raw.reset(new float[static_cast<size_t>(n) + 16]);
    const uintptr_t a = reinterpret_cast<uintptr_t>(raw.get());
    p = reinterpret_cast<float*>((a + 63) & ~static_cast<uintptr_t>(63));
  }
};

inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  uint32_t u;
  if (e == 0) {
    const float f = static_cast<float>(m) * 5.9604644775390625e-8f;  // subnormal: m * 2^-24
    std::memcpy(&u, &f, 4);
    u |= sign;
  } else if (e == 31) {
    u = sign | 0x7f800000u | (m << 13);
  } else {
    u = sign | ((e + 112u) << 23) | (m << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

inline float bf16_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// dst[0:n] = float(src[off : off + n]) for any of the three input dtypes.
void load_f32(const void* src, int dtype, int64_t off, int64_t n, float* dst) {
  if (dtype == kF32) {
    std::memcpy(dst, static_cast<const float*>(src) + off, static_cast<size_t>(n) * sizeof(float));
    return;
  }
  const uint16_t* s = static_cast<const uint16_t*>(src) + off;
  int64_t i = 0;
  if (dtype == kF16) {
#if defined(__F16C__) && defined(__AVX2__)
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
#endif
    for (; i < n; ++i) dst[i] = half_to_float(s[i]);
  } else {
    for (; i < n; ++i) dst[i] = bf16_to_float(s[i]);
  }
}

// ---------------------------------------------------------------------------
// sparsemax of one row

// Threshold (of the max-shifted values d = x - max) from the candidates
// d > -1, which hold the whole support (tau >= max - 1). Michelot's fixed
// point: tau = (sum_S d - 1) / |S| over S = {d > previous tau} increases to the
// exact threshold; every pass either drops a candidate or ends.
float threshold_from_candidates(float* d, int64_t n) {
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) sum += d[i];
  double tau = (sum - 1.0) / static_cast<double>(n);
  for (;;) {
    sum = 0.0;
    int64_t kept = 0;
    for (int64_t i = 0; i < n; ++i) {
      if (static_cast<double>(d[i]) > tau) {
        sum += d[i];
        d[kept++] = d[i];
      }
    }
    if (kept == n) return static_cast<float>(tau);
    n = kept;  // >= 1: the maximum (d = 0) stays, tau < 0
    tau = (sum - 1.0) / static_cast<double>(n);
  }
}

// 0 = ok, 1 = NaN or +inf, 2 = every entry -inf.
int sparsemax_row(const float* x, int64_t L, float* y, float* cand) {
  float mx = -kInf;
  bool nan = false;
  int64_t i = 0;
#if defined(__AVX2__)
  __m256 vmx = _mm256_set1_ps(-kInf), vnan = _mm256_setzero_ps();
  for (; i + 8 <= L; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    vmx = _mm256_max_ps(vmx, v);
    vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  alignas(32) float t[8];
  _mm256_store_ps(t, vmx);
  for (int j = 0; j < 8; ++j) mx = t[j] > mx ? t[j] : mx;
  nan = _mm256_movemask_ps(vnan) != 0;
#endif
  for (; i < L; ++i) {
    mx = x[i] > mx ? x[i] : mx;
    nan |= x[i] != x[i];
  }
  if (nan || mx == kInf) return 1;
  if (mx == -kInf) return 2;
  int64_t n = 0;
  i = 0;
#if defined(__AVX2__)
  const __m256 vm = _mm256_set1_ps(mx), lo = _mm256_set1_ps(-1.0f);
  for (; i + 8 <= L; i += 8) {
    const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(x + i), vm);
    unsigned bits = static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(d, lo, _CMP_GT_OQ)));
    while (bits) {
      const int j = __builtin_ctz(bits);
      bits &= bits - 1;
      cand[n++] = x[i + j] - mx;
    }
  }
#endif
  for (; i < L; ++i) {
    const float d = x[i] - mx;
    if (d > -1.0f) cand[n++] = d;
  }
  const float tau = threshold_from_candidates(cand, n);
  i = 0;
#if defined(__AVX2__)
  const __m256 vt = _mm256_set1_ps(tau), zero = _mm256_setzero_ps();
  for (; i + 8 <= L; i += 8)
    _mm256_storeu_ps(y + i, _mm256_max_ps(_mm256_sub_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm), vt), zero));
#endif
  for (; i < L; ++i) {
    const float v = (x[i] - mx) - tau;
    y[i] = v > 0.0f ? v : 0.0f;
  }
  return 0;
}

// ---------------------------------------------------------------------------
// GEMM pieces: packed panels and the register tile

// dst[k * width + i] = float(rows[i][k]) for the first `nrows` rows, 0 for the rest.
void pack_panel(const void* src, int dtype, int64_t row0, int64_t nrows, int64_t C, int width, float* dst,
                float* tmp) {
  for (int i = 0; i < width; ++i) {
    if (i < nrows) {
      load_f32(src, dtype, (row0 + i) * C, C, tmp);
      for (int64_t k = 0; k < C; ++k) dst[k * width + i] = tmp[k];
    } else {
      for (int64_t k = 0; k < C; ++k) dst[k * width + i] = 0.0f;
    }
  }
}

// tile[6][16] (+)= A(6 x C, packed) . B(C x 16, packed); A and B advance by
// 6 and 16 floats per step of depth.
void micro_6x16(const float* A, const float* B, int64_t C, float* tile, bool accumulate) {
#if defined(__AVX2__)
  __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps(), c10 = _mm256_setzero_ps(),
         c11 = _mm256_setzero_ps(), c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps(),
         c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps(), c40 = _mm256_setzero_ps(),
         c41 = _mm256_setzero_ps(), c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps();
  if (accumulate) {
    c00 = _mm256_load_ps(tile + 0);
    c01 = _mm256_load_ps(tile + 8);
    c10 = _mm256_load_ps(tile + 16);
    c11 = _mm256_load_ps(tile + 24);
    c20 = _mm256_load_ps(tile + 32);
    c21 = _mm256_load_ps(tile + 40);
    c30 = _mm256_load_ps(tile + 48);
    c31 = _mm256_load_ps(tile + 56);
    c40 = _mm256_load_ps(tile + 64);
    c41 = _mm256_load_ps(tile + 72);
    c50 = _mm256_load_ps(tile + 80);
    c51 = _mm256_load_ps(tile + 88);
  }
#pragma GCC unroll 4
  for (int64_t k = 0; k < C; ++k) {
    const __m256 b0 = _mm256_load_ps(B), b1 = _mm256_load_ps(B + 8);
    __m256 a = _mm256_broadcast_ss(A);
    c00 = _mm256_fmadd_ps(a, b0, c00);
    c01 = _mm256_fmadd_ps(a, b1, c01);
    a = _mm256_broadcast_ss(A + 1);
    c10 = _mm256_fmadd_ps(a, b0, c10);
    c11 = _mm256_fmadd_ps(a, b1, c11);
    a = _mm256_broadcast_ss(A + 2);
    c20 = _mm256_fmadd_ps(a, b0, c20);
    c21 = _mm256_fmadd_ps(a, b1, c21);
    a = _mm256_broadcast_ss(A + 3);
    c30 = _mm256_fmadd_ps(a, b0, c30);
    c31 = _mm256_fmadd_ps(a, b1, c31);
    a = _mm256_broadcast_ss(A + 4);
    c40 = _mm256_fmadd_ps(a, b0, c40);
    c41 = _mm256_fmadd_ps(a, b1, c41);
    a = _mm256_broadcast_ss(A + 5);
    c50 = _mm256_fmadd_ps(a, b0, c50);
    c51 = _mm256_fmadd_ps(a, b1, c51);
    A += MR;
    B += NR;
  }
  _mm256_store_ps(tile + 0, c00);
  _mm256_store_ps(tile + 8, c01);
  _mm256_store_ps(tile + 16, c10);
  _mm256_store_ps(tile + 24, c11);
  _mm256_store_ps(tile + 32, c20);
  _mm256_store_ps(tile + 40, c21);
  _mm256_store_ps(tile + 48, c30);
  _mm256_store_ps(tile + 56, c31);
  _mm256_store_ps(tile + 64, c40);
  _mm256_store_ps(tile + 72, c41);
  _mm256_store_ps(tile + 80, c50);
  _mm256_store_ps(tile + 88, c51);
#else
  float acc[MR * NR] = {0.0f};
  if (accumulate) std::memcpy(acc, tile, sizeof(acc));
  for (int64_t k = 0; k < C; ++k) {
    for (int i = 0; i < MR; ++i) {
      const float a = A[k * MR + i];
      for (int j = 0; j < NR; ++j) acc[i * NR + j] += a * B[k * NR + j];
    }
  }
  std::memcpy(tile, acc, sizeof(acc));
#endif
}

#if defined(__AVX2__)
// micro_6x16 for two query panels at once with 512-bit vectors where the CPU has
// AVX-512F (a 16-key panel is one vector; 12 FMA chains share each key load): the
// same fused multiply-adds in the same order, so the same logits, at up to twice
// the rate of the 8-wide tile.
__attribute__((target("avx512f"))) void micro_12x16_512(const float* A0, const float* A1, const float* B, int64_t C,
                                                         float* tile0, float* tile1, bool accumulate) {
  __m512 c0[MR], c1[MR];
  for (int i = 0; i < MR; ++i) {
    c0[i] = accumulate ? _mm512_load_ps(tile0 + NR * i) : _mm512_setzero_ps();
    c1[i] = accumulate ? _mm512_load_ps(tile1 + NR * i) : _mm512_setzero_ps();
  }
#pragma GCC unroll 2
  for (int64_t k = 0; k < C; ++k) {
    const __m512 b = _mm512_load_ps(B + NR * k);
    for (int i = 0; i < MR; ++i) {
      c0[i] = _mm512_fmadd_ps(_mm512_set1_ps(A0[MR * k + i]), b, c0[i]);
      c1[i] = _mm512_fmadd_ps(_mm512_set1_ps(A1[MR * k + i]), b, c1[i]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    _mm512_store_ps(tile0 + NR * i, c0[i]);
    _mm512_store_ps(tile1 + NR * i, c1[i]);
  }
}

// Whether the logit tiles run 512 bits wide: the CPU has AVX-512F and
// FASTAD_CPU_WIDE_TILES is not "0" (as the nn_distance kernel).
bool wide_tiles() {
  static const bool cpu = __builtin_cpu_supports("avx512f");
  const char* env = std::getenv("FASTAD_CPU_WIDE_TILES");
  return cpu && !(env && env[0] == '0' && env[1] == '\0');
}
#else
bool wide_tiles() { return false; }
void micro_12x16_512(const float*, const float*, const float*, int64_t, float*, float*, bool) {}
#endif

// 16-bit masks over a 16-key tile row: bit j set where z[j] > thr, and where z[j] is not finite.
inline unsigned above_bits(const float* z, float thr, unsigned* nonfinite) {
#if defined(__AVX2__)
  const __m256 t = _mm256_set1_ps(thr), inf = _mm256_set1_ps(kInf);
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 z0 = _mm256_load_ps(z), z1 = _mm256_load_ps(z + 8);
  const unsigned gt = static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(z0, t, _CMP_GT_OQ))) |
                      (static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(z1, t, _CMP_GT_OQ))) << 8);
  *nonfinite =
      static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_and_ps(z0, absmask), inf, _CMP_NLT_UQ))) |
      (static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_and_ps(z1, absmask), inf, _CMP_NLT_UQ)))
       << 8);
  return gt;
#else
  unsigned gt = 0, bad = 0;
  for (int j = 0; j < NR; ++j) {
    gt |= static_cast<unsigned>(z[j] > thr) << j;
    bad |= static_cast<unsigned>(!(std::fabs(z[j]) < kInf)) << j;
  }
  *nonfinite = bad;
  return gt;
#endif
}

// Running top-K of one thread for a chunk of rows: an unsorted buffer of
// cap = K + max(K / 2, 16) slots per row that takes every logit above the row's
// threshold; when it is full, a partial selection keeps the best K (value
// descending, key ascending) and the threshold becomes the K-th value. Amortised
// O(1) per entry for any K (a replace-the-worst slot array costs O(K) per entry,
// which is what large K -- wide sparsemax supports -- cannot afford).
struct TopK {
  int K = 0, cap = 0;
  std::vector<float> val;
  std::vector<int32_t> idx;
  std::vector<int32_t> cnt;
  std::vector<float> thr;  // value a logit must exceed to enter (-inf until K are kept)
  std::vector<std::pair<float, int32_t>> tmp;

  void allocate(int64_t rows, int k) {
    K = k;
    cap = k + std::max(k / 2, 16);
    val.resize(static_cast<size_t>(rows * cap));
    idx.resize(static_cast<size_t>(rows * cap));
    cnt.resize(static_cast<size_t>(rows));
    thr.resize(static_cast<size_t>(rows));
    tmp.resize(static_cast<size_t>(cap));
  }
  // Empties the first `rows` rows (no allocation: safe inside OpenMP regions).
  void reset(int64_t rows) {
    std::fill(cnt.begin(), cnt.begin() + rows, 0);
    std::fill(thr.begin(), thr.begin() + rows, -kInf);
  }
  // Keeps the best K entries of row r (no-op below K); the threshold becomes the K-th.
  void compact(int64_t r) {
    int32_t& c = cnt[static_cast<size_t>(r)];
    if (c < K) return;
    float* v = &val[static_cast<size_t>(r * cap)];
    int32_t* ix = &idx[static_cast<size_t>(r * cap)];
    for (int s = 0; s < c; ++s) tmp[static_cast<size_t>(s)] = {v[s], ix[s]};
    auto better = [](const std::pair<float, int32_t>& a, const std::pair<float, int32_t>& b) {
      return a.first > b.first || (a.first == b.first && a.second < b.second);
    };
    std::nth_element(tmp.begin(), tmp.begin() + (K - 1), tmp.begin() + c, better);
    for (int s = 0; s < K; ++s) {
      v[s] = tmp[static_cast<size_t>(s)].first;
      ix[s] = tmp[static_cast<size_t>(s)].second;
    }
    c = K;
    thr[static_cast<size_t>(r)] = v[K - 1];
  }
  // Keys arrive in increasing order per row and the K kept are the lowest keys among
  // equals, so `z > thr` keeps the lowest index among ties.
  void push(int64_t r, float z, int32_t key) {
    int32_t& c = cnt[static_cast<size_t>(r)];
    const size_t base = static_cast<size_t>(r * cap);
    val[base + c] = z;
    idx[base + c] = key;
    ++c;
    if (c == K && thr[static_cast<size_t>(r)] == -kInf) {
      // first time K are held: the threshold is the worst of them
      float m = val[base];
      for (int s = 1; s < K; ++s) m = std::min(m, val[base + s]);
      thr[static_cast<size_t>(r)] = m;
    } else if (c == cap) {
      compact(r);
    }
  }
};

// Logit tiles of query panels [p0, p1) against the npk key micro-panels of a
// packed block: cb[((p - p0) * npk_max + jp) * 96 ...] = the 6 x 16 tile, unscaled.
// One pass per KC-deep slice: a key slice is reused from L1 by every panel.
void block_logits(const float* qp, const float* kb, int64_t C, int64_t p0, int64_t p1, int npk, int npk_max,
                  const uint16_t* vbits, float* cb, bool wide) {
  for (int64_t c0 = 0; c0 == 0 || c0 < C; c0 += KC) {
    const int64_t kc = std::min<int64_t>(KC, C - c0);
    for (int jp = 0; jp < npk; ++jp) {
      if (!vbits[jp]) continue;
      const float* B = kb + static_cast<int64_t>(jp) * NR * C + c0 * NR;
      int64_t p = p0;
      for (; wide && p + 1 < p1; p += 2)
        micro_12x16_512(qp + p * MR * C + c0 * MR, qp + (p + 1) * MR * C + c0 * MR, B, kc,
                        cb + ((p - p0) * npk_max + jp) * MR * NR, cb + ((p + 1 - p0) * npk_max + jp) * MR * NR, c0 > 0);
      for (; p < p1; ++p)
        micro_6x16(qp + p * MR * C + c0 * MR, B, kc, cb + ((p - p0) * npk_max + jp) * MR * NR, c0 > 0);
    }
  }
}

}  // namespace

// ---------------------------------------------------------------------------
// entry points (declared with FASTAD_DECLARE_KERNEL in csrc/sparsemax.cpp)

// y[R, L] = sparsemax of each row of x. Returns 0, or 1 (NaN / +inf) / 2 (row of
// -inf only) with the first such row in *bad_row.
int sparsemax_rows(const void* x, int dtype, int64_t R, int64_t L, float* y, int nthreads, int64_t* bad_row) {
  int status = 0;
  int64_t first_bad = R;
  const int T = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nthreads, R)));
  std::vector<FloatBuf> bufs;
  for (int t = 0; t < T; ++t) bufs.emplace_back(2 * L);
#pragma omp parallel num_threads(T)
  {
    float* row = bufs[static_cast<size_t>(omp_get_thread_num())].p;
    float* cand = row + L;
#pragma omp for schedule(dynamic, 16)
    for (int64_t r = 0; r < R; ++r) {
      const float* xr;
      if (dtype == kF32) {
        xr = static_cast<const float*>(x) + r * L;
      } else {
        load_f32(x, dtype, r * L, L, row);
        xr = row;
      }
      const int s = sparsemax_row(xr, L, y + r * L, cand);
      if (s != 0) {
#pragma omp critical(fastad_sparsemax_status)
        if (r < first_bad) {
          first_bad = r;
          status = s;
        }
      }
    }
  }
  *bad_row = first_bad;
  return status;
}

// Top-K logits (q . k * scale) of each of R rows against M keys (keys with
// mask[j] == 0 are skipped). vals[R, K] sorted descending (ties: lower key
// first), idx[R, K] the keys; empty slots hold -inf / -1. Returns 0, or 1 when
// a logit of an unmasked key is NaN or infinite.
int dict_topk(const void* q, int qdt, int64_t R, int64_t C, const void* keys, int kdt, int64_t M,
              const uint8_t* mask, float scale, int K, float* out_vals, int64_t* out_idx, int nthreads) {
  const int T = std::max(1, nthreads);
  // rows per chunk: the packed copy and, for large K, the top-K buffers (about 2^20
  // slots per thread) bound it
  const int64_t kcap = K + std::max(K / 2, 16);
  const int64_t rc_step = std::min<int64_t>(RC, std::max<int64_t>(16 * MR, (int64_t(1) << 20) / kcap / MR * MR));
  const int64_t rc_max = std::min<int64_t>(R, rc_step);
  const int64_t panels_max = (rc_max + MR - 1) / MR;
  FloatBuf qp(panels_max * MR * C);
  std::vector<FloatBuf> kp, tmp, cbuf;
  std::vector<TopK> tops(static_cast<size_t>(T));
  std::vector<std::vector<uint16_t>> vbits(static_cast<size_t>(T), std::vector<uint16_t>(NC / NR));
  for (int t = 0; t < T; ++t) {
    kp.emplace_back(static_cast<int64_t>(NC) * C);
    tmp.emplace_back(C);
    cbuf.emplace_back(static_cast<int64_t>(PB) * (NC / NR) * MR * NR);
    tops[static_cast<size_t>(t)].allocate(rc_max, K);
  }
  std::vector<int> bad(static_cast<size_t>(T), 0);
  using Entry = std::pair<float, int64_t>;
  const int cap = static_cast<int>(kcap);
  std::vector<std::vector<Entry>> merge(static_cast<size_t>(T), std::vector<Entry>(static_cast<size_t>(T * cap)));
  const int64_t nblocks = (M + NC - 1) / NC;
  const bool wide = wide_tiles();

  for (int64_t r0 = 0; r0 < R; r0 += rc_step) {
    const int64_t rc = std::min<int64_t>(rc_step, R - r0);
    const int64_t npanels = (rc + MR - 1) / MR;
#pragma omp parallel num_threads(T)
    {
      const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
      float* tb = tmp[static_cast<size_t>(tid)].p;
#pragma omp for schedule(static)
      for (int64_t p = 0; p < npanels; ++p)
        pack_panel(q, qdt, r0 + p * MR, std::min<int64_t>(MR, rc - p * MR), C, MR, qp.p + p * MR * C, tb);

      // Split the keys between threads when there are enough, else the rows;
      // a thread meets the keys of each row in increasing order either way.
      int64_t p_lo = 0, p_hi = npanels, b_lo = 0, b_hi = nblocks;
      if (nblocks >= nt) {
        b_lo = nblocks * tid / nt;
        b_hi = nblocks * (tid + 1) / nt;
      } else {
        p_lo = npanels * tid / nt;
        p_hi = npanels * (tid + 1) / nt;
      }
      TopK& top = tops[static_cast<size_t>(tid)];
      top.reset(rc);
      float* kb = kp[static_cast<size_t>(tid)].p;
      uint16_t* vb = vbits[static_cast<size_t>(tid)].data();
      float* cb = cbuf[static_cast<size_t>(tid)].p;
      int nonfinite = 0;
      for (int64_t blk = b_lo; blk < b_hi && p_lo < p_hi; ++blk) {
        const int64_t j0 = blk * NC;
        const int64_t nk = std::min<int64_t>(NC, M - j0);
        const int npk = static_cast<int>((nk + NR - 1) / NR);
        for (int jp = 0; jp < npk; ++jp) {
          const int64_t kj = j0 + jp * NR;
          const int64_t cnt = std::min<int64_t>(NR, M - kj);
          pack_panel(keys, kdt, kj, cnt, C, NR, kb + static_cast<int64_t>(jp) * NR * C, tb);
          unsigned bits = 0;
          for (int j = 0; j < cnt; ++j)
            if (mask == nullptr || mask[kj + j]) bits |= 1u << j;
          vb[jp] = static_cast<uint16_t>(bits);
        }
        for (int64_t p0 = p_lo; p0 < p_hi; p0 += PB) {
          const int64_t p1 = std::min<int64_t>(p_hi, p0 + PB);
          block_logits(qp.p, kb, C, p0, p1, npk, NC / NR, vb, cb, wide);
          for (int64_t p = p0; p < p1; ++p) {
            const int nrows = static_cast<int>(std::min<int64_t>(MR, rc - p * MR));
            for (int jp = 0; jp < npk; ++jp) {
              const unsigned valid = vb[jp];
              if (!valid) continue;
              float* tile = cb + ((p - p0) * (NC / NR) + jp) * MR * NR;
              for (int i = 0; i < MR * NR; ++i) tile[i] *= scale;
              const int32_t key0 = static_cast<int32_t>(j0 + jp * NR);
              for (int i = 0; i < nrows; ++i) {
                const int64_t row = p * MR + i;
                const float* z = tile + i * NR;
                unsigned nf = 0;
                unsigned b = above_bits(z, top.thr[static_cast<size_t>(row)], &nf) & valid;
                nonfinite |= static_cast<int>((nf & valid) != 0);
                while (b) {
                  const int j = __builtin_ctz(b);
                  b &= b - 1;
                  if (z[j] > top.thr[static_cast<size_t>(row)]) top.push(row, z[j], key0 + j);
                }
              }
            }
          }
        }
      }
      bad[static_cast<size_t>(tid)] |= nonfinite;
#pragma omp barrier
#pragma omp for schedule(static)
      for (int64_t row = 0; row < rc; ++row) {
        // Every thread's entries for this row; keep the best K by (value
        // descending, key ascending).
        Entry* all = merge[static_cast<size_t>(tid)].data();
        int total = 0;
        for (int t = 0; t < nt; ++t) {
          const TopK& tk = tops[static_cast<size_t>(t)];
          const int c = tk.cnt[static_cast<size_t>(row)];
          for (int s = 0; s < c; ++s)
            all[total++] = Entry(tk.val[static_cast<size_t>(row * cap + s)], tk.idx[static_cast<size_t>(row * cap + s)]);
        }
        auto better = [](const Entry& a, const Entry& b) {
          return a.first > b.first || (a.first == b.first && a.second < b.second);
        };
        if (total > K) std::nth_element(all, all + (K - 1), all + total, better);
        std::sort(all, all + std::min(total, K), better);
        float* ov = out_vals + (r0 + row) * K;
        int64_t* oi = out_idx + (r0 + row) * K;
        for (int s = 0; s < K; ++s) {
          if (s < total) {
            ov[s] = all[s].first;
            oi[s] = all[s].second;
          } else {
            ov[s] = -kInf;
            oi[s] = -1;
          }
        }
      }
    }
  }
  for (int b : bad)
    if (b) return 1;
  return 0;
}


// out[r] = sum_s w[r, s] * values[b(r), idx[r, s]] over the slots with idx >= 0
// and w != 0; b(r) = r / rows_per_batch when values are batched (Bv > 1).
void dict_gather(const float* w, const int64_t* idx, int64_t R, int64_t kk, int64_t rows_per_batch,
                 const void* v, int vdt, int64_t Bv, int64_t M, int64_t Cv, float* out, int nthreads) {
  const int T = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nthreads, R)));
  std::vector<FloatBuf> bufs;
  for (int t = 0; t < T; ++t) bufs.emplace_back(Cv);
#pragma omp parallel for num_threads(T) schedule(static)
  for (int64_t r = 0; r < R; ++r) {
    float* buf = bufs[static_cast<size_t>(omp_get_thread_num())].p;
    float* o = out + r * Cv;
    std::fill(o, o + Cv, 0.0f);
    const int64_t vb = Bv == 1 ? 0 : r / rows_per_batch;
    for (int64_t s = 0; s < kk; ++s) {
      const int64_t j = idx[r * kk + s];
      const float ws = w[r * kk + s];
      if (j < 0 || ws == 0.0f) continue;
      const float* vr;
      if (vdt == kF32) {
        vr = static_cast<const float*>(v) + (vb * M + j) * Cv;
      } else {
        load_f32(v, vdt, (vb * M + j) * Cv, Cv, buf);
        vr = buf;
      }
      for (int64_t c = 0; c < Cv; ++c) o[c] += ws * vr[c];
    }
  }
}

namespace {

// Compressed lists of the support entries e = r * kk + s per key row
// (batch(r) * M + idx), so that key gradients are sums without atomics.
void support_lists(const int64_t* idx, const float* w, int64_t R, int64_t kk, int64_t N, int64_t Bx, int64_t M,
                   std::vector<int64_t>& start, std::vector<int64_t>& entries) {
  start.assign(static_cast<size_t>(Bx * M + 1), 0);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t s = 0; s < kk; ++s) {
      const int64_t e = r * kk + s;
      if (idx[e] >= 0 && w[e] > 0.0f) ++start[static_cast<size_t>((Bx == 1 ? 0 : r / N) * M + idx[e] + 1)];
    }
  for (size_t i = 1; i < start.size(); ++i) start[i] += start[i - 1];
  entries.resize(static_cast<size_t>(start.back()));
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t s = 0; s < kk; ++s) {
      const int64_t e = r * kk + s;
      if (idx[e] >= 0 && w[e] > 0.0f)
        entries[static_cast<size_t>(fill[static_cast<size_t>((Bx == 1 ? 0 : r / N) * M + idx[e])]++)] = e;
    }
}

// dst[row] = sum over the listed entries e of coef[e] * src_row(e / kk), one
// destination row per list (rows with an empty list become 0).
void scatter_rows(const std::vector<int64_t>& start, const std::vector<int64_t>& entries, const float* coef,
                  int64_t kk, const void* src, int sdt, int64_t width, float* dst, int T,
                  std::vector<FloatBuf>& bufs) {
  const int64_t rows = static_cast<int64_t>(start.size()) - 1;
#pragma omp parallel for num_threads(T) schedule(dynamic, 64)
  for (int64_t j = 0; j < rows; ++j) {
    float* buf = bufs[static_cast<size_t>(omp_get_thread_num())].p;
    float* o = dst + j * width;
    std::fill(o, o + width, 0.0f);
    for (int64_t a = start[static_cast<size_t>(j)]; a < start[static_cast<size_t>(j) + 1]; ++a) {
      const int64_t e = entries[static_cast<size_t>(a)];
      const float c = coef[e];
      if (c == 0.0f) continue;
      const float* x;
      if (sdt == kF32) {
        x = static_cast<const float*>(src) + (e / kk) * width;
      } else {
        load_f32(src, sdt, (e / kk) * width, width, buf);
        x = buf;
      }
      for (int64_t i = 0; i < width; ++i) o[i] += c * x[i];
    }
  }
}

}  // namespace

// Backward of the sparse lookup out[r] = sum_s w[r,s] V[idx[r,s]], w = sparsemax(z)
// on the support (sparsemax_mode) or one-hot (argmax: no gradient to q and k):
//   gw = g . V[idx];  gz = gw - mean_support(gw);  gq = scale * sum gz K[idx];
//   gK[idx] += scale * gz q;  gV[idx] += w g.
// q [B*N, C], k [Bk, M, C], v [Bv, M, Cv] (one dtype), g [B*N, Cv] float32.
void dict_sparse_backward(const void* q, const void* k, const void* v, int dt, int64_t B, int64_t N, int64_t C,
                          int64_t Cv, int64_t M, int64_t Bk, int64_t Bv, const int64_t* idx, const float* w,
                          int64_t kk, const float* g, float scale, int sparsemax_mode, float* gq, float* gk,
                          float* gv, int nthreads) {
  const int64_t R = B * N;
  const int T = std::max(1, nthreads);
  std::vector<FloatBuf> bufs;
  for (int t = 0; t < T; ++t) bufs.emplace_back(std::max(C, Cv));
  std::vector<float> gz(static_cast<size_t>(R * kk), 0.0f);
  std::vector<float> gzs(static_cast<size_t>(R * kk), 0.0f);  // scale * gz: the key-side coefficient
#pragma omp parallel for num_threads(T) schedule(static)
  for (int64_t r = 0; r < R; ++r) {
    float* buf = bufs[static_cast<size_t>(omp_get_thread_num())].p;
    float* oq = gq + r * C;
    std::fill(oq, oq + C, 0.0f);
    if (!sparsemax_mode) continue;
    const int64_t kb = Bk == 1 ? 0 : r / N, vb = Bv == 1 ? 0 : r / N;
    const float* gr = g + r * Cv;
    double sum = 0.0;
    int64_t n = 0;
    for (int64_t s = 0; s < kk; ++s) {
      const int64_t e = r * kk + s;
      if (idx[e] < 0 || !(w[e] > 0.0f)) continue;
      const float* vr;
      if (dt == kF32) {
        vr = static_cast<const float*>(v) + (vb * M + idx[e]) * Cv;
      } else {
        load_f32(v, dt, (vb * M + idx[e]) * Cv, Cv, buf);
        vr = buf;
      }
      double d = 0.0;
      for (int64_t c = 0; c < Cv; ++c) d += static_cast<double>(gr[c]) * vr[c];
      gz[static_cast<size_t>(e)] = static_cast<float>(d);
      sum += d;
      ++n;
    }
    const float mean = n ? static_cast<float>(sum / static_cast<double>(n)) : 0.0f;
    for (int64_t s = 0; s < kk; ++s) {
      const int64_t e = r * kk + s;
      if (idx[e] < 0 || !(w[e] > 0.0f)) continue;
      const float z = gz[static_cast<size_t>(e)] - mean;
      gz[static_cast<size_t>(e)] = z;
      gzs[static_cast<size_t>(e)] = scale * z;
      const float* kr;
      if (dt == kF32) {
        kr = static_cast<const float*>(k) + (kb * M + idx[e]) * C;
      } else {
        load_f32(k, dt, (kb * M + idx[e]) * C, C, buf);
        kr = buf;
      }
      const float cz = scale * z;
      for (int64_t c = 0; c < C; ++c) oq[c] += cz * kr[c];
    }
  }
  std::vector<int64_t> start, entries;
  support_lists(idx, w, R, kk, N, Bk, M, start, entries);
  scatter_rows(start, entries, gzs.data(), kk, q, dt, C, gk, T, bufs);
  if (Bv != Bk) support_lists(idx, w, R, kk, N, Bv, M, start, entries);
  // gV rows: sum of w * g over the entries; g is float32 and indexed like q.
  scatter_rows(start, entries, w, kk, g, kF32, Cv, gv, T, bufs);
}

namespace {

// Keys per block of the softmax lookup: the packed key block and the value
// block (NCS x C and NCS x Cv floats) share L2.
constexpr int NCS = 32;

// exp of 8 lanes (Cephes expf: range reduction by ln 2, degree-5 polynomial;
// within 2 ulp of expf, exp(-inf) = 0).
#if defined(__AVX2__)
inline __m256 exp8(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.3762626647949f), lo = _mm256_set1_ps(-88.3762626647949f);
  const __m256 is_ninf = _mm256_cmp_ps(x, _mm256_set1_ps(-kInf), _CMP_EQ_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
  __m256 fx = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f));
  fx = _mm256_floor_ps(fx);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  const __m256 x2 = _mm256_mul_ps(x, x);
  y = _mm256_fmadd_ps(y, x2, _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
  return _mm256_andnot_ps(is_ninf, y);
}
#endif

// p[0:n] = exp(z[0:n] - m); returns their sum.
float exp_shift(const float* z, float m, int n, float* p) {
  int i = 0;
  float sum = 0.0f;
#if defined(__AVX2__)
  __m256 acc = _mm256_setzero_ps();
  const __m256 mv = _mm256_set1_ps(m);
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(z + i), mv));
    _mm256_storeu_ps(p + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  alignas(32) float t[8];
  _mm256_store_ps(t, acc);
  for (int j = 0; j < 8; ++j) sum += t[j];
#endif
  for (; i < n; ++i) {
    p[i] = std::exp(z[i] - m);
    sum += p[i];
  }
  return sum;
}

// Value block in 16-column strips: Vp[(s * nk + k) * 16 + j] = V[k][16 s + j]
// (zero padded), so that the P . V pass reads one contiguous stream per strip
// instead of nk row streams.
void pack_values(const void* v, int dt, int64_t j0, int nk, int64_t Cv, float* Vp, float* tmp) {
  const int64_t strips = (Cv + NR - 1) / NR;
  for (int k = 0; k < nk; ++k) {
    load_f32(v, dt, (j0 + k) * Cv, Cv, tmp);
    for (int64_t s = 0; s < strips; ++s) {
      float* d = Vp + (s * nk + k) * NR;
      const int64_t w = std::min<int64_t>(NR, Cv - s * NR);
      std::memcpy(d, tmp + s * NR, static_cast<size_t>(w) * sizeof(float));
      std::fill(d + w, d + NR, 0.0f);
    }
  }
}

// acc[i][0:Cv] += sum_k P[i][k] * V[k][0:Cv] for i < 6, k < nk (acc rows at
// stride Cv, V packed by pack_values).
void accumulate_pv(const float* P, int nk, const float* Vp, int64_t Cv, float* acc) {
  int64_t s = 0;
#if defined(__AVX2__)
  for (; (s + 1) * NR <= Cv; ++s) {
    const int64_t c = s * NR;
    const float* B = Vp + s * nk * NR;
    __m256 a[MR][2];
    for (int i = 0; i < MR; ++i) {
      a[i][0] = _mm256_loadu_ps(acc + i * Cv + c);
      a[i][1] = _mm256_loadu_ps(acc + i * Cv + c + 8);
    }
    for (int k = 0; k < nk; ++k) {
      const __m256 b0 = _mm256_load_ps(B + k * NR), b1 = _mm256_load_ps(B + k * NR + 8);
      for (int i = 0; i < MR; ++i) {
        const __m256 p = _mm256_broadcast_ss(P + i * NCS + k);
        a[i][0] = _mm256_fmadd_ps(p, b0, a[i][0]);
        a[i][1] = _mm256_fmadd_ps(p, b1, a[i][1]);
      }
    }
    for (int i = 0; i < MR; ++i) {
      _mm256_storeu_ps(acc + i * Cv + c, a[i][0]);
      _mm256_storeu_ps(acc + i * Cv + c + 8, a[i][1]);
    }
  }
#endif
  for (; s * NR < Cv; ++s) {
    const int64_t c = s * NR, w = std::min<int64_t>(NR, Cv - c);
    const float* B = Vp + s * nk * NR;
    for (int i = 0; i < MR; ++i)
      for (int k = 0; k < nk; ++k) {
        const float p = P[i * NCS + k];
        for (int64_t j = 0; j < w; ++j) acc[i * Cv + c + j] += p * B[k * NR + j];
      }
  }
}

}  // namespace

// Softmax lookup out[r] = softmax(q_r . K^T * scale) V for R rows against M keys
// and values of one batch item, online over blocks of keys (the logits of one
// 6-row x 64-key tile at a time); lse[r] = log-sum-exp of the row's logits.
// Returns 0, or 1 when a logit of an unmasked key is NaN or infinite.
int dict_softmax_fwd(const void* q, int dt, int64_t R, int64_t C, const void* keys, const void* values, int64_t M,
                     int64_t Cv, const uint8_t* mask, float scale, float* out, float* lse, int nthreads) {
  constexpr int64_t RS = 576;  // rows per pass: one accumulator [RS, Cv] per thread
  const bool wide = wide_tiles();
  const int T = std::max(1, nthreads);
  const int64_t rc_max = std::min<int64_t>(R, RS);
  const int64_t panels_max = (rc_max + MR - 1) / MR;
  FloatBuf qp(panels_max * MR * C);
  std::vector<FloatBuf> kp, vp, acc, tmp, cbuf;
  std::vector<std::vector<float>> mrow(static_cast<size_t>(T)), lrow(static_cast<size_t>(T));
  for (int t = 0; t < T; ++t) {
    kp.emplace_back(static_cast<int64_t>(NCS) * C);
    cbuf.emplace_back(static_cast<int64_t>(PB) * (NCS / NR) * MR * NR);
    vp.emplace_back(static_cast<int64_t>(NCS) * ((Cv + NR - 1) / NR) * NR);
    acc.emplace_back(panels_max * MR * Cv);
    tmp.emplace_back(std::max(C, Cv));
    mrow[static_cast<size_t>(t)].resize(static_cast<size_t>(panels_max * MR));
    lrow[static_cast<size_t>(t)].resize(static_cast<size_t>(panels_max * MR));
  }
  std::vector<int> bad(static_cast<size_t>(T), 0);
  const int64_t nblocks = (M + NCS - 1) / NCS;

  for (int64_t r0 = 0; r0 < R; r0 += RS) {
    const int64_t rc = std::min<int64_t>(RS, R - r0);
    const int64_t npanels = (rc + MR - 1) / MR;
#pragma omp parallel num_threads(T)
    {
      const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
      float* tb = tmp[static_cast<size_t>(tid)].p;
#pragma omp for schedule(static)
      for (int64_t p = 0; p < npanels; ++p)
        pack_panel(q, dt, r0 + p * MR, std::min<int64_t>(MR, rc - p * MR), C, MR, qp.p + p * MR * C, tb);
      int64_t p_lo = 0, p_hi = npanels, b_lo = 0, b_hi = nblocks;
      if (nblocks >= nt) {
        b_lo = nblocks * tid / nt;
        b_hi = nblocks * (tid + 1) / nt;
      } else {
        p_lo = npanels * tid / nt;
        p_hi = npanels * (tid + 1) / nt;
      }
      float* A = acc[static_cast<size_t>(tid)].p;
      float* mr = mrow[static_cast<size_t>(tid)].data();
      float* lr = lrow[static_cast<size_t>(tid)].data();
      std::fill(A, A + npanels * MR * Cv, 0.0f);
      std::fill(mr, mr + npanels * MR, -kInf);
      std::fill(lr, lr + npanels * MR, 0.0f);
      float* kb = kp[static_cast<size_t>(tid)].p;
      float* cb = cbuf[static_cast<size_t>(tid)].p;
      alignas(64) float z[MR * NCS];
      alignas(64) float P[MR * NCS];
      uint16_t vbits[NCS / NR];
      int nonfinite = 0;
      for (int64_t blk = b_lo; blk < b_hi && p_lo < p_hi; ++blk) {
        const int64_t j0 = blk * NCS;
        const int nk = static_cast<int>(std::min<int64_t>(NCS, M - j0));
        const int npk = (nk + NR - 1) / NR;
        for (int jp = 0; jp < npk; ++jp) {
          const int64_t kj = j0 + jp * NR;
          const int cnt = static_cast<int>(std::min<int64_t>(NR, M - kj));
          pack_panel(keys, dt, kj, cnt, C, NR, kb + static_cast<int64_t>(jp) * NR * C, tb);
          unsigned bits = 0;
          for (int j = 0; j < cnt; ++j)
            if (mask == nullptr || mask[kj + j]) bits |= 1u << j;
          vbits[jp] = static_cast<uint16_t>(bits);
        }
        const float* V = vp[static_cast<size_t>(tid)].p;
        pack_values(values, dt, j0, nk, Cv, vp[static_cast<size_t>(tid)].p, tb);
        for (int64_t p0 = p_lo; p0 < p_hi; p0 += PB) {
          const int64_t p1 = std::min<int64_t>(p_hi, p0 + PB);
          block_logits(qp.p, kb, C, p0, p1, npk, NCS / NR, vbits, cb, wide);
          for (int64_t p = p0; p < p1; ++p) {
            for (int jp = 0; jp < npk; ++jp) {
              const float* tile = cb + ((p - p0) * (NCS / NR) + jp) * MR * NR;
              for (int i = 0; i < MR; ++i)
                for (int j = 0; j < NR; ++j) {
                  const bool ok = (vbits[jp] >> j) & 1u;
                  const float v = tile[i * NR + j] * scale;
                  nonfinite |= static_cast<int>(ok && !(std::fabs(v) < kInf));
                  z[i * NCS + jp * NR + j] = ok ? v : -kInf;
                }
            }
            float* Ap = A + p * MR * Cv;
            for (int i = 0; i < MR; ++i) {
              const int64_t row = p * MR + i;
              float bm = -kInf;
              for (int j = 0; j < nk; ++j) bm = std::max(bm, z[i * NCS + j]);
              const float m_new = std::max(mr[row], bm);
              if (m_new == -kInf) {  // nothing unmasked yet in this row
                std::fill(P + i * NCS, P + i * NCS + nk, 0.0f);
                continue;
              }
              if (m_new > mr[row]) {
                const float alpha = mr[row] == -kInf ? 0.0f : std::exp(mr[row] - m_new);
                lr[row] *= alpha;
                float* ar = Ap + i * Cv;
                for (int64_t c = 0; c < Cv; ++c) ar[c] *= alpha;
                mr[row] = m_new;
              }
              lr[row] += exp_shift(z + i * NCS, m_new, nk, P + i * NCS);
            }
            accumulate_pv(P, nk, V, Cv, Ap);
          }
        }
      }
      bad[static_cast<size_t>(tid)] |= nonfinite;
#pragma omp barrier
#pragma omp for schedule(static)
      for (int64_t row = 0; row < rc; ++row) {
        float m = -kInf;
        for (int t = 0; t < nt; ++t) m = std::max(m, mrow[static_cast<size_t>(t)][static_cast<size_t>(row)]);
        float* o = out + (r0 + row) * Cv;
        std::fill(o, o + Cv, 0.0f);
        double l = 0.0;
        for (int t = 0; t < nt; ++t) {
          const float mt = mrow[static_cast<size_t>(t)][static_cast<size_t>(row)];
          if (mt == -kInf) continue;
          const float f = std::exp(mt - m);
          l += static_cast<double>(f) * lrow[static_cast<size_t>(t)][static_cast<size_t>(row)];
          const float* a = acc[static_cast<size_t>(t)].p + row * Cv;
          for (int64_t c = 0; c < Cv; ++c) o[c] += f * a[c];
        }
        const float inv = l > 0.0 ? static_cast<float>(1.0 / l) : 0.0f;
        for (int64_t c = 0; c < Cv; ++c) o[c] *= inv;
        lse[r0 + row] = l > 0.0 ? m + static_cast<float>(std::log(l)) : -kInf;
      }
    }
  }
  for (int b : bad)
    if (b) return 1;
  return 0;
}

// 1 when every element of x[0:n] is finite (fp16 / bf16 read as their bits).
int all_finite(const void* x, int dtype, int64_t n, int nthreads) {
  int ok = 1;
  const int T = std::max(1, nthreads);
  if (dtype == kF32) {
    const float* f = static_cast<const float*>(x);
#pragma omp parallel for num_threads(T) reduction(&& : ok) schedule(static)
    for (int64_t b = 0; b < n; b += 4096) {
      const int64_t e = std::min(n, b + 4096);
      float acc = 0.0f;  // x - x is NaN exactly for NaN and +-inf
      for (int64_t i = b; i < e; ++i) acc += f[i] - f[i];
      ok = ok && acc == 0.0f;
    }
  } else {
    // exponent all ones: 0x7c00 in float16, 0x7f80 in bfloat16
    const uint16_t* h = static_cast<const uint16_t*>(x);
    const uint16_t e = dtype == kF16 ? 0x7c00u : 0x7f80u;
#pragma omp parallel for num_threads(T) reduction(&& : ok) schedule(static)
    for (int64_t b = 0; b < n; b += 4096) {
      const int64_t end = std::min(n, b + 4096);
      int bad = 0;
      for (int64_t i = b; i < end; ++i) bad |= (h[i] & e) == e;
      ok = ok && !bad;
    }
  }
  return ok;
}
}  // namespace FASTAD_ISA_NS
}  // namespace fastad
