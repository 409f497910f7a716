// fastad._C: module definition. Ops add their functions with FASTAD_REGISTER
// in their own csrc/<op>.cpp; this file only holds the shared pieces.
#include <omp.h>

#include <map>
#include <string>

#include "common.h"
#include "isa.h"
#include "registry.h"

namespace fastad {

static std::map<std::string, InitFn>& registry() {
  static std::map<std::string, InitFn> r;
  return r;
}

Registrar::Registrar(const char* name, InitFn fn) { registry()[name] = fn; }

void init_all(py::module_& m) {
  for (auto& kv : registry()) kv.second(m);
}

}  // namespace fastad

PYBIND11_MODULE(_C, m) {
  using namespace fastad;
  m.doc() = "fastad C++ kernels (CPU; CUDA when built with FASTAD_CUDA)";
  m.def("cpu_isa", [] { return std::string(isa_name(cpu_isa())); },
        "ISA variant the CPU kernels use now: generic, avx2 or avx512");
  m.def("supported_isa", [] { return std::string(isa_name(supported_isa())); },
        "Best ISA variant compiled in and supported by this CPU");
  m.def("set_cpu_isa", [](const std::string& name) {
    Isa isa;
    if (name == "generic") isa = Isa::generic;
    else if (name == "avx2") isa = Isa::avx2;
    else if (name == "avx512") isa = Isa::avx512;
    else throw py::value_error("set_cpu_isa: unknown ISA '" + name + "' (generic, avx2, avx512)");
    if (!set_cpu_isa(isa))
      throw py::value_error("set_cpu_isa: '" + name + "' is above what this build and CPU support (" +
                            isa_name(supported_isa()) + ")");
  }, py::arg("name"), "Use this ISA variant from now on (lower than or equal to supported_isa())");
  m.def("omp_max_threads", [] { return omp_get_max_threads(); });
#ifdef FASTAD_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.attr("ops") = [] {
    py::list names;
    for (auto& kv : registry()) names.append(kv.first);
    return names;
  }();
  init_all(m);
}
