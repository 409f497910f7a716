// Bindings of the metric kernels (csrc/cpu/metrics_kernel.cpp). Python
// (fastad/metrics) validates first; these checks make a wrong direct call raise
// ValueError instead of crashing. Non-finite scores and non-binary labels are
// counted by the kernels and returned, so that Python can name the argument.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "common.h"
#include "isa.h"
#include "registry.h"

FASTAD_DECLARE_KERNEL(void metrics_curve_stats(const void* s, bool f64, const uint8_t* y, int64_t n, int nthreads,
                                               double* out, int64_t* info))
FASTAD_DECLARE_KERNEL(void metrics_curve_stats_binned(const void* s, bool f64, const uint8_t* y, int64_t n,
                                                      const double* th, int64_t T, int nthreads, double* out,
                                                      int64_t* info))
FASTAD_DECLARE_KERNEL(int64_t metrics_label_components(const uint8_t* masks, int64_t nimg, int64_t H, int64_t W,
                                                       int32_t* labels, int64_t* rcount, std::vector<int64_t>* areas,
                                                       int nthreads))
FASTAD_DECLARE_KERNEL(void metrics_aupro_exact(const void* s, bool f64, const int32_t* lab, int64_t nimg, int64_t hw,
                                               const int64_t* rcount, const int64_t* areas, int64_t R, double limit,
                                               int nthreads, double* out, int64_t* info))
FASTAD_DECLARE_KERNEL(void metrics_pro_thresholds(const void* s, bool f64, const int32_t* lab, int64_t nimg,
                                                  int64_t hw, const int64_t* rcount, const int64_t* areas, int64_t R,
                                                  const double* th, int64_t T, int nthreads, int64_t* fp_out,
                                                  double* pro_out, int64_t* info))
FASTAD_DECLARE_KERNEL(void metrics_region_f1(const void* s, bool f64, const int32_t* gl, int64_t nimg, int64_t H,
                                             int64_t W, const int64_t* gcount, const double* asc, int64_t T, double iou,
                                             int nthreads, int64_t* tp_out, int64_t* npred_out, int64_t* info))

namespace fastad {
namespace {

std::string describe(const py::array& a) {
  return "dtype " + std::string(py::str(a.dtype())) + " shape " + shape_str(a);
}

void require_contiguous(const char* fn, const char* name, const py::array& a) {
  if (!(a.flags() & py::array::c_style))
    fail(fn, std::string("argument '") + name + "' must be C-contiguous, got " + describe(a));
}

// float32 or float64 scores; returns true for float64.
bool score_arg(const char* fn, const char* name, const py::array& a, int ndim) {
  const bool f32 = a.dtype().is(py::dtype::of<float>());
  const bool f64 = a.dtype().is(py::dtype::of<double>());
  if (!f32 && !f64) fail(fn, std::string("argument '") + name + "' must be float32 or float64, got " + describe(a));
  if (a.ndim() != ndim)
    fail(fn, std::string("argument '") + name + "' must have " + std::to_string(ndim) + " dimensions, got " +
                 describe(a));
  require_contiguous(fn, name, a);
  return f64;
}

void shape_is(const char* fn, const char* name, const py::array& a, const std::vector<int64_t>& shape) {
  bool ok = a.ndim() == static_cast<py::ssize_t>(shape.size());
  for (size_t i = 0; ok && i < shape.size(); ++i) ok = a.shape(i) == shape[i];
  if (!ok) {
    std::string want = "(";
    for (size_t i = 0; i < shape.size(); ++i) want += (i ? ", " : "") + std::to_string(shape[i]);
    fail(fn, std::string("argument '") + name + "' must have shape " + want + "), got " + describe(a));
  }
  require_contiguous(fn, name, a);
}

const uint8_t* u8_arg(const char* fn, const char* name, const py::array& a, const std::vector<int64_t>& shape) {
  if (!a.dtype().is(py::dtype::of<uint8_t>()))
    fail(fn, std::string("argument '") + name + "' must be uint8, got " + describe(a));
  shape_is(fn, name, a, shape);
  return static_cast<const uint8_t*>(a.data());
}

const int32_t* labels_arg(const char* fn, const py::array& lab, const py::array& scores) {
  std::vector<int64_t> shape;
  for (py::ssize_t i = 0; i < scores.ndim(); ++i) shape.push_back(scores.shape(i));
  return int32_arg(fn, "labels", lab, shape);
}

struct Regions {
  const int64_t* count;
  const int64_t* areas;
  int64_t R;
};

Regions regions_arg(const char* fn, const py::array& rcount, const py::array& areas, int64_t nimg) {
  const int64_t* c = int64_arg(fn, "region_counts", rcount, {nimg});
  if (areas.ndim() != 1) fail(fn, "argument 'areas' must be 1-D, got " + describe(areas));
  const int64_t R = areas.shape(0);
  const int64_t* a = int64_arg(fn, "areas", areas, {R});
  int64_t total = 0;
  for (int64_t i = 0; i < nimg; ++i) {
    if (c[i] < 0) fail(fn, "region_counts must be >= 0");
    total += c[i];
  }
  if (total != R) fail(fn, "region_counts sum to " + std::to_string(total) + " but areas has " + std::to_string(R));
  for (int64_t r = 0; r < R; ++r)
    if (a[r] <= 0) fail(fn, "areas must be > 0");
  return {c, a, R};
}

// Region labels must lie in 0..region_counts[i] per image: the kernels index with
// them. Returns the first image that breaks this, or -1.
int64_t bad_label_image(const int32_t* lab, int64_t nimg, int64_t hw, const int64_t* rcount) {
  for (int64_t i = 0; i < nimg; ++i) {
    const int32_t* l = lab + i * hw;
    const int64_t R = rcount[i];
    int64_t bad = 0;
    for (int64_t p = 0; p < hw; ++p) bad += (l[p] < 0) | (l[p] > R);
    if (bad) return i;
  }
  return -1;
}

void fail_labels(const char* fn, int64_t img) {
  fail(fn, "labels of image " + std::to_string(img) + " must lie in [0, region_counts[" + std::to_string(img) + "]]");
}

int threads_arg(int n) { return resolve_threads(n); }

// The exact curves count negatives in uint32 slots.
void require_count(const char* fn, int64_t n) {
  if (n >= (int64_t(1) << 32)) fail(fn, "at most 2^32 - 1 scores per call, got " + std::to_string(n));
}

// Non-empty, ascending, 1-D float64 thresholds.
const double* thresholds_arg(const char* fn, const py::array& th) {
  if (!th.dtype().is(py::dtype::of<double>()) || th.ndim() != 1 || th.shape(0) < 1)
    fail(fn, "argument 'thresholds' must be a non-empty 1-D float64 array, got " + describe(th));
  require_contiguous(fn, "thresholds", th);
  const double* t = static_cast<const double*>(th.data());
  for (py::ssize_t j = 1; j < th.shape(0); ++j)
    if (!(t[j - 1] <= t[j])) fail(fn, "argument 'thresholds' must be ascending");
  return t;
}

}  // namespace

FASTAD_REGISTER(metrics) {
  m.def(
      "metrics_curve_stats",
      [](const py::array& scores, const py::array& labels, int nthreads) {
        const char* fn = "metrics_curve_stats";
        const bool f64 = score_arg(fn, "scores", scores, 1);
        const int64_t n = scores.shape(0);
        const uint8_t* y = u8_arg(fn, "labels", labels, {n});
        require_count(fn, n);
        double out[3];
        int64_t info[4];
        {
          py::gil_scoped_release nogil;
          FASTAD_DISPATCH_KERNEL(metrics_curve_stats, scores.data(), f64, y, n, threads_arg(nthreads), out, info);
        }
        return py::make_tuple(out[0], out[1], out[2], info[0], info[1], info[2], info[3]);
      },
      py::arg("scores"), py::arg("labels"), py::arg("nthreads") = 0,
      "(auroc, ap, f1_max, n_pos, n_neg, n_nonfinite, n_bad_labels) of 1-D scores and 0/1 uint8 labels, exact");
  m.def(
      "metrics_curve_stats_binned",
      [](const py::array& scores, const py::array& labels, const py::array& thresholds, int nthreads) {
        const char* fn = "metrics_curve_stats_binned";
        const bool f64 = score_arg(fn, "scores", scores, 1);
        const int64_t n = scores.shape(0);
        const uint8_t* y = u8_arg(fn, "labels", labels, {n});
        const double* th = thresholds_arg(fn, thresholds);
        const int64_t T = thresholds.shape(0);
        double out[3];
        int64_t info[4];
        {
          py::gil_scoped_release nogil;
          FASTAD_DISPATCH_KERNEL(metrics_curve_stats_binned, scores.data(), f64, y, n, th, T, threads_arg(nthreads),
                                 out, info);
        }
        return py::make_tuple(out[0], out[1], out[2], info[0], info[1], info[2], info[3]);
      },
      py::arg("scores"), py::arg("labels"), py::arg("thresholds"), py::arg("nthreads") = 0,
      "curve_stats of the scores rounded down to the ascending float64 thresholds (scores >= thresholds[0])");
  m.def(
      "metrics_label_components",
      [](const py::array& masks, int nthreads) {
        const char* fn = "metrics_label_components";
        if (masks.ndim() != 3) fail(fn, "argument 'masks' must be (N, H, W), got " + describe(masks));
        const int64_t N = masks.shape(0), H = masks.shape(1), W = masks.shape(2);
        const uint8_t* mk = u8_arg(fn, "masks", masks, {N, H, W});
        if (H * W >= (int64_t(1) << 31)) fail(fn, "maps must have fewer than 2^31 pixels");
        py::array_t<int32_t> labels({N, H, W});
        py::array_t<int64_t> rcount(N);
        std::vector<int64_t> areas;
        int64_t R;
        {
          py::gil_scoped_release nogil;
          R = FASTAD_DISPATCH_KERNEL(metrics_label_components, mk, N, H, W, labels.mutable_data(),
                                     rcount.mutable_data(), &areas, threads_arg(nthreads));
        }
        if (R < 0) fail(fn, "argument 'masks' must hold only 0 and 1");
        py::array_t<int64_t> a(static_cast<py::ssize_t>(areas.size()));
        std::copy(areas.begin(), areas.end(), a.mutable_data());
        return py::make_tuple(labels, rcount, a);
      },
      py::arg("masks"), py::arg("nthreads") = 0,
      "8-connected components of (N, H, W) 0/1 uint8 masks: (labels int32, 1..R_i per image in raster order, "
      "region counts R_i, areas of all regions in order)");
  m.def(
      "metrics_aupro_exact",
      [](const py::array& scores, const py::array& labels, const py::array& rcount, const py::array& areas,
         double fpr_limit, int nthreads) {
        const char* fn = "metrics_aupro_exact";
        const bool f64 = score_arg(fn, "scores", scores, 3);
        const int64_t N = scores.shape(0), hw = scores.shape(1) * scores.shape(2);
        const int32_t* lab = labels_arg(fn, labels, scores);
        const Regions reg = regions_arg(fn, rcount, areas, N);
        require_count(fn, N * hw);
        if (!(fpr_limit > 0.0 && fpr_limit <= 1.0)) fail(fn, "fpr_limit must be in (0, 1]");
        double out[1];
        int64_t info[1];
        int64_t bad;
        {
          py::gil_scoped_release nogil;
          bad = bad_label_image(lab, N, hw, reg.count);
          if (bad < 0)
            FASTAD_DISPATCH_KERNEL(metrics_aupro_exact, scores.data(), f64, lab, N, hw, reg.count, reg.areas, reg.R,
                                 fpr_limit, threads_arg(nthreads), out, info);
        }
        if (bad >= 0) fail_labels(fn, bad);
        return py::make_tuple(out[0], info[0]);
      },
      py::arg("scores"), py::arg("labels"), py::arg("region_counts"), py::arg("areas"), py::arg("fpr_limit"),
      py::arg("nthreads") = 0, "(exact AUPRO up to fpr_limit, n_nonfinite) as the MVTec AD evaluation code computes it");
  m.def(
      "metrics_pro_thresholds",
      [](const py::array& scores, const py::array& labels, const py::array& rcount, const py::array& areas,
         const py::array& thresholds, int nthreads) {
        const char* fn = "metrics_pro_thresholds";
        const bool f64 = score_arg(fn, "scores", scores, 3);
        const int64_t N = scores.shape(0), hw = scores.shape(1) * scores.shape(2);
        const int32_t* lab = labels_arg(fn, labels, scores);
        const Regions reg = regions_arg(fn, rcount, areas, N);
        const double* th = thresholds_arg(fn, thresholds);
        const int64_t T = thresholds.shape(0);
        py::array_t<int64_t> fp(T);
        py::array_t<double> pro(T);
        int64_t info[1];
        int64_t bad;
        {
          py::gil_scoped_release nogil;
          bad = bad_label_image(lab, N, hw, reg.count);
          if (bad < 0)
            FASTAD_DISPATCH_KERNEL(metrics_pro_thresholds, scores.data(), f64, lab, N, hw, reg.count, reg.areas, reg.R,
                                 th, T, threads_arg(nthreads), fp.mutable_data(), pro.mutable_data(),
                                 info);
        }
        if (bad >= 0) fail_labels(fn, bad);
        return py::make_tuple(fp, pro, info[0]);
      },
      py::arg("scores"), py::arg("labels"), py::arg("region_counts"), py::arg("areas"), py::arg("thresholds"),
      py::arg("nthreads") = 0,
      "(false positives, summed per-region overlap, n_nonfinite) of `scores > thresholds[k]` for ascending thresholds");
  m.def(
      "metrics_region_f1",
      [](const py::array& scores, const py::array& labels, const py::array& rcount, const py::array& thresholds,
         double iou, int nthreads) {
        const char* fn = "metrics_region_f1";
        const bool f64 = score_arg(fn, "scores", scores, 3);
        const int64_t N = scores.shape(0), H = scores.shape(1), W = scores.shape(2);
        if (H * W >= (int64_t(1) << 31)) fail(fn, "maps must have fewer than 2^31 pixels");
        const int32_t* lab = labels_arg(fn, labels, scores);
        const int64_t* rc = int64_arg(fn, "region_counts", rcount, {N});
        const double* th = thresholds_arg(fn, thresholds);
        const int64_t T = thresholds.shape(0);
        for (int64_t i = 0; i < N; ++i)
          if (rc[i] < 0) fail(fn, "region_counts must be >= 0");
        py::array_t<int64_t> tp(T), npred(T);
        int64_t info[1];
        int64_t bad;
        {
          py::gil_scoped_release nogil;
          bad = bad_label_image(lab, N, H * W, rc);
          if (bad < 0)
            FASTAD_DISPATCH_KERNEL(metrics_region_f1, scores.data(), f64, lab, N, H, W, rc, th, T, iou,
                                 threads_arg(nthreads), tp.mutable_data(), npred.mutable_data(), info);
        }
        if (bad >= 0) fail_labels(fn, bad);
        return py::make_tuple(tp, npred, info[0]);
      },
      py::arg("scores"), py::arg("labels"), py::arg("region_counts"), py::arg("thresholds"), py::arg("iou"),
      py::arg("nthreads") = 0,
      "(hits, predicted regions, n_nonfinite) per threshold of the SAA+ region F1; thresholds ascending, step k of "
      "the result uses thresholds[T - 1 - k]");
}

}  // namespace fastad
