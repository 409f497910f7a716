// Bindings of the fused nearest-neighbour kernel (csrc/cpu/nn_distance_kernel.cpp).
// fastad/ops/nn_distance.py validates first; every argument is checked again here so
// that a wrong direct call raises ValueError instead of crashing.
#include <cmath>
#include <limits>
#include <string>

#include "common.h"
#include "cpu/nn_distance_kernel.h"
#include "registry.h"

namespace fastad {
namespace {

py::dict nn_distance_cpu(const py::array& query, const py::array& bank, int dtype, int64_t k, int metric,
                         int reduce, double scale, const py::object& query_groups,
                         const py::object& bank_groups, bool group_same, py::array values,
                         const py::object& indices, int path, int nthreads) {
  const char* fn = "nn_distance";
  const FloatArg q = float_arg(fn, "query", query, dtype, 3, 3);
  const FloatArg b = float_arg(fn, "bank", bank, dtype, 3, 3);
  NNArgs a;
  a.query = q.data;
  a.bank = b.data;
  a.dtype = dtype;
  a.B = q.dim(0);
  a.N = q.dim(1);
  a.C = q.dim(2);
  a.Bb = b.dim(0);
  a.M = b.dim(1);
  if (b.dim(2) != a.C)
    fail(fn, "query and bank must have the same channel count, got query " + shape_str(query) + " and bank " +
                 shape_str(bank));
  if (a.C < 1) fail(fn, "channel count must be >= 1, got query " + shape_str(query));
  if (a.Bb != 1 && a.Bb != a.B)
    fail(fn, "bank batch must be 1 or the query batch " + std::to_string(a.B) + ", got bank " + shape_str(bank));
  if (a.M < 1) fail(fn, "bank is empty: " + shape_str(bank));
  if (a.M > std::numeric_limits<int32_t>::max())
    fail(fn, "bank has more than 2^31 - 1 rows: " + shape_str(bank));
  if (k < 1 || k > a.M) fail(fn, "k must be in [1, M=" + std::to_string(a.M) + "], got " + std::to_string(k));
  a.k = k;
  if (metric < kNNCosine || metric > kNNIp) fail(fn, "unknown metric code " + std::to_string(metric));
  if (reduce < kNNTopk || reduce > kNNMeanSmallest) fail(fn, "unknown reduce code " + std::to_string(reduce));
  a.metric = metric;
  a.reduce = reduce;
  if (!(scale > 0) || !std::isfinite(scale)) fail(fn, "scale must be positive and finite, got " + std::to_string(scale));
  a.scale = scale;
  if (query_groups.is_none() != bank_groups.is_none())
    fail(fn, "pass both query_groups and bank_groups, or neither");
  if (!query_groups.is_none()) {
    if (!py::isinstance<py::array>(query_groups) || !py::isinstance<py::array>(bank_groups))
      fail(fn, "query_groups and bank_groups must be numpy arrays");
    const py::array qg = py::reinterpret_borrow<py::array>(query_groups);
    const py::array bg = py::reinterpret_borrow<py::array>(bank_groups);
    a.query_groups = int32_arg(fn, "query_groups", qg, {a.B, a.N});
    a.Bg = bg.ndim() == 2 ? bg.shape(0) : -1;
    if (a.Bg != 1 && a.Bg != a.B)
      fail(fn, "bank_groups must have shape (1 or " + std::to_string(a.B) + ", " + std::to_string(a.M) + "), got " +
                   shape_str(bg));
    if (a.Bb == 1 && a.Bg != 1)
      fail(fn, "a shared bank needs bank_groups of shape (1, " + std::to_string(a.M) + "), got " + shape_str(bg));
    a.bank_groups = int32_arg(fn, "bank_groups", bg, {a.Bg, a.M});
    a.group_same = group_same;
  }
  if (reduce == kNNTopk) a.values = float_out(fn, "values", values, {a.B, a.N, k});
  else a.values = float_out(fn, "values", values, {a.B, a.N});
  if (indices.is_none()) {
    if (reduce == kNNTopk) fail(fn, "reduce='topk' needs an indices output");
  } else {
    if (!py::isinstance<py::array>(indices)) fail(fn, "indices must be a numpy array or None");
    py::array idx = py::reinterpret_borrow<py::array>(indices);
    a.indices = int64_out(fn, "indices", idx, {a.B, a.N, k});
  }
  if (path < kNNAuto || path > kNNL2Direct) fail(fn, "unknown path code " + std::to_string(path));
  a.path = path;
  a.nthreads = resolve_threads(nthreads);
  NNStats st;
  {
    py::gil_scoped_release release;
    FASTAD_DISPATCH_KERNEL(nn_distance_kernel, a, st);
  }
  static const char* names[] = {"auto", "fp32", "int8", "l2_direct"};
  py::dict out;
  out["status"] = st.status == 0 ? "ok" : "out_of_range";
  out["path"] = names[st.path];
  out["exact_evals"] = st.exact_evals;
  out["screened_pairs"] = st.screened_pairs;
  out["int8_tasks"] = st.int8_tasks;
  out["switched_tasks"] = st.switched_tasks;
  return out;
}

}  // namespace

FASTAD_REGISTER(nn_distance) {
  m.def("nn_distance", &nn_distance_cpu, py::arg("query"), py::arg("bank"), py::arg("dtype"), py::arg("k"),
        py::arg("metric"), py::arg("reduce"), py::arg("scale"), py::arg("query_groups"), py::arg("bank_groups"),
        py::arg("group_same"), py::arg("values"), py::arg("indices"), py::arg("path"), py::arg("nthreads"),
        "Fused k-nearest-neighbour distances (see fastad.ops.nn_distance). query [B, N, C], bank [1 or B, M, C]\n"
        "(float32, or int16 bits of float16 / bfloat16 with dtype 1 / 2); metric 0 cosine, 1 l2, 2 ip; reduce 0\n"
        "topk, 1 mean_largest, 2 mean_smallest; groups int32 [B, N] / [1 or B, M] or None; values float32\n"
        "[B, N, k] or [B, N] and indices int64 [B, N, k] (or None for the mean modes) are written in place;\n"
        "path 0 auto, 1 fp32, 2 int8 screen, 3 l2 direct. Returns statistics; status 'out_of_range' means\n"
        "nothing was written (a row norm is outside the float32 range the kernel handles).");
}

}  // namespace fastad
