// k-center greedy (farthest-point) selection, exact and pruned.
//
// Canonical distance (the definition every fastad backend reproduces bit for bit):
//   D(x, c) = float32( sqrt( pairwise_sum_j double(float32(x_j - c_j))^2 ) )
// with x_j, c_j the float32 values of the rows (fp16 / bf16 widened exactly) and
// pairwise_sum the recursive-halves tree over the row zero-padded to P = next
// power of two >= C (level by level: t[i] = t[2i] + t[2i+1]). Every square is
// exact in double and every add is a fixed IEEE operation, so the value does not
// depend on vector width, thread count or device.
//
// The selection keeps, per point, mind(x) = min over centers of D(x, c) and, per
// center, the list of points whose nearest center it is (its cluster) with the
// cluster's largest mind (r). Adding a center s reads as few rows as it can:
//  * triangle inequality: a whole cluster c is skipped when d(c, s) >= 2 r(c), a
//    point x of a scanned cluster when d(c, s) >= 2 mind(x); for an argmax pick
//    d(c, s) >= mind(s) = R for every center, so clusters with r(c) <= R / 2 are
//    skipped without reading anything;
//  * the remaining points are tested on an approximate copy of the rows (fp16, or
//    bf16 in the generic build), read in memory order, in float32, with a proved
//    error bound; the scan of a row stops as soon as its partial sum proves
//    d(x, s) >= mind(x). The copy stores y(x) = [U^T v ; v - U U^T v], v = x - mu,
//    for U the top principal directions of the data (orthonormal columns; none for
//    data without dominant directions): ||y(x) - y(s)|| = ||x - s|| (Pythagoras), and
//    the first coordinates carry most of each distance, so most rows are settled
//    after their first 64 bytes;
//  * only points that may get closer to s are recomputed canonically (exact value).
// Every skip is proved with margins far above the float32 rounding of D, so mind,
// the clusters' maxima, and hence every argmax (ties to the lowest index) equal
// those of the plain loop that evaluates D for every point and center.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include <omp.h>


#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "isa.h"

namespace fastad {
namespace FASTAD_ISA_NS {
namespace {

// Element codes shared with csrc/common.h (enum DType) and kcenter.cpp (storage).
constexpr int kF32 = 0, kF16 = 1, kBF16 = 2;
constexpr int kStoreAuto = 0, kStoreInput = 1, kStoreF16 = 2, kStoreBF16 = 3;

constexpr float kInf = std::numeric_limits<float>::infinity();
// Relative margins of the skip tests. The canonical D differs from the exact
// Euclidean distance by at most ~1.2e-7 (float32 differences and final rounding);
// the margins also absorb the float32 rounding of the tests themselves.
constexpr float kKappa = 2e-6f;   // "d(x, s) >= mind(x)" tests
constexpr float kKappa2 = 1e-5f;  // triangle-inequality tests
// Range guards (inputs anywhere in the float32 range, e.g. rows of norm 1e20 or
// 1e-25). The margins above are relative, which holds for normal float32 values
// only: a canonical D below 2^-126 is rounded to a subnormal (absolute error 2^-150),
// and the float32 approximate sums overflow or underflow for large / tiny rows. So
//  * a proof about a point (or a cluster radius) is attempted only when its mind is
//    0 or at least kMinProof, a lower bound on d(c, s) is used only when it is at
//    least kMinProof (else 0: no information);
//  * an approximate sum (in the copy's units) proves nothing when its threshold
//    target is below kMinTarget (its square would leave the normal range) or is not
//    finite, and a sum that overflowed is taken as FLT_MAX.
// Everything else falls through to the canonical (double) distance, exact for every
// finite float32 input.
constexpr float kMinProof = 0x1p-100f;
constexpr float kMinTarget = 0x1p-60f;
constexpr float kMaxSum = std::numeric_limits<float>::max();

inline bool provable(float m) { return m == 0.f || m >= kMinProof; }

// ---------------------------------------------------------------- conversions
inline float bf16_to_f32(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even; inputs are finite
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu, u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do { ++e; man <<= 1; } while (!(man & 0x400u));
      u = sign | ((112u - static_cast<uint32_t>(e)) << 23) | ((man & 0x3FFu) << 13);
    }
  } else if (exp == 31) {
    u = sign | 0x7F800000u | (man << 13);
  } else {
    u = sign | ((exp + 112u) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even; |f| < 65504 here (the copy is scaled to at most 2^15).
inline uint16_t f32_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  u &= 0x7FFFFFFFu;
  if (u < 0x33000000u) return sign;  // below half the smallest subnormal
  if (u < 0x38800000u) {             // fp16 subnormal
    const uint32_t man = (u & 0x7FFFFFu) | 0x800000u;
    const int shift = 126 - static_cast<int>(u >> 23);  // 14..24
    uint32_t r = man >> shift;
    const uint32_t rem = man & ((1u << shift) - 1u), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return static_cast<uint16_t>(sign | r);
  }
  uint32_t r = ((u - 0x38000000u) >> 13);
  const uint32_t rem = u & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;
  return static_cast<uint16_t>(sign | r);
}

template <int D>
inline float load_elem(const void* p, int64_t j) {
  if (D == kF32) return static_cast<const float*>(p)[j];
  if (D == kF16) return f16_to_f32(static_cast<const uint16_t*>(p)[j]);
  return bf16_to_f32(static_cast<const uint16_t*>(p)[j]);
}

#if defined(__AVX2__)
template <int D>
inline __m256 load8(const void* p, int64_t j) {
  if (D == kF32) return _mm256_loadu_ps(static_cast<const float*>(p) + j);
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + j));
  if (D == kF16) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// --------------------------------------------------------- canonical distance
// buf holds P doubles (P = next power of two >= C, zero beyond C on entry and exit
// of the fill loop below).
template <int D>
float canonical_dist(const void* xrow, const float* c, int64_t C, int64_t P, double* buf) {
  for (int64_t j = 0; j < C; ++j) {
    const double d = static_cast<double>(load_elem<D>(xrow, j) - c[j]);
    buf[j] = d * d;
  }
  for (int64_t j = C; j < P; ++j) buf[j] = 0.0;
  for (int64_t n = P; n > 1; n >>= 1) {
    const int64_t h = n >> 1;
    int64_t i = 0;
#if defined(__AVX2__)
    // hadd gives [b0+b1, b4+b5, b2+b3, b6+b7] for b0..b7 = buf[2i..2i+7]; the
    // permute restores order. Same IEEE adds as the scalar loop.
    for (; i + 4 <= h; i += 4) {
      const __m256d a = _mm256_loadu_pd(buf + 2 * i), b = _mm256_loadu_pd(buf + 2 * i + 4);
      _mm256_storeu_pd(buf + i, _mm256_permute4x64_pd(_mm256_hadd_pd(a, b), 0xD8));
    }
#endif
    for (; i < h; ++i) buf[i] = buf[2 * i] + buf[2 * i + 1];
  }
  return static_cast<float>(std::sqrt(buf[0]));
}

// ------------------------------------------------------ approximate distance
// init + float32 sum of (q_j - s_j)^2 over W elements (q: a copy row, s: a float
// row in the same units). Returns as soon as a partial sum reaches `stop` (checked
// after every 32 elements), otherwise the full sum. Partial sums of squares only
// grow, so a returned value >= stop proves the full sum >= stop up to the rounding
// bound.
template <int S>
float approx_sq(const void* q, const float* s, int64_t W, float init, float stop) {
  int64_t j = 0;
  float total = init;
#if defined(__AVX2__)
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  for (; j + 32 <= W; j += 32) {
    const __m256 d0 = _mm256_sub_ps(load8<S>(q, j), _mm256_loadu_ps(s + j));
    const __m256 d1 = _mm256_sub_ps(load8<S>(q, j + 8), _mm256_loadu_ps(s + j + 8));
    const __m256 d2 = _mm256_sub_ps(load8<S>(q, j + 16), _mm256_loadu_ps(s + j + 16));
    const __m256 d3 = _mm256_sub_ps(load8<S>(q, j + 24), _mm256_loadu_ps(s + j + 24));
    a0 = _mm256_fmadd_ps(d0, d0, a0);
    a1 = _mm256_fmadd_ps(d1, d1, a1);
    a2 = _mm256_fmadd_ps(d2, d2, a2);
    a3 = _mm256_fmadd_ps(d3, d3, a3);
    if (j + 32 < W) {
      const float part = init + hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
      if (part >= stop) return part;
    }
  }
  for (; j + 8 <= W; j += 8) {
    const __m256 d0 = _mm256_sub_ps(load8<S>(q, j), _mm256_loadu_ps(s + j));
    a0 = _mm256_fmadd_ps(d0, d0, a0);
  }
  total += hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
#else
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (; j + 32 <= W; j += 32) {
    for (int64_t u = j; u < j + 32; u += 8)
      for (int l = 0; l < 8; ++l) {
        const float d = load_elem<S>(q, u + l) - s[u + l];
        acc[l] += d * d;
      }
    if (j + 32 < W) {
      float part = init;
      for (int l = 0; l < 8; ++l) part += acc[l];
      if (part >= stop) return part;
    }
  }
  for (int l = 0; l < 8; ++l) total += acc[l];
#endif
  for (; j < W; ++j) {
    const float d = load_elem<S>(q, j) - s[j];
    total += d * d;
  }
  return total;
}

constexpr int kPW = 32;  // width of the rotated prefix kept inline in the member lists

// Sum of squares of the kPW prefix differences.
template <int S>
inline float prefix_sq(const uint16_t* p, const float* s) {
#if defined(__AVX2__)
  const __m256 d0 = _mm256_sub_ps(load8<S>(p, 0), _mm256_loadu_ps(s));
  const __m256 d1 = _mm256_sub_ps(load8<S>(p, 8), _mm256_loadu_ps(s + 8));
  const __m256 d2 = _mm256_sub_ps(load8<S>(p, 16), _mm256_loadu_ps(s + 16));
  const __m256 d3 = _mm256_sub_ps(load8<S>(p, 24), _mm256_loadu_ps(s + 24));
  const __m256 a = _mm256_fmadd_ps(d1, d1, _mm256_mul_ps(d0, d0));
  const __m256 b = _mm256_fmadd_ps(d3, d3, _mm256_mul_ps(d2, d2));
  return hsum8(_mm256_add_ps(a, b));
#else
  float acc = 0.f;
  for (int k = 0; k < kPW; ++k) {
    const float d = load_elem<S>(p, k) - s[k];
    acc += d * d;
  }
  return acc;
#endif
}

// A cache-line aligned buffer for the copy (no value initialisation: it is written
// whole before any read).
class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  ~AlignedBuffer() { std::free(p_); }
  void allocate(size_t bytes) {
    std::free(p_);
    p_ = nullptr;
    if (posix_memalign(&p_, 64, bytes ? bytes : 64) != 0) {
      p_ = nullptr;
      throw std::bad_alloc();
    }
  }
  void* data() const { return p_; }

 private:
  void* p_ = nullptr;
};

inline void prefetch_row(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  const int64_t n = std::min<int64_t>(bytes, 128);
  for (int64_t o = 0; o < n; o += 64) __builtin_prefetch(c + o);
}

// ------------------------------------------------------------------ problem
// A point of a cluster, with what the skip tests need inline: scanning a cluster
// reads one contiguous list, and rows only of the points that survive the tests.
template <int PW>
struct Member {
  int32_t idx;
  float mind;          // canonical distance to the cluster's center (+inf: no center yet)
  float qerr;          // bound of its copy's error (scaled units)
  uint16_t p[PW];      // the first PW coordinates of its copy (rotated prefix)
};
template <>
struct Member<0> {
  int32_t idx;
  float mind;
};

template <int PW>
struct Cluster {
  int32_t center = -1;  // point index, -1 for the initial "no center yet" group
  float r = -kInf;      // max mind over members (-inf when empty)
  int32_t ridx = std::numeric_limits<int32_t>::max();  // lowest index attaining r
  std::vector<Member<PW>> members;
};

inline bool better(float ra, int32_t ia, float rb, int32_t ib) { return ra > rb || (ra == rb && ia < ib); }

struct WorkItem {
  int32_t cluster;
  int64_t begin, end;  // range in the cluster's member list
  int64_t base;        // offset of this item's slots in the scratch buffers
  int64_t nflag = 0, nkept = 0, nmoved = 0;
  float r = -kInf;
  int32_t ridx = std::numeric_limits<int32_t>::max();
};

struct Setup {
  const void* x;  // [N, C] rows
  int dtype;
  int64_t N, C;
  std::vector<int32_t> forced;
  int64_t picks;
  int store;         // kStoreInput / kStoreF16 / kStoreBF16 (resolved)
  const float* mu;   // [C], centres the copy
  const double* U;   // [C, m] orthonormal columns rotating the copy's prefix, m <= kPW
  int64_t m;
  float sig;         // >= 1, bounds ||y(x) - y(s)|| / ||x - s|| for this U
};

class ProblemBase {
 public:
  virtual ~ProblemBase() = default;
  // Runs the forced centers (first call) and up to `nsteps` argmax picks; returns
  // the argmax picks done so far.
  virtual int64_t advance(int64_t nsteps, int nthreads) = 0;
  virtual const std::vector<int32_t>& picks() const = 0;
  virtual float radius() const = 0;
};

// PW = kPW: the copy is y(x) = [U^T v ; v - U U^T v] (v = x - mu), its first kPW
// coordinates inline in the members; PW = 0: the copy is v (or x itself).
template <int PW>
class Problem final : public ProblemBase {
  using M = Member<PW>;
  using Cl = Cluster<PW>;

 public:
  explicit Problem(Setup s) : st_(std::move(s)) {
    P_ = 1;
    while (P_ < st_.C) P_ <<= 1;
  }

  int64_t advance(int64_t nsteps, int nthreads) override {
    if (!ready_) prepare(nthreads);
    const size_t nt = static_cast<size_t>(std::max(1, nthreads));
    if (canon_buf_.size() < static_cast<size_t>(P_) * nt) canon_buf_.resize(static_cast<size_t>(P_) * nt, 0.0);
    if (list_.size() < kRange * nt) list_.resize(kRange * nt);
    for (; next_forced_ < st_.forced.size(); ++next_forced_) {
      const int32_t s = st_.forced[next_forced_];
      if (!selected_[s]) add_center(s, false, 0.f, nthreads);
    }
    for (int64_t t = 0; t < nsteps && static_cast<int64_t>(picks_.size()) < st_.picks; ++t) {
      const Cl& cb = clusters_[tree_[1]];
      if (cb.r == -kInf) break;  // nothing left to pick (the bindings rule this out)
      const int32_t s = cb.ridx;
      picks_.push_back(s);
      add_center(s, true, cb.r, nthreads);
    }
    return static_cast<int64_t>(picks_.size());
  }

  const std::vector<int32_t>& picks() const override { return picks_; }

  float radius() const override {
    if (!ready_) return kInf;
    const float r = clusters_[tree_[1]].r;
    return r == -kInf ? 0.f : r;
  }

 private:
  static constexpr int64_t kRange = 4096;  // points per pass-2 task
  enum : uint8_t { kUntested = 0, kTest = 1, kLeave = 2, kKept = 3, kMoved = 4 };

  Setup st_;
  int64_t P_ = 1;
  size_t next_forced_ = 0;
  bool ready_ = false;

  // Approximate rows q_ (element code qtype_, C each; after the prefix when PW > 0),
  // the prefixes pre_ [N, PW], both times scale_; qerr_ bounds the error of a point's
  // whole copy (prefix and rest) against y(x) scale_ (empty: exact).
  AlignedBuffer copy_;
  std::vector<uint16_t> pre_;
  const void* q_ = nullptr;
  int qtype_ = kF32;
  float scale_ = 1.f;
  std::vector<float> qerr_;
  float gamma_ = 0.f;  // relative bound of a float32 sum of C + PW squares

  std::vector<int32_t> assign_;  // cluster of each unselected point
  std::vector<uint8_t> selected_;
  std::vector<Cl> clusters_;
  std::vector<int32_t> tree_;
  int64_t cap_ = 1;
  std::vector<int32_t> picks_;

  // per-step scratch
  std::vector<float> s_in_, s_q_, dlo_;
  float sp_[kPW] = {};
  float sqerr_ = 0.f;
  std::vector<uint8_t> scan_;
  std::vector<int32_t> need_;
  std::vector<WorkItem> items_;
  std::vector<M> moved_;
  std::vector<uint8_t> flag_;   // per point: kUntested / kTest / kLeave / kKept / kMoved
  std::vector<float> tmind_;    // per flagged point: its mind, then its new mind
  std::vector<float> tpart_;    // per flagged point: its prefix's partial sum
  std::vector<int32_t> list_;   // per thread: flagged points of a range
  std::vector<int32_t> pos_;    // per work item: positions of its flagged members
  std::vector<double> canon_buf_;

  const void* xrow(int64_t i) const {
    return static_cast<const char*>(st_.x) + i * st_.C * (st_.dtype == kF32 ? 4 : 2);
  }
  const void* qrow(int64_t i) const {
    return static_cast<const char*>(q_) + i * st_.C * (qtype_ == kF32 ? 4 : 2);
  }
  int64_t qrow_bytes() const { return st_.C * (qtype_ == kF32 ? 4 : 2); }
  float qerr(int64_t i) const { return qerr_.empty() ? 0.f : qerr_[i]; }
  // target^2 (1 + kKappa) / (1 - gamma): a float32 (partial) sum of squares >= this
  // proves ||y(x) - y(s)|| scale >= target.
  // Targets below kMinTarget give +inf (nothing can be proved).
  float threshold(float target) const {
    if (!(target >= kMinTarget)) return kInf;
    return target * target * (1.f + kKappa) / (1.f - gamma_);
  }

  void prepare(int nthreads) {
    const int64_t N = st_.N;
    if (st_.store == kStoreInput) {
      q_ = st_.x;
      qtype_ = st_.dtype;
    } else {
      const int qtype = st_.store == kStoreF16 ? kF16 : kBF16;
      switch (st_.dtype) {
        case kF32: make_copy<kF32>(qtype, nthreads); break;
        case kF16: make_copy<kF16>(qtype, nthreads); break;
        default: make_copy<kBF16>(qtype, nthreads); break;
      }
    }
    gamma_ = static_cast<float>((static_cast<double>(st_.C) + PW + 4.0) * std::ldexp(1.0, -24) * 1.01);
    assign_.assign(N, 0);
    selected_.assign(N, 0);
    const int64_t nclusters = 1 + static_cast<int64_t>(st_.forced.size()) + st_.picks;
    clusters_.reserve(nclusters);
    clusters_.emplace_back();
    Cl& c0 = clusters_.back();
    c0.members.resize(N);
    for (int64_t i = 0; i < N; ++i) {
      M& e = c0.members[i];
      e.idx = static_cast<int32_t>(i);
      e.mind = kInf;
      if constexpr (PW > 0) {
        e.qerr = qerr(i);
        std::memcpy(e.p, pre_.data() + i * PW, sizeof(e.p));
      }
    }
    c0.r = kInf;
    c0.ridx = 0;
    while (cap_ < nclusters) cap_ <<= 1;
    tree_.assign(2 * cap_, -1);
    tree_update(0);
    s_in_.resize(st_.C);
    s_q_.resize(st_.C);
    moved_.resize(N);
    flag_.assign(N, 0);
    tmind_.resize(N);
    tpart_.resize(N);
    pos_.resize(N);
    ready_ = true;
  }

  // y(x) = [U^T v ; v - U U^T v] (PW > 0) or v (v = x - mu), in double, times a power
  // of two, rounded to fp16 / bf16; qerr = ||q(x) - y(x) scale|| evaluated in double,
  // plus a bound of the double rounding of y.
  template <int D>
  void make_copy(int qtype, int nthreads) {
    const int64_t N = st_.N, C = st_.C, m = PW > 0 ? st_.m : 0, W = PW + C;
    const float* mu = st_.mu;
    const double* U = st_.U;
    std::vector<double> Ut(static_cast<size_t>(m) * C);
    for (int64_t j = 0; j < C; ++j)
      for (int64_t k = 0; k < m; ++k) Ut[k * C + j] = U[j * m + k];
    // y[0, PW) = prefix (zero beyond m), y[PW, PW + C) = the rest.
    auto rotate = [&](int64_t i, double* y, double* n2) {
      const void* xi = xrow(i);
      double* v = y + PW;
      double vv = 0.0;
      for (int64_t j = 0; j < C; ++j) {
        v[j] = static_cast<double>(load_elem<D>(xi, j)) - static_cast<double>(mu[j]);
        vv += v[j] * v[j];
      }
      *n2 = vv;
      if (PW == 0) return;
      for (int64_t k = 0; k < PW; ++k) y[k] = 0.0;
      for (int64_t j = 0; j < C; ++j) {
        const double* u = U + j * m;
        for (int64_t k = 0; k < m; ++k) y[k] += v[j] * u[k];
      }
      for (int64_t k = 0; k < m; ++k) {  // U^T rows: vectorises over j
        const double* ut = Ut.data() + k * C;
        const double yk = y[k];
        for (int64_t j = 0; j < C; ++j) v[j] -= ut[j] * yk;
      }
    };
    // The scale comes from the largest row norm: |y_j| <= ||y|| ~ ||v||.
    double maxnorm = 0.0;
#pragma omp parallel for num_threads(nthreads) if (nthreads > 1) reduction(max : maxnorm) schedule(static)
    for (int64_t i = 0; i < N; ++i) {
      const void* xi = xrow(i);
      double vv = 0.0;
      for (int64_t j = 0; j < C; ++j) {
        const double v = static_cast<double>(load_elem<D>(xi, j)) - static_cast<double>(mu[j]);
        vv += v * v;
      }
      maxnorm = std::max(maxnorm, std::sqrt(vv));
    }
    int e = 0;
    if (maxnorm > 0.0) std::frexp(maxnorm * st_.sig * (1.0 + 1e-6), &e);  // maxnorm < 2^e
    scale_ = std::ldexp(1.f, 14 - e);  // scaled values < 2^14: fp16 range, few subnormals
    if (!std::isfinite(scale_) || scale_ == 0.f) scale_ = 1.f;
    const double scale = scale_;
    copy_.allocate(static_cast<size_t>(N) * C * sizeof(uint16_t));
    if (PW > 0) pre_.resize(static_cast<size_t>(N) * PW);
    qerr_.resize(N);
    uint16_t* q = static_cast<uint16_t*>(copy_.data());
    float* qerr = qerr_.data();
    // y in double is off by at most (C + 2m + 4) 2^-53 sqrt(m + 1) ||v|| (dot products
    // of length C and m with unit-norm columns); 4x that as a margin.
    const double yerr = 4.0 * (static_cast<double>(C) + 2.0 * m + 4.0) * std::ldexp(1.0, -53) *
                        std::sqrt(static_cast<double>(m) + 1.0);
    std::vector<double> ybuf(static_cast<size_t>(W) * nthreads);
    std::vector<float> fbuf(static_cast<size_t>(2 * W) * nthreads);
    std::vector<uint16_t> hbuf(static_cast<size_t>(W) * nthreads);
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
      const int tid = omp_get_thread_num();
      double* y = ybuf.data() + static_cast<size_t>(W) * tid;
      float* v = fbuf.data() + static_cast<size_t>(2 * W) * tid;
      float* back = v + W;
      uint16_t* h = hbuf.data() + static_cast<size_t>(W) * tid;
#pragma omp for schedule(static)
      for (int64_t i = 0; i < N; ++i) {
        double n2;
        rotate(i, y, &n2);
        for (int64_t j = 0; j < W; ++j) v[j] = static_cast<float>(y[j] * scale);  // power-of-two scaling
        int64_t j = 0;
#if defined(__F16C__)
        if (qtype == kF16)
          for (; j + 8 <= W; j += 8) {
            const __m128i hv = _mm256_cvtps_ph(_mm256_loadu_ps(v + j), _MM_FROUND_TO_NEAREST_INT);
            _mm_storeu_si128(reinterpret_cast<__m128i*>(h + j), hv);
            _mm256_storeu_ps(back + j, _mm256_cvtph_ps(hv));
          }
#endif
        for (; j < W; ++j) {
          h[j] = qtype == kF16 ? f32_to_f16(v[j]) : f32_to_bf16(v[j]);
          back[j] = qtype == kF16 ? f16_to_f32(h[j]) : bf16_to_f32(h[j]);
        }
        if (PW > 0) std::memcpy(pre_.data() + i * PW, h, PW * sizeof(uint16_t));
        std::memcpy(q + i * C, h + PW, C * sizeof(uint16_t));
        double err2 = 0.0;
        for (int64_t u = 0; u < W; ++u) {
          const double d = static_cast<double>(back[u]) - y[u] * scale;
          err2 += d * d;
        }
        qerr[i] = static_cast<float>((std::sqrt(err2) + yerr * std::sqrt(n2) * scale) * (1.0 + 1e-6) + 1e-30);
      }
    }
    q_ = copy_.data();
    qtype_ = qtype;
  }

  // Tournament tree over the clusters' (r, ridx): the root is the next argmax.
  // Node value -1 stands for an unused leaf.
  bool node_better(int32_t a, int32_t b) const {
    if (b < 0) return a >= 0;
    if (a < 0) return false;
    return better(clusters_[a].r, clusters_[a].ridx, clusters_[b].r, clusters_[b].ridx);
  }

  void tree_update(int64_t j) {
    int64_t p = cap_ + j;
    tree_[p] = static_cast<int32_t>(j);
    for (p >>= 1; p >= 1; p >>= 1) {
      const int32_t a = tree_[2 * p], b = tree_[2 * p + 1];
      tree_[p] = node_better(b, a) ? b : a;
    }
  }

  // Approximate float32 ||q(i) - q(s)||^2 (prefix + rest), stopping early at `stop`.
  template <int Q>
  float approx_to_s(int64_t i, float stop) const {
    float init = 0.f;
    if constexpr (PW > 0) init = prefix_sq<Q>(pre_.data() + i * PW, sp_);
    if (init >= stop) return init;
    return approx_sq<Q>(qrow(i), s_q_.data(), st_.C, init, stop);
  }

  // Which clusters may hold points closer to s than to their center, and a lower
  // bound dlo of d(center, s) for the per-point test.
  template <int Q>
  void phase1(int32_t s, bool by_argmax, float R, int nthreads) {
    const int64_t nc = static_cast<int64_t>(clusters_.size()) - 1;  // the new cluster is last
    const int32_t as = assign_[s];
    const float Es = sqerr_, scale = scale_, g = gamma_, sig = st_.sig;
    // For an argmax pick, d(c, s) >= D(s, c) (1 - 1.2e-7) >= R (1 - kKappa) for every center c.
    const float lower = by_argmax && R >= kMinProof ? R * (1.f - kKappa) : 0.f;
    need_.clear();
    for (int64_t j = 0; j < nc; ++j) {
      const Cl& c = clusters_[j];
      scan_[j] = 0;
      if (c.members.empty()) continue;
      if (c.center < 0) {
        scan_[j] = 1;
        dlo_[j] = 0.f;
        continue;
      }
      if (j != as && lower >= 2.f * c.r * (1.f + kKappa2)) continue;
      need_.push_back(static_cast<int32_t>(j));
    }
    const int64_t nneed = static_cast<int64_t>(need_.size());
    const bool par = nthreads > 1 && nneed * st_.C >= (int64_t(1) << 20);
#pragma omp parallel for num_threads(nthreads) if (par) schedule(dynamic, 16)
    for (int64_t u = 0; u < nneed; ++u) {
      const int32_t j = need_[u];
      const Cl& c = clusters_[j];
      const float Ec = qerr(c.center);
      // A sum >= thr proves d(c, s) >= 2 r (1 + kKappa2).
      const float thr = provable(c.r) ? threshold(2.f * c.r * (1.f + kKappa2) * sig * scale + Ec + Es) : kInf;
      // s's own cluster is always scanned: s leaves it.
      const bool can_stop = j != as && std::isfinite(thr);
      const float S = std::min(approx_to_s<Q>(c.center, can_stop ? thr : kInf), kMaxSum);
      if (can_stop && S >= thr) continue;
      // below kMinTarget^2 the sum's subnormal roundings are not covered by gamma
      float lo = 0.f;
      if (S >= kMinTarget * kMinTarget) lo = (std::sqrt(S * (1.f - g)) - Ec - Es) / (scale * sig) * (1.f - kKappa);
      dlo_[j] = std::max(lower, lo >= kMinProof ? lo : 0.f);
      scan_[j] = 1;
    }
  }

  // Pass 1 on one work item (members [begin, end) of a scanned cluster): the
  // triangle test, then the prefix's partial sum, on the inline values. The points
  // still undecided are flagged and their positions listed; the maximum is taken
  // over the others (they stay, unchanged).
  template <int Q>
  void mark_item(WorkItem& w, int32_t s) {
    const M* mem = clusters_[w.cluster].members.data();
    const float dlo = dlo_[w.cluster];
    const float Es = sqerr_, scale = scale_, sig = st_.sig;
    uint8_t* flag = flag_.data();
    int32_t* pos = pos_.data() + w.base;
    for (int64_t i = w.begin; i < w.end; ++i) {
      const M& e = mem[i];
      const float m = e.mind;
      if (e.idx == s) {
        flag[e.idx] = kLeave;
        pos[w.nflag++] = static_cast<int32_t>(i);
        continue;
      }
      bool settled = dlo >= 2.f * m * (1.f + kKappa2);
      float part = 0.f;
      if constexpr (PW > 0) {
        if (!settled && m != kInf && provable(m)) {
          // A sum >= thr proves d(x, s) >= mind(x) (1 + kKappa).
          const float thr = threshold(m * (1.f + kKappa) * sig * scale + e.qerr + Es);
          part = prefix_sq<Q>(e.p, sp_);
          settled = part >= thr && std::isfinite(thr);
        }
      }
      if (settled) {
        if (better(m, e.idx, w.r, w.ridx)) {
          w.r = m;
          w.ridx = e.idx;
        }
        continue;
      }
      flag[e.idx] = kTest;
      tmind_[e.idx] = m;
      tpart_[e.idx] = part;
      pos[w.nflag++] = static_cast<int32_t>(i);
    }
  }

  // Pass 2 on the points [lo, hi): the rows of the flagged ones, in memory order.
  template <int Q>
  void test_range(int64_t lo, int64_t hi, double* buf, int32_t* list) {
    const int64_t C = st_.C, P = P_, qbytes = qrow_bytes();
    const float Es = sqerr_, scale = scale_, sig = st_.sig;
    const float* sq = s_q_.data();
    const float* sin = s_in_.data();
    uint8_t* flag = flag_.data();
    int64_t n = 0;
    for (int64_t i = lo; i < hi; ++i) {
      if (!(i & 7) && i + 8 <= hi) {  // skip 8 clear flags at once
        uint64_t word;
        std::memcpy(&word, flag + i, 8);
        if (!word) {
          i += 7;
          continue;
        }
      }
      if (flag[i] == kTest) list[n++] = static_cast<int32_t>(i);
    }
    constexpr int64_t kAhead = 6;
    for (int64_t u = 0; u < std::min(n, kAhead); ++u) prefetch_row(qrow(list[u]), qbytes);
    for (int64_t u = 0; u < n; ++u) {
      if (u + kAhead < n) prefetch_row(qrow(list[u + kAhead]), qbytes);
      const int32_t x = list[u];
      const float m = tmind_[x];
      if (m != kInf && provable(m)) {
        const float thr = threshold(m * (1.f + kKappa) * sig * scale + qerr(x) + Es);
        if (std::isfinite(thr) && approx_sq<Q>(qrow(x), sq, C, tpart_[x], thr) >= thr) {
          flag[x] = kKept;
          continue;
        }
      }
      float d;
      switch (st_.dtype) {
        case kF32: d = canonical_dist<kF32>(xrow(x), sin, C, P, buf); break;
        case kF16: d = canonical_dist<kF16>(xrow(x), sin, C, P, buf); break;
        default: d = canonical_dist<kBF16>(xrow(x), sin, C, P, buf); break;
      }
      if (d < m) {
        tmind_[x] = d;
        flag[x] = kMoved;
      } else {
        flag[x] = kKept;
      }
    }
  }

  // Pass 3 on one work item: apply the results to its flagged members, clear their
  // flags, and compact the list when some left.
  void collect_item(WorkItem& w, int32_t t) {
    M* mem = clusters_[w.cluster].members.data();
    M* moved = moved_.data() + w.base;
    const int32_t* pos = pos_.data() + w.base;
    uint8_t* flag = flag_.data();
    int64_t left = 0;
    for (int64_t u = 0; u < w.nflag; ++u) {
      M& e = mem[pos[u]];
      const uint8_t f = flag[e.idx];
      flag[e.idx] = kUntested;
      if (f == kKept) {
        if (better(e.mind, e.idx, w.r, w.ridx)) {
          w.r = e.mind;
          w.ridx = e.idx;
        }
        continue;
      }
      if (f == kMoved) {
        moved[w.nmoved] = e;
        moved[w.nmoved++].mind = tmind_[e.idx];
        assign_[e.idx] = t;
      }
      e.idx = -1;  // moved, or s itself: leaves the cluster
      ++left;
    }
    int64_t keep = w.end;
    if (left) {
      keep = w.begin;
      for (int64_t i = w.begin; i < w.end; ++i) {
        if (mem[i].idx < 0) continue;
        if (keep != i) mem[keep] = mem[i];
        ++keep;
      }
    }
    w.nkept = keep - w.begin;
  }

  template <int Q>
  void add_center_t(int32_t s, bool by_argmax, float R, int nthreads) {
    const int64_t C = st_.C, N = st_.N;
    const int32_t t = static_cast<int32_t>(clusters_.size());
    clusters_.emplace_back();
    clusters_.back().center = s;
    selected_[s] = 1;
    const void* srow = xrow(s);
    const void* sqrow = qrow(s);
    for (int64_t j = 0; j < C; ++j) {
      switch (st_.dtype) {
        case kF32: s_in_[j] = load_elem<kF32>(srow, j); break;
        case kF16: s_in_[j] = load_elem<kF16>(srow, j); break;
        default: s_in_[j] = load_elem<kBF16>(srow, j); break;
      }
      s_q_[j] = load_elem<Q>(sqrow, j);
    }
    if constexpr (PW > 0)
      for (int k = 0; k < PW; ++k) sp_[k] = load_elem<Q>(pre_.data() + s * PW, k);
    sqerr_ = qerr(s);
    scan_.assign(clusters_.size(), 0);
    dlo_.assign(clusters_.size(), 0.f);
    phase1<Q>(s, by_argmax, R, nthreads);

    // Work items: chunks of the members of the scanned clusters.
    items_.clear();
    int64_t base = 0;
    constexpr int64_t kChunk = 2048;
    for (int64_t j = 0; j + 1 < static_cast<int64_t>(clusters_.size()); ++j) {
      if (!scan_[j]) continue;
      const int64_t m = static_cast<int64_t>(clusters_[j].members.size());
      for (int64_t b = 0; b < m; b += kChunk) {
        WorkItem w;
        w.cluster = static_cast<int32_t>(j);
        w.begin = b;
        w.end = std::min(m, b + kChunk);
        w.base = base;
        base += w.end - w.begin;
        items_.push_back(w);
      }
    }
    const int64_t nitems = static_cast<int64_t>(items_.size());
    // Pass 2 covers all points in ranges; a range without flags costs a byte scan.
    const int64_t nranges = (N + kRange - 1) / kRange;
    const bool par = nthreads > 1 && base >= 16384;
    double* bufs = canon_buf_.data();
    int32_t* lists = list_.data();
    const int64_t P = P_;
#pragma omp parallel num_threads(nthreads) if (par)
    {
      const int tid = par ? omp_get_thread_num() : 0;
#pragma omp for schedule(dynamic, 4)
      for (int64_t u = 0; u < nitems; ++u) mark_item<Q>(items_[u], s);
#pragma omp for schedule(dynamic, 1)
      for (int64_t r = 0; r < nranges; ++r)
        test_range<Q>(r * kRange, std::min(N, (r + 1) * kRange), bufs + static_cast<size_t>(tid) * P,
                      lists + static_cast<size_t>(tid) * kRange);
#pragma omp for schedule(dynamic, 4)
      for (int64_t u = 0; u < nitems; ++u) collect_item(items_[u], t);
    }

    // Merge: close the gaps between the items of each cluster; collect the new cluster.
    Cl& nc = clusters_[t];
    int64_t nmoved = 0;
    for (const WorkItem& w : items_) nmoved += w.nmoved;
    nc.members.reserve(nmoved);
    int64_t u = 0;
    while (u < nitems) {
      const int32_t j = items_[u].cluster;
      Cl& c = clusters_[j];
      int64_t out = 0;
      c.r = -kInf;
      c.ridx = std::numeric_limits<int32_t>::max();
      for (; u < nitems && items_[u].cluster == j; ++u) {
        const WorkItem& w = items_[u];
        if (w.begin != out && w.nkept)
          std::memmove(c.members.data() + out, c.members.data() + w.begin, w.nkept * sizeof(M));
        out += w.nkept;
        if (better(w.r, w.ridx, c.r, c.ridx)) {
          c.r = w.r;
          c.ridx = w.ridx;
        }
        for (int64_t v = 0; v < w.nmoved; ++v) {
          const M& e = moved_[w.base + v];
          nc.members.push_back(e);
          if (better(e.mind, e.idx, nc.r, nc.ridx)) {
            nc.r = e.mind;
            nc.ridx = e.idx;
          }
        }
      }
      c.members.resize(out);
      if (c.members.empty()) std::vector<M>().swap(c.members);
      tree_update(j);
    }
    tree_update(t);
  }

  void add_center(int32_t s, bool by_argmax, float R, int nthreads) {
    switch (qtype_) {
      case kF32: add_center_t<kF32>(s, by_argmax, R, nthreads); break;
      case kF16: add_center_t<kF16>(s, by_argmax, R, nthreads); break;
      default: add_center_t<kBF16>(s, by_argmax, R, nthreads); break;
    }
  }
};

struct State {
  std::vector<std::unique_ptr<ProblemBase>> problems;
  int64_t picks = 0;
};

}  // namespace

// ---------------------------------------------------------------- entry points
// x [B, N, C]; forced [B, M]; mu [B, C]; U [B, C, m] (m = 0: none); sig [B].
void* kcenter_create(const void* x, int dtype, int64_t B, int64_t N, int64_t C, const int64_t* forced, int64_t M,
                     int64_t picks, int storage, const float* mu, const double* U, int64_t m, const float* sig) {
  auto st = std::make_unique<State>();
  st->picks = picks;
  const int64_t row_bytes = C * (dtype == kF32 ? 4 : 2);
  int store = storage;
  if (store == kStoreAuto) {
    // A copy pays when the rows are read many times and do not sit in cache (rows of
    // small problems, e.g. one image's patches, stay in L2/L3 between steps), or when
    // it can be rotated.
    const bool big = N * C * 4 >= (int64_t(16) << 20) && picks >= 16;
    const bool use = big || (m > 0 && U);
#if defined(__F16C__)
    store = use ? kStoreF16 : kStoreInput;
#else
    store = use ? kStoreBF16 : kStoreInput;
#endif
  }
  const bool rotated = store != kStoreInput && m > 0 && U;
  for (int64_t b = 0; b < B; ++b) {
    Setup s;
    s.x = static_cast<const char*>(x) + b * N * row_bytes;
    s.dtype = dtype;
    s.N = N;
    s.C = C;
    s.forced.assign(forced + b * M, forced + (b + 1) * M);
    s.picks = picks;
    s.store = store;
    s.mu = mu + b * C;
    s.U = rotated ? U + b * C * m : nullptr;
    s.m = rotated ? m : 0;
    s.sig = rotated ? sig[b] : 1.f;
    if (rotated)
      st->problems.push_back(std::make_unique<Problem<kPW>>(std::move(s)));
    else
      st->problems.push_back(std::make_unique<Problem<0>>(std::move(s)));
  }
  return st.release();
}

// Returns an empty string on success, else the error (no exception leaves OpenMP).
std::string kcenter_advance(void* state, int64_t nsteps, int nthreads, int64_t* done) {
  State* st = static_cast<State*>(state);
  const int64_t B = static_cast<int64_t>(st->problems.size());
  std::string err;
  int64_t least = st->picks;
  if (B == 1 || nthreads <= 1) {
    try {
      for (auto& p : st->problems) least = std::min(least, p->advance(nsteps, nthreads));
    } catch (const std::bad_alloc&) {
      err = "out of memory";
    }
  } else {
    bool oom = false;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1) reduction(min : least)
    for (int64_t b = 0; b < B; ++b) {
      try {
        least = std::min(least, st->problems[b]->advance(nsteps, 1));
      } catch (const std::bad_alloc&) {
#pragma omp critical
        oom = true;
      }
    }
    if (oom) err = "out of memory";
  }
  *done = least;
  return err;
}

void kcenter_result(void* state, int64_t* indices, float* radius) {
  State* st = static_cast<State*>(state);
  const int64_t B = static_cast<int64_t>(st->problems.size());
  for (int64_t b = 0; b < B; ++b) {
    const auto& p = *st->problems[b];
    const auto& picks = p.picks();
    for (int64_t t = 0; t < st->picks; ++t)
      indices[b * st->picks + t] = t < static_cast<int64_t>(picks.size()) ? picks[t] : -1;
    radius[b] = p.radius();
  }
}

void kcenter_destroy(void* state) { delete static_cast<State*>(state); }

}  // namespace FASTAD_ISA_NS
}  // namespace fastad
