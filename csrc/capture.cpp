// Streaming one-step gradient capture: accumulate products of a layer's input x (M, in) and its output
// gradient dy (M, out) into an fp32 buffer, never forming the weight gradient unless asked to. Inputs in
// another dtype (bf16) are converted a block of rows (about 32 MiB) at a time: no full-size fp32 copy.
//   no probe:            acc (out, in) += dy^T x                 (exact G = dL/dW)
//   probe_in (in, q):    acc (out, q)  += dy^T (x probe_in)      (range sketch G probe_in)
//   probe_out (out, q):  acc (q, in)   += (dy probe_out)^T x     (co-range sketch probe_out^T G)
// The products run in acc's dtype (fp32 or fp64), so a bf16 model's gradient is accumulated without bf16
// rounding of the sums. Registered as CompositeExplicitAutograd: the same ATen code serves CPU and CUDA
// (cuBLAS) until a fused CUDA kernel replaces it.
//
// sketch_accumulate_ (the one-pass sketch of Tropp, Yurtsever, Udell & Cevher 2019): with omega (in, k),
// theta (in, s), psi (out, l), phi (out, s) it adds, in one read of x and dy,
//   Y (out, k) += dy^T (x omega)      range sketch      G omega
//   W (l, in)  += (dy psi)^T x        co-range sketch   psi^T G
//   Z (s, s)   += (dy phi)^T (x theta) core sketch      phi^T G theta
// of G = dy^T x, never forming G. x and dy are converted to the accumulators' dtype a block of rows at a
// time, so a bf16 model needs no full-size fp32 copy of either. When theta starts right after omega's last
// column in one buffer (and phi after psi), x and dy are multiplied by both probes with one GEMM each.
#include <torch/library.h>
#include <ATen/ATen.h>

#include <algorithm>

namespace lorakern {

namespace {

// [a | b] as one (rows, ca + cb) view when b's columns follow a's in the same buffer, else undefined.
at::Tensor adjacent_columns(const at::Tensor& a, const at::Tensor& b) {
  const bool fits = a.dim() == 2 && b.dim() == 2 && a.size(0) == b.size(0) && a.scalar_type() == b.scalar_type() &&
                    a.device() == b.device() && a.stride(1) == 1 && b.stride(1) == 1 && a.stride(0) == b.stride(0) &&
                    a.is_alias_of(b) && a.stride(0) >= a.size(1) + b.size(1) &&
                    static_cast<const char*>(b.data_ptr()) ==
                        static_cast<const char*>(a.data_ptr()) + a.size(1) * a.element_size();
  if (!fits) return at::Tensor();
  return a.as_strided({a.size(0), a.size(1) + b.size(1)}, {a.stride(0), 1});
}

// x @ [p | q] as (x p, x q): one GEMM when the probes share a buffer.
std::pair<at::Tensor, at::Tensor> times_both(const at::Tensor& x, const at::Tensor& p, const at::Tensor& q) {
  const at::Tensor both = adjacent_columns(p, q);
  if (both.defined()) {
    const at::Tensor r = at::mm(x, both);
    return {r.narrow(1, 0, p.size(1)), r.narrow(1, p.size(1), q.size(1))};
  }
  return {at::mm(x, p), at::mm(x, q)};
}

void check_sketch_args(const at::Tensor& Y, const at::Tensor& W, const at::Tensor& Z, const at::Tensor& x,
                       const at::Tensor& dy, const at::Tensor& omega, const at::Tensor& theta, const at::Tensor& psi,
                       const at::Tensor& phi) {
  for (const at::Tensor* t : {&Y, &W, &Z, &x, &dy, &omega, &theta, &psi, &phi}) {
    TORCH_CHECK_VALUE(t->dim() == 2, "sketch_accumulate_: every argument must be 2-D; got Y ", Y.sizes(), ", W ",
                      W.sizes(), ", Z ", Z.sizes(), ", x ", x.sizes(), ", dy ", dy.sizes(), ", omega ",
                      omega.sizes(), ", theta ", theta.sizes(), ", psi ", psi.sizes(), ", phi ", phi.sizes());
  }
  const auto dt = Y.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble, "sketch_accumulate_: Y must be float32 or float64, got ", dt);
  TORCH_CHECK_TYPE(W.scalar_type() == dt && Z.scalar_type() == dt,
                   "sketch_accumulate_: Y, W and Z must share one dtype, got ", dt, ", ", W.scalar_type(), ", ",
                   Z.scalar_type());
  TORCH_CHECK_TYPE(x.is_floating_point() && dy.is_floating_point(),
                   "sketch_accumulate_: x and dy must be floating point, got ", x.scalar_type(), ", ", dy.scalar_type());
  const auto M = x.size(0), in = x.size(1), out = dy.size(1);
  const auto k = omega.size(1), s = theta.size(1), l = psi.size(1);
  TORCH_CHECK_VALUE(dy.size(0) == M, "sketch_accumulate_: x ", x.sizes(), " and dy ", dy.sizes(),
                    " must have the same number of rows");
  TORCH_CHECK_VALUE(omega.size(0) == in && theta.size(0) == in, "sketch_accumulate_: omega ", omega.sizes(),
                    " and theta ", theta.sizes(), " must have in = ", in, " rows (x is ", x.sizes(), ")");
  TORCH_CHECK_VALUE(psi.size(0) == out && phi.size(0) == out, "sketch_accumulate_: psi ", psi.sizes(), " and phi ",
                    phi.sizes(), " must have out = ", out, " rows (dy is ", dy.sizes(), ")");
  TORCH_CHECK_VALUE(phi.size(1) == s, "sketch_accumulate_: theta ", theta.sizes(), " and phi ", phi.sizes(),
                    " must have the same number of columns s");
  TORCH_CHECK_VALUE(Y.size(0) == out && Y.size(1) == k, "sketch_accumulate_: Y ", Y.sizes(), " must be (out, k) = (",
                    out, ", ", k, ")");
  TORCH_CHECK_VALUE(W.size(0) == l && W.size(1) == in, "sketch_accumulate_: W ", W.sizes(), " must be (l, in) = (",
                    l, ", ", in, ")");
  TORCH_CHECK_VALUE(Z.size(0) == s && Z.size(1) == s, "sketch_accumulate_: Z ", Z.sizes(), " must be (s, s) = (",
                    s, ", ", s, ")");
  for (const at::Tensor* t : {&W, &Z, &x, &dy, &omega, &theta, &psi, &phi}) {
    TORCH_CHECK_VALUE(t->device() == Y.device(), "sketch_accumulate_: every argument must be on ", Y.device(),
                      ", got one on ", t->device());
  }
}

// Rows converted per block: about 32 MiB of converted x and dy at a time (the whole input when it is already
// in the accumulators' dtype: .to() is then free).
int64_t block_rows(const at::Tensor& x, const at::Tensor& dy, at::ScalarType dt) {
  if (x.scalar_type() == dt && dy.scalar_type() == dt) return std::max<int64_t>(x.size(0), 1);
  const int64_t row_bytes = (x.size(1) + dy.size(1)) * c10::elementSize(dt);
  return std::max<int64_t>(int64_t{32} * 1024 * 1024 / std::max<int64_t>(row_bytes, 1), 64);
}

at::Tensor cast_to(const at::Tensor& t, at::ScalarType dt) { return t.scalar_type() == dt ? t : t.to(dt); }

}  // namespace

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
  const auto in = x.size(1), out = dy.size(1);
  if (has_in) {
    TORCH_CHECK_VALUE(probe_in->dim() == 2 && probe_in->size(0) == in && acc.size(0) == out &&
                          acc.size(1) == probe_in->size(1),
                      "capture_accumulate_: probe_in ", probe_in->sizes(), " and acc ", acc.sizes(),
                      " do not fit x ", x.sizes(), ", dy ", dy.sizes());
  } else if (has_out) {
    TORCH_CHECK_VALUE(probe_out->dim() == 2 && probe_out->size(0) == out && acc.size(1) == in &&
                          acc.size(0) == probe_out->size(1),
                      "capture_accumulate_: probe_out ", probe_out->sizes(), " and acc ", acc.sizes(),
                      " do not fit x ", x.sizes(), ", dy ", dy.sizes());
  } else {
    TORCH_CHECK_VALUE(acc.size(0) == out && acc.size(1) == in, "capture_accumulate_: acc ", acc.sizes(),
                      " must be (out, in) = (", out, ", ", in, ")");
  }
  const at::Tensor p_in = has_in ? cast_to(*probe_in, dt) : at::Tensor();
  const at::Tensor p_out = has_out ? cast_to(*probe_out, dt) : at::Tensor();
  const int64_t M = x.size(0), step = block_rows(x, dy, dt);
  for (int64_t start = 0; start < M; start += step) {  // converted a block of rows at a time
    const int64_t n = std::min(step, M - start);
    const at::Tensor xb = cast_to(x.narrow(0, start, n), dt), db = cast_to(dy.narrow(0, start, n), dt);
    if (has_in) {
      acc.addmm_(db.t(), at::mm(xb, p_in));
    } else if (has_out) {
      acc.addmm_(at::mm(db, p_out).t(), xb);
    } else {
      acc.addmm_(db.t(), xb);
    }
  }
}


void sketch_accumulate_(at::Tensor& Y, at::Tensor& W, at::Tensor& Z, const at::Tensor& x, const at::Tensor& dy,
                        const at::Tensor& omega, const at::Tensor& theta, const at::Tensor& psi,
                        const at::Tensor& phi) {
  check_sketch_args(Y, W, Z, x, dy, omega, theta, psi, phi);
  const auto dt = Y.scalar_type();
  const at::Tensor om = cast_to(omega, dt), th = cast_to(theta, dt), ps = cast_to(psi, dt), ph = cast_to(phi, dt);
  const int64_t M = x.size(0), step = block_rows(x, dy, dt);
  for (int64_t start = 0; start < M; start += step) {
    const int64_t n = std::min(step, M - start);
    const at::Tensor xb = cast_to(x.narrow(0, start, n), dt), db = cast_to(dy.narrow(0, start, n), dt);
    const auto [x_om, x_th] = times_both(xb, om, th);  // (n, k), (n, s)
    const auto [d_ps, d_ph] = times_both(db, ps, ph);  // (n, l), (n, s)
    Y.addmm_(db.t(), x_om);
    W.addmm_(d_ps.t(), xb);
    Z.addmm_(d_ph.t(), x_th);
  }
}

TORCH_LIBRARY_FRAGMENT(lorakern, m) {
  m.def("capture_accumulate_(Tensor(a!) acc, Tensor x, Tensor dy, Tensor? probe_in, Tensor? probe_out) -> ()");
  m.def("sketch_accumulate_(Tensor(a!) Y, Tensor(b!) W, Tensor(c!) Z, Tensor x, Tensor dy, Tensor omega, "
        "Tensor theta, Tensor psi, Tensor phi) -> ()");
}

TORCH_LIBRARY_IMPL(lorakern, CompositeExplicitAutograd, m) {
  m.impl("capture_accumulate_", &capture_accumulate_);
  m.impl("sketch_accumulate_", &sketch_accumulate_);
}

}  // namespace lorakern
