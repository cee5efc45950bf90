// The Python module ptfast._C. Importing it loads this library, whose static
// initialisers register the ptfast operators with the dispatcher; every op is
// reached through torch.ops.ptfast. The module itself holds only the
// process-wide settings that are not arguments of an op (ptfast.backends)
// and the peak-rate probe of ptfast-bench.
#include "ops/cpu/conv2d_relu_max_pool2d_path.h"
#include "ops/cpu/peak_flops.h"

#include <Python.h>

#include <string_view>

namespace {

using ptfast::cpu::ConvBlockPath;

// _get_cpu_conv_block() -> "auto" | "direct" | "vendor"
PyObject* get_cpu_conv_block(PyObject* /*module*/, PyObject* /*unused*/) {
  const std::string_view name =
      ptfast::cpu::conv_block_path_name(ptfast::cpu::conv_block_policy());
  return PyUnicode_FromStringAndSize(
      name.data(), static_cast<Py_ssize_t>(name.size()));
}

// _set_cpu_conv_block(name); ValueError for an unknown name.
PyObject* set_cpu_conv_block(PyObject* /*module*/, PyObject* value) {
  Py_ssize_t size = 0;
  const char* name =
      PyUnicode_Check(value) ? PyUnicode_AsUTF8AndSize(value, &size) : nullptr;
  ConvBlockPath path = ConvBlockPath::kAuto;
  if (name == nullptr ||
      !ptfast::cpu::parse_conv_block_path(
          std::string_view(name, static_cast<size_t>(size)), &path)) {
    PyErr_Clear();
    PyErr_Format(
        PyExc_ValueError,
        "ptfast.backends.cpu: `conv_block` must be 'auto', 'direct' or "
        "'vendor', got %R",
        value);
    return nullptr;
  }
  ptfast::cpu::set_conv_block_policy(path);
  Py_RETURN_NONE;
}

// _peak_fp32_gflops() -> float: the CPU's peak float32 rate on torch's
// threads, for ptfast-bench.
PyObject* peak_fp32_gflops(PyObject* /*module*/, PyObject* /*unused*/) {
  double gflops = 0;
  Py_BEGIN_ALLOW_THREADS gflops = ptfast::cpu::peak_fp32_gflops();
  Py_END_ALLOW_THREADS return PyFloat_FromDouble(gflops);
}

PyMethodDef methods[] = {
    {"_get_cpu_conv_block", get_cpu_conv_block, METH_NOARGS, nullptr},
    {"_set_cpu_conv_block", set_cpu_conv_block, METH_O, nullptr},
    {"_peak_fp32_gflops", peak_fp32_gflops, METH_NOARGS, nullptr},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" {

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module);
}
}
