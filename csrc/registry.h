// Static registration of binding functions: each csrc/<op>.cpp adds its own
// functions to fastad._C without a central list to edit.
#pragma once
#include <pybind11/pybind11.h>

namespace fastad {

using InitFn = void (*)(pybind11::module_&);

struct Registrar {
  Registrar(const char* name, InitFn fn);
};

void init_all(pybind11::module_& m);

}  // namespace fastad

// FASTAD_REGISTER(op) { m.def(...); }   -- `m` is the fastad._C module.
#define FASTAD_REGISTER(op)                                                   \
  static void fastad_init_##op(pybind11::module_& m);                         \
  static ::fastad::Registrar fastad_registrar_##op(#op, &fastad_init_##op);   \
  static void fastad_init_##op(pybind11::module_& m)
