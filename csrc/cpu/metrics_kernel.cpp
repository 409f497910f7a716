// Anomaly-detection metrics: exact curves (AUROC, AP, F1-max, AUPRO), binned
// curves, connected components and the per-threshold region metrics.
//
// Exact curves never sort (score, label) pairs together: the negative and the
// positive scores become order-preserving integer keys, are radix-sorted apart
// (streaming passes, so the cost stays linear when the data outgrows the caches),
// and the curve is walked over the distinct positive scores while a galloping
// search counts the negatives between them. Every tie group is one threshold step,
// as in scikit-learn and the MVTec AD evaluation code.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "isa.h"

namespace fastad {
namespace FASTAD_ISA_NS {
namespace {

template <typename F> struct KeyOf;
template <> struct KeyOf<float> { using type = uint32_t; };
template <> struct KeyOf<double> { using type = uint64_t; };

// Unsigned key with the order of the float; -0.0 and +0.0 map to one key so that
// they form one tie group. NaN never gets here (callers count non-finite values).
template <typename F>
inline typename KeyOf<F>::type order_key(F f) {
  using K = typename KeyOf<F>::type;
  constexpr int kBits = sizeof(K) * 8;
  constexpr K kSign = K(1) << (kBits - 1);
  K u;
  std::memcpy(&u, &f, sizeof(K));
  u = (u == kSign) ? K(0) : u;
  const K mask = (K(0) - (u >> (kBits - 1))) | kSign;
  return u ^ mask;
}

template <typename F>
inline bool is_finite(F f) {
  return std::isfinite(f);
}

inline void chunk_of(int64_t n, int nt, int t, int64_t& lo, int64_t& hi) {
  lo = n / nt * t + std::min<int64_t>(t, n % nt);
  hi = lo + n / nt + (t < n % nt ? 1 : 0);
}

template <typename K>
inline int top_bit(K x) {
  return static_cast<int>(sizeof(K) * 8) - 1 -
         (sizeof(K) == 8 ? __builtin_clzll(static_cast<unsigned long long>(x))
                         : __builtin_clz(static_cast<unsigned>(x)));
}

template <typename K>
inline int low_bit(K x) {
  return sizeof(K) == 8 ? __builtin_ctzll(static_cast<unsigned long long>(x))
                        : __builtin_ctz(static_cast<unsigned>(x));
}

// Exceptions (allocation failures) must not leave an OpenMP region: the first one is
// kept and rethrown after the region.
struct OmpError {
  std::exception_ptr first;
  void capture() {
#pragma omp critical(fastad_metrics_error)
    if (!first) first = std::current_exception();
  }
  void rethrow() const {
    if (first) std::rethrow_exception(first);
  }
};

struct NoPayload {};

// Parallel LSD radix sort of keys[0, n) ascending, carrying vals when V is not
// NoPayload. Only the bit span in which the keys differ is sorted, in passes of at
// most 11 bits. tmp buffers have n elements. Returns true when the sorted data
// ended up in the tmp buffers.
template <typename K, typename V>
bool radix_sort(K* keys, K* ktmp, V* vals, V* vtmp, int64_t n, int nthreads) {
  constexpr bool kPayload = !std::is_same<V, NoPayload>::value;
  if (n <= 1) return false;
  const K first = keys[0];
  K diff = 0;
#pragma omp parallel for reduction(| : diff) num_threads(nthreads) schedule(static)
  for (int64_t i = 0; i < n; ++i) diff |= keys[i] ^ first;
  if (diff == 0) return false;
  if (n < 2048) {
    std::vector<std::pair<K, int64_t>> items(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) items[i] = {keys[i], i};
    std::sort(items.begin(), items.end());
    for (int64_t i = 0; i < n; ++i) {
      ktmp[i] = items[i].first;
      if constexpr (kPayload) vtmp[i] = vals[items[i].second];
    }
    return true;
  }
  const int lo_bit = low_bit(diff);
  const int span = top_bit(diff) - lo_bit + 1;
  const int passes = (span + 10) / 11;
  const int width = (span + passes - 1) / passes;
  const int64_t buckets = int64_t(1) << width;
  const K digit_mask = static_cast<K>(buckets - 1);
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nthreads, n / 32768)));
  std::vector<int64_t> hist(static_cast<size_t>(nt * buckets));
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num();
    const int nta = omp_get_num_threads();
    int64_t lo, hi;
    chunk_of(n, nta, t, lo, hi);
    K* src = keys;
    K* dst = ktmp;
    V* vsrc = vals;
    V* vdst = vtmp;
    int64_t* h = hist.data() + t * buckets;
    for (int p = 0; p < passes; ++p) {
      const int shift = lo_bit + p * width;
      std::fill(h, h + buckets, 0);
      for (int64_t i = lo; i < hi; ++i) ++h[(src[i] >> shift) & digit_mask];
#pragma omp barrier
#pragma omp single
      {
        int64_t off = 0;
        for (int64_t b = 0; b < buckets; ++b)
          for (int u = 0; u < nta; ++u) {
            const int64_t c = hist[u * buckets + b];
            hist[u * buckets + b] = off;
            off += c;
          }
      }
      for (int64_t i = lo; i < hi; ++i) {
        const K k = src[i];
        const int64_t d = h[(k >> shift) & digit_mask]++;
        dst[d] = k;
        if constexpr (kPayload) vdst[d] = vsrc[i];
      }
#pragma omp barrier
      std::swap(src, dst);
      std::swap(vsrc, vdst);
    }
  }
  return passes % 2 == 1;
}

// In ascending a[0, hi): first index whose key is >= k, searching down from hi
// (the previous group's position) with exponential steps.
template <typename K>
inline int64_t gallop_lower(const K* a, int64_t hi, K k) {
  int64_t r = hi, step = 1, l = hi - 1;
  while (l >= 0 && !(a[l] < k)) {
    r = l;
    l = r - step;
    step <<= 1;
  }
  const int64_t from = l < 0 ? 0 : l + 1;
  return std::lower_bound(a + from, a + r, k) - a;
}

// In ascending a[lo, hi): first index whose key is > k, searching up from lo.
template <typename K>
inline int64_t gallop_upper(const K* a, int64_t lo, int64_t hi, K k) {
  int64_t l = lo, step = 1, r = lo;
  while (r < hi && !(k < a[r])) {
    l = r + 1;
    r = l + step - 1;
    step <<= 1;
  }
  if (r > hi) r = hi;
  return std::upper_bound(a + l, a + r, k) - a;
}

// Walk the distinct keys of `pos` (ascending, np) from the largest down, in
// parallel over key ranges. For every positive group the visitor gets the number
// of negatives strictly between it and the group above (`between`) and the number
// tied with it (`tied`); `tail` gets the negatives below the lowest positive.
//   v.begin(t, pos_above, neg_above)  counts above the thread's first group
//   v.group(t, first, last, between, tied)   pos[first..last] share one key
//   v.tail(t, count)
template <typename K, typename Visitor>
void walk_groups(const K* neg, int64_t nn, const K* pos, int64_t np, int nthreads, Visitor& v) {
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nthreads, np / 4096)));
  std::vector<int64_t> cut(nt + 1);
  for (int t = 0; t <= nt; ++t) {
    int64_t c = np / nt * t + std::min<int64_t>(t, np % nt);
    while (c > 0 && c < np && pos[c] == pos[c - 1]) ++c;
    cut[t] = c;
  }
  v.resize(nt);
#pragma omp parallel for num_threads(nt) schedule(static, 1)
  for (int t = 0; t < nt; ++t) {
    const int64_t a = cut[t], b = std::max(cut[t], cut[t + 1]);
    int64_t hi = b == np ? nn : std::lower_bound(neg, neg + nn, pos[b]) - neg;
    v.begin(t, np - b, nn - hi);
    int64_t j = b - 1;
    while (j >= a) {
      const K k = pos[j];
      int64_t jj = j - 1;
      while (jj >= a && pos[jj] == k) --jj;
      const int64_t lb = gallop_lower(neg, hi, k);
      const int64_t ub = gallop_upper(neg, lb, hi, k);
      v.group(t, jj + 1, j, hi - ub, ub - lb);
      hi = lb;
      j = jj;
    }
    if (a == 0) v.tail(t, hi);
  }
}

// AUROC / AP / F1-max from tie groups visited in descending score order.
struct CurveAcc {
  int64_t P = 0;
  int64_t tp = 0, fp = 0;
  unsigned __int128 u = 0;  // sum over groups of fp_g * (2 * tp_before + tp_g)
  double ap = 0.0, f1 = 0.0;

  inline void group(int64_t tpg, int64_t fpg) {
    u += static_cast<unsigned __int128>(fpg) * static_cast<unsigned __int128>(2 * tp + tpg);
    tp += tpg;
    fp += fpg;
    if (tpg > 0) {
      ap += static_cast<double>(tpg) * (static_cast<double>(tp) / static_cast<double>(tp + fp));
      f1 = std::max(f1, 2.0 * static_cast<double>(tp) / static_cast<double>(tp + fp + P));
    }
  }
};

struct CurveVisitor {
  int64_t P;
  std::vector<CurveAcc> acc;
  void resize(int nt) {
    acc.assign(nt, CurveAcc{});
    for (auto& a : acc) a.P = P;
  }
  void begin(int t, int64_t pos_above, int64_t neg_above) {
    acc[t].tp = pos_above;
    acc[t].fp = neg_above;
  }
  void group(int t, int64_t first, int64_t last, int64_t between, int64_t tied) {
    if (between) acc[t].group(0, between);
    acc[t].group(last - first + 1, tied);
  }
  void tail(int t, int64_t count) {
    if (count) acc[t].group(0, count);
  }
};

void finish_curve(const std::vector<CurveAcc>& acc, int64_t P, int64_t N, double* out) {
  unsigned __int128 u = 0;
  double ap = 0.0, f1 = 0.0;
  for (const auto& a : acc) {
    u += a.u;
    ap += a.ap;
    f1 = std::max(f1, a.f1);
  }
  const double nan = std::numeric_limits<double>::quiet_NaN();
  out[0] = (P > 0 && N > 0) ? static_cast<double>(u) / (2.0 * static_cast<double>(P) * static_cast<double>(N)) : nan;
  out[1] = P > 0 ? ap / static_cast<double>(P) : nan;
  out[2] = P > 0 ? f1 : nan;
}

template <typename F>
void curve_stats_impl(const F* s, const uint8_t* y, int64_t n, int nthreads, double* out, int64_t* info) {
  using K = typename KeyOf<F>::type;
  // fixed chunks (not per OpenMP thread) so that both passes agree on them
  const int nc = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nthreads, n / 65536 + 1)));
  std::vector<int64_t> cpos(nc, 0), cbad(nc, 0), cnonfin(nc, 0);
#pragma omp parallel for num_threads(nc) schedule(static, 1)
  for (int t = 0; t < nc; ++t) {
    int64_t lo, hi;
    chunk_of(n, nc, t, lo, hi);
    int64_t p = 0, bad = 0, nf = 0;
    for (int64_t i = lo; i < hi; ++i) {
      p += y[i] == 1;
      bad += y[i] > 1;
      nf += !is_finite(s[i]);
    }
    cpos[t] = p;
    cbad[t] = bad;
    cnonfin[t] = nf;
  }
  int64_t P = 0, bad = 0, nonfin = 0;
  for (int t = 0; t < nc; ++t) {
    P += cpos[t];
    bad += cbad[t];
    nonfin += cnonfin[t];
  }
  const int64_t N = n - P;
  info[0] = P;
  info[1] = N;
  info[2] = nonfin;
  info[3] = bad;
  out[0] = out[1] = out[2] = std::numeric_limits<double>::quiet_NaN();
  if (bad || nonfin || P == 0) return;

  std::unique_ptr<K[]> keys(new K[n]);
  std::unique_ptr<K[]> tmp(new K[n]);
#pragma omp parallel for num_threads(nc) schedule(static, 1)
  for (int t = 0; t < nc; ++t) {
    int64_t lo, hi;
    chunk_of(n, nc, t, lo, hi);
    int64_t ip = N, in = 0;
    for (int u = 0; u < t; ++u) {
      int64_t l2, h2;
      chunk_of(n, nc, u, l2, h2);
      ip += cpos[u];
      in += (h2 - l2) - cpos[u];
    }
    K* kk = keys.get();
    for (int64_t i = lo; i < hi; ++i) {
      const K k = order_key(s[i]);
      if (y[i]) kk[ip++] = k;
      else kk[in++] = k;
    }
  }
  const K* negk = keys.get();
  const K* posk = keys.get() + N;
  if (radix_sort<K, NoPayload>(keys.get(), tmp.get(), nullptr, nullptr, N, nthreads)) negk = tmp.get();
  if (radix_sort<K, NoPayload>(keys.get() + N, tmp.get() + N, nullptr, nullptr, P, nthreads)) posk = tmp.get() + N;
  CurveVisitor v{P, {}};
  walk_groups(negk, N, posk, P, nthreads, v);
  finish_curve(v.acc, P, N, out);
}

// Number of thresholds in ascending th[0, T) that are below (strict) or at most
// (!strict) v, from a guess for evenly spaced thresholds, checked exactly.
template <typename F, typename Th>
inline int64_t count_below(F v, const Th* th, int64_t T, Th t0, double inv_step, bool strict) {
  auto below = [&](int64_t j) { return strict ? (th[j] < v) : (th[j] <= v); };
  int64_t g;
  const double x = (static_cast<double>(v) - static_cast<double>(t0)) * inv_step;
  if (!(x >= 0.0)) g = 0;
  else if (x >= static_cast<double>(T)) g = T;
  else g = static_cast<int64_t>(x) + 1;
  for (int it = 0; it < 3; ++it) {
    if (g > 0 && !below(g - 1)) --g;
    else if (g < T && below(g)) ++g;
    else return g;
  }
  if ((g > 0 && !below(g - 1)) || (g < T && below(g))) {
    g = strict ? std::lower_bound(th, th + T, v, [](Th a, F b) { return a < b; }) - th
               : std::upper_bound(th, th + T, v, [](F b, Th a) { return b < a; }) - th;
  }
  return g;
}

template <typename Th>
inline double inverse_step(const Th* th, int64_t T) {
  if (T < 2) return 0.0;
  const double step = (static_cast<double>(th[T - 1]) - static_cast<double>(th[0])) / static_cast<double>(T - 1);
  return step > 0.0 && std::isfinite(1.0 / step) ? 1.0 / step : 0.0;
}

template <typename F>
void curve_stats_binned_impl(const F* s, const uint8_t* y, int64_t n, const double* th, int64_t T, int nthreads,
                             double* out, int64_t* info) {
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nthreads, n / 65536 + 1)));
  std::vector<int64_t> hpos(static_cast<size_t>(nt * T), 0), hneg(static_cast<size_t>(nt * T), 0);
  std::vector<int64_t> cbad(nt, 0), cnonfin(nt, 0);
  const double inv = inverse_step(th, T);
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num();
    int64_t lo, hi;
    chunk_of(n, omp_get_num_threads(), t, lo, hi);
    int64_t* hp = hpos.data() + t * T;
    int64_t* hn = hneg.data() + t * T;
    int64_t bad = 0, nf = 0;
    for (int64_t i = lo; i < hi; ++i) {
      const F v = s[i];
      if (!is_finite(v)) {
        ++nf;
        continue;
      }
      // bin j holds the scores with th[j] <= v < th[j + 1]: the curve of the
      // scores rounded down to the grid, i.e. predictions `score >= th[j]`.
      const int64_t b = std::max<int64_t>(count_below(static_cast<double>(v), th, T, th[0], inv, false) - 1, 0);
      if (y[i] == 1) ++hp[b];
      else if (y[i] == 0) ++hn[b];
      else ++bad;
    }
    cbad[t] = bad;
    cnonfin[t] = nf;
  }
  int64_t P = 0, N = 0, bad = 0, nonfin = 0;
  for (int t = 0; t < nt; ++t) {
    bad += cbad[t];
    nonfin += cnonfin[t];
    for (int64_t j = 0; j < T; ++j) {
      if (t) {
        hpos[j] += hpos[t * T + j];
        hneg[j] += hneg[t * T + j];
      }
    }
  }
  for (int64_t j = 0; j < T; ++j) {
    P += hpos[j];
    N += hneg[j];
  }
  info[0] = P;
  info[1] = N;
  info[2] = nonfin;
  info[3] = bad;
  std::vector<CurveAcc> acc(1);
  acc[0].P = P;
  for (int64_t j = T - 1; j >= 0; --j)
    if (hpos[j] || hneg[j]) acc[0].group(hpos[j], hneg[j]);
  finish_curve(acc, P, N, out);
}

// ---------------------------------------------------------------------------
// Connected components (8-connectivity), one image at a time.

inline int32_t uf_find(int32_t* parent, int32_t x) {
  while (parent[x] != x) {
    parent[x] = parent[parent[x]];
    x = parent[x];
  }
  return x;
}

// Labels the foreground of one H x W mask 1..R in raster order of each
// component's first pixel (as scipy.ndimage.label and skimage.measure.label do);
// appends the R areas. Returns R, or -1 when a mask value is neither 0 nor 1.
int64_t label_image(const uint8_t* m, int64_t H, int64_t W, int32_t* out, std::vector<int32_t>& parent,
                    std::vector<int64_t>& areas) {
  parent.assign(1, 0);
  for (int64_t r = 0; r < H; ++r) {
    const uint8_t* mr = m + r * W;
    int32_t* orow = out + r * W;
    const int32_t* up = r > 0 ? orow - W : nullptr;
    for (int64_t c = 0; c < W; ++c) {
      const uint8_t v = mr[c];
      if (v == 0) {
        orow[c] = 0;
        continue;
      }
      if (v != 1) return -1;
      int32_t nb[4];
      int k = 0;
      if (c > 0 && orow[c - 1]) nb[k++] = orow[c - 1];
      if (up) {
        if (c > 0 && up[c - 1]) nb[k++] = up[c - 1];
        if (up[c]) nb[k++] = up[c];
        if (c + 1 < W && up[c + 1]) nb[k++] = up[c + 1];
      }
      if (k == 0) {
        const int32_t lab = static_cast<int32_t>(parent.size());
        parent.push_back(lab);
        orow[c] = lab;
        continue;
      }
      int32_t root = uf_find(parent.data(), nb[0]);
      for (int i = 1; i < k; ++i) {
        const int32_t q = uf_find(parent.data(), nb[i]);
        // the smaller provisional label stays root: it was created first
        if (q < root) {
          parent[root] = q;
          root = q;
        } else if (q > root) {
          parent[q] = root;
        }
      }
      orow[c] = root;
    }
  }
  const int32_t nprov = static_cast<int32_t>(parent.size());
  std::vector<int32_t> final_label(static_cast<size_t>(nprov), 0);
  int32_t R = 0;
  for (int32_t p = 1; p < nprov; ++p) {
    const int32_t root = uf_find(parent.data(), p);
    final_label[p] = root == p ? ++R : final_label[root];
  }
  const size_t a0 = areas.size();
  areas.resize(a0 + static_cast<size_t>(R), 0);
  const int64_t hw = H * W;
  for (int64_t i = 0; i < hw; ++i) {
    if (out[i]) {
      const int32_t f = final_label[out[i]];
      out[i] = f;
      ++areas[a0 + f - 1];
    }
  }
  return R;
}

// ---------------------------------------------------------------------------
// Exact AUPRO (MVTec AD evaluation code): PRO curve over every distinct score,
// trapezoid up to fpr_limit with linear interpolation at the limit, / fpr_limit.

// Accumulates, for the normal pixels above the FPR cut, sum over normal pixels of
// (W(> s) + W(= s) / 2) where W is the summed region weight of the anomalous
// pixels: the trapezoid area times (regions * normal pixels). Thread-local sums
// are relative to the thread's own start and are combined in order.
struct ProVisitor {
  const int32_t* rid;
  const double* weight;  // 1 / area per region
  struct Acc {
    double area = 0.0, w = 0.0;  // area relative to w_start = 0, local weight sum
    int64_t count = 0;           // normal pixels visited
  };
  std::vector<Acc> acc;
  void resize(int nt) { acc.assign(nt, Acc{}); }
  void begin(int, int64_t, int64_t) {}
  void group(int t, int64_t first, int64_t last, int64_t between, int64_t tied) {
    Acc& a = acc[t];
    double wg = 0.0;
    for (int64_t j = first; j <= last; ++j) wg += weight[rid[j]];
    a.area += static_cast<double>(between) * a.w + static_cast<double>(tied) * (a.w + 0.5 * wg);
    a.count += between + tied;
    a.w += wg;
  }
  void tail(int t, int64_t count) {
    acc[t].area += static_cast<double>(count) * acc[t].w;
    acc[t].count += count;
  }
  // walk_groups runs threads over descending key ranges: thread 0 holds the
  // lowest keys, so the cumulative weight flows from the last thread down.
  void combine(double& area, double& w) const {
    area = 0.0;
    w = 0.0;
    for (int t = static_cast<int>(acc.size()) - 1; t >= 0; --t) {
      area += acc[t].area + w * static_cast<double>(acc[t].count);
      w += acc[t].w;
    }
  }
};

constexpr int kSelectBits = 14;

template <typename F>
void aupro_exact_impl(const F* s, const int32_t* lab, int64_t nimg, int64_t hw, const int64_t* rcount,
                      const int64_t* areas, int64_t R, double limit, int nthreads, double* out, int64_t* info) {
  using K = typename KeyOf<F>::type;
  constexpr int kShift = static_cast<int>(sizeof(K) * 8) - kSelectBits;
  constexpr int64_t kB = int64_t(1) << kSelectBits;
  const int64_t n = nimg * hw;
  out[0] = std::numeric_limits<double>::quiet_NaN();
  std::vector<int64_t> roff(static_cast<size_t>(nimg) + 1, 0);
  for (int64_t i = 0; i < nimg; ++i) roff[i + 1] = roff[i] + rcount[i];
  std::vector<double> weight(static_cast<size_t>(R));
  for (int64_t r = 0; r < R; ++r) weight[r] = 1.0 / static_cast<double>(areas[r]);

  const int nta = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nthreads, n / 65536 + 1)));
  // pass 1: histograms of the top key bits of normal and anomalous pixels, per chunk
  std::vector<uint32_t> hn(static_cast<size_t>(nta * kB), 0), ha(static_cast<size_t>(nta * kB), 0);
  std::vector<int64_t> cnonfin(nta, 0);
#pragma omp parallel for num_threads(nta) schedule(static, 1)
  for (int t = 0; t < nta; ++t) {
    int64_t lo, hi;
    chunk_of(n, nta, t, lo, hi);
    uint32_t* hnt = hn.data() + t * kB;
    uint32_t* hat = ha.data() + t * kB;
    int64_t nf = 0;
    for (int64_t i = lo; i < hi; ++i) {
      const F v = s[i];
      if (!is_finite(v)) {
        ++nf;
        continue;
      }
      const uint32_t d = static_cast<uint32_t>(order_key(v) >> kShift);
      if (lab[i]) ++hat[d];
      else ++hnt[d];
    }
    cnonfin[t] = nf;
  }
  int64_t nonfin = 0;
  for (int t = 0; t < nta; ++t) nonfin += cnonfin[t];
  info[0] = nonfin;
  if (nonfin) return;
  std::vector<int64_t> totn(kB, 0);
  int64_t Nn = 0;
  for (int t = 0; t < nta; ++t)
    for (int64_t d = 0; d < kB; ++d) totn[d] += hn[t * kB + d];
  for (int64_t d = 0; d < kB; ++d) Nn += totn[d];
  if (Nn == 0 || R == 0) return;

  // kcut: the most normal pixels whose FPR kcut / Nn is still <= limit (as numpy computes it)
  int64_t kcut = static_cast<int64_t>(std::floor(limit * static_cast<double>(Nn)));
  kcut = std::min(std::max<int64_t>(kcut, 0), Nn);
  while (kcut < Nn && static_cast<double>(kcut + 1) / static_cast<double>(Nn) <= limit) ++kcut;
  while (kcut > 0 && static_cast<double>(kcut) / static_cast<double>(Nn) > limit) --kcut;
  const bool cut = kcut < Nn;
  // b: the top-bits bucket holding the (kcut+1)-th largest normal score
  int64_t b = 0;
  if (cut) {
    int64_t above = 0;
    for (b = kB - 1; b > 0; --b) {
      if (above + totn[b] > kcut) break;
      above += totn[b];
    }
  }
  // pass 2: keys of the normal pixels in buckets >= b, (key, region) of anomalous ones
  std::vector<int64_t> offn(static_cast<size_t>(nta) + 1, 0), offa(static_cast<size_t>(nta) + 1, 0);
  for (int t = 0; t < nta; ++t) {
    int64_t cn = 0, ca = 0;
    for (int64_t d = b; d < kB; ++d) {
      cn += hn[t * kB + d];
      ca += ha[t * kB + d];
    }
    offn[t + 1] = offn[t] + cn;
    offa[t + 1] = offa[t] + ca;
  }
  hn = std::vector<uint32_t>();
  ha = std::vector<uint32_t>();
  const int64_t nA = offn[nta], nP = offa[nta];
  std::unique_ptr<K[]> ak(new K[std::max<int64_t>(nA, 1)]), atmp(new K[std::max<int64_t>(nA, 1)]);
  std::unique_ptr<K[]> pk(new K[std::max<int64_t>(nP, 1)]), ptmp(new K[std::max<int64_t>(nP, 1)]);
  std::unique_ptr<int32_t[]> pr(new int32_t[std::max<int64_t>(nP, 1)]), prtmp(new int32_t[std::max<int64_t>(nP, 1)]);
#pragma omp parallel for num_threads(nta) schedule(static, 1)
  for (int t = 0; t < nta; ++t) {
    int64_t lo, hi;
    chunk_of(n, nta, t, lo, hi);
    int64_t in = offn[t], ia = offa[t];
    const K kmin = static_cast<K>(static_cast<K>(b) << kShift);
    int64_t i = lo;
    while (i < hi) {
      const int64_t img = i / hw;
      const int64_t end = std::min(hi, (img + 1) * hw);
      const int64_t base = roff[img] - 1;
      for (; i < end; ++i) {
        const K k = order_key(s[i]);
        if (k < kmin) continue;
        const int32_t l = lab[i];
        if (l) {
          pk[ia] = k;
          pr[ia++] = static_cast<int32_t>(base + l);
        } else {
          ak[in++] = k;
        }
      }
    }
  }
  K* A = ak.get();
  if (radix_sort<K, NoPayload>(A, atmp.get(), nullptr, nullptr, nA, nthreads)) A = atmp.get();
  K* pkeys = pk.get();
  int32_t* prid = pr.get();
  if (radix_sort<K, int32_t>(pkeys, ptmp.get(), prid, prtmp.get(), nP, nthreads)) {
    pkeys = ptmp.get();
    prid = prtmp.get();
  }
  const double dNn = static_cast<double>(Nn), dR = static_cast<double>(R);
  if (!cut) {
    ProVisitor v{prid, weight.data(), {}};
    walk_groups(A, nA, pkeys, nP, nthreads, v);
    double area, w;
    v.combine(area, w);
    out[0] = area / (dR * dNn) / limit;
    return;
  }
  const K vstar = A[nA - 1 - kcut];
  const int64_t a_gt = std::upper_bound(A, A + nA, vstar) - A;    // normal > v* : A[a_gt, nA)
  const int64_t a_ge = std::lower_bound(A, A + nA, vstar) - A;    // normal >= v*: A[a_ge, nA)
  const int64_t p_gt = std::upper_bound(pkeys, pkeys + nP, vstar) - pkeys;
  const int64_t p_ge = std::lower_bound(pkeys, pkeys + nP, vstar) - pkeys;
  ProVisitor v{prid + p_gt, weight.data(), {}};
  walk_groups(A + a_gt, nA - a_gt, pkeys + p_gt, nP - p_gt, nthreads, v);
  double area, w_above;
  v.combine(area, w_above);
  double w_eq = 0.0;
  for (int64_t j = p_ge; j < p_gt; ++j) w_eq += weight[prid[j]];
  area /= dR * dNn;
  const double f_i = static_cast<double>(nA - a_gt) / dNn;
  const double f_next = static_cast<double>(nA - a_ge) / dNn;
  const double p_i = w_above / dR;
  const double p_next = (w_above + w_eq) / dR;
  if (f_i < limit) {
    const double p_lim = p_i + (p_next - p_i) * (limit - f_i) / (f_next - f_i);
    area += 0.5 * (p_i + p_lim) * (limit - f_i);
  }
  out[0] = area / limit;
}

// ---------------------------------------------------------------------------
// Per-threshold PRO (cflow-ad style `cal_pro_score`): for ascending thresholds
// th[0, T), false positives and summed per-region overlap of `score > th[k]`.

template <typename F>
void pro_thresholds_impl(const F* s, const int32_t* lab, int64_t nimg, int64_t hw, const int64_t* rcount,
                         const int64_t* areas, int64_t R, const double* th, int64_t T, int nthreads, int64_t* fp_out,
                         double* pro_out, int64_t* info) {
  const int64_t n = nimg * hw;
  std::vector<int64_t> roff(static_cast<size_t>(nimg) + 1, 0);
  for (int64_t i = 0; i < nimg; ++i) roff[i + 1] = roff[i] + rcount[i];
  std::vector<double> weight(static_cast<size_t>(R));
  for (int64_t r = 0; r < R; ++r) weight[r] = 1.0 / static_cast<double>(areas[r]);
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nthreads, n / 65536 + 1)));
  const int64_t T1 = T + 1;
  std::vector<int64_t> hfp(static_cast<size_t>(nt * T1), 0), cnonfin(nt, 0);
  std::vector<double> hpro(static_cast<size_t>(nt * T1), 0.0);
  const double inv = inverse_step(th, T);
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num();
    int64_t lo, hi;
    chunk_of(n, omp_get_num_threads(), t, lo, hi);
    int64_t* hf = hfp.data() + t * T1;
    double* hp = hpro.data() + t * T1;
    int64_t nf = 0;
    int64_t i = lo;
    while (i < hi) {
      const int64_t img = i / hw;
      const int64_t end = std::min(hi, (img + 1) * hw);
      const int64_t base = roff[img] - 1;
      for (; i < end; ++i) {
        const F v = s[i];
        if (!is_finite(v)) {
          ++nf;
          continue;
        }
        const int64_t c = count_below(v, th, T, th[0], inv, true);  // positive at th[0..c)
        const int32_t l = lab[i];
        if (l) hp[c] += weight[base + l];
        else ++hf[c];
      }
    }
    cnonfin[t] = nf;
  }
  int64_t nonfin = 0;
  for (int t = 0; t < nt; ++t) nonfin += cnonfin[t];
  info[0] = nonfin;
  for (int t = 1; t < nt; ++t)
    for (int64_t c = 0; c < T1; ++c) {
      hfp[c] += hfp[t * T1 + c];
      hpro[c] += hpro[t * T1 + c];
    }
  int64_t fp = 0;
  double pro = 0.0;
  for (int64_t k = T - 1; k >= 0; --k) {
    fp += hfp[k + 1];
    pro += hpro[k + 1];
    fp_out[k] = fp;
    pro_out[k] = pro;
  }
}

// ---------------------------------------------------------------------------
// Region F1 (SAA+ `calculate_max_f1_region`): at each threshold, the predicted
// regions are the 8-connected components of `score > th`; a predicted region is
// a hit when, for some ground-truth region, the IoU of the whole prediction and
// the whole ground truth inside the union of the two bounding boxes is >= iou.
// Predicted regions only grow and merge as the threshold falls, so they are kept
// in one union-find per image instead of being relabelled at every threshold.

struct Box {
  int32_t r0, c0, r1, c1;  // inclusive
};

struct RegionF1Image {
  int64_t H, W, HW, W64;
  std::vector<int32_t> first, order, start, fill, parent, size, roots;
  std::vector<uint8_t> active, gt;
  std::vector<uint64_t> abits, gbits;  // the same as row bitsets (W64 words per row)
  std::vector<Box> box, gbox;
  std::vector<int32_t> sat_p, sat_i, sat_g;  // (H+1) x (W+1) summed-area tables

  void init(int64_t h, int64_t w, int64_t T) {
    H = h;
    W = w;
    HW = h * w;
    W64 = (w + 63) / 64;
    abits.resize(H * W64);
    gbits.resize(H * W64);
    first.resize(HW);
    order.resize(HW);
    start.resize(T + 2);
    parent.resize(HW);
    size.resize(HW);
    active.resize(HW);
    gt.resize(HW);
    box.resize(HW);
    sat_p.resize((H + 1) * (W + 1));
    sat_i.resize((H + 1) * (W + 1));
    sat_g.resize((H + 1) * (W + 1));
  }

  int32_t find(int32_t x) {
    while (parent[x] != x) {
      parent[x] = parent[parent[x]];
      x = parent[x];
    }
    return x;
  }

  static int64_t rect(const std::vector<int32_t>& sat, int64_t W1, const Box& b) {
    return static_cast<int64_t>(sat[(b.r1 + 1) * W1 + b.c1 + 1]) - sat[b.r0 * W1 + b.c1 + 1] -
           sat[(b.r1 + 1) * W1 + b.c0] + sat[b.r0 * W1 + b.c0];
  }

  enum SatOf { kGt, kPred, kBoth };

  void build_sat(std::vector<int32_t>& sat, SatOf what) {
    const int64_t W1 = W + 1;
    std::fill(sat.begin(), sat.begin() + W1, 0);
    for (int64_t r = 0; r < H; ++r) {
      int32_t run = 0;
      const uint8_t* ar = active.data() + r * W;
      const uint8_t* gr = gt.data() + r * W;
      const int32_t* prev = sat.data() + r * W1;
      int32_t* cur = sat.data() + (r + 1) * W1;
      cur[0] = 0;
      for (int64_t c = 0; c < W; ++c) {
        run += what == kGt ? gr[c] : what == kPred ? ar[c] : (ar[c] & gr[c]);
        cur[c + 1] = prev[c + 1] + run;
      }
    }
  }

  // Counts (pred, gt, both) inside box u, from the tables or by popcounts of the
  // row bitsets.
  void counts(const Box& u, bool use_sat, int64_t& p, int64_t& g, int64_t& both) const {
    if (use_sat) {
      p = rect(sat_p, W + 1, u);
      g = rect(sat_g, W + 1, u);
      both = rect(sat_i, W + 1, u);
      return;
    }
    const int64_t w0 = u.c0 >> 6, w1 = u.c1 >> 6;
    const uint64_t m0 = ~uint64_t(0) << (u.c0 & 63);
    const uint64_t m1 = ~uint64_t(0) >> (63 - (u.c1 & 63));
    int64_t sp = 0, sg = 0, sb = 0;
    for (int32_t r = u.r0; r <= u.r1; ++r) {
      const uint64_t* ar = abits.data() + r * W64;
      const uint64_t* gr = gbits.data() + r * W64;
      for (int64_t w = w0; w <= w1; ++w) {
        uint64_t mask = ~uint64_t(0);
        if (w == w0) mask &= m0;
        if (w == w1) mask &= m1;
        const uint64_t a = ar[w] & mask, b = gr[w] & mask;
        sp += __builtin_popcountll(a);
        sg += __builtin_popcountll(b);
        sb += __builtin_popcountll(a & b);
      }
    }
    p = sp;
    g = sg;
    both = sb;
  }

  static int64_t box_words(const Box& u) { return int64_t(u.r1 - u.r0 + 1) * ((u.c1 >> 6) - (u.c0 >> 6) + 1); }

  template <typename F>
  void run(const F* s, const int32_t* gl, int64_t G, const double* asc, int64_t T, double inv, double iou,
           int64_t* tp, int64_t* npred, int64_t& nonfin) {
    // first[p]: first threshold index (descending thresholds) with s > th
    std::fill(start.begin(), start.end(), 0);
    for (int64_t p = 0; p < HW; ++p) {
      const F v = s[p];
      int64_t f;
      if (!is_finite(v)) {
        ++nonfin;
        f = T;
      } else {
        f = T - count_below(v, asc, T, asc[0], inv, true);
      }
      first[p] = static_cast<int32_t>(f);
      ++start[f + 1];
    }
    for (int64_t k = 0; k <= T; ++k) start[k + 1] += start[k];
    fill.assign(start.begin(), start.begin() + T + 1);
    for (int64_t p = 0; p < HW; ++p) order[fill[first[p]]++] = static_cast<int32_t>(p);
    std::fill(active.begin(), active.end(), 0);
    std::fill(abits.begin(), abits.end(), 0);
    roots.clear();
    if (G > 0) {
      std::fill(gbits.begin(), gbits.end(), 0);
      gbox.assign(static_cast<size_t>(G), Box{INT32_MAX, INT32_MAX, -1, -1});
      for (int64_t p = 0; p < HW; ++p) {
        const int32_t l = gl[p];
        gt[p] = l != 0;
        if (l) {
          gbits[(p / W) * W64 + (p % W) / 64] |= uint64_t(1) << ((p % W) % 64);
          Box& b = gbox[l - 1];
          const int32_t r = static_cast<int32_t>(p / W), c = static_cast<int32_t>(p % W);
          b.r0 = std::min(b.r0, r);
          b.c0 = std::min(b.c0, c);
          b.r1 = std::max(b.r1, r);
          b.c1 = std::max(b.c1, c);
        }
      }
    }
    bool sat_g_built = false;
    int64_t ncomp = 0, tp_img = 0;
    for (int64_t k = 0; k < T; ++k) {
      const int64_t a0 = start[k], a1 = start[k + 1];
      for (int64_t q = a0; q < a1; ++q) {
        const int32_t p = order[q];
        const int32_t r = p / static_cast<int32_t>(W), c = p % static_cast<int32_t>(W);
        active[p] = 1;
        abits[r * W64 + c / 64] |= uint64_t(1) << (c % 64);
        parent[p] = p;
        size[p] = 1;
        if (G > 0) {  // boxes and roots only matter for the IoU tests
          box[p] = Box{r, c, r, c};
          roots.push_back(p);
        }
        ++ncomp;
        int32_t rp = p;  // root of p's component, kept current across the unions
        for (int dr = -1; dr <= 1; ++dr) {
          const int32_t rr = r + dr;
          if (rr < 0 || rr >= H) continue;
          for (int dc = -1; dc <= 1; ++dc) {
            const int32_t cc = c + dc;
            if ((dr == 0 && dc == 0) || cc < 0 || cc >= W) continue;
            const int32_t qn = rr * static_cast<int32_t>(W) + cc;
            if (!active[qn]) continue;
            int32_t rq = find(qn);
            if (rq == rp) continue;
            int32_t big = rp, small = rq;  // union by size keeps the trees shallow
            if (size[big] < size[small]) std::swap(big, small);
            parent[small] = big;
            size[big] += size[small];
            if (G > 0) {
              Box& x = box[big];
              const Box& y = box[small];
              x.r0 = std::min(x.r0, y.r0);
              x.c0 = std::min(x.c0, y.c0);
              x.r1 = std::max(x.r1, y.r1);
              x.c1 = std::max(x.c1, y.c1);
            }
            rp = big;
            --ncomp;
          }
        }
      }
      if (G > 0 && a1 > a0) {
        size_t w = 0;
        for (size_t i = 0; i < roots.size(); ++i)
          if (parent[roots[i]] == roots[i]) roots[w++] = roots[i];
        roots.resize(w);
        // popcounts cost one step per box row and word; the tables ~3 passes over the map
        int64_t cost = 0;
        const int64_t budget = HW / 2;
        for (size_t i = 0; i < roots.size() && cost <= budget; ++i)
          for (int64_t g = 0; g < G; ++g) {
            const Box& a = box[roots[i]];
            const Box& b = gbox[g];
            cost += box_words(Box{std::min(a.r0, b.r0), std::min(a.c0, b.c0), std::max(a.r1, b.r1),
                                  std::max(a.c1, b.c1)});
          }
        const bool use_sat = cost > budget;
        if (use_sat) {
          if (!sat_g_built) {
            build_sat(sat_g, kGt);
            sat_g_built = true;
          }
          build_sat(sat_p, kPred);
          build_sat(sat_i, kBoth);
        }
        tp_img = 0;
        for (int32_t rt : roots) {
          const Box& a = box[rt];
          for (int64_t g = 0; g < G; ++g) {
            const Box& b = gbox[g];
            const Box u{std::min(a.r0, b.r0), std::min(a.c0, b.c0), std::max(a.r1, b.r1), std::max(a.c1, b.c1)};
            int64_t pc, gc, both;
            counts(u, use_sat, pc, gc, both);
            const int64_t uni = pc + gc - both;
            if (uni > 0 && static_cast<double>(both) / static_cast<double>(uni) >= iou) {
              ++tp_img;
              break;
            }
          }
        }
      }
      tp[k] += tp_img;
      npred[k] += ncomp;
    }
  }
};

template <typename F>
void region_f1_impl(const F* s, const int32_t* gl, int64_t nimg, int64_t H, int64_t W, const int64_t* gcount,
                    const double* asc, int64_t T, double iou, int nthreads, int64_t* tp_out, int64_t* npred_out,
                    int64_t* info) {
  const int64_t HW = H * W;
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nthreads, nimg)));
  std::vector<int64_t> tp(static_cast<size_t>(nt * T), 0), np(static_cast<size_t>(nt * T), 0), cnonfin(nt, 0);
  std::vector<RegionF1Image> work(nt);
  for (auto& w : work) w.init(H, W, T);
  const double inv = inverse_step(asc, T);
  OmpError err;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
  for (int64_t img = 0; img < nimg; ++img) {
    const int t = omp_get_thread_num();
    try {
      work[t].run(s + img * HW, gl + img * HW, gcount[img], asc, T, inv, iou, tp.data() + t * T, np.data() + t * T,
                  cnonfin[t]);
    } catch (...) {
      err.capture();
    }
  }
  err.rethrow();
  int64_t nonfin = 0;
  for (int t = 0; t < nt; ++t) nonfin += cnonfin[t];
  info[0] = nonfin;
  for (int64_t k = 0; k < T; ++k) {
    int64_t a = 0, b = 0;
    for (int t = 0; t < nt; ++t) {
      a += tp[t * T + k];
      b += np[t * T + k];
    }
    tp_out[k] = a;
    npred_out[k] = b;
  }
}

}  // namespace

// ---------------------------------------------------------------------------
// Entry points (declared in csrc/metrics.cpp with FASTAD_DECLARE_KERNEL).

void metrics_curve_stats(const void* s, bool f64, const uint8_t* y, int64_t n, int nthreads, double* out,
                         int64_t* info) {
  if (f64) curve_stats_impl(static_cast<const double*>(s), y, n, nthreads, out, info);
  else curve_stats_impl(static_cast<const float*>(s), y, n, nthreads, out, info);
}

void metrics_curve_stats_binned(const void* s, bool f64, const uint8_t* y, int64_t n, const double* th, int64_t T,
                                int nthreads, double* out, int64_t* info) {
  if (f64) curve_stats_binned_impl(static_cast<const double*>(s), y, n, th, T, nthreads, out, info);
  else curve_stats_binned_impl(static_cast<const float*>(s), y, n, th, T, nthreads, out, info);
}

int64_t metrics_label_components(const uint8_t* masks, int64_t nimg, int64_t H, int64_t W, int32_t* labels,
                                 int64_t* rcount, std::vector<int64_t>* areas, int nthreads) {
  const int64_t HW = H * W;
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nthreads, nimg)));
  std::vector<std::vector<int64_t>> img_areas(static_cast<size_t>(nimg));
  int64_t bad = 0;
  OmpError err;
#pragma omp parallel num_threads(nt) reduction(+ : bad)
  {
    std::vector<int32_t> parent;
#pragma omp for schedule(dynamic, 4)
    for (int64_t i = 0; i < nimg; ++i) {
      try {
        const int64_t r = label_image(masks + i * HW, H, W, labels + i * HW, parent, img_areas[i]);
        bad += r < 0;
        rcount[i] = std::max<int64_t>(r, 0);
      } catch (...) {
        err.capture();
      }
    }
  }
  err.rethrow();
  if (bad) return -1;
  areas->clear();
  for (auto& a : img_areas) areas->insert(areas->end(), a.begin(), a.end());
  return static_cast<int64_t>(areas->size());
}

void metrics_aupro_exact(const void* s, bool f64, const int32_t* lab, int64_t nimg, int64_t hw, const int64_t* rcount,
                         const int64_t* areas, int64_t R, double limit, int nthreads, double* out, int64_t* info) {
  if (f64) aupro_exact_impl(static_cast<const double*>(s), lab, nimg, hw, rcount, areas, R, limit, nthreads, out, info);
  else aupro_exact_impl(static_cast<const float*>(s), lab, nimg, hw, rcount, areas, R, limit, nthreads, out, info);
}

void metrics_pro_thresholds(const void* s, bool f64, const int32_t* lab, int64_t nimg, int64_t hw,
                            const int64_t* rcount, const int64_t* areas, int64_t R, const double* th, int64_t T,
                            int nthreads, int64_t* fp_out, double* pro_out, int64_t* info) {
  if (f64)
    pro_thresholds_impl(static_cast<const double*>(s), lab, nimg, hw, rcount, areas, R, th, T, nthreads, fp_out,
                        pro_out, info);
  else
    pro_thresholds_impl(static_cast<const float*>(s), lab, nimg, hw, rcount, areas, R, th, T, nthreads, fp_out,
                        pro_out, info);
}

void metrics_region_f1(const void* s, bool f64, const int32_t* gl, int64_t nimg, int64_t H, int64_t W,
                       const int64_t* gcount, const double* asc, int64_t T, double iou, int nthreads, int64_t* tp_out,
                       int64_t* npred_out, int64_t* info) {
  if (f64)
    region_f1_impl(static_cast<const double*>(s), gl, nimg, H, W, gcount, asc, T, iou, nthreads, tp_out, npred_out,
                   info);
  else
    region_f1_impl(static_cast<const float*>(s), gl, nimg, H, W, gcount, asc, T, iou, nthreads, tp_out, npred_out,
                   info);
}

}  // namespace FASTAD_ISA_NS
}  // namespace fastad
