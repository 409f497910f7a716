// Fused patch nearest-neighbour distance: the interface shared by the bindings
// (csrc/nn_distance.cpp) and the per-ISA kernels (csrc/cpu/nn_distance_kernel.cpp).
#pragma once
#include <cstdint>

#include "isa.h"

namespace fastad {

enum NNMetric : int { kNNCosine = 0, kNNL2 = 1, kNNIp = 2 };
enum NNReduce : int { kNNTopk = 0, kNNMeanLargest = 1, kNNMeanSmallest = 2 };
// Which algorithm runs (kNNAuto picks one per problem; the others force it, for tests
// and benchmarks). All of them give the exact answer.
enum NNPath : int { kNNAuto = 0, kNNFp32 = 1, kNNInt8 = 2, kNNL2Direct = 3 };

struct NNArgs {
  const void* query = nullptr;  // [B, N, C], dtype (DType in common.h)
  const void* bank = nullptr;   // [Bb, M, C], Bb in {1, B}
  int dtype = 0;
  int64_t B = 0, N = 0, M = 0, C = 0, Bb = 1;
  int64_t k = 1;
  int metric = kNNCosine;
  int reduce = kNNTopk;
  double scale = 1.0;
  const int32_t* query_groups = nullptr;  // [B, N] or null
  const int32_t* bank_groups = nullptr;   // [Bg, M] or null, Bg in {1, B}
  int64_t Bg = 1;
  bool group_same = false;  // group_match == "same"
  float* values = nullptr;     // [B, N, k] (topk) or [B, N] (mean modes)
  int64_t* indices = nullptr;  // [B, N, k] or null (mean modes only)
  int path = kNNAuto;
  int nthreads = 1;
};

struct NNStats {
  int status = 0;             // 0: done; 1: a row norm is outside the float32 range the kernel
                              // handles (|x|^2 > 2^100, or 0 < max|x| < 2^-50): nothing written
  int path = 0;               // path of the last problem (NNPath)
  int64_t exact_evals = 0;    // candidate pairs re-ranked exactly after a screen
  int64_t screened_pairs = 0; // pairs that went through the int8 screen
  int64_t int8_tasks = 0;     // query chunks that ran the int8 screen
  int64_t switched_tasks = 0; // of those, chunks that switched to the fp32 kernel part-way
};

}  // namespace fastad

FASTAD_DECLARE_KERNEL(void nn_distance_kernel(const NNArgs& args, NNStats& stats))
