// Fused patch nearest-neighbour distance on the CPU (fastad.ops.nn_distance, backend "cpu").
//
// For every query row the kernel keeps the k best bank rows under a total order:
// score sigma descending, then bank index ascending (exact ties go to the lowest
// index). sigma is the metric turned into "larger is kept": cos, -d^2 or q.b, negated
// for the mean mode that keeps the other end. Nothing of size N x M is formed: tiles
// live in registers and caches, each query row has a running top-k buffer.
//
// Canonical arithmetic. Within one call every reported value is one fixed function of
// (query row, bank row), so an exact duplicate gets a bit-identical sigma wherever,
// and in whichever task, it is computed, and ties resolve by index as in the float64
// reference. Two summation orders are used, one per path:
//  (B) "chain": one fused multiply-add per channel in channel order (for l2 on the
//      difference q_c - b_c), as the blocked kernel computes it: 6 query rows are
//      broadcast against 16 bank rows (two 8-wide vectors) from packed panels, like a
//      BLAS sgemm microkernel. Used where the kernel's values are final.
//  (A) "dot layout": lane l of an 8-wide accumulator runs the chain of channels
//      c = l mod 8, then the lanes add in the fixed tree ((l0+l4)+(l2+l6)) +
//      ((l1+l5)+(l3+l7)). Eight scattered pairs per call run at load / FMA throughput,
//      so this is the re-rank of screened candidates.
// (The generic build multiplies, then adds.) Cosine: sigma = fl(s * inv|b|) with s the
// sum for q^ = fl(q * inv|q|) and b, inverse norms 1 / max(|x|, 1e-12) as F.normalize
// (a zero vector has cosine 0 to everything). Either sum is within gamma |q||b| of the
// real value (l2: gamma (|q| + |b|)^2), gamma = (C + 64) u * 1.05, u = 2^-24: a chain
// rounds at most C + 2 times, a dot-layout sum C/8 + 6 times.
//
// Paths (all exact; NNPath forces one, auto picks by size, C and k):
//  * fp32 exact (B): cosine / ip, l2 "direct" (when many l2 candidates would pass a
//    screen), and every fp32 selection from a tile (below).
//  * fp32 screen (B screens, A reports): the blocked kernel's D = fl(q . b) bounds
//    sigma: U = h (g D) + alpha_i P_j + c_j + e_i >= sigma with, for cosine / ip,
//    h = sgn, g = inv|b| (cosine) or 1, alpha P = 3 gamma |q^||b^| (|q||b| for ip;
//    covers D's error and the re-rank sum's), and for l2 (Gram form)
//    U = 2 sgn D - sgn (|b|^2 + |q|^2) + 4 gamma |q||b| + gamma (|q|^2 + |b|^2),
//    which also covers the distance to the difference form (no cancellation in the
//    reported values, near-duplicates included). Pairs whose U reaches the row
//    threshold T (the k-th best exact sigma so far) are re-ranked with (A). Used for
//    l2 with small k, and when the int8 screen falls back.
//  * int8 screen + exact re-rank (A): query rows (q^ for cosine) are quantised per row as
//    q = s_q (q~ + e_q), q~ integer in [-63, 63] stored as u8 q~ + 64; bank rows as
//    b = s_b (b~ + e_b), b~ in [-63, 63] as s8. _mm256_maddubs_epi16 on (u8 <= 127) x
//    (|s8| <= 63) gives pair sums <= 16002, so two of them add in int16 without
//    saturation (<= 32004) before _mm256_madd_epi16 widens them: the integer dot
//    q~ . b~ = acc - 64 sum(b~) is exact. Then, by Cauchy-Schwarz,
//      |q . b - s_q s_b q~.b~| <= s_q s_b (|q~||e_b| + |e_q||b~| + |e_q||e_b|),
//    with |q~|, |b~| exact integers and |e| bounded from the float32 residuals (their
//    squares summed, inflated by (1 + (C + 64) 2^-23)) plus 2.0001 u (L + 1) sqrt(C) for
//    the rounding of x * (1/s) itself. Adding gamma-terms for the re-rank sum (A) and
//    for every float32 rounding in evaluating the bound (gamma leaves 7C/8 + 58 spare
//    roundings; each product of bound terms is rounded up and inflated by 1 + 2^-18)
//    gives U >= sigma for every pair (cosine screens b / |b| = s_b inv|b| (b~ + e_b);
//    l2 adds the Gram-form terms above). A pair with U < T is strictly worse than k
//    pairs already evaluated, so it can never be selected; every other pair is
//    re-ranked with (A): per bank block, first the best bound of each row (which
//    usually lifts T above the rest), then the others that still reach T, eight
//    independent pairs per kernel call. The buffers therefore hold exact
//    values only and cannot overflow; a task whose re-rank rate would make the screen
//    slower than fp32 switches to the fp32 screen for the rest of its bank range.
//  Rows whose norms leave the float32 range (|x|^2 > 2^100, or 0 < max|x| < 2^-50)
//  are refused (status 1) and the caller falls back to the reference.
//
// Selection: k == 1 keeps the best entry; otherwise a buffer of k + max(k/2, 16)
// entries with threshold T, compacted with nth_element when full (no heap per insert).
// When k is a large part of M (most pairs would enter the buffer) the fp32 paths keep
// each task's tile of sigma (at most 4 MiB) and pick the k best of each row without
// sorting: a histogram of the row's values finds the k-th value's bin, one more pass
// takes what lies above it; the mean modes sum those values directly.
//
// Work split: tasks of (query chunk, bank range), OpenMP dynamic schedule. int8 chunks
// hold up to 1,026 query rows (each bank row is quantised once per chunk); fp32
// chunks are sized for the threads and the selection buffers; their query rows are
// packed once, and 512-row bank blocks (packed once per task, L3) stream past 66-row
// query slices (L2) with one 16-row bank panel k-slice in L1. With few chunks the
// bank is split across tasks that share their row thresholds (any task's k-th best
// bounds the final one) and the last to finish merges the partial lists.
// Peak memory per task: fp32 -- the chunk's packed query rows (5.3 KiB per row at
// C = 1,024), a 512-row packed bank block (2 MiB) and 1 MiB of selection buffers or a
// 4 MiB tile; int8 -- the chunk as u8 (1 KiB per row), a 96-row packed bank block and
// the candidate lists of one block; plus 28 bytes per query and bank row per problem.
#include "cpu/nn_distance_kernel.h"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define NN_AVX2 1
#else
#define NN_AVX2 0
#endif

namespace fastad {
namespace FASTAD_ISA_NS {
namespace {

constexpr double kU = 1.0 / 16777216.0;  // float32 unit roundoff 2^-24
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int kQLevels = 63;             // int8 screen: |q~|, |b~| <= 63
constexpr int64_t kFp32Chunk = 66;       // query rows that stay in L2 (fp32 path)
constexpr int64_t kFp32Block = 512;      // bank rows that stay in L3 (fp32 path)
constexpr int64_t kPanel = 24;           // bank rows per int8 panel
constexpr int64_t kInt8Block = 96;       // bank rows quantised together
constexpr int64_t kKc = 256;             // channels per k-slice: a 16-row bank panel slice is 16 KiB (L1)

enum ElemType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

inline size_t elem_size(int dt) { return dt == kF32 ? 4 : 2; }

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: man * 2^-24, exact in float32
    const float v = static_cast<float>(man) * 5.9604644775390625e-08f;
    return (h & 0x8000u) ? -v : v;
  }
  if (exp == 31) return bits_to_float(sign | 0x7f800000u | (man << 13));
  return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
}

inline float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

template <int DT>
inline float load_elem(const void* row, int64_t c) {
  if constexpr (DT == kF32) return static_cast<const float*>(row)[c];
  else if constexpr (DT == kF16) return half_to_float(static_cast<const uint16_t*>(row)[c]);
  else return bf16_to_float(static_cast<const uint16_t*>(row)[c]);
}

template <int DT>
inline void load_row(const void* row, int64_t C, float* out) {
  if constexpr (DT == kF32) {
    std::memcpy(out, row, static_cast<size_t>(C) * 4);
  } else {
    for (int64_t c = 0; c < C; ++c) out[c] = load_elem<DT>(row, c);
  }
}

inline const void* row_ptr(const void* base, int dt, int64_t r, int64_t C) {
  return static_cast<const char*>(base) + static_cast<size_t>(r) * static_cast<size_t>(C) * elem_size(dt);
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// float >= x (x finite, >= 0)
inline float up(double x) {
  float f = static_cast<float>(x);
  if (static_cast<double>(f) < x) f = std::nextafter(f, kInf);
  return f;
}

// ----------------------------------------------------------------------------------
// Canonical float32 sums (one chain per pair, see the top of the file)

constexpr int kMR = 6;   // query rows per micro-tile (broadcast)
constexpr int kNR = 16;  // bank rows per micro-tile (two vectors)

#if NN_AVX2
template <int DT>
inline __m256 vload(const void* row, int64_t c) {
  if constexpr (DT == kF32) {
    return _mm256_loadu_ps(static_cast<const float*>(row) + c);
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(row) + c));
    if constexpr (DT == kF16) return _mm256_cvtph_ps(h);
    else return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
}

// The n < 8 channels left at c, zero-filled (never reads past the row).
template <int DT>
inline __m256 vload_tail(const void* row, int64_t c, int n) {
  if constexpr (DT == kF32) {
    static const int32_t mask[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
    return _mm256_maskload_ps(static_cast<const float*>(row) + c,
                              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(mask + 8 - n)));
  } else {
    alignas(16) uint16_t tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::memcpy(tmp, static_cast<const uint16_t*>(row) + c, static_cast<size_t>(n) * 2);
    return vload<DT>(tmp, 0);
  }
}

// Channels [c, c + 8) of a row (zero past C).
template <int DT>
inline __m256 vload_any(const void* row, int64_t c, int64_t C) {
  return c + 8 <= C ? vload<DT>(row, c) : vload_tail<DT>(row, c, static_cast<int>(C - c));
}

// 8 x 8 transpose: r[i] lane l  ->  r[l] lane i.
inline void transpose8(__m256 (&r)[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

// Micro-tile: acc[i][l] (6 x 16, float32) continues the chains of query row i and
// bank row l over channels [0, n) of the packed panels: A holds 8 floats per channel
// (6 query rows + 2 zero), B 16 floats per channel (the 16 bank rows).
template <bool DIFF>
inline void gemm_tile(const float* A, const float* B, int64_t n, float* acc) {
  __m256 c[kMR][2];
  for (int i = 0; i < kMR; ++i) {
    c[i][0] = _mm256_loadu_ps(acc + 16 * i);
    c[i][1] = _mm256_loadu_ps(acc + 16 * i + 8);
  }
#pragma GCC unroll 4
  for (int64_t t = 0; t < n; ++t) {
    const __m256 b0 = _mm256_loadu_ps(B + 16 * t), b1 = _mm256_loadu_ps(B + 16 * t + 8);
    for (int i = 0; i < kMR; ++i) {
      const __m256 a = _mm256_broadcast_ss(A + 8 * t + i);
      if constexpr (DIFF) {
        const __m256 d0 = _mm256_sub_ps(a, b0), d1 = _mm256_sub_ps(a, b1);
        c[i][0] = _mm256_fmadd_ps(d0, d0, c[i][0]);
        c[i][1] = _mm256_fmadd_ps(d1, d1, c[i][1]);
      } else {
        c[i][0] = _mm256_fmadd_ps(a, b0, c[i][0]);
        c[i][1] = _mm256_fmadd_ps(a, b1, c[i][1]);
      }
    }
  }
  for (int i = 0; i < kMR; ++i) {
    _mm256_storeu_ps(acc + 16 * i, c[i][0]);
    _mm256_storeu_ps(acc + 16 * i + 8, c[i][1]);
  }
}

// The same chains with 512-bit vectors where the CPU has AVX-512F (a 16-row bank
// panel is one vector): two query panels (12 rows) share each bank load, which keeps
// 12 FMA chains in flight. Lane for lane the same fused multiply-adds in the same
// channel order as gemm_tile, so the sums are bit-identical; only the throughput
// differs (the avx2 build otherwise runs 8-wide on CPUs that have twice that).
template <bool DIFF>
__attribute__((target("avx512f"))) void gemm_tile2_512(const float* A0, const float* A1, const float* B, int64_t n,
                                                        float* acc0, float* acc1) {
  __m512 c0[kMR], c1[kMR];
  for (int i = 0; i < kMR; ++i) {
    c0[i] = _mm512_loadu_ps(acc0 + 16 * i);
    c1[i] = _mm512_loadu_ps(acc1 + 16 * i);
  }
#pragma GCC unroll 2
  for (int64_t t = 0; t < n; ++t) {
    const __m512 b = _mm512_loadu_ps(B + 16 * t);
    for (int i = 0; i < kMR; ++i) {
      const __m512 a0 = _mm512_set1_ps(A0[8 * t + i]), a1 = _mm512_set1_ps(A1[8 * t + i]);
      if constexpr (DIFF) {
        const __m512 d0 = _mm512_sub_ps(a0, b), d1 = _mm512_sub_ps(a1, b);
        c0[i] = _mm512_fmadd_ps(d0, d0, c0[i]);
        c1[i] = _mm512_fmadd_ps(d1, d1, c1[i]);
      } else {
        c0[i] = _mm512_fmadd_ps(a0, b, c0[i]);
        c1[i] = _mm512_fmadd_ps(a1, b, c1[i]);
      }
    }
  }
  for (int i = 0; i < kMR; ++i) {
    _mm512_storeu_ps(acc0 + 16 * i, c0[i]);
    _mm512_storeu_ps(acc1 + 16 * i, c1[i]);
  }
}

// Whether the fp32 tiles run 512 bits wide: the CPU has AVX-512F and
// FASTAD_CPU_WIDE_TILES is not "0" (tests compare the two; the sums are bit-identical).
inline bool use_avx512_tiles() {
  static const bool cpu = __builtin_cpu_supports("avx512f");
  if (!cpu) return false;
  const char* env = std::getenv("FASTAD_CPU_WIDE_TILES");
  return !(env && env[0] == '0' && env[1] == '\0');
}

// Re-rank sum of NP unrelated pairs (q[p], b[p]) in the "dot layout": lane l of an
// 8-wide accumulator runs the chain of channels c = l mod 8, then the lanes add in the
// fixed tree ((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7)). NP independent accumulators keep
// the FMA pipes busy on scattered rows. SCALE multiplies query row p by qs[p] first,
// which gives exactly the float32 q^ = fl(q * inv|q|) of the cosine query panels.
template <int NP, bool DIFF, int DT, bool SCALE>
inline void pairs_dot(const void* const* q, const float* qs, const void* const* b, int64_t C, float* out) {
  __m256 acc[NP];
  for (int p = 0; p < NP; ++p) acc[p] = _mm256_setzero_ps();
  for (int64_t c = 0; c < C; c += 8) {
    for (int p = 0; p < NP; ++p) {
      __m256 qv = vload_any<DT>(q[p], c, C);
      if constexpr (SCALE) qv = _mm256_mul_ps(qv, _mm256_set1_ps(qs[p]));
      const __m256 bv = vload_any<DT>(b[p], c, C);
      if constexpr (DIFF) {
        const __m256 d = _mm256_sub_ps(qv, bv);
        acc[p] = _mm256_fmadd_ps(d, d, acc[p]);
      } else {
        acc[p] = _mm256_fmadd_ps(qv, bv, acc[p]);
      }
    }
  }
  for (int p = 0; p < NP; ++p) {
    const __m128 x = _mm_add_ps(_mm256_castps256_ps128(acc[p]), _mm256_extractf128_ps(acc[p], 1));
    const __m128 y = _mm_add_ps(x, _mm_movehl_ps(x, x));
    out[p] = _mm_cvtss_f32(_mm_add_ss(y, _mm_movehdup_ps(y)));
  }
}

// Bank rows [m0, m1) as panels of 16 rows, 16 floats per channel (zero past m1 and C).
template <int DT>
void pack_bank(const void* base, int64_t C, int64_t C8, int64_t m0, int64_t m1, float* out) {
  for (int64_t m = m0; m < m1; m += kNR) {
    float* panel = out + (m - m0) * C8;
    for (int h = 0; h < 2; ++h) {
      const void* rows[8];
      int valid = 0;
      for (int l = 0; l < 8; ++l) {
        const int64_t j = m + 8 * h + l;
        rows[l] = j < m1 ? row_ptr(base, DT, j, C) : nullptr;
        valid += j < m1;
      }
      for (int64_t c = 0; c < C8; c += 8) {
        __m256 r[8];
        for (int l = 0; l < 8; ++l) r[l] = l < valid ? vload_any<DT>(rows[l], c, C) : _mm256_setzero_ps();
        transpose8(r);
        for (int t = 0; t < 8; ++t) _mm256_storeu_ps(panel + 16 * (c + t) + 8 * h, r[t]);
      }
    }
  }
}

// Query rows (float32, row stride qs) as panels of 6 rows, 8 floats per channel.
inline void pack_query(const float* rows, int64_t qs, int64_t n, int64_t C8, float* out) {
  for (int64_t i0 = 0; i0 < n; i0 += kMR) {
    float* panel = out + i0 / kMR * 8 * C8;
    for (int64_t c = 0; c < C8; c += 8) {
      __m256 r[8];
      for (int l = 0; l < 8; ++l) r[l] = l < kMR && i0 + l < n ? _mm256_loadu_ps(rows + (i0 + l) * qs + c) : _mm256_setzero_ps();
      transpose8(r);
      for (int t = 0; t < 8; ++t) _mm256_storeu_ps(panel + 8 * (c + t), r[t]);
    }
  }
}

#else  // portable fallback: the same chains, multiply then add

inline bool use_avx512_tiles() { return false; }

template <bool DIFF>
void gemm_tile2_512(const float*, const float*, const float*, int64_t, float*, float*) {}

template <bool DIFF>
inline void gemm_tile(const float* A, const float* B, int64_t n, float* acc) {
  for (int64_t t = 0; t < n; ++t) {
    for (int i = 0; i < kMR; ++i) {
      const float a = A[8 * t + i];
      for (int l = 0; l < kNR; ++l) {
        if constexpr (DIFF) {
          const float d = a - B[16 * t + l];
          acc[16 * i + l] += d * d;
        } else {
          acc[16 * i + l] += a * B[16 * t + l];
        }
      }
    }
  }
}

template <int NP, bool DIFF, int DT, bool SCALE>
inline void pairs_dot(const void* const* q, const float* qs, const void* const* b, int64_t C, float* out) {
  for (int p = 0; p < NP; ++p) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t c = 0; c < C; c += 8) {
      for (int l = 0; l < 8; ++l) {
        float qv = 0.0f, bv = 0.0f;
        if (c + l < C) {
          qv = load_elem<DT>(q[p], c + l);
          if constexpr (SCALE) qv *= qs[p];
          bv = load_elem<DT>(b[p], c + l);
        }
        if constexpr (DIFF) {
          const float d = qv - bv;
          acc[l] += d * d;
        } else {
          acc[l] += qv * bv;
        }
      }
    }
    const float y0 = (acc[0] + acc[4]) + (acc[2] + acc[6]), y1 = (acc[1] + acc[5]) + (acc[3] + acc[7]);
    out[p] = y0 + y1;
  }
}

template <int DT>
void pack_bank(const void* base, int64_t C, int64_t C8, int64_t m0, int64_t m1, float* out) {
  for (int64_t m = m0; m < m1; m += kNR) {
    float* panel = out + (m - m0) * C8;
    for (int l = 0; l < kNR; ++l) {
      const int64_t j = m + l;
      const void* row = j < m1 ? row_ptr(base, DT, j, C) : nullptr;
      for (int64_t c = 0; c < C8; ++c) panel[16 * c + l] = row && c < C ? load_elem<DT>(row, c) : 0.0f;
    }
  }
}

inline void pack_query(const float* rows, int64_t qs, int64_t n, int64_t C8, float* out) {
  for (int64_t i0 = 0; i0 < n; i0 += kMR) {
    float* panel = out + i0 / kMR * 8 * C8;
    for (int64_t c = 0; c < C8; ++c)
      for (int l = 0; l < 8; ++l) panel[8 * c + l] = l < kMR && i0 + l < n ? rows[(i0 + l) * qs + c] : 0.0f;
  }
}
#endif

// ----------------------------------------------------------------------------------
// Running top-k per row

struct Entry {
  float s;
  int32_t j;
};
// The selection order (a function object, so that the sorts inline it).
struct Better {
  bool operator()(const Entry& a, const Entry& b) const { return a.s > b.s || (a.s == b.s && a.j < b.j); }
};
constexpr Better better{};

// The best min(k, |v|) entries of v, sorted.
inline void keep_best(std::vector<Entry>& v, int64_t k) {
  if (static_cast<int64_t>(v.size()) > k) {
    std::nth_element(v.begin(), v.begin() + (k - 1), v.end(), better);
    v.resize(static_cast<size_t>(k));
  }
  std::sort(v.begin(), v.end(), better);
}

struct TopK {
  int64_t k = 1, cap = 1;
  std::vector<Entry> e;
  std::vector<int32_t> n;
  std::vector<float> thr;  // k-th best sigma in this buffer (-inf before k entries)
  // Tasks that split the bank share their thresholds: the k-th best of any one of them
  // bounds the final k-th best from below, so each prunes with the largest.
  std::atomic<float>* shared = nullptr;
  bool written = false;  // the task wrote its rows' outputs itself (tile_row_best)

  float bound(int64_t r) const {
    return shared ? std::max(thr[r], shared[r].load(std::memory_order_relaxed)) : thr[r];
  }

  void publish(int64_t r) {
    if (!shared) return;
    const float v = thr[r];
    float cur = shared[r].load(std::memory_order_relaxed);
    while (v > cur && !shared[r].compare_exchange_weak(cur, v, std::memory_order_relaxed)) {
    }
  }

  void init(int64_t rows, int64_t k_) {
    k = k_;
    cap = k == 1 ? 1 : k + std::max<int64_t>(k / 2, 16);
    e.resize(static_cast<size_t>(rows * cap));
    n.assign(static_cast<size_t>(rows), 0);
    thr.assign(static_cast<size_t>(rows), -kInf);
  }

  void push(int64_t r, float s, int32_t j) {
    if (!(s >= bound(r))) return;
    Entry* er = &e[static_cast<size_t>(r * cap)];
    const Entry x{s, j};
    if (k == 1) {
      if (n[r] == 0 || better(x, er[0])) {
        er[0] = x;
        n[r] = 1;
        thr[r] = s;
        publish(r);
      }
      return;
    }
    er[n[r]++] = x;
    if (n[r] == k) {  // first time the buffer holds k entries: T = the worst of them
      float m = er[0].s;
      for (int64_t t = 1; t < k; ++t) m = std::min(m, er[t].s);
      thr[r] = m;
      publish(r);
    } else if (n[r] == cap) {
      std::nth_element(er, er + (k - 1), er + cap, better);
      n[r] = static_cast<int32_t>(k);
      thr[r] = er[k - 1].s;
      publish(r);
    }
  }

  // Row r holds exactly `best` (at most k entries, any order).
  void assign(int64_t r, const std::vector<Entry>& best) {
    std::copy(best.begin(), best.end(), &e[static_cast<size_t>(r * cap)]);
    n[r] = static_cast<int32_t>(best.size());
    float worst = kInf;
    for (const Entry& x : best) worst = std::min(worst, x.s);
    thr[r] = n[r] == k ? worst : -kInf;
    publish(r);
  }

  // The best min(k, n) entries of row r, sorted; returns their count.
  int64_t sorted(int64_t r, std::vector<Entry>& out) const {
    const Entry* er = &e[static_cast<size_t>(r * cap)];
    out.assign(er, er + n[r]);
    keep_best(out, k);
    return static_cast<int64_t>(out.size());
  }
};

// ----------------------------------------------------------------------------------
// One problem: NQ query rows against M bank rows (a shared bank flattens the batch).

struct Problem {
  const void* q = nullptr;
  const void* b = nullptr;
  int64_t NQ = 0, M = 0, C = 0, C8 = 0, k = 1;
  int metric = kNNCosine;
  int sgn = 1;  // sigma = sgn * (cos | -d^2 | q.b)
  const int32_t* qg = nullptr;
  const int32_t* bg = nullptr;
  bool same = false;
  double gamma = 0;
  // per bank row
  std::vector<float> binv, bn2, bnorm;
  // per query row
  std::vector<float> qinv, qn2, qnorm;
  // fp32 screen terms (per bank row / query row; sh per problem)
  float sh = 1;
  std::vector<float> gg, gP, gc, galpha, ge;
  // outputs
  float* values = nullptr;
  int64_t* indices = nullptr;
  bool topk = true;
  double scale = 1;
  // k is a large part of M: keep each task's tile of sigma and select once per row
  // (a running buffer would take most pairs in)
  bool tile_select = false;
  bool wide_tiles = false;  // fp32 tiles 512 bits wide (use_avx512_tiles)
  bool l2() const { return metric == kNNL2; }
  bool eligible(int64_t r, int64_t j) const { return !qg || ((qg[r] == bg[j]) == same); }
  // reported value (distance, or q.b for ip, times scale) of a kept sigma
  double value(float s) const {
    const double nat = static_cast<double>(sgn) * s;  // cos, -d^2 or q.b
    double v;
    if (metric == kNNCosine) v = 1.0 - nat;
    else if (metric == kNNL2) v = std::sqrt(std::max(0.0, -nat));
    else v = nat;
    return v * scale;
  }
  // sigma from the canonical sum of pair (r, j)
  float sigma(float raw, int64_t j) const {
    if (metric == kNNCosine) return static_cast<float>(sgn) * (raw * binv[j]);
    if (metric == kNNL2) return static_cast<float>(-sgn) * raw;
    return static_cast<float>(sgn) * raw;
  }
};

struct TaskCounters {
  int64_t evals = 0, screened = 0, int8_tasks = 0, switched = 0;
};

// |row|^2 (lane l of 8 sums channels c = l mod 8 in double, then a fixed tree) and
// max |x| (NaN ignored) of rows [r0, r1).
template <int DT>
void row_stats(const void* base, int64_t r0, int64_t r1, int64_t C, double* n2, float* maxabs) {
  for (int64_t r = r0; r < r1; ++r) {
    const void* row = row_ptr(base, DT, r, C);
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    float m = 0;
    int64_t c = 0;
#if NN_AVX2
    // the same lane sums 4 doubles at a time: x * x is exact in double, so the fused
    // multiply-add rounds exactly as the scalar multiply-then-add
    __m256d a0 = _mm256_setzero_pd(), a1 = _mm256_setzero_pd();
    __m256 mv = _mm256_setzero_ps();
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (; c + 8 <= C; c += 8) {
      const __m256 x = vload<DT>(row, c);
      const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(x)), hi = _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1));
      a0 = _mm256_fmadd_pd(lo, lo, a0);
      a1 = _mm256_fmadd_pd(hi, hi, a1);
      mv = _mm256_max_ps(_mm256_and_ps(x, absmask), mv);  // a NaN lane keeps mv
    }
    _mm256_storeu_pd(acc, a0);
    _mm256_storeu_pd(acc + 4, a1);
    alignas(32) float ml[8];
    _mm256_store_ps(ml, mv);
    for (int l = 0; l < 8; ++l) m = std::max(m, ml[l]);
#else
    for (; c + 8 <= C; c += 8) {
      for (int l = 0; l < 8; ++l) {
        const float x = load_elem<DT>(row, c + l);
        acc[l] += static_cast<double>(x) * x;
        m = std::max(m, std::fabs(x));
      }
    }
#endif
    for (; c < C; ++c) {
      const float x = load_elem<DT>(row, c);
      acc[0] += static_cast<double>(x) * x;
      m = std::max(m, std::fabs(x));
    }
    n2[r - r0] = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    maxabs[r - r0] = m;
  }
}

void stats_dispatch(int dt, const void* base, int64_t r0, int64_t r1, int64_t C, double* n2, float* maxabs) {
  if (dt == kF32) row_stats<kF32>(base, r0, r1, C, n2, maxabs);
  else if (dt == kF16) row_stats<kF16>(base, r0, r1, C, n2, maxabs);
  else row_stats<kBF16>(base, r0, r1, C, n2, maxabs);
}

// Norm terms of rows [r0, r1) of `base` (at most 256); false when one is outside the
// float32 range the kernel handles.
bool row_norms(const void* base, int dt, int64_t r0, int64_t r1, int64_t C, float* inv, float* n2f, float* norm) {
  double n2[256];
  float mx[256];
  stats_dispatch(dt, base, r0, r1, C, n2, mx);
  bool ok = true;
  for (int64_t r = r0; r < r1; ++r) {
    const double s = n2[r - r0];
    if (s > 0x1p100 || (mx[r - r0] > 0 && mx[r - r0] < 0x1p-50f)) ok = false;
    const double nr = std::sqrt(s);
    inv[r] = static_cast<float>(1.0 / std::max(nr, 1e-12));
    n2f[r] = static_cast<float>(s);
    norm[r] = up(nr * (1 + 0x1p-40));
  }
  return ok;
}

// Query rows [r0, r0 + rows) as float32 (q^ for cosine), zero-padded to C8.
template <int DT>
void fill_query(const Problem& P, int64_t r0, int64_t rows, float* buf, int64_t stride) {
  for (int64_t i = 0; i < rows; ++i) {
    const void* row = row_ptr(P.q, DT, r0 + i, P.C);
    float* out = buf + i * stride;
    load_row<DT>(row, P.C, out);
    if (P.metric == kNNCosine) {
      const float s = P.qinv[r0 + i];
      for (int64_t c = 0; c < P.C; ++c) out[c] *= s;
    }
    for (int64_t c = P.C; c < P.C8; ++c) out[c] = 0.0f;
  }
}

// ----------------------------------------------------------------------------------
// fp32 path: blocked canonical kernel, 3 query rows x 4 bank rows per micro-tile.

enum Fp32Mode : int { kExactDot = 0, kDirectDiff = 1, kScreen = 2 };

// Order-preserving integer key of a float (-0 counts as +0, as in comparisons).
inline uint32_t order_key(float f) {
  if (f == 0) f = 0.0f;
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

struct Pending {
  int32_t i;  // query row of the task
  float u;    // upper bound of sigma
  int32_t j;  // bank row
};

// Exact sigma of pairs (query row r0 + i, bank row j), pushed into the top-k.
template <int DT, bool DIFF>
void eval_pairs(const Problem& P, int64_t r0, const Pending* pr, int64_t n, TopK& top, int64_t& evals) {
  constexpr int NP = 8;
  for (int64_t s = 0; s < n; s += NP) {
    const int np = static_cast<int>(std::min<int64_t>(NP, n - s));
    const void* qp[NP];
    float qs[NP];
    const void* bp[NP];
    for (int p = 0; p < NP; ++p) {
      const Pending& x = pr[s + std::min(p, np - 1)];
      qp[p] = row_ptr(P.q, DT, r0 + x.i, P.C);
      qs[p] = P.qinv[r0 + x.i];
      bp[p] = row_ptr(P.b, DT, x.j, P.C);
    }
    float r[NP];
    if (P.metric == kNNCosine) pairs_dot<NP, DIFF, DT, true>(qp, qs, bp, P.C, r);
    else pairs_dot<NP, DIFF, DT, false>(qp, qs, bp, P.C, r);
    for (int p = 0; p < np; ++p) top.push(pr[s + p].i, P.sigma(r[p], pr[s + p].j), pr[s + p].j);
  }
  evals += n;
}

// Re-rank the candidates a bank block left: first the best bound of every row, which
// usually lifts T above all the others, then those of the rest that still reach T.
// `by_row` and `start` are scratch (a counting sort by row).
template <int DT, bool DIFF>
void rerank_rows(const Problem& P, int64_t r0, int64_t rows, std::vector<Pending>& pend, std::vector<Pending>& by_row,
                 std::vector<int32_t>& start, std::vector<Pending>& wave, TopK& top, int64_t& evals) {
  const int64_t n = static_cast<int64_t>(pend.size());
  if (n == 0) return;
  start.assign(static_cast<size_t>(rows + 1), 0);
  for (const Pending& x : pend) ++start[x.i + 1];
  for (int64_t i = 0; i < rows; ++i) start[i + 1] += start[i];
  by_row.resize(static_cast<size_t>(n));
  for (const Pending& x : pend) by_row[start[x.i]++] = x;  // start[i] ends at row i's end
  wave.clear();
  for (int64_t i = 0, a = 0; i < rows; a = start[i++]) {
    if (a == start[i]) continue;
    int64_t best = a;
    for (int64_t t = a + 1; t < start[i]; ++t)
      if (by_row[t].u > by_row[best].u || (by_row[t].u == by_row[best].u && by_row[t].j < by_row[best].j)) best = t;
    std::swap(by_row[a], by_row[best]);
    wave.push_back(by_row[a]);
  }
  eval_pairs<DT, DIFF>(P, r0, wave.data(), static_cast<int64_t>(wave.size()), top, evals);
  wave.clear();
  for (int64_t i = 0, a = 0; i < rows; a = start[i++])
    for (int64_t t = a + 1; t < start[i]; ++t)
      if (by_row[t].u >= top.bound(i)) wave.push_back(by_row[t]);
  eval_pairs<DT, DIFF>(P, r0, wave.data(), static_cast<int64_t>(wave.size()), top, evals);
  pend.clear();
}

// Scratch of one fp32 task.
struct Fp32Scratch {
  std::vector<float> qbuf, qpanels, bpanels, kbuf, tile;
  std::vector<Pending> pend, by_row, wave;
  std::vector<int32_t> start;
};

// Query rows packed at qpanels (problem rows r0 + i, top rows t0 + i, i < rows)
// against bank rows [m0, m1) packed in bpanels. Exact modes push sigma (or write it to
// the tile, NaN where ineligible); the Gram mode queues the pairs whose bound reaches
// T for rerank_rows.
template <int DT, int MODE>
void fp32_block(const Problem& P, const float* qpanels, int64_t r0, int64_t rows, int64_t t0, int64_t m0,
                int64_t m1, TopK& top, Fp32Scratch& sc, float* tile, int64_t tstride, int64_t tbase) {
  constexpr bool DIFF = MODE == kDirectDiff;
  const int64_t C = P.C, C8 = P.C8;
  const int64_t nk = (C + kKc - 1) / kKc;
  const int64_t kc = (C + nk - 1) / nk;
  const int64_t nmb = (rows + kMR - 1) / kMR;
  sc.kbuf.resize(static_cast<size_t>(nmb * kMR * kNR));
  const float* binv = P.metric == kNNCosine ? P.binv.data() : nullptr;
  const float s_out = static_cast<float>(P.metric == kNNL2 ? -P.sgn : P.sgn);
  const int64_t step = P.wide_tiles ? 2 : 1;  // query panels per tile call
  for (int64_t m = m0; m < m1; m += kNR) {
    const int nb = static_cast<int>(std::min<int64_t>(kNR, m1 - m));
    const float* B = sc.bpanels.data() + (m - m0) * C8;
    for (int64_t c0 = 0; c0 < C; c0 += kc) {
      const int64_t c1 = std::min(C, c0 + kc);
      for (int64_t mb0 = 0; mb0 < nmb; mb0 += step) {
        const int64_t mbn = std::min(nmb, mb0 + step);
        float* acc0 = sc.kbuf.data() + mb0 * kMR * kNR;
        if (c0 == 0) std::fill(acc0, acc0 + (mbn - mb0) * kMR * kNR, 0.0f);
        if (mbn - mb0 == 2)
          gemm_tile2_512<DIFF>(qpanels + mb0 * 8 * C8 + 8 * c0, qpanels + (mb0 + 1) * 8 * C8 + 8 * c0, B + 16 * c0,
                               c1 - c0, acc0, acc0 + kMR * kNR);
        else
          gemm_tile<DIFF>(qpanels + mb0 * 8 * C8 + 8 * c0, B + 16 * c0, c1 - c0, acc0);
        if (c1 < C) continue;
        for (int64_t mb = mb0; mb < mbn; ++mb) {
          float* acc = sc.kbuf.data() + mb * kMR * kNR;
          const int mr = static_cast<int>(std::min<int64_t>(kMR, rows - mb * kMR));
          for (int i = 0; i < mr; ++i) {
            const int64_t ti = mb * kMR + i, r = r0 + ti, tr = t0 + ti;
            const float* a = acc + kNR * i;
            alignas(32) float v[kNR];
            if constexpr (MODE == kScreen) {
              // U = h (g D) + (alpha P + c) + e >= sigma, see the top of the file
              const float al = P.galpha[r], e = P.ge[r];
              for (int l = 0; l < kNR; ++l) v[l] = (P.sh * (P.gg[m + l] * a[l]) + (al * P.gP[m + l] + P.gc[m + l])) + e;
              const float th = top.bound(tr);
              for (int l = 0; l < nb; ++l)
                if (v[l] >= th && P.eligible(r, m + l))
                  sc.pend.push_back(Pending{static_cast<int32_t>(tr), v[l], static_cast<int32_t>(m + l)});
              continue;
            }
            // sigma = sgn (cos: raw * inv|b|; l2: -raw; ip: raw), as Problem::sigma
            if (binv) {
              for (int l = 0; l < kNR; ++l) v[l] = s_out * (a[l] * binv[m + l]);
            } else {
              for (int l = 0; l < kNR; ++l) v[l] = s_out * a[l];
            }
            if (tile) {
              float* row = tile + tr * tstride + (m - tbase);
              for (int l = 0; l < nb; ++l) row[l] = P.eligible(r, m + l) ? v[l] : std::numeric_limits<float>::quiet_NaN();
              continue;
            }
            const float th = top.bound(tr);
            unsigned bits = 0;
            for (int l = 0; l < kNR; ++l) bits |= static_cast<unsigned>(v[l] >= th) << l;
            bits &= (1u << nb) - 1;
            for (; bits; bits &= bits - 1) {
              const int l = __builtin_ctz(bits);
              if (P.eligible(r, m + l)) top.push(tr, v[l], static_cast<int32_t>(m + l));
            }
          }
        }
      }
    }
  }
}

// The k best eligible entries of a tile row (NaN marks ineligible pairs) without
// sorting them: a histogram over 2,048 equal bins between the row's smallest and
// largest value (the bin, fl(fl(x - lo) * w), never decreases with x) finds the bin
// of the k-th largest value; one more pass takes every entry above that bin and
// keeps the bin's own entries, of which a partial selection takes the best that are
// still needed (value descending, index ascending: ties at the k-th value go to the
// lowest indices). With `best`, it returns those entries (any order) there; without,
// it returns the mean of their reported values (NaN when none is eligible), which
// equal values make independent of which tied entries count.
double tile_row_best(const Problem& P, const float* row, int64_t span, int64_t m0, int64_t k, std::vector<Entry>* best,
                     std::vector<Entry>& edge) {
  constexpr int kBins = 2048;
  float lo = kInf, hi = -kInf;
  for (int64_t j = 0; j < span; ++j) {  // NaN compares false: ignored
    lo = row[j] < lo ? row[j] : lo;
    hi = row[j] > hi ? row[j] : hi;
  }
  if (best) best->clear();
  if (!(lo <= hi)) return std::numeric_limits<double>::quiet_NaN();  // nothing eligible
  // bins of width (hi - lo) / kBins; w = 0 puts everything in bin 0 (lo == hi)
  float w = hi > lo ? static_cast<float>(kBins) / (hi - lo) : 0.0f;
  if (!(w < kInf)) w = 0.0f;  // a subnormal spread: one bin
  auto bin = [&](float x) { return std::min(kBins - 1, static_cast<int>((x - lo) * w)); };
  int32_t hist[kBins] = {};
  int64_t eligible = 0;
  for (int64_t j = 0; j < span; ++j) {
    if (row[j] != row[j]) continue;
    ++hist[bin(row[j])];
    ++eligible;
  }
  k = std::min(k, eligible);
  int b0 = kBins - 1;
  int64_t need = k;
  for (; hist[b0] < need; --b0) need -= hist[b0];
  edge.clear();
  double sum = 0;
  // (x - lo) * w rounds monotonically, so bin(x) > b0 exactly for the values above the bin
  for (int64_t j = 0; j < span; ++j) {
    if (!(row[j] >= lo)) continue;  // NaN
    const int b = bin(row[j]);
    if (b < b0) continue;
    if (b == b0) edge.push_back(Entry{row[j], static_cast<int32_t>(m0 + j)});
    else if (best) best->push_back(Entry{row[j], static_cast<int32_t>(m0 + j)});
    else sum += P.value(row[j]);
  }
  if (static_cast<int64_t>(edge.size()) > need) std::nth_element(edge.begin(), edge.begin() + (need - 1), edge.end(), better);
  for (int64_t t = 0; t < need; ++t) {
    if (best) best->push_back(edge[t]);
    else sum += P.value(edge[t].s);
  }
  return sum / static_cast<double>(k);
}

// Query rows [r0, r0 + rows) (top rows 0...) against bank rows [m0, m1): bank blocks,
// packed once, stay in L3 while slices of the (packed once) query rows pass over
// them; inside, a 16-row bank panel (one k-slice of at most kKc channels) stays in L1
// while the slice's 6-row query panels stream from L2. The bank is read from memory
// once per task.
template <int DT>
void run_fp32(const Problem& P, int mode, int64_t r0, int64_t rows, int64_t m0, int64_t m1, TopK& top,
              TaskCounters& cnt) {
  Fp32Scratch sc;
  const int64_t C8 = P.C8, qs = C8;
  const int64_t nsub = (rows + kFp32Chunk - 1) / kFp32Chunk;
  const int64_t sub = round_up((rows + nsub - 1) / nsub, kMR);
  sc.qbuf.resize(static_cast<size_t>(std::min(rows, sub) * qs));
  sc.qpanels.resize(static_cast<size_t>((rows + kMR - 1) / kMR * 8 * C8));
  for (int64_t i0 = 0; i0 < rows; i0 += sub) {
    const int64_t n = std::min(sub, rows - i0);
    fill_query<DT>(P, r0 + i0, n, sc.qbuf.data(), qs);
    pack_query(sc.qbuf.data(), qs, n, C8, sc.qpanels.data() + i0 / kMR * 8 * C8);
  }
  sc.bpanels.resize(static_cast<size_t>(std::min(round_up(m1 - m0, kNR), kFp32Block) * C8));
  const bool use_tile = P.tile_select && mode != kScreen;
  sc.tile.resize(use_tile ? static_cast<size_t>(rows * (m1 - m0)) : 0);
  float* tp = use_tile ? sc.tile.data() : nullptr;
  for (int64_t bb = m0; bb < m1; bb += kFp32Block) {
    const int64_t be = std::min(m1, bb + kFp32Block);
    pack_bank<DT>(P.b, P.C, C8, bb, be, sc.bpanels.data());
    for (int64_t i0 = 0; i0 < rows; i0 += sub) {
      const int64_t n = std::min(sub, rows - i0);
      const float* qp = sc.qpanels.data() + i0 / kMR * 8 * C8;
      if (mode == kExactDot) {
        fp32_block<DT, kExactDot>(P, qp, r0 + i0, n, i0, bb, be, top, sc, tp, m1 - m0, m0);
      } else if (mode == kDirectDiff) {
        fp32_block<DT, kDirectDiff>(P, qp, r0 + i0, n, i0, bb, be, top, sc, tp, m1 - m0, m0);
      } else {
        fp32_block<DT, kScreen>(P, qp, r0 + i0, n, i0, bb, be, top, sc, nullptr, 0, 0);
        if (P.l2()) rerank_rows<DT, true>(P, r0, rows, sc.pend, sc.by_row, sc.start, sc.wave, top, cnt.evals);
        else rerank_rows<DT, false>(P, r0, rows, sc.pend, sc.by_row, sc.start, sc.wave, top, cnt.evals);
      }
    }
  }
  if (!use_tile) return;
  // A task over the whole bank writes the mean modes' rows itself: no entry lists.
  const bool mean_here = !P.topk && !P.indices && m0 == 0 && m1 == P.M;
  std::vector<Entry> best, edge;
  const int64_t span = m1 - m0;
  for (int64_t i = 0; i < rows; ++i) {
    const float* row = tp + i * span;
    if (mean_here) {
      P.values[r0 + i] = static_cast<float>(tile_row_best(P, row, span, m0, top.k, nullptr, edge));
      top.written = true;
      continue;
    }
    tile_row_best(P, row, span, m0, top.k, &best, edge);
    top.assign(i, best);
  }
}

// ----------------------------------------------------------------------------------
// int8 screen

// Quantise row[0, C) to integers v in [-L, L]: x = s (v + e) with |e_c| <= 1/2 up to
// rounding. Returns s, |v|^2 (exact), sum(v) and an upper bound on |e|. The integers
// go to a query row (u8 v + 64, zero channels 64) or to row t of a bank panel (s8,
// channels 8g..8g+3 at g*192 + 4t and 8g+4..8g+7 at g*192 + 96 + 4t, so that one
// 32-byte load holds the same 4 channels of 8 rows).
struct QuantRow {
  float s;
  double a2, r;
  int32_t sum;
};

struct QuantOut {
  uint8_t* linear;  // query row, or null
  int8_t* panel;    // bank panel, with row t
  int t;
};

inline void quant_store(const QuantOut& o, int64_t c, const int8_t* v8) {
  if (o.linear) {
    for (int l = 0; l < 8; ++l) o.linear[c + l] = static_cast<uint8_t>(v8[l] + 64);
  } else {
    int8_t* dst = o.panel + (c / 8) * 192 + o.t * 4;
    std::memcpy(dst, v8, 4);
    std::memcpy(dst + 96, v8 + 4, 4);
  }
}

// e2: sum of the float32 residual squares as accumulated (lane sums of at most
// C8/8 + 1 terms, the rest in double): inflating it by (1 + (C + 64) 2^-23) bounds
// the exact sum. |x/s - t| <= 2.0001 u (L + 1) per channel (1/s and x * (1/s) round
// once each) adds sqrt(C) times that to |e|.
inline double residual_bound(double e2, int64_t C) {
  const double L = kQLevels;
  return std::sqrt(e2 * (1 + static_cast<double>(C + 64) * 0x1p-23)) * (1 + 0x1p-50) +
         std::sqrt(static_cast<double>(C)) * (L + 1) * 2.0001 * kU;
}

inline QuantRow quant_zero(int64_t C8, const QuantOut& o) {
  const int8_t z[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t c = 0; c < C8; c += 8) quant_store(o, c, z);
  return QuantRow{0.0f, 0.0, 0.0, 0};
}

#if NN_AVX2
template <int DT>
QuantRow quantise(const void* row, int64_t C, int64_t C8, const QuantOut& o) {
  const int64_t full = C & ~int64_t(7);
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 mx = _mm256_setzero_ps();
  for (int64_t c = 0; c < full; c += 8) mx = _mm256_max_ps(mx, _mm256_and_ps(vload<DT>(row, c), absmask));
  if (full < C) mx = _mm256_max_ps(mx, _mm256_and_ps(vload_tail<DT>(row, full, static_cast<int>(C - full)), absmask));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, mx);
  float m = 0;
  for (int l = 0; l < 8; ++l) m = std::max(m, lanes[l]);
  if (m == 0) return quant_zero(C8, o);
  const float L = static_cast<float>(kQLevels);
  const float s = m / L, inv = 1.0f / s;
  const __m256 vinv = _mm256_set1_ps(inv), lo = _mm256_set1_ps(-L), hi = _mm256_set1_ps(L);
  __m256 e2 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), sm = _mm256_setzero_ps();
  const __m128i off = _mm_set1_epi8(64);
  for (int64_t c = 0; c < C8; c += 8) {
    const __m256 x = c < full ? vload<DT>(row, c) : vload_tail<DT>(row, c, static_cast<int>(C - c));
    const __m256 t = _mm256_mul_ps(x, vinv);
    const __m256 v = _mm256_min_ps(hi, _mm256_max_ps(lo, _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
    const __m256 e = _mm256_sub_ps(t, v);  // exact (Sterbenz)
    e2 = _mm256_fmadd_ps(e, e, e2);
    a2 = _mm256_fmadd_ps(v, v, a2);  // integers < 2^24 (C <= 32768): exact
    sm = _mm256_add_ps(sm, v);
    const __m256i vi = _mm256_cvtps_epi32(v);
    const __m128i p16 = _mm_packs_epi32(_mm256_castsi256_si128(vi), _mm256_extracti128_si256(vi, 1));
    const __m128i p8 = _mm_packs_epi16(p16, p16);
    if (o.linear) {
      _mm_storel_epi64(reinterpret_cast<__m128i*>(o.linear + c), _mm_add_epi8(p8, off));
    } else {
      int8_t* dst = o.panel + (c / 8) * 192 + o.t * 4;
      const int32_t w0 = _mm_cvtsi128_si32(p8), w1 = _mm_extract_epi32(p8, 1);
      std::memcpy(dst, &w0, 4);
      std::memcpy(dst + 96, &w1, 4);
    }
  }
  alignas(32) float le[8], la[8], ls[8];
  _mm256_store_ps(le, e2);
  _mm256_store_ps(la, a2);
  _mm256_store_ps(ls, sm);
  double se = 0, sa = 0, ss = 0;
  for (int l = 0; l < 8; ++l) {
    se += le[l];
    sa += la[l];
    ss += ls[l];
  }
  return QuantRow{s, sa, residual_bound(se, C), static_cast<int32_t>(ss)};
}
#else
template <int DT>
QuantRow quantise(const void* row, int64_t C, int64_t C8, const QuantOut& o) {
  float m = 0;
  for (int64_t c = 0; c < C; ++c) m = std::max(m, std::fabs(load_elem<DT>(row, c)));
  if (m == 0) return quant_zero(C8, o);
  const float L = static_cast<float>(kQLevels);
  const float s = m / L, inv = 1.0f / s;
  double e2 = 0, a2 = 0;
  int32_t sum = 0;
  for (int64_t c = 0; c < C8; c += 8) {
    int8_t v8[8];
    for (int l = 0; l < 8; ++l) {
      const float t = c + l < C ? load_elem<DT>(row, c + l) * inv : 0.0f;
      const float v = std::min(L, std::max(-L, std::nearbyint(t)));
      const float e = t - v;  // exact (Sterbenz)
      e2 += static_cast<double>(e) * e;
      a2 += static_cast<double>(v) * v;
      sum += static_cast<int32_t>(v);
      v8[l] = static_cast<int8_t>(v);
    }
    quant_store(o, c, v8);
  }
  return QuantRow{s, a2, residual_bound(e2, C), sum};
}
#endif

struct PanelCols {
  alignas(32) float g[kPanel];
  alignas(32) float P[kPanel];
  alignas(32) float Q[kPanel];
  alignas(32) float c[kPanel];
  alignas(32) int32_t corr[kPanel];
  alignas(32) int32_t grp[kPanel];
};

struct QRowTerms {
  float h, alpha, beta, e;
  int32_t grp;
};

#if NN_AVX2
// acc[i][v] (8 bank rows each) += sum over channels of (q~ + 64) * b~; q rows are u8
// (C8 bytes), the panel holds 8 channels of 24 rows per 192 bytes (see pack_row).
inline void kernel_i8(const uint8_t* const* qp, const int8_t* panel, int64_t G2, __m256i (&out)[3][3]) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[3][3];
  for (int i = 0; i < 3; ++i)
    for (int v = 0; v < 3; ++v) acc[i][v] = out[i][v];
  const uint8_t* q[3] = {qp[0], qp[1], qp[2]};
  for (int64_t g = 0; g < G2; ++g) {
    const int8_t* p = panel + g * 192;
    for (int i = 0; i < 3; ++i) {
      int32_t v0, v1;
      std::memcpy(&v0, q[i] + 8 * g, 4);
      std::memcpy(&v1, q[i] + 8 * g + 4, 4);
      const __m256i a0 = _mm256_set1_epi32(v0), a1 = _mm256_set1_epi32(v1);
      for (int v = 0; v < 3; ++v) {
        const __m256i s = _mm256_add_epi16(
            _mm256_maddubs_epi16(a0, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + 32 * v))),
            _mm256_maddubs_epi16(a1, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + 96 + 32 * v))));
        acc[i][v] = _mm256_add_epi32(acc[i][v], _mm256_madd_epi16(s, ones));
      }
    }
  }
  for (int i = 0; i < 3; ++i)
    for (int v = 0; v < 3; ++v) out[i][v] = acc[i][v];
}
// kernel_i8 with AVX-512 VNNI: vpdpbusd adds the four u8 x s8 products of each
// 32-bit lane to the int32 accumulator in one instruction (no int16 step), so the
// integer dots are the same exact integers in fewer than half the instructions.
__attribute__((target("avx512f,avx512vl,avx512vnni"))) void kernel_i8_vnni(const uint8_t* const* qp,
                                                                            const int8_t* panel, int64_t G2,
                                                                            __m256i (&out)[3][3]) {
  __m256i acc[3][3];  // integer sums: added to `out` at the end, exactly
  for (auto& row : acc)
    for (auto& x : row) x = _mm256_setzero_si256();
  const uint8_t* q[3] = {qp[0], qp[1], qp[2]};
  for (int64_t g = 0; g < G2; ++g) {
    const int8_t* p = panel + g * 192;
    __m256i b0[3], b1[3];
    for (int v = 0; v < 3; ++v) {
      b0[v] = _mm256_load_si256(reinterpret_cast<const __m256i*>(p + 32 * v));
      b1[v] = _mm256_load_si256(reinterpret_cast<const __m256i*>(p + 96 + 32 * v));
    }
    for (int i = 0; i < 3; ++i) {
      int32_t v0, v1;
      std::memcpy(&v0, q[i] + 8 * g, 4);
      std::memcpy(&v1, q[i] + 8 * g + 4, 4);
      const __m256i a0 = _mm256_set1_epi32(v0), a1 = _mm256_set1_epi32(v1);
      for (int v = 0; v < 3; ++v) acc[i][v] = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(acc[i][v], a0, b0[v]), a1, b1[v]);
    }
  }
  for (int i = 0; i < 3; ++i)
    for (int v = 0; v < 3; ++v) out[i][v] = _mm256_add_epi32(out[i][v], acc[i][v]);
}

inline bool use_vnni() {
  static const bool cpu = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512vnni");
  return cpu && use_avx512_tiles();
}
#else
inline void kernel_i8(const uint8_t* const* q, const int8_t* panel, int64_t G2, int32_t (&acc)[3][kPanel]) {
  for (int64_t g = 0; g < G2; ++g) {
    for (int h = 0; h < 2; ++h) {
      const int8_t* p = panel + g * 192 + h * 96;
      for (int i = 0; i < 3; ++i) {
        const uint8_t* qi = q[i] + 8 * g + 4 * h;
        for (int t = 0; t < kPanel; ++t) {
          int32_t s = 0;
          for (int u = 0; u < 4; ++u) s += static_cast<int32_t>(qi[u]) * p[t * 4 + u];
          acc[i][t] += s;
        }
      }
    }
  }
}
#endif

// Query rows of an int8 task, quantised once and shared by the tasks that split the bank.
struct QueryPrep {
  int64_t r0 = 0, rows = 0;
  std::vector<uint8_t> qu;      // rows x C8, u8 = q~ + 64
  std::vector<QRowTerms> qt;
};

template <int DT>
void prep_rows(const Problem& P, QueryPrep& qp, int64_t i0, int64_t i1) {
  const int64_t C = P.C, C8 = P.C8;
  const bool l2 = P.l2();
  const double w = l2 ? 2.0 : 1.0, gam = P.gamma, infl = 1 + 0x1p-18;
  std::vector<float> x(static_cast<size_t>(C8));
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t r = qp.r0 + i;
    fill_query<DT>(P, r, 1, x.data(), C8);  // the canonical q^ (cosine) or q
    const QuantRow qr = quantise<kF32>(x.data(), C, C8, QuantOut{qp.qu.data() + i * C8, nullptr, 0});
    const double a = std::sqrt(qr.a2) * (1 + 0x1p-50), nq = qr.s * (a + qr.r);
    QRowTerms& t = qp.qt[i];
    t.h = static_cast<float>(w * P.sgn) * qr.s;
    t.alpha = up(qr.s * a * infl);
    t.beta = up(qr.s * qr.r * infl);
    t.e = l2 ? static_cast<float>(gam * nq * nq * infl - P.sgn * static_cast<double>(P.qn2[r])) : 0.0f;
    t.grp = P.qg ? P.qg[r] : 0;
  }
}

// int8 screen of the prepared query rows (top rows 0...) against bank rows [m0, m1).
template <int DT>
void run_int8(const Problem& P, const QueryPrep& qp, int64_t m0, int64_t m1, TopK& top, int fp32_mode,
              TaskCounters& cnt) {
  const int64_t C = P.C, C8 = P.C8, G2 = C8 / 8, rows = qp.rows;
  const bool l2 = P.l2();
  const double w = l2 ? 2.0 : 1.0;
  const double gam = P.gamma, kappa = w * gam + (l2 ? 2 * gam : 0.0), infl = 1 + 0x1p-18;
  const int64_t npmax = kInt8Block / kPanel;
  int8_t* panels = static_cast<int8_t*>(::operator new(static_cast<size_t>(npmax * kPanel * C8), std::align_val_t(64)));
  std::unique_ptr<int8_t, void (*)(int8_t*)> panels_guard(panels, [](int8_t* p) { ::operator delete(p, std::align_val_t(64)); });
  std::vector<PanelCols> cols(static_cast<size_t>(npmax));
  std::vector<Pending> pend, wave, by_row;
  std::vector<int32_t> start;
  pend.reserve(static_cast<size_t>(rows * 4));
  const int64_t nmb = (rows + 2) / 3;
#if NN_AVX2
  const bool vnni = P.wide_tiles && use_vnni();
#endif
  int64_t blocks = 0, evals0 = cnt.evals, pairs0 = 0, pairs = 0;
  int64_t m = m0;
  ++cnt.int8_tasks;
  for (; m < m1; m += kInt8Block) {
    const int64_t me = std::min(m1, m + kInt8Block);
    const int64_t np = (me - m + kPanel - 1) / kPanel;
    for (int64_t p = 0; p < np; ++p) {
      PanelCols& pc = cols[p];
      int8_t* panel = panels + p * kPanel * C8;
      for (int t = 0; t < kPanel; ++t) {
        const int64_t j = m + p * kPanel + t;
        if (j >= me) {
          quant_zero(C8, QuantOut{nullptr, panel, t});
          pc.g[t] = pc.P[t] = pc.Q[t] = 0.0f;
          pc.c[t] = std::numeric_limits<float>::quiet_NaN();  // never passes
          pc.corr[t] = 0;
          pc.grp[t] = 0;
          continue;
        }
        const QuantRow br = quantise<DT>(row_ptr(P.b, DT, j, C), C, C8, QuantOut{nullptr, panel, t});
        // cosine screens b / |b| = (s inv|b|) (b~ + e)
        const double sb = static_cast<double>(br.s) * (P.metric == kNNCosine ? static_cast<double>(P.binv[j]) : 1.0);
        const double A = std::sqrt(br.a2) * (1 + 0x1p-50), R = br.r, nb = sb * (A + R);
        pc.g[t] = static_cast<float>(sb);
        pc.P[t] = up(sb * (w * R + kappa * (A + R)) * infl);
        pc.Q[t] = up(sb * (w + kappa) * (A + R) * infl);
        pc.c[t] = l2 ? static_cast<float>(gam * nb * nb * infl - P.sgn * static_cast<double>(P.bn2[j])) : 0.0f;
        pc.corr[t] = 64 * br.sum;
        pc.grp[t] = P.bg ? P.bg[j] : 0;
      }
    }
    for (int64_t p = 0; p < np; ++p) {
      const PanelCols& pc = cols[p];
      const int8_t* panel = panels + p * kPanel * C8;
      const int32_t jbase = static_cast<int32_t>(m + p * kPanel);
      for (int64_t mb = 0; mb < nmb; ++mb) {
        const int64_t i0 = mb * 3;
        const uint8_t* qrows[3];
        for (int i = 0; i < 3; ++i) qrows[i] = qp.qu.data() + std::min(i0 + i, rows - 1) * C8;
        const int mr = static_cast<int>(std::min<int64_t>(3, rows - i0));
#if NN_AVX2
        __m256i acc[3][3];
        for (int i = 0; i < 3; ++i)
          for (int v = 0; v < 3; ++v) acc[i][v] = _mm256_setzero_si256();
        if (vnni) kernel_i8_vnni(qrows, panel, G2, acc);
        else kernel_i8(qrows, panel, G2, acc);
        for (int i = 0; i < mr; ++i) {
          const QRowTerms& t = qp.qt[i0 + i];
          const int32_t tr = static_cast<int32_t>(i0 + i);
          const __m256 h = _mm256_set1_ps(t.h), al = _mm256_set1_ps(t.alpha), be = _mm256_set1_ps(t.beta),
                       e = _mm256_set1_ps(t.e), th = _mm256_set1_ps(top.bound(tr));
          const __m256i qgv = _mm256_set1_epi32(t.grp);
          for (int v = 0; v < 3; ++v) {
            const __m256i d = _mm256_sub_epi32(acc[i][v], _mm256_load_si256(reinterpret_cast<const __m256i*>(pc.corr + 8 * v)));
            const __m256 G = _mm256_mul_ps(_mm256_load_ps(pc.g + 8 * v), _mm256_cvtepi32_ps(d));
            __m256 W = _mm256_fmadd_ps(be, _mm256_load_ps(pc.Q + 8 * v), _mm256_load_ps(pc.c + 8 * v));
            W = _mm256_fmadd_ps(al, _mm256_load_ps(pc.P + 8 * v), W);
            const __m256 U = _mm256_add_ps(_mm256_fmadd_ps(h, G, W), e);
            __m256 mask = _mm256_cmp_ps(U, th, _CMP_GE_OQ);
            if (P.qg) {
              const __m256 eq = _mm256_castsi256_ps(
                  _mm256_cmpeq_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(pc.grp + 8 * v)), qgv));
              mask = P.same ? _mm256_and_ps(mask, eq) : _mm256_andnot_ps(eq, mask);
            }
            int bits = _mm256_movemask_ps(mask);
            if (!bits) continue;
            alignas(32) float u[8];
            _mm256_store_ps(u, U);
            for (; bits; bits &= bits - 1) {
              const int l = __builtin_ctz(static_cast<unsigned>(bits));
              pend.push_back(Pending{tr, u[l], jbase + 8 * v + l});
            }
          }
        }
#else
        int32_t acc[3][kPanel] = {};
        kernel_i8(qrows, panel, G2, acc);
        for (int i = 0; i < mr; ++i) {
          const QRowTerms& t = qp.qt[i0 + i];
          const int32_t tr = static_cast<int32_t>(i0 + i);
          const float th = top.bound(tr);
          for (int l = 0; l < kPanel; ++l) {
            const float G = pc.g[l] * static_cast<float>(acc[i][l] - pc.corr[l]);
            const float W = t.alpha * pc.P[l] + (t.beta * pc.Q[l] + pc.c[l]);
            const float U = (t.h * G + W) + t.e;
            const bool ok = !P.qg || ((pc.grp[l] == t.grp) == P.same);
            if (U >= th && ok) pend.push_back(Pending{tr, U, jbase + l});
          }
        }
#endif
      }
    }
    if (l2) rerank_rows<DT, true>(P, qp.r0, rows, pend, by_row, start, wave, top, cnt.evals);
    else rerank_rows<DT, false>(P, qp.r0, rows, pend, by_row, start, wave, top, cnt.evals);
    pairs += rows * (me - m);
    cnt.screened += rows * (me - m);
    // Once T has settled (after the start-up blocks), a re-rank rate above 6% of the
    // screened pairs makes the screen slower than the fp32 kernel: switch.
    if (++blocks == 2) {
      evals0 = cnt.evals;
      pairs0 = pairs;
    } else if (blocks > 4 && (cnt.evals - evals0) > 0.06 * static_cast<double>(pairs - pairs0)) {
      m = me;
      ++cnt.switched;
      break;
    }
  }
  if (m < m1) run_fp32<DT>(P, fp32_mode, qp.r0, rows, m, m1, top, cnt);
}

// Output of one row from its best entries.
void write_row(const Problem& P, int64_t r, const std::vector<Entry>& best) {
  const int64_t k = P.k, m = static_cast<int64_t>(best.size());
  auto value = [&](float s) { return P.value(s); };
  if (P.topk) {
    // ascending distance, descending similarity for ip: padding at the far end
    const float fill = P.metric == kNNIp ? -kInf : kInf;
    for (int64_t t = 0; t < k; ++t) {
      P.values[r * k + t] = t < m ? static_cast<float>(value(best[t].s)) : fill;
      P.indices[r * k + t] = t < m ? best[t].j : -1;
    }
    return;
  }
  double sum = 0;
  for (int64_t t = 0; t < m; ++t) sum += value(best[t].s);
  P.values[r] = m ? static_cast<float>(sum / static_cast<double>(m)) : std::numeric_limits<float>::quiet_NaN();
  if (P.indices)
    for (int64_t t = 0; t < k; ++t) P.indices[r * k + t] = t < m ? best[t].j : -1;
}

int choose_path(const Problem& P, int requested) {
  if (requested == kNNL2Direct && !P.l2()) return kNNFp32;
  if (requested == kNNInt8 && P.C > 32768) return kNNFp32;  // int8 lane sums stay exact below
  if (requested != kNNAuto) return requested;
  const double k = static_cast<double>(P.k), M = static_cast<double>(P.M);
  const double inserts = k * (1 + std::log(M / k));  // expected top-k insertions per row
  const bool int8 = P.C >= 64 && P.C <= 32768 && P.k <= 32 && inserts * 64 <= M &&
                    static_cast<double>(P.NQ) * M * static_cast<double>(P.C) >= 0x1p28;
  if (int8) return kNNInt8;
  if (P.l2() && inserts * 16 > M) return kNNL2Direct;
  return kNNFp32;
}

template <int DT>
void run_problem(Problem& P, int requested_path, int nthreads, NNStats& st) {
  const int path = choose_path(P, requested_path);
  st.path = path;
  // fp32 path: cosine / ip exact, l2 screened (direct when k is large); the int8
  // path falls back to the screened fp32 kernel (its values come from the same
  // re-rank sums as the int8 screen's)
  int fp32_mode = kExactDot;
  if (path == kNNInt8 || (path == kNNFp32 && P.l2())) fp32_mode = kScreen;
  if (path == kNNL2Direct) fp32_mode = kDirectDiff;
  const int64_t NQ = P.NQ, M = P.M;
  if (NQ == 0) return;
  if (static_cast<double>(NQ) * static_cast<double>(M) * static_cast<double>(P.C) < 0x1p22) nthreads = 1;
  // Tasks: chunks of R query rows x S ranges of the bank. The int8 screen wants long
  // chunks (each bank row is quantised once per chunk); both paths read the bank once
  // per chunk. Small k: few long chunks and a split bank (partial top-k lists merged);
  // large k: the per-row buffers bound the chunk.
  const int64_t target = 4 * static_cast<int64_t>(nthreads);
  const int64_t cap = P.k == 1 ? 1 : P.k + std::max<int64_t>(P.k / 2, 16);
  P.tile_select = path != kNNInt8 && static_cast<double>(P.k) * (1 + std::log(static_cast<double>(M) / P.k)) * 4 > M;
  // 1 MiB of running buffers, or a 4 MiB tile, per task
  const int64_t rmax = std::max<int64_t>(
      kFp32Chunk, std::min<int64_t>(1024, (int64_t(1) << 20) / (P.tile_select ? M : cap * 8)));
  int64_t R;
  if (path == kNNInt8) R = std::min<int64_t>(round_up(NQ, 3), 1026);
  else R = std::min(round_up(NQ, 3), std::max(kFp32Chunk, std::min(rmax, round_up((NQ + target - 1) / target, 3))));
  const int64_t nchunk = (NQ + R - 1) / R;
  const int64_t align = path == kNNInt8 ? kInt8Block : kFp32Block;
  int64_t S = 1;
  if (nchunk < target) S = std::max<int64_t>(1, std::min((target + nchunk - 1) / nchunk, M / (2 * align)));
  const int64_t span = round_up((M + S - 1) / S, align);
  S = (M + span - 1) / span;
  const int64_t ntask = nchunk * S;

  // One pass over the rows: norms (and the range check), the l2 Gram screen terms and,
  // when the bank is split, the int8 query rows shared by the splits (else each task
  // quantises its own).
  P.binv.resize(static_cast<size_t>(M + kNR));  // padded: the fp32 micro-tile reads 16 at a time
  P.bn2.resize(static_cast<size_t>(M));
  P.bnorm.resize(static_cast<size_t>(M));
  P.qinv.resize(static_cast<size_t>(NQ));
  P.qn2.resize(static_cast<size_t>(NQ));
  P.qnorm.resize(static_cast<size_t>(NQ));
  const bool screen = fp32_mode == kScreen;
  if (screen) {
    P.gg.resize(static_cast<size_t>(M + kNR));
    P.gP.resize(static_cast<size_t>(M + kNR));
    P.gc.resize(static_cast<size_t>(M + kNR));
    P.galpha.resize(static_cast<size_t>(NQ));
    P.ge.resize(static_cast<size_t>(NQ));
  }
  std::vector<QueryPrep> preps(path == kNNInt8 && S > 1 ? static_cast<size_t>(nchunk) : 0);
  for (int64_t c = 0; c < static_cast<int64_t>(preps.size()); ++c) {
    preps[c].r0 = c * R;
    preps[c].rows = std::min(R, NQ - c * R);
    preps[c].qu.resize(static_cast<size_t>(preps[c].rows * P.C8));
    preps[c].qt.resize(static_cast<size_t>(preps[c].rows));
  }
  // fp32 screen: U = h (g D) + (alpha P + c) + e >= sigma, see the top of the file
  const double g = P.gamma, kappa = (P.l2() ? 4 : 3) * g, infl = 1 + 0x1p-18;
  const bool cosine = P.metric == kNNCosine;
  P.sh = static_cast<float>(P.l2() ? 2 * P.sgn : P.sgn);
  const int64_t nbb = (M + 255) / 256, per_chunk = (R + 63) / 64, nqb = nchunk * per_chunk;
  std::atomic<bool> in_range{true};
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
  for (int64_t t = 0; t < nbb + nqb; ++t) {
    if (t < nbb) {
      const int64_t r0 = t * 256, r1 = std::min(M, r0 + 256);
      if (!row_norms(P.b, DT, r0, r1, P.C, P.binv.data(), P.bn2.data(), P.bnorm.data())) in_range.store(false);
      for (int64_t j = r0; screen && j < r1; ++j) {
        // cosine screens dot(q^, b) * inv|b|, whose canonical value involves |b| inv|b| <= 1
        const double nb = cosine ? up(P.bnorm[j] * static_cast<double>(P.binv[j]) * infl) : P.bnorm[j];
        P.gg[j] = cosine ? P.binv[j] : 1.0f;
        P.gP[j] = up(kappa * nb * infl);
        P.gc[j] = P.l2() ? static_cast<float>(g * nb * nb * infl - P.sgn * static_cast<double>(P.bn2[j])) : 0.0f;
      }
      continue;
    }
    const int64_t chunk = (t - nbb) / per_chunk, i0 = (t - nbb) % per_chunk * 64;
    const int64_t r0 = chunk * R + i0, r1 = std::min({NQ, chunk * R + R, r0 + 64});
    if (r0 >= r1) continue;
    if (!row_norms(P.q, DT, r0, r1, P.C, P.qinv.data(), P.qn2.data(), P.qnorm.data())) in_range.store(false);
    for (int64_t r = r0; screen && r < r1; ++r) {
      const double nq = cosine ? up(P.qnorm[r] * static_cast<double>(P.qinv[r]) * infl) : P.qnorm[r];
      P.galpha[r] = static_cast<float>(nq);
      P.ge[r] = P.l2() ? static_cast<float>(g * nq * nq * infl - P.sgn * static_cast<double>(P.qn2[r])) : 0.0f;
    }
    if (!preps.empty()) prep_rows<DT>(P, preps[chunk], i0, r1 - chunk * R);
  }
  if (!in_range.load()) {
    st.status = 1;
    return;
  }
  std::vector<std::unique_ptr<TopK>> partial(S > 1 ? static_cast<size_t>(ntask) : 0);
  std::vector<std::unique_ptr<std::atomic<float>[]>> shared(S > 1 ? static_cast<size_t>(nchunk) : 0);
  for (int64_t c = 0; c < static_cast<int64_t>(shared.size()); ++c) {
    const int64_t rows = std::min(R, NQ - c * R);
    shared[c].reset(new std::atomic<float>[static_cast<size_t>(rows)]);
    for (int64_t i = 0; i < rows; ++i) shared[c][i].store(-kInf);
  }
  std::unique_ptr<std::atomic<int>[]> done(new std::atomic<int>[static_cast<size_t>(nchunk)]);
  for (int64_t c = 0; c < nchunk; ++c) done[c].store(0);
  std::vector<TaskCounters> counters(static_cast<size_t>(ntask));
  std::atomic<bool> failed{false};
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
  for (int64_t t = 0; t < ntask; ++t) {
    if (failed.load(std::memory_order_relaxed)) continue;
    try {
      const int64_t chunk = t / S, split = t % S;
      const int64_t r0 = chunk * R, rows = std::min(R, NQ - r0);
      const int64_t m0 = split * span, m1 = std::min(M, m0 + span);
      auto top = std::make_unique<TopK>();
      top->init(rows, P.k);
      if (S > 1) top->shared = shared[chunk].get();
      if (path == kNNInt8) {
        if (S > 1) {
          run_int8<DT>(P, preps[chunk], m0, m1, *top, fp32_mode, counters[t]);
        } else {
          QueryPrep qp;
          qp.r0 = r0;
          qp.rows = rows;
          qp.qu.resize(static_cast<size_t>(rows * P.C8));
          qp.qt.resize(static_cast<size_t>(rows));
          prep_rows<DT>(P, qp, 0, rows);
          run_int8<DT>(P, qp, m0, m1, *top, fp32_mode, counters[t]);
        }
      } else {
        run_fp32<DT>(P, path == kNNL2Direct ? static_cast<int>(kDirectDiff) : fp32_mode, r0, rows, m0, m1, *top,
                     counters[t]);
      }
      std::vector<Entry> best, part;
      if (S == 1) {
        for (int64_t i = 0; i < rows && !top->written; ++i) {
          top->sorted(i, best);
          write_row(P, r0 + i, best);
        }
        continue;
      }
      partial[t] = std::move(top);
      // the last split of a chunk to finish merges the chunk's lists
      if (done[chunk].fetch_add(1) + 1 != S) continue;
      for (int64_t i = 0; i < rows; ++i) {
        best.clear();
        for (int64_t s = 0; s < S; ++s) {
          partial[chunk * S + s]->sorted(i, part);
          best.insert(best.end(), part.begin(), part.end());
        }
        keep_best(best, P.k);
        write_row(P, r0 + i, best);
      }
      for (int64_t s = 0; s < S; ++s) partial[chunk * S + s].reset();
      shared[chunk].reset();
    } catch (...) {
      failed.store(true);
    }
  }
  if (failed.load()) throw std::bad_alloc();
  for (const TaskCounters& c : counters) {
    st.exact_evals += c.evals;
    st.screened_pairs += c.screened;
    st.int8_tasks += c.int8_tasks;
    st.switched_tasks += c.switched;
  }
}

template <int DT>
void run_all(const NNArgs& a, NNStats& st) {
  const bool shared = a.Bb == 1;
  const int64_t nprob = shared ? 1 : a.B;
  const int64_t NQ = shared ? a.B * a.N : a.N;
  const int64_t k = a.k;
  const bool topk = a.reduce == kNNTopk;
  const int64_t vstride = topk ? k : 1;
  for (int64_t p = 0; p < nprob; ++p) {
    Problem P;
    P.q = row_ptr(a.query, DT, p * NQ, a.C);
    P.b = row_ptr(a.bank, DT, shared ? 0 : p * a.M, a.C);
    P.NQ = NQ;
    P.M = a.M;
    P.C = a.C;
    P.C8 = round_up(a.C, 8);
    P.k = k;
    P.metric = a.metric;
    // topk keeps the nearest (largest cos / -d^2 / q.b); the mean modes keep the
    // largest or smallest value, which for cosine and l2 is the smallest score
    bool keep_large_value = a.reduce == kNNMeanLargest;
    if (a.reduce == kNNTopk) keep_large_value = a.metric == kNNIp;
    P.sgn = (a.metric == kNNIp) == keep_large_value ? 1 : -1;
    if (a.query_groups) {
      P.qg = a.query_groups + p * NQ;
      P.bg = a.bank_groups + (a.Bg > 1 ? p * a.M : 0);
      P.same = a.group_same;
    }
    P.gamma = static_cast<double>(a.C + 64) * kU * 1.05;
    P.values = a.values + p * NQ * vstride;
    P.indices = a.indices ? a.indices + p * NQ * k : nullptr;
    P.topk = topk;
    P.scale = a.scale;
    P.wide_tiles = use_avx512_tiles();
    run_problem<DT>(P, a.path, a.nthreads, st);
    if (st.status != 0) return;
  }
}

}  // namespace

void nn_distance_kernel(const NNArgs& args, NNStats& stats) {
  if (args.dtype == kF32) run_all<kF32>(args, stats);
  else if (args.dtype == kF16) run_all<kF16>(args, stats);
  else run_all<kBF16>(args, stats);
}

}  // namespace FASTAD_ISA_NS
}  // namespace fastad
