// CPU LoRA forward/backward, registered as torch.ops.lorakern.* (the C++ reference path).
//
// Layout (API.md): weight (out, in), lora_A (r, in), lora_B (out, r);
//   y = x W^T + b + s * (x_l A^T) B^T,  x_l = dropout(x) (the caller passes x_l; x_l = x without dropout).
// The adapters may have another dtype than x (fp32 adapters on a bf16 base): the rank-r products then run
// in the adapter dtype and only the (M, out) LoRA term is rounded to x's dtype when it is added.
#include <torch/library.h>
#include <ATen/ATen.h>

#include <tuple>

namespace lorakern {

namespace {

void check_2d(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 2, "lorakern: ", name, " must be 2-D, got shape ", t.sizes());
}

void check_shapes(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                  const at::Tensor& x_lora, const at::Tensor& lora_A, const at::Tensor& lora_B) {
  check_2d(x, "x");
  check_2d(weight, "weight");
  check_2d(x_lora, "x_lora");
  check_2d(lora_A, "lora_A");
  check_2d(lora_B, "lora_B");
  const auto in = weight.size(1), out = weight.size(0), r = lora_A.size(0);
  TORCH_CHECK_VALUE(x.size(1) == in, "lorakern: x has ", x.size(1), " features but weight is ", weight.sizes());
  TORCH_CHECK_VALUE(x_lora.sizes() == x.sizes(), "lorakern: x_lora shape ", x_lora.sizes(),
                    " differs from x shape ", x.sizes());
  TORCH_CHECK_VALUE(lora_A.size(1) == in, "lorakern: lora_A shape ", lora_A.sizes(), " does not match in_features ", in);
  TORCH_CHECK_VALUE(lora_B.size(0) == out && lora_B.size(1) == r, "lorakern: lora_B shape ", lora_B.sizes(),
                    " does not match (out_features, r) = (", out, ", ", r, ")");
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type(), "lorakern: x dtype ", x.scalar_type(),
                   " differs from weight dtype ", weight.scalar_type());
  TORCH_CHECK_TYPE(lora_A.scalar_type() == lora_B.scalar_type(), "lorakern: lora_A dtype ", lora_A.scalar_type(),
                   " differs from lora_B dtype ", lora_B.scalar_type());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == out, "lorakern: bias shape ", bias->sizes(),
                      " does not match out_features ", out);
  }
}

}  // namespace

// Returns (y, xa) with xa = x_lora A^T in the adapter dtype: the backward needs xa for dB, so the forward
// hands it out instead of the autograd Function recomputing it.
std::tuple<at::Tensor, at::Tensor> lora_forward(const at::Tensor& x, const at::Tensor& weight,
                                                const c10::optional<at::Tensor>& bias, const at::Tensor& x_lora,
                                                const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling) {
  check_shapes(x, weight, bias, x_lora, lora_A, lora_B);
  const auto adt = lora_A.scalar_type();
  at::Tensor y = (bias.has_value() && bias->defined()) ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
  at::Tensor xa = at::mm(x_lora.to(adt), lora_A.t());
  if (adt == x.scalar_type()) {
    y.addmm_(xa, lora_B.t(), /*beta=*/1, /*alpha=*/scaling);  // one pass over y
  } else {
    y.add_(at::mm(xa, lora_B.t()).mul_(scaling).to(x.scalar_type()));
  }
  return {y, xa};
}

// Gradients of lora_forward for a frozen weight and bias. `mask` (optional, x's shape, the adapter dtype) is the
// dropout multiplier (0 or 1/(1-p)) that produced x_lora; it scales the LoRA part of dx.
std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_backward(
    const at::Tensor& grad_y, const at::Tensor& x_lora, const at::Tensor& xa, const at::Tensor& weight,
    const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling, const c10::optional<at::Tensor>& mask,
    bool need_dx, bool need_dA, bool need_dB) {
  check_2d(grad_y, "grad_y");
  check_2d(xa, "xa");
  TORCH_CHECK_VALUE(grad_y.size(0) == x_lora.size(0) && grad_y.size(1) == weight.size(0),
                    "lorakern: grad_y shape ", grad_y.sizes(), " does not match (M, out) = (", x_lora.size(0), ", ",
                    weight.size(0), ")");
  const auto adt = lora_A.scalar_type();
  const at::Tensor gy = grad_y.to(adt);  // no copy when the dtypes agree
  at::Tensor dx, dA, dB;
  if (need_dB) dB = at::mm(gy.t(), xa).mul_(scaling);
  if (need_dx || need_dA) {
    const at::Tensor dxa = at::mm(gy, lora_B).mul_(scaling);  // (M, r)
    if (need_dA) dA = at::mm(dxa.t(), x_lora.to(adt));
    if (need_dx) {
      dx = at::mm(grad_y, weight);
      const bool has_mask = mask.has_value() && mask->defined();
      if (!has_mask && adt == grad_y.scalar_type()) {
        dx.addmm_(dxa, lora_A);
      } else {
        at::Tensor dxl = at::mm(dxa, lora_A);
        if (has_mask) dxl.mul_(*mask);
        dx.add_(dxl.to(dx.scalar_type()));
      }
    }
  }
  return {dx, dA, dB};
}

TORCH_LIBRARY(lorakern, m) {
  m.def("lora_forward(Tensor x, Tensor weight, Tensor? bias, Tensor x_lora, Tensor lora_A, Tensor lora_B, "
        "float scaling) -> (Tensor, Tensor)");
  m.def("lora_backward(Tensor grad_y, Tensor x_lora, Tensor xa, Tensor weight, Tensor lora_A, Tensor lora_B, "
        "float scaling, Tensor? mask, bool need_dx, bool need_dA, bool need_dB) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lorakern, CPU, m) {
  m.impl("lora_forward", &lora_forward);
  m.impl("lora_backward", &lora_backward);
}

}  // namespace lorakern
