// The Python module ptfast._C. Importing it loads this library, whose static
// initialisers register the ptfast operators with the dispatcher; every op is
// reached through torch.ops.ptfast. The module itself holds only the
// process-wide settings that are not arguments of an op (ptfast.backends)
// and the peak-rate probe of ptfast-bench.
#include "ops/conv_block_path.h"
#include "ops/cpu/peak_flops.h"

#include <Python.h>

#include <string_view>

namespace {

using ptfast::ops::ConvBlockPath;

// The backend a device name ("cpu" or "cuda") names, or nullptr with a
// ValueError set.
const c10::DeviceType* backend_device(PyObject* name) {
  static const c10::DeviceType cpu = c10::DeviceType::CPU;
  static const c10::DeviceType cuda = c10::DeviceType::CUDA;
  Py_ssize_t size = 0;
  const char* text =
      PyUnicode_Check(name) ? PyUnicode_AsUTF8AndSize(name, &size) : nullptr;
  const std::string_view device =
      text == nullptr ? "" : std::string_view(text, static_cast<size_t>(size));
  if (device == "cpu") {
    return &cpu;
  }
  if (device == "cuda") {
    return &cuda;
  }
  PyErr_Clear();
  PyErr_Format(
      PyExc_ValueError,
      "ptfast.backends: `device` must be 'cpu' or 'cuda', got %R", name);
  return nullptr;
}

// _get_conv_block(device) -> "auto" | "direct" | "vendor"
PyObject* get_conv_block(PyObject* /*module*/, PyObject* device_name) {
  const c10::DeviceType* device = backend_device(device_name);
  if (device == nullptr) {
    return nullptr;
  }
  const std::string_view name = ptfast::ops::conv_block_path_name(
      ptfast::ops::conv_block_policy(*device));
  return PyUnicode_FromStringAndSize(
      name.data(), static_cast<Py_ssize_t>(name.size()));
}

// _set_conv_block(device, name); ValueError for an unknown name.
PyObject* set_conv_block(PyObject* /*module*/, PyObject* args) {
  PyObject* device_name = nullptr;
  PyObject* value = nullptr;
  if (!PyArg_ParseTuple(args, "OO", &device_name, &value)) {
    return nullptr;
  }
  const c10::DeviceType* device = backend_device(device_name);
  if (device == nullptr) {
    return nullptr;
  }
  Py_ssize_t size = 0;
  const char* name =
      PyUnicode_Check(value) ? PyUnicode_AsUTF8AndSize(value, &size) : nullptr;
  ConvBlockPath path = ConvBlockPath::kAuto;
  if (name == nullptr ||
      !ptfast::ops::parse_conv_block_path(
          std::string_view(name, static_cast<size_t>(size)), &path)) {
    PyErr_Clear();
    PyErr_Format(
        PyExc_ValueError,
        "ptfast.backends.%U: `conv_block` must be 'auto', 'direct' or "
        "'vendor', got %R",
        device_name, value);
    return nullptr;
  }
  ptfast::ops::set_conv_block_policy(*device, path);
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
    {"_get_conv_block", get_conv_block, METH_O, nullptr},
    {"_set_conv_block", set_conv_block, METH_VARARGS, nullptr},
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
