// Batched small dense linear algebra on CUDA (k <= 256): one thread block per matrix, a heterogeneous batch
// (a different k per matrix) in one launch. No torch here: raw device pointers and the caller's stream; the
// torch ops that call these are in small_linalg_glue.cpp, the CPU versions in ../small_linalg.cpp (same
// semantics, documented there).
//
// Layout: n matrices padded to kmax x kmax, row-major, contiguous: matrix i starts at mats + i kmax^2 and is
// its leading k_i x k_i block, k_i = sizes[i] (device int64 array; nullptr: every k_i = kmax; values outside
// [0, kmax] are clamped). Right-hand sides: rhs (n, kmax, m), contiguous; rows >= k_i untouched.
// Every function returns the launch's cudaError_t (cudaSuccess, or cudaErrorInvalidValue for kmax > 256).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace lorakern {
namespace cuda {

constexpr int64_t kMaxOrder = 256;

// Lower Cholesky factor in place (reads the lower triangle, zeroes the strict upper one); info[i] = 0, or j+1
// when pivot j is not positive (the block is then partly factored), as LAPACK potrf / torch cholesky_ex.
template <typename T>
cudaError_t batched_cholesky(T* mats, const int64_t* sizes, int32_t* info, int64_t n, int64_t kmax,
                             cudaStream_t stream);

// The inverse of each SPD matrix in place (lower triangle read, both triangles written) from its Cholesky
// factor, L^-T L^-1; info as batched_cholesky (the matrix is left partly factored where it is not 0). `work`:
// device memory for n * batched_cholesky_inverse_workspace(kmax, sizeof(T)) elements of T (nullptr when 0).
int64_t batched_cholesky_inverse_workspace(int64_t kmax, int64_t elem_bytes);

template <typename T>
cudaError_t batched_cholesky_inverse(T* mats, const int64_t* sizes, int32_t* info, T* work, int64_t n, int64_t kmax,
                                     cudaStream_t stream);

// rhs[i] <- op(T_i)^-1 rhs[i], T_i the lower (upper = false) or upper triangle of tri[i], op(T) = T^T when
// transpose. Forward substitution when op(T) is lower, back substitution when it is upper.
template <typename T>
cudaError_t batched_triangular_solve(const T* tri, T* rhs, const int64_t* sizes, int64_t n, int64_t kmax, int64_t m,
                                     bool upper, bool transpose, cudaStream_t stream);

// Symmetric eigendecomposition (parallel-ordered cyclic two-sided Jacobi, computed in float64) of the lower
// triangle of mats[i]: w (n, kmax) ascending, V (n, kmax, kmax) eigenvectors as columns, both zero outside the
// k_i block; info[i] 0 converged, 1 not within the sweep limit, 2 input not finite (NaN out). `work`: device
// memory for n * batched_eigh_workspace(kmax) doubles (nullptr when that is 0: the matrices fit in shared memory).
int64_t batched_eigh_workspace(int64_t kmax);

template <typename T>
cudaError_t batched_eigh(const T* mats, T* w, T* V, const int64_t* sizes, int32_t* info, double* work, int64_t n,
                         int64_t kmax, cudaStream_t stream);

}  // namespace cuda
}  // namespace lorakern
