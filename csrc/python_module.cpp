// `import mage_ext._C` loads the shared library; its static registrars (TORCH_LIBRARY and
// TORCH_LIBRARY_IMPL) then make the ops available as torch.ops.mage.*. The module itself is
// empty and uses only the limited Python API, so one binary serves every Python >= 3.9.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "MAGE ops; loading this module registers torch.ops.mage.*",
      -1,  // no per-module state
      nullptr,
  };
  return PyModule_Create(&module_def);
}
}
