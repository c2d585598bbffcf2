// Python module lorakern._C: importing it registers the torch.ops.lorakern operators (lora_cpu.cpp,
// and the CUDA sources when built with them) and reports how it was built.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lorakern C++/CUDA extension";
#ifdef LORAKERN_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
