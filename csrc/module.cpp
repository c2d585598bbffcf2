// Python module lorakern._C: importing it registers the torch.ops.lorakern operators (csrc/*.cpp for the CPU and
// composite keys; csrc/cuda/ for the CUDA key when built with it) and reports how it was built: with_cuda is
// True when the CUDA sources were compiled in (setup.py, LORAKERN_CUDA).
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lorakern C++/CUDA extension";
#ifdef LORAKERN_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
