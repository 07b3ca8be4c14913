// The Python module fastlm._C. Importing it runs the TORCH_LIBRARY registrations of every
// translation unit; the module itself only reports how it was built (no pybind11 needed).
#include <Python.h>

#define FASTLM_STR2(...) #__VA_ARGS__
#define FASTLM_STR(...) FASTLM_STR2(__VA_ARGS__)

#ifndef FASTLM_CUDA_ARCHS
#define FASTLM_CUDA_ARCHS
#endif
#ifndef FASTLM_TORCH_VERSION
#define FASTLM_TORCH_VERSION unknown
#endif

static struct PyModuleDef fastlm_module = {PyModuleDef_HEAD_INIT, "_C",
                                           "fastlm's compiled kernels (registered as torch.ops.fastlm)",
                                           -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&fastlm_module);
  if (m == nullptr) return nullptr;
#ifdef FASTLM_WITH_CUDA
  PyModule_AddIntConstant(m, "with_cuda", 1);
#else
  PyModule_AddIntConstant(m, "with_cuda", 0);
#endif
  // Comma-separated sm_XX targets nvcc was asked for; empty without CUDA kernels.
  PyModule_AddStringConstant(m, "cuda_archs", FASTLM_STR(FASTLM_CUDA_ARCHS));
  // The torch the library was compiled against: a different one at import cannot load it.
  PyModule_AddStringConstant(m, "torch_version", FASTLM_STR(FASTLM_TORCH_VERSION));
  return m;
}
