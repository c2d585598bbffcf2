// Streaming one-step gradient capture: accumulate products of a layer's input x (M, in) and its output
// gradient dy (M, out) into an fp32 buffer, never forming the weight gradient unless asked to.
//   no probe:            acc (out, in) += dy^T x                 (exact G = dL/dW)
//   probe_in (in, q):    acc (out, q)  += dy^T (x probe_in)      (range sketch G probe_in)
//   probe_out (out, q):  acc (q, in)   += (dy probe_out)^T x     (co-range sketch probe_out^T G)
// The products run in acc's dtype (fp32 or fp64), so a bf16 model's gradient is accumulated without bf16
// rounding of the sums. Registered as CompositeExplicitAutograd: the same ATen code serves CPU and CUDA
// (cuBLAS) until a fused CUDA kernel replaces it.
#include <torch/library.h>
#include <ATen/ATen.h>

namespace lorakern {

void capture_accumulate_(at::Tensor& acc, const at::Tensor& x, const at::Tensor& dy,
                         const c10::optional<at::Tensor>& probe_in, const c10::optional<at::Tensor>& probe_out) {
  TORCH_CHECK_VALUE(x.dim() == 2 && dy.dim() == 2 && acc.dim() == 2,
                    "capture_accumulate_: acc, x and dy must be 2-D, got ", acc.sizes(), ", ", x.sizes(), ", ",
                    dy.sizes());
  TORCH_CHECK_VALUE(x.size(0) == dy.size(0), "capture_accumulate_: x has ", x.size(0), " rows but dy has ",
                    dy.size(0));
  TORCH_CHECK_TYPE(acc.scalar_type() == at::kFloat || acc.scalar_type() == at::kDouble,
                   "capture_accumulate_: acc must be float32 or float64, got ", acc.scalar_type());
  const bool has_in = probe_in.has_value() && probe_in->defined();
  const bool has_out = probe_out.has_value() && probe_out->defined();
  TORCH_CHECK_VALUE(!(has_in && has_out), "capture_accumulate_: pass probe_in or probe_out, not both");
  const auto dt = acc.scalar_type();
  const at::Tensor xw = x.to(dt), dyw = dy.to(dt);
  const auto in = x.size(1), out = dy.size(1);
  if (has_in) {
    TORCH_CHECK_VALUE(probe_in->dim() == 2 && probe_in->size(0) == in && acc.size(0) == out &&
                          acc.size(1) == probe_in->size(1),
                      "capture_accumulate_: probe_in ", probe_in->sizes(), " and acc ", acc.sizes(),
                      " do not fit x ", x.sizes(), ", dy ", dy.sizes());
    acc.addmm_(dyw.t(), at::mm(xw, probe_in->to(dt)));
  } else if (has_out) {
    TORCH_CHECK_VALUE(probe_out->dim() == 2 && probe_out->size(0) == out && acc.size(1) == in &&
                          acc.size(0) == probe_out->size(1),
                      "capture_accumulate_: probe_out ", probe_out->sizes(), " and acc ", acc.sizes(),
                      " do not fit x ", x.sizes(), ", dy ", dy.sizes());
    acc.addmm_(at::mm(dyw, probe_out->to(dt)).t(), xw);
  } else {
    TORCH_CHECK_VALUE(acc.size(0) == out && acc.size(1) == in, "capture_accumulate_: acc ", acc.sizes(),
                      " must be (out, in) = (", out, ", ", in, ")");
    acc.addmm_(dyw.t(), xw);
  }
}

TORCH_LIBRARY_FRAGMENT(lorakern, m) {
  m.def("capture_accumulate_(Tensor(a!) acc, Tensor x, Tensor dy, Tensor? probe_in, Tensor? probe_out) -> ()");
}

TORCH_LIBRARY_IMPL(lorakern, CompositeExplicitAutograd, m) {
  m.impl("capture_accumulate_", &capture_accumulate_);
}

}  // namespace lorakern
