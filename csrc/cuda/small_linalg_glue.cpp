// torch glue of the CUDA small linear algebra (small_linalg.cu): the ops of ../small_linalg.cpp for the CUDA
// dispatch key. Compiled only in CUDA builds (setup.py / CMakeLists.txt add csrc/cuda/ then). The current stream
// comes from c10/cuda/CUDAStream.h, not ATen/cuda/CUDAContext.h (that one needs cusparse.h, which a minimal
// toolkit lacks). The values of `sizes` are not read on the host (that would synchronize): the kernels clamp
// them to [0, kmax]; lorakern/small_linalg.py checks them where they come from the host.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "small_linalg.h"

namespace lorakern {

namespace small_linalg {  // defined in ../small_linalg.cpp: shapes, dtypes, contiguity, devices
void check_cholesky(const at::Tensor& mats, const c10::optional<at::Tensor>& sizes, const at::Tensor& info,
                    const char* op);
void check_triangular_solve(const at::Tensor& tri, const at::Tensor& rhs, const c10::optional<at::Tensor>& sizes);
void check_eigh(const at::Tensor& mats, const c10::optional<at::Tensor>& sizes, const at::Tensor& w,
                const at::Tensor& V, const at::Tensor& info);
}  // namespace small_linalg

namespace {

const int64_t* sizes_ptr(const c10::optional<at::Tensor>& sizes) {
  return sizes.has_value() && sizes->defined() ? sizes->data_ptr<int64_t>() : nullptr;
}

cudaStream_t stream_of(const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.is_cuda(), "lorakern: expected a CUDA tensor, got one on ", t.device());
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "lorakern::", op, ": CUDA launch failed: ", cudaGetErrorString(err));
}

}  // namespace

void batched_cholesky_cuda(at::Tensor& mats, const c10::optional<at::Tensor>& sizes, at::Tensor& info) {
  small_linalg::check_cholesky(mats, sizes, info, "batched_cholesky_");
  const c10::cuda::CUDAGuard guard(mats.device());
  const cudaStream_t stream = stream_of(mats);
  AT_DISPATCH_FLOATING_TYPES(mats.scalar_type(), "batched_cholesky_", [&] {
    check_launch(cuda::batched_cholesky<scalar_t>(mats.data_ptr<scalar_t>(), sizes_ptr(sizes),
                                                  info.data_ptr<int32_t>(), mats.size(0), mats.size(1), stream),
                 "batched_cholesky_");
  });
}

void batched_cholesky_inverse_cuda(at::Tensor& mats, const c10::optional<at::Tensor>& sizes, at::Tensor& info) {
  small_linalg::check_cholesky(mats, sizes, info, "batched_cholesky_inverse_");
  const c10::cuda::CUDAGuard guard(mats.device());
  const cudaStream_t stream = stream_of(mats);
  const int64_t n = mats.size(0), kmax = mats.size(1);
  const int64_t per_matrix = cuda::batched_cholesky_inverse_workspace(kmax, mats.element_size());
  at::Tensor work;  // L^-1 when L and it do not fit in shared memory together
  if (per_matrix > 0 && n > 0) work = at::empty({n * per_matrix}, mats.options());
  AT_DISPATCH_FLOATING_TYPES(mats.scalar_type(), "batched_cholesky_inverse_", [&] {
    check_launch(cuda::batched_cholesky_inverse<scalar_t>(mats.data_ptr<scalar_t>(), sizes_ptr(sizes),
                                                          info.data_ptr<int32_t>(),
                                                          work.defined() ? work.data_ptr<scalar_t>() : nullptr, n,
                                                          kmax, stream),
                 "batched_cholesky_inverse_");
  });
}

void batched_triangular_solve_cuda(const at::Tensor& tri, at::Tensor& rhs, const c10::optional<at::Tensor>& sizes,
                                   bool upper, bool transpose) {
  small_linalg::check_triangular_solve(tri, rhs, sizes);
  const c10::cuda::CUDAGuard guard(tri.device());
  const cudaStream_t stream = stream_of(tri);
  AT_DISPATCH_FLOATING_TYPES(tri.scalar_type(), "batched_triangular_solve_", [&] {
    check_launch(cuda::batched_triangular_solve<scalar_t>(tri.data_ptr<scalar_t>(), rhs.data_ptr<scalar_t>(),
                                                          sizes_ptr(sizes), tri.size(0), tri.size(1), rhs.size(2),
                                                          upper, transpose, stream),
                 "batched_triangular_solve_");
  });
}

void batched_eigh_cuda(const at::Tensor& mats, const c10::optional<at::Tensor>& sizes, at::Tensor& w, at::Tensor& V,
                       at::Tensor& info) {
  small_linalg::check_eigh(mats, sizes, w, V, info);
  const c10::cuda::CUDAGuard guard(mats.device());
  const cudaStream_t stream = stream_of(mats);
  const int64_t n = mats.size(0), kmax = mats.size(1), per_matrix = cuda::batched_eigh_workspace(kmax);
  at::Tensor work;  // float64 copies of A and V when they do not fit in shared memory (the caching allocator's)
  if (per_matrix > 0 && n > 0) work = at::empty({n * per_matrix}, mats.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(mats.scalar_type(), "batched_eigh_", [&] {
    check_launch(cuda::batched_eigh<scalar_t>(mats.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                                              V.data_ptr<scalar_t>(), sizes_ptr(sizes), info.data_ptr<int32_t>(),
                                              work.defined() ? work.data_ptr<double>() : nullptr, n, kmax, stream),
                 "batched_eigh_");
  });
}

TORCH_LIBRARY_IMPL(lorakern, CUDA, m) {
  m.impl("batched_cholesky_", &batched_cholesky_cuda);
  m.impl("batched_cholesky_inverse_", &batched_cholesky_inverse_cuda);
  m.impl("batched_triangular_solve_", &batched_triangular_solve_cuda);
  m.impl("batched_eigh_", &batched_eigh_cuda);
}

}  // namespace lorakern
