// The Python module ptfast._C. Importing it loads this library, whose static
// initialisers register the ptfast operators with the dispatcher; the
// module itself exposes nothing, since every op is reached through
// torch.ops.ptfast.
#include <Python.h>

extern "C" {

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

}
