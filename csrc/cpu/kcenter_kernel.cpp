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
//  * a whole cluster c is skipped when d(c, s) >= 2 r(c), and a point x of a scanned
//    cluster when d(c, s) >= 2 mind(x) (triangle inequality: d(x, s) >= d(x, c));
//    for an argmax pick, d(c, s) >= mind(s) = R for every center, so clusters with
//    r(c) <= R / 2 are skipped without reading anything;
//  * distances to s are first computed in float32 from a low-precision copy
//    (fp16, or bf16 in the generic build) of the centred, power-of-two-scaled rows,
//    with per-row quantisation errors e(x) = ||copy(x) - x|| and a rounding bound,
//    and the scan of a row stops as soon as its partial sum proves d(x, s) >= mind(x);
//  * only rows that may get closer to s are recomputed canonically (exact value).
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

#if defined(__linux__)
#include <sys/mman.h>
#endif

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
// float32 sum of (q_j - s_j)^2 (q: storage row, s: float row in the same units).
// Returns as soon as a partial sum reaches `stop` (checked every 64 elements),
// otherwise the full sum. Partial sums of squares only grow, so a returned value
// >= stop proves the full sum is >= stop up to the rounding bound.
template <int S>
float approx_sq(const void* q, const float* s, int64_t C, float stop) {
  int64_t j = 0;
  float total = 0.f;
#if defined(__AVX2__)
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  for (; j + 64 <= C; j += 64) {
    for (int64_t u = j; u < j + 64; u += 32) {
      const __m256 d0 = _mm256_sub_ps(load8<S>(q, u), _mm256_loadu_ps(s + u));
      const __m256 d1 = _mm256_sub_ps(load8<S>(q, u + 8), _mm256_loadu_ps(s + u + 8));
      const __m256 d2 = _mm256_sub_ps(load8<S>(q, u + 16), _mm256_loadu_ps(s + u + 16));
      const __m256 d3 = _mm256_sub_ps(load8<S>(q, u + 24), _mm256_loadu_ps(s + u + 24));
      a0 = _mm256_fmadd_ps(d0, d0, a0);
      a1 = _mm256_fmadd_ps(d1, d1, a1);
      a2 = _mm256_fmadd_ps(d2, d2, a2);
      a3 = _mm256_fmadd_ps(d3, d3, a3);
    }
    if (j + 64 < C) {
      const float part = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
      if (part >= stop) return part;
    }
  }
  for (; j + 8 <= C; j += 8) {
    const __m256 d0 = _mm256_sub_ps(load8<S>(q, j), _mm256_loadu_ps(s + j));
    a0 = _mm256_fmadd_ps(d0, d0, a0);
  }
  total = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
#else
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (; j + 64 <= C; j += 64) {
    for (int64_t u = j; u < j + 64; u += 8)
      for (int l = 0; l < 8; ++l) {
        const float d = load_elem<S>(q, u + l) - s[u + l];
        acc[l] += d * d;
      }
    if (j + 64 < C) {
      float part = 0.f;
      for (int l = 0; l < 8; ++l) part += acc[l];
      if (part >= stop) return part;
    }
  }
  for (int l = 0; l < 8; ++l) total += acc[l];
#endif
  for (; j < C; ++j) {
    const float d = load_elem<S>(q, j) - s[j];
    total += d * d;
  }
  return total;
}

// A buffer on transparent huge pages where the OS offers them: the rows of the
// copy are read in cluster order, i.e. scattered, and 4 KiB pages would cost a
// TLB miss per row.
class HugeBuffer {
 public:
  HugeBuffer() = default;
  HugeBuffer(const HugeBuffer&) = delete;
  HugeBuffer& operator=(const HugeBuffer&) = delete;
  ~HugeBuffer() { std::free(p_); }
  void allocate(size_t bytes) {
    std::free(p_);
    p_ = nullptr;
    constexpr size_t kAlign = size_t(1) << 21;
    const size_t rounded = (bytes + kAlign - 1) / kAlign * kAlign;
    if (posix_memalign(&p_, kAlign, rounded ? rounded : kAlign) != 0) {
      p_ = nullptr;
      throw std::bad_alloc();
    }
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(p_, rounded, MADV_HUGEPAGE);
#endif
  }
  void* data() const { return p_; }

 private:
  void* p_ = nullptr;
};

inline void prefetch_row(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  const int64_t n = std::min<int64_t>(bytes, 256);
  for (int64_t o = 0; o < n; o += 64) __builtin_prefetch(c + o);
}

// ------------------------------------------------------------------ problem
// A point of a cluster, with the values the skip tests need inline so that
// scanning a cluster reads one contiguous list (the rows only when tested).
struct Member {
  int32_t idx;
  float mind;  // canonical distance to the cluster's center (+inf: no center yet)
  float qerr;  // quantisation error bound of its approximate row (scaled units)
};

struct Cluster {
  int32_t center = -1;  // point index, -1 for the initial "no center yet" group
  float r = -kInf;      // max mind over members (-inf when empty)
  int32_t ridx = std::numeric_limits<int32_t>::max();  // lowest index attaining r
  std::vector<Member> members;
};

inline bool better(float ra, int32_t ia, float rb, int32_t ib) { return ra > rb || (ra == rb && ia < ib); }

struct WorkItem {
  int32_t cluster;
  int64_t begin, end;  // range in the cluster's member list
  int64_t base;        // offset of this item's slots in the scratch buffers
  int64_t nkept = 0, nmoved = 0;
  float r = -kInf;
  int32_t ridx = std::numeric_limits<int32_t>::max();
};

class Problem {
 public:
  Problem(const void* x, int dtype, int64_t N, int64_t C, std::vector<int32_t> forced, int64_t picks, int storage)
      : x_(x), dtype_(dtype), N_(N), C_(C), forced_(std::move(forced)), picks_total_(picks), storage_(storage) {
    P_ = 1;
    while (P_ < C_) P_ <<= 1;
  }

  // Runs the forced centers (first call) and up to `nsteps` argmax picks.
  // Returns the argmax picks done so far.
  int64_t advance(int64_t nsteps, int nthreads) {
    if (!ready_) prepare(nthreads);
    const size_t need = static_cast<size_t>(P_) * std::max(1, nthreads);
    if (canon_buf_.size() < need) canon_buf_.resize(need, 0.0);
    for (; next_forced_ < forced_.size(); ++next_forced_) {
      const int32_t s = forced_[next_forced_];
      if (!selected_[s]) add_center(s, false, 0.f, nthreads);
    }
    for (int64_t t = 0; t < nsteps && static_cast<int64_t>(picks_.size()) < picks_total_; ++t) {
      const Cluster& cb = clusters_[tree_[1]];
      if (cb.r == -kInf) break;  // nothing left to pick (the bindings rule this out)
      const int32_t s = cb.ridx;
      picks_.push_back(s);
      add_center(s, true, cb.r, nthreads);
    }
    return static_cast<int64_t>(picks_.size());
  }

  const std::vector<int32_t>& picks() const { return picks_; }

  float radius() const {
    if (!ready_) return kInf;
    const float r = clusters_[tree_[1]].r;
    return r == -kInf ? 0.f : r;
  }

 private:
  const void* x_;
  int dtype_;
  int64_t N_, C_, P_;
  std::vector<int32_t> forced_;
  size_t next_forced_ = 0;
  int64_t picks_total_;
  int storage_;
  bool ready_ = false;

  // Approximate rows: q_ (element code qtype_) = (x - mu) * scale_, quantised; qerr_
  // (empty when q_ is x itself) bounds ||q(x) - (x - mu) * scale_|| per row.
  HugeBuffer copy_;
  const void* q_ = nullptr;
  int qtype_ = kF32;
  float scale_ = 1.f;
  std::vector<float> mu_, qerr_;
  float gamma_ = 0.f;  // relative bound of the float32 sum of squares

  std::vector<int32_t> assign_;  // cluster of each unselected point
  std::vector<uint8_t> selected_;
  std::vector<Cluster> clusters_;
  std::vector<int32_t> tree_;
  int64_t cap_ = 1;
  std::vector<int32_t> picks_;

  // per-step scratch
  std::vector<float> s_in_, s_q_, dlo_;
  std::vector<uint8_t> scan_;
  std::vector<int32_t> need_;
  std::vector<WorkItem> items_;
  std::vector<Member> moved_;
  std::vector<int32_t> todo_;
  std::vector<double> canon_buf_;

  const void* xrow(int64_t i) const {
    return static_cast<const char*>(x_) + i * C_ * (dtype_ == kF32 ? 4 : 2);
  }
  const void* qrow(int64_t i) const {
    return static_cast<const char*>(q_) + i * C_ * (qtype_ == kF32 ? 4 : 2);
  }
  int64_t qrow_bytes() const { return C_ * (qtype_ == kF32 ? 4 : 2); }
  float qerr(int64_t i) const { return qerr_.empty() ? 0.f : qerr_[i]; }

  void prepare(int nthreads) {
    int store = storage_;
    if (store == kStoreAuto) {
      // A copy pays when the rows are read many times and do not sit in cache.
      const bool big = N_ * C_ * 4 >= (int64_t(4) << 20) && picks_total_ >= 16;
#if defined(__F16C__)
      store = (dtype_ == kF32 && big) ? kStoreF16 : kStoreInput;
#else
      store = (dtype_ == kF32 && big) ? kStoreBF16 : kStoreInput;
#endif
    }
    if (store == kStoreInput || dtype_ != kF32) {
      q_ = x_;
      qtype_ = dtype_;
    } else {
      make_copy(store == kStoreF16 ? kF16 : kBF16, nthreads);
    }
    gamma_ = static_cast<float>((static_cast<double>(C_) + 4.0) * std::ldexp(1.0, -24) * 1.01);
    assign_.assign(N_, 0);
    selected_.assign(N_, 0);
    const int64_t nclusters = 1 + static_cast<int64_t>(forced_.size()) + picks_total_;
    clusters_.reserve(nclusters);
    clusters_.emplace_back();
    Cluster& c0 = clusters_.back();
    c0.members.resize(N_);
    for (int64_t i = 0; i < N_; ++i) c0.members[i] = Member{static_cast<int32_t>(i), kInf, qerr(i)};
    c0.r = kInf;
    c0.ridx = 0;
    while (cap_ < nclusters) cap_ <<= 1;
    tree_.assign(2 * cap_, -1);
    tree_update(0);
    s_in_.resize(C_);
    s_q_.resize(C_);
    moved_.resize(N_);
    todo_.resize(N_);
    ready_ = true;
  }

  // Centred, power-of-two-scaled low-precision copy and its per-row error bound.
  void make_copy(int qtype, int nthreads) {
    const float* x = static_cast<const float*>(x_);
    const int64_t N = N_, C = C_;
    std::vector<double> sum(C, 0.0);
    {
      std::vector<double> part(static_cast<size_t>(C) * nthreads, 0.0);
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
      {
        double* p = part.data() + static_cast<size_t>(omp_get_thread_num()) * C;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < N; ++i)
          for (int64_t j = 0; j < C; ++j) p[j] += x[i * C + j];
      }
      for (int t = 0; t < nthreads; ++t)
        for (int64_t j = 0; j < C; ++j) sum[j] += part[static_cast<size_t>(t) * C + j];
    }
    mu_.resize(C);
    for (int64_t j = 0; j < C; ++j) mu_[j] = static_cast<float>(sum[j] / static_cast<double>(N));
    float maxabs = 0.f;
    const float* mu = mu_.data();
#pragma omp parallel for num_threads(nthreads) if (nthreads > 1) reduction(max : maxabs) schedule(static)
    for (int64_t i = 0; i < N; ++i)
      for (int64_t j = 0; j < C; ++j) maxabs = std::max(maxabs, std::fabs(x[i * C + j] - mu[j]));
    int e = 0;
    if (maxabs > 0.f) std::frexp(maxabs, &e);  // maxabs < 2^e
    const int shift = 14 - e;                  // scaled values < 2^14
    scale_ = std::ldexp(1.f, shift);
    if (!std::isfinite(scale_) || scale_ == 0.f) scale_ = 1.f;
    const float scale = scale_;
    copy_.allocate(static_cast<size_t>(N) * C * sizeof(uint16_t));
    qerr_.resize(N);
    uint16_t* q = static_cast<uint16_t*>(copy_.data());
    float* qerr = qerr_.data();
    std::vector<float> tmp(static_cast<size_t>(2 * C) * nthreads);
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
      float* v = tmp.data() + static_cast<size_t>(2 * C) * omp_get_thread_num();
      float* back = v + C;
#pragma omp for schedule(static)
      for (int64_t i = 0; i < N; ++i) {
        const float* xi = x + i * C;
        uint16_t* qi = q + i * C;
        for (int64_t j = 0; j < C; ++j) v[j] = (xi[j] - mu[j]) * scale;
        int64_t j = 0;
#if defined(__F16C__)
        if (qtype == kF16)
          for (; j + 8 <= C; j += 8) {
            const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(v + j), _MM_FROUND_TO_NEAREST_INT);
            _mm_storeu_si128(reinterpret_cast<__m128i*>(qi + j), h);
            _mm256_storeu_ps(back + j, _mm256_cvtph_ps(h));
          }
#endif
        for (; j < C; ++j) {
          qi[j] = qtype == kF16 ? f32_to_f16(v[j]) : f32_to_bf16(v[j]);
          back[j] = qtype == kF16 ? f16_to_f32(qi[j]) : bf16_to_f32(qi[j]);
        }
        double err2 = 0.0, mag2 = 0.0;
        for (int64_t u = 0; u < C; ++u) {
          const double exact = (static_cast<double>(xi[u]) - static_cast<double>(mu[u])) * scale;
          const double d = static_cast<double>(back[u]) - exact;
          const double m = (std::fabs(static_cast<double>(xi[u])) + std::fabs(static_cast<double>(mu[u]))) * scale;
          err2 += d * d;
          mag2 += m * m;
        }
        // The double evaluation above is off by at most ~2^-52 of the magnitudes.
        qerr[i] = static_cast<float>((std::sqrt(err2) + 1e-14 * std::sqrt(mag2)) * (1.0 + 1e-6));
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

  // Which clusters may hold points closer to s than to their center, and a lower
  // bound dlo of d(center, s) for the per-point test.
  template <int Q>
  void phase1(int32_t s, bool by_argmax, float R, int nthreads) {
    const int64_t nc = static_cast<int64_t>(clusters_.size()) - 1;  // the new cluster is last
    const int32_t as = assign_[s];
    const float Es = qerr(s), scale = scale_, g = gamma_;
    // For an argmax pick, d(c, s) >= D(s, c) (1 - 1.2e-7) >= R (1 - kKappa) for every center c.
    const float lower = by_argmax ? R * (1.f - kKappa) : 0.f;
    const float* sq = s_q_.data();
    const int64_t C = C_;
    need_.clear();
    for (int64_t j = 0; j < nc; ++j) {
      const Cluster& c = clusters_[j];
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
    const bool par = nthreads > 1 && nneed * C >= (int64_t(1) << 20);
#pragma omp parallel for num_threads(nthreads) if (par) schedule(dynamic, 16)
    for (int64_t u = 0; u < nneed; ++u) {
      const int32_t j = need_[u];
      const Cluster& c = clusters_[j];
      const float Ec = qerr(c.center);
      const float target = 2.f * c.r * (1.f + kKappa2) * scale + Ec + Es;
      const float thr = target * target * (1.f + kKappa) / (1.f - g);
      // s's own cluster is always scanned: s leaves it.
      const bool can_stop = j != as && std::isfinite(thr);
      const float S = approx_sq<Q>(qrow(c.center), sq, C, can_stop ? thr : kInf);
      if (can_stop && S >= thr) continue;
      const float lo = (std::sqrt(S * (1.f - g)) - Ec - Es) / scale * (1.f - kKappa);
      dlo_[j] = std::max(lower, std::max(lo, 0.f));
      scan_[j] = 1;
    }
  }

  // One work item: members [begin, end) of a scanned cluster.
  template <int Q>
  void scan_item(WorkItem& w, int32_t s, int32_t t, double* buf) {
    const int64_t C = C_, P = P_, qbytes = qrow_bytes();
    const float Es = qerr(s), scale = scale_, g = gamma_;
    const float* sq = s_q_.data();
    const float* sin = s_in_.data();
    Member* mem = clusters_[w.cluster].members.data();
    const float dlo = dlo_[w.cluster];
    int32_t* todo = todo_.data() + w.base;
    Member* moved = moved_.data() + w.base;
    // Pass 1: the triangle test on the inline values; survivors' positions to `todo`.
    int64_t ntodo = 0;
    for (int64_t i = w.begin; i < w.end; ++i) {
      const float m = mem[i].mind;
      if (mem[i].idx == s || !(dlo >= 2.f * m * (1.f + kKappa2))) todo[ntodo++] = static_cast<int32_t>(i);
    }
    // Pass 2: rows of the survivors (prefetched a few ahead).
    constexpr int64_t kAhead = 4;
    for (int64_t u = 0; u < std::min(ntodo, kAhead); ++u) prefetch_row(qrow(mem[todo[u]].idx), qbytes);
    for (int64_t u = 0; u < ntodo; ++u) {
      if (u + kAhead < ntodo) prefetch_row(qrow(mem[todo[u + kAhead]].idx), qbytes);
      Member& e = mem[todo[u]];
      if (e.idx == s) {
        e.idx = -1;  // leaves the cluster
        continue;
      }
      const float m = e.mind;
      if (m != kInf) {
        const float target = m * (1.f + kKappa) * scale + e.qerr + Es;
        const float thr = target * target * (1.f + kKappa) / (1.f - g);
        if (std::isfinite(thr) && approx_sq<Q>(qrow(e.idx), sq, C, thr) >= thr) continue;
      }
      float d;
      switch (dtype_) {
        case kF32: d = canonical_dist<kF32>(xrow(e.idx), sin, C, P, buf); break;
        case kF16: d = canonical_dist<kF16>(xrow(e.idx), sin, C, P, buf); break;
        default: d = canonical_dist<kBF16>(xrow(e.idx), sin, C, P, buf); break;
      }
      if (d < m) {
        moved[w.nmoved++] = Member{e.idx, d, e.qerr};
        assign_[e.idx] = t;
        e.idx = -1;
      }
    }
    // Pass 3: compact the kept members in place and take their maximum.
    int64_t keep = w.begin;
    for (int64_t i = w.begin; i < w.end; ++i) {
      const Member e = mem[i];
      if (e.idx < 0) continue;
      mem[keep++] = e;
      if (better(e.mind, e.idx, w.r, w.ridx)) {
        w.r = e.mind;
        w.ridx = e.idx;
      }
    }
    w.nkept = keep - w.begin;
  }

  template <int Q>
  void add_center_t(int32_t s, bool by_argmax, float R, int nthreads) {
    const int64_t C = C_;
    const int32_t t = static_cast<int32_t>(clusters_.size());
    clusters_.emplace_back();
    clusters_.back().center = s;
    selected_[s] = 1;
    const void* srow = xrow(s);
    const void* sqrow = qrow(s);
    for (int64_t j = 0; j < C; ++j) {
      switch (dtype_) {
        case kF32: s_in_[j] = load_elem<kF32>(srow, j); break;
        case kF16: s_in_[j] = load_elem<kF16>(srow, j); break;
        default: s_in_[j] = load_elem<kBF16>(srow, j); break;
      }
      s_q_[j] = load_elem<Q>(sqrow, j);
    }
    scan_.assign(clusters_.size(), 0);
    dlo_.assign(clusters_.size(), 0.f);
    phase1<Q>(s, by_argmax, R, nthreads);

    // Work items: chunks of the members of the scanned clusters.
    items_.clear();
    int64_t base = 0;
    constexpr int64_t kChunk = 1024;
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
    // Each member costs about one mind test; rows cost more, but are unknown here.
    const bool par = nthreads > 1 && nitems > 1 && base >= 32768;
#pragma omp parallel for num_threads(nthreads) if (par) schedule(dynamic, 1)
    for (int64_t u = 0; u < nitems; ++u)
      scan_item<Q>(items_[u], s, t, canon_buf_.data() + static_cast<size_t>(par ? omp_get_thread_num() : 0) * P_);

    // Merge: close the gaps between the items of each cluster; collect the new cluster.
    Cluster& nc = clusters_[t];
    int64_t nmoved = 0;
    for (const WorkItem& w : items_) nmoved += w.nmoved;
    nc.members.reserve(nmoved);
    int64_t u = 0;
    while (u < nitems) {
      const int32_t j = items_[u].cluster;
      Cluster& c = clusters_[j];
      int64_t out = 0;
      c.r = -kInf;
      c.ridx = std::numeric_limits<int32_t>::max();
      for (; u < nitems && items_[u].cluster == j; ++u) {
        const WorkItem& w = items_[u];
        if (w.begin != out && w.nkept)
          std::memmove(c.members.data() + out, c.members.data() + w.begin, w.nkept * sizeof(Member));
        out += w.nkept;
        if (better(w.r, w.ridx, c.r, c.ridx)) {
          c.r = w.r;
          c.ridx = w.ridx;
        }
        for (int64_t v = 0; v < w.nmoved; ++v) {
          const Member& e = moved_[w.base + v];
          nc.members.push_back(e);
          if (better(e.mind, e.idx, nc.r, nc.ridx)) {
            nc.r = e.mind;
            nc.ridx = e.idx;
          }
        }
      }
      c.members.resize(out);
      if (c.members.empty()) std::vector<Member>().swap(c.members);
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
  std::vector<std::unique_ptr<Problem>> problems;
  int64_t picks = 0;
};

}  // namespace

// ---------------------------------------------------------------- entry points
void* kcenter_create(const void* x, int dtype, int64_t B, int64_t N, int64_t C, const int64_t* forced, int64_t M,
                     int64_t picks, int storage) {
  auto st = std::make_unique<State>();
  st->picks = picks;
  const int64_t row_bytes = C * (dtype == kF32 ? 4 : 2);
  for (int64_t b = 0; b < B; ++b) {
    std::vector<int32_t> f(forced + b * M, forced + (b + 1) * M);
    st->problems.push_back(std::make_unique<Problem>(static_cast<const char*>(x) + b * N * row_bytes, dtype, N, C,
                                                     std::move(f), picks, storage));
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
