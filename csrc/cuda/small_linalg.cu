// Batched small dense linear algebra on CUDA (k <= 256): one thread block per matrix (per matrix and block of
// right-hand-side columns for the solves), a heterogeneous batch in one launch. Declarations and layout in
// small_linalg.h; no torch headers here (they cost minutes under nvcc): raw pointers and the caller's stream.
//
// Each kernel works on a compact copy of its k x k block in shared memory when it fits the device's opt-in
// limit (the whole factorization then runs out of shared memory), else in global memory (L1/L2): in place for
// the Cholesky, the triangle read from global memory for the solves, a float64 workspace for eigh.
#include "small_linalg.h"

#include <cfloat>

namespace lorakern {
namespace cuda {

namespace {

constexpr int kMaxSweeps = 40;  // the CPU version's limit (csrc/small_linalg.cpp)
constexpr int kSmemReserve = 16 * 1024;  // static shared arrays + margin below the opt-in limit

__device__ __forceinline__ int order_of(const int64_t* sizes, int64_t b, int kmax) {
  if (sizes == nullptr) return kmax;
  const int64_t k = sizes[b];
  return k < 0 ? 0 : (k > kmax ? kmax : static_cast<int>(k));
}

// sum over the block; every thread gets the result (two __syncthreads)
template <typename T>
__device__ T block_sum(T v, T* scratch) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T total = 0;
  for (int i = 0; i < static_cast<int>((blockDim.x + 31) >> 5); ++i) total += scratch[i];
  __syncthreads();
  return total;
}

int threads_for(int64_t kmax) { return kmax <= 16 ? 64 : (kmax <= 32 ? 128 : 256); }

int smem_optin_bytes() {
  int dev = 0, bytes = 48 * 1024;
  if (cudaGetDevice(&dev) == cudaSuccess) cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  return bytes - kSmemReserve;
}

template <typename K>
cudaError_t allow_smem(K kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

// ---------------------------------------------------------------------------------------------------------
// Cholesky: right-looking, one column per step (pivot, scale the column, rank-1 update of the trailing lower
// triangle), three barriers per column.
// ---------------------------------------------------------------------------------------------------------
// Factors a (k x k, leading dimension ld; lower triangle) in place; returns 0 or the failing pivot + 1 (the same
// value in every thread). `failed`: a shared int.
template <typename T>
__device__ int factor_in_place(T* a, int ld, int k, int& failed) {
  const int tid = threadIdx.x, nt = blockDim.x;
  if (tid == 0) failed = 0;
  __syncthreads();
  for (int j = 0; j < k; ++j) {
    if (tid == 0) {
      const T d = a[j * ld + j];
      if (d > T(0)) a[j * ld + j] = sqrt(d);
      else failed = j + 1;  // also NaN
    }
    __syncthreads();
    if (failed) break;
    const T djj = a[j * ld + j];
    for (int i = j + 1 + tid; i < k; i += nt) a[i * ld + j] /= djj;
    __syncthreads();
    const int m = k - j - 1;
    for (int idx = tid; idx < m * m; idx += nt) {
      const int ii = j + 1 + idx / m, ll = j + 1 + idx % m;
      if (ll <= ii) a[ii * ld + ll] -= a[ii * ld + j] * a[ll * ld + j];
    }
    __syncthreads();
  }
  return failed;
}

template <typename T, bool SMEM>
__global__ void cholesky_kernel(T* __restrict__ mats, const int64_t* __restrict__ sizes, int32_t* __restrict__ info,
                                int kmax) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ int failed;
  const int64_t b = blockIdx.x;
  const int k = order_of(sizes, b, kmax), tid = threadIdx.x, nt = blockDim.x;
  T* g = mats + b * kmax * kmax;
  T* a = SMEM ? reinterpret_cast<T*>(smem_raw) : g;
  const int ld = SMEM ? k : kmax;
  if (SMEM) {
    for (int idx = tid; idx < k * k; idx += nt) a[idx] = g[(idx / k) * kmax + idx % k];
  }
  const int status = factor_in_place(a, ld, k, failed);
  for (int idx = tid; idx < k * k; idx += nt) {
    const int i = idx / k, j = idx % k;
    g[i * kmax + j] = j <= i ? a[i * ld + j] : T(0);
  }
  if (tid == 0) info[b] = status;
}

// ---------------------------------------------------------------------------------------------------------
// Cholesky inverse (potrf + potri): factor, Y = L^-1 one column per thread (forward substitution on e_c), then
// A^-1 = Y^T Y one entry pair per thread. L and Y in shared memory when 2 k^2 values fit, else L in place in
// global memory and Y in the caller's workspace (kmax^2 per matrix).
// ---------------------------------------------------------------------------------------------------------
template <typename T, bool SMEM>
__global__ void cholesky_inverse_kernel(T* __restrict__ mats, const int64_t* __restrict__ sizes,
                                        int32_t* __restrict__ info, T* __restrict__ work, int kmax) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ int failed;
  const int64_t b = blockIdx.x;
  const int k = order_of(sizes, b, kmax), tid = threadIdx.x, nt = blockDim.x;
  T* g = mats + b * kmax * kmax;
  T* a = SMEM ? reinterpret_cast<T*>(smem_raw) : g;
  T* y = SMEM ? a + k * k : work + b * kmax * kmax;
  const int ld = SMEM ? k : kmax;
  if (SMEM) {
    for (int idx = tid; idx < k * k; idx += nt) a[idx] = g[(idx / k) * kmax + idx % k];
  }
  const int status = factor_in_place(a, ld, k, failed);
  if (tid == 0) info[b] = status;
  if (status) return;  // the same in every thread
  for (int c = tid; c < k; c += nt) {  // column c of Y: Y[i][c] = 0 for i < c
    for (int i = c; i < k; ++i) {
      T acc = i == c ? T(1) : T(0);
      for (int j = c; j < i; ++j) acc -= a[i * ld + j] * y[j * k + c];
      y[i * k + c] = acc / a[i * ld + i];
    }
  }
  __syncthreads();
  for (int idx = tid; idx < k * k; idx += nt) {  // (A^-1)[i][j] = sum_{l >= max(i, j)} Y[l][i] Y[l][j]
    const int i = idx / k, j = idx % k;
    if (j > i) continue;
    T acc = 0;
    for (int l = i; l < k; ++l) acc += y[l * k + i] * y[l * k + j];
    g[i * kmax + j] = acc;
    g[j * kmax + i] = acc;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Triangular solve: one thread per right-hand-side column, substitution down (or up) its column; the triangle
// is read from shared memory when it fits.
// ---------------------------------------------------------------------------------------------------------
constexpr int kSolveCols = 128;

template <typename T, bool SMEM>
__global__ void trsm_kernel(const T* __restrict__ tri, T* __restrict__ rhs, const int64_t* __restrict__ sizes,
                            int kmax, int64_t m, int64_t chunks, bool upper, bool transpose) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int64_t b = blockIdx.x / chunks;
  const int64_t col = (blockIdx.x % chunks) * kSolveCols + threadIdx.x;
  const int k = order_of(sizes, b, kmax);
  const T* g = tri + b * kmax * kmax;
  const T* t = g;
  int ld = kmax;
  if (SMEM) {
    T* s = reinterpret_cast<T*>(smem_raw);
    for (int idx = threadIdx.x; idx < k * k; idx += blockDim.x) s[idx] = g[(idx / k) * kmax + idx % k];
    __syncthreads();
    t = s;
    ld = k;
  }
  if (col >= m) return;
  // op(T)(i, j) = T(i, j), or T(j, i) when transposed: strides of the row index i and column index j
  const int si = transpose ? 1 : ld, sj = transpose ? ld : 1;
  const bool lower = upper == transpose;
  T* x = rhs + b * kmax * m + col;
  for (int s = 0; s < k; ++s) {
    const int i = lower ? s : k - 1 - s;
    T acc = x[i * m];
    if (lower) {
      for (int j = 0; j < i; ++j) acc -= t[i * si + j * sj] * x[j * m];
    } else {
      for (int j = i + 1; j < k; ++j) acc -= t[i * si + j * sj] * x[j * m];
    }
    x[i * m] = acc / t[i * si + i * sj];
  }
}

// ---------------------------------------------------------------------------------------------------------
// Symmetric eigendecomposition: cyclic two-sided Jacobi in the round-robin (Brent-Luk) ordering: each of the
// m-1 steps of a sweep rotates m/2 disjoint pairs (p, q) at once (m = k rounded up to even; a pair holding the
// dummy index k is idle). In float64 whatever the input dtype (as on the CPU: float32 Jacobi leaves ~1e-4
// orthogonality at k = 64), on compact k x k copies of A and V (leading dimension k) in shared memory when
// 2 k^2 doubles fit, else in the caller's global workspace. A pair is skipped when |a_pq| <= eps sqrt(|a_pp
// a_qq|) or <= eps^2 ||A||_F (as on the CPU); the sweeps stop when one applies no rotation.
// ---------------------------------------------------------------------------------------------------------
struct Rotation {
  double c[kMaxOrder / 2], s[kMaxOrder / 2], dp[kMaxOrder / 2], dq[kMaxOrder / 2];
  int p[kMaxOrder / 2], q[kMaxOrder / 2];
};

__device__ __forceinline__ int round_robin(int pos, int step, int m) {
  return pos == 0 ? 0 : (pos - 1 + step) % (m - 1) + 1;
}

// Rotation parameters of the pairs of one step; returns whether this thread set up a rotation.
__device__ bool plan_step(const double* a, int k, int m, int step, double floor, Rotation& r) {
  bool any = false;
  for (int pr = threadIdx.x; pr < m / 2; pr += blockDim.x) {
    int p = round_robin(pr, step, m), q = round_robin(m - 1 - pr, step, m);
    if (p > q) { const int x = p; p = q; q = x; }
    r.p[pr] = p;
    r.q[pr] = -1;  // idle
    if (q >= k) continue;
    const double apq = a[p * k + q], app = a[p * k + p], aqq = a[q * k + q];
    const double aa = fabs(apq);
    if (aa <= floor || aa <= DBL_EPSILON * sqrt(fabs(app * aqq))) continue;
    const double tau = (aqq - app) / (2 * apq);
    const double t = (tau >= 0.0 ? 1.0 : -1.0) / (fabs(tau) + sqrt(1.0 + tau * tau));
    const double c = 1.0 / sqrt(1.0 + t * t);
    r.q[pr] = q;
    r.c[pr] = c;
    r.s[pr] = t * c;
    r.dp[pr] = app - t * apq;
    r.dq[pr] = aqq + t * apq;
    any = true;
  }
  return any;
}

// A <- J^T A J, V <- V J for the planned rotations (three barriers).
__device__ void apply_step(double* a, double* v, int k, int m, const Rotation& r) {
  const int half = m / 2, tid = threadIdx.x, nt = blockDim.x;
  for (int idx = tid; idx < half * k; idx += nt) {  // rows p, q
    const int pr = idx / k, j = idx % k, q = r.q[pr];
    if (q < 0) continue;
    const int p = r.p[pr];
    const double x = a[p * k + j], y = a[q * k + j], c = r.c[pr], s = r.s[pr];
    a[p * k + j] = c * x - s * y;
    a[q * k + j] = s * x + c * y;
  }
  __syncthreads();
  for (int idx = tid; idx < half * k; idx += nt) {  // columns p, q of A and V
    const int pr = idx / k, j = idx % k, q = r.q[pr];
    if (q < 0) continue;
    const int p = r.p[pr];
    const double c = r.c[pr], s = r.s[pr];
    double x = a[j * k + p], y = a[j * k + q];
    a[j * k + p] = c * x - s * y;
    a[j * k + q] = s * x + c * y;
    x = v[j * k + p];
    y = v[j * k + q];
    v[j * k + p] = c * x - s * y;
    v[j * k + q] = s * x + c * y;
  }
  __syncthreads();
  for (int pr = tid; pr < half; pr += nt) {  // the rotated 2 x 2 blocks, exactly
    const int q = r.q[pr];
    if (q < 0) continue;
    const int p = r.p[pr];
    a[p * k + p] = r.dp[pr];
    a[q * k + q] = r.dq[pr];
    a[p * k + q] = a[q * k + p] = 0.0;
  }
  __syncthreads();
}

// a <- the symmetric matrix of g's lower triangle, v <- I; returns ||A||_F^2, or NaN when g is not finite.
template <typename T>
__device__ double eigh_load(const T* g, int kmax, double* a, double* v, int k, double* scratch) {
  double sum = 0;
  bool finite = true;
  for (int idx = threadIdx.x; idx < k * k; idx += blockDim.x) {
    const int i = idx / k, j = idx % k;
    v[idx] = i == j ? 1.0 : 0.0;
    if (j > i) continue;
    const double x = static_cast<double>(g[i * kmax + j]);
    a[i * k + j] = x;
    a[j * k + i] = x;
    finite = finite && isfinite(x);
    sum += (i == j ? 1.0 : 2.0) * x * x;
  }
  finite = __syncthreads_and(finite);
  const double fro2 = block_sum(sum, scratch);
  return finite ? fro2 : NAN;
}

// w (ascending) and V's columns in that order from the diagonal of a and the columns of v.
template <typename T>
__device__ void eigh_store(const double* a, const double* v, int k, int kmax, T* w, T* V, double* wu, int* rank) {
  const int tid = threadIdx.x, nt = blockDim.x;
  for (int i = tid; i < k; i += nt) wu[i] = a[i * k + i];
  __syncthreads();
  for (int i = tid; i < k; i += nt) {
    int r = 0;
    for (int j = 0; j < k; ++j) r += (wu[j] < wu[i]) || (wu[j] == wu[i] && j < i);
    rank[i] = r;
    w[r] = static_cast<T>(wu[i]);
  }
  __syncthreads();
  for (int idx = tid; idx < k * k; idx += nt) {
    const int j = idx / k, i = idx % k;
    V[j * kmax + rank[i]] = static_cast<T>(v[j * k + i]);
  }
}

// work: nullptr (SMEM), or 2 kmax^2 doubles per matrix.
template <typename T, bool SMEM>
__global__ void eigh_kernel(const T* __restrict__ mats, T* __restrict__ w, T* __restrict__ V,
                            const int64_t* __restrict__ sizes, int32_t* __restrict__ info, double* __restrict__ work,
                            int kmax) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ Rotation rot;
  __shared__ double wu[kMaxOrder];
  __shared__ int rank[kMaxOrder];
  __shared__ double scratch[32];
  const int64_t b = blockIdx.x;
  const int k = order_of(sizes, b, kmax), m = k + (k & 1), tid = threadIdx.x, nt = blockDim.x;
  const T* g = mats + b * kmax * kmax;
  T* Vb = V + b * kmax * kmax;
  T* wb = w + b * kmax;
  for (int idx = tid; idx < kmax * kmax; idx += nt) {  // zero padding; the k x k block is written below
    if (idx / kmax >= k || idx % kmax >= k) Vb[idx] = T(0);
  }
  for (int i = k + tid; i < kmax; i += nt) wb[i] = T(0);
  double* a = SMEM ? reinterpret_cast<double*>(smem_raw) : work + b * 2 * kmax * kmax;
  double* v = a + k * k;
  const double fro2 = eigh_load(g, kmax, a, v, k, scratch);
  if (isnan(fro2)) {
    for (int idx = tid; idx < k * k; idx += nt) Vb[(idx / k) * kmax + idx % k] = T(NAN);
    for (int i = tid; i < k; i += nt) wb[i] = T(NAN);
    if (tid == 0) info[b] = 2;
    return;
  }
  __syncthreads();
  const double floor = fmax(DBL_EPSILON * DBL_EPSILON * sqrt(fro2), DBL_MIN);
  int status = m > 1 ? 1 : 0;
  for (int sweep = 0; sweep < kMaxSweeps && status; ++sweep) {
    bool rotated = false;
    for (int step = 0; step < m - 1; ++step) {
      rotated = plan_step(a, k, m, step, floor, rot) || rotated;
      __syncthreads();
      apply_step(a, v, k, m, rot);
    }
    if (!__syncthreads_or(rotated)) status = 0;
  }
  eigh_store(a, v, k, kmax, wb, Vb, wu, rank);
  if (tid == 0) info[b] = status;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------------------
template <typename T>
cudaError_t batched_cholesky(T* mats, const int64_t* sizes, int32_t* info, int64_t n, int64_t kmax,
                             cudaStream_t stream) {
  if (kmax < 0 || kmax > kMaxOrder) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  const size_t bytes = sizeof(T) * kmax * kmax;
  const int threads = threads_for(kmax), k = static_cast<int>(kmax);
  if (bytes <= static_cast<size_t>(smem_optin_bytes())) {
    const cudaError_t err = allow_smem(cholesky_kernel<T, true>, bytes);
    if (err != cudaSuccess) return err;
    cholesky_kernel<T, true><<<n, threads, bytes, stream>>>(mats, sizes, info, k);
  } else {
    cholesky_kernel<T, false><<<n, threads, 0, stream>>>(mats, sizes, info, k);
  }
  return cudaGetLastError();
}

int64_t batched_cholesky_inverse_workspace(int64_t kmax, int64_t elem_bytes) {
  const size_t bytes = 2 * static_cast<size_t>(elem_bytes) * kmax * kmax;
  return bytes <= static_cast<size_t>(smem_optin_bytes()) ? 0 : kmax * kmax;
}

template <typename T>
cudaError_t batched_cholesky_inverse(T* mats, const int64_t* sizes, int32_t* info, T* work, int64_t n, int64_t kmax,
                                     cudaStream_t stream) {
  if (kmax < 0 || kmax > kMaxOrder) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  const int threads = threads_for(kmax), k = static_cast<int>(kmax);
  if (batched_cholesky_inverse_workspace(kmax, sizeof(T)) == 0) {
    const size_t bytes = 2 * sizeof(T) * kmax * kmax;
    const cudaError_t err = allow_smem(cholesky_inverse_kernel<T, true>, bytes);
    if (err != cudaSuccess) return err;
    cholesky_inverse_kernel<T, true><<<n, threads, bytes, stream>>>(mats, sizes, info, nullptr, k);
  } else {
    if (work == nullptr) return cudaErrorInvalidValue;
    cholesky_inverse_kernel<T, false><<<n, threads, 0, stream>>>(mats, sizes, info, work, k);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t batched_triangular_solve(const T* tri, T* rhs, const int64_t* sizes, int64_t n, int64_t kmax, int64_t m,
                                     bool upper, bool transpose, cudaStream_t stream) {
  if (kmax < 0 || kmax > kMaxOrder || m < 0) return cudaErrorInvalidValue;
  if (n == 0 || m == 0) return cudaSuccess;
  const int64_t chunks = (m + kSolveCols - 1) / kSolveCols;
  const size_t bytes = sizeof(T) * kmax * kmax;
  const int k = static_cast<int>(kmax);
  if (bytes <= static_cast<size_t>(smem_optin_bytes())) {
    const cudaError_t err = allow_smem(trsm_kernel<T, true>, bytes);
    if (err != cudaSuccess) return err;
    trsm_kernel<T, true><<<n * chunks, kSolveCols, bytes, stream>>>(tri, rhs, sizes, k, m, chunks, upper, transpose);
  } else {
    trsm_kernel<T, false><<<n * chunks, kSolveCols, 0, stream>>>(tri, rhs, sizes, k, m, chunks, upper, transpose);
  }
  return cudaGetLastError();
}

int64_t batched_eigh_workspace(int64_t kmax) {
  const size_t bytes = 2 * sizeof(double) * kmax * kmax;
  return bytes <= static_cast<size_t>(smem_optin_bytes()) ? 0 : 2 * kmax * kmax;
}

template <typename T>
cudaError_t batched_eigh(const T* mats, T* w, T* V, const int64_t* sizes, int32_t* info, double* work, int64_t n,
                         int64_t kmax, cudaStream_t stream) {
  if (kmax < 0 || kmax > kMaxOrder) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  const int threads = threads_for(kmax), k = static_cast<int>(kmax);
  if (batched_eigh_workspace(kmax) == 0) {
    const size_t bytes = 2 * sizeof(double) * kmax * kmax;
    const cudaError_t err = allow_smem(eigh_kernel<T, true>, bytes);
    if (err != cudaSuccess) return err;
    eigh_kernel<T, true><<<n, threads, bytes, stream>>>(mats, w, V, sizes, info, nullptr, k);
  } else {
    if (work == nullptr) return cudaErrorInvalidValue;
    eigh_kernel<T, false><<<n, threads, 0, stream>>>(mats, w, V, sizes, info, work, k);
  }
  return cudaGetLastError();
}

#define LORAKERN_INSTANTIATE(T)                                                                                  \
  template cudaError_t batched_cholesky<T>(T*, const int64_t*, int32_t*, int64_t, int64_t, cudaStream_t);       \
  template cudaError_t batched_cholesky_inverse<T>(T*, const int64_t*, int32_t*, T*, int64_t, int64_t,          \
                                                   cudaStream_t);                                                \
  template cudaError_t batched_triangular_solve<T>(const T*, T*, const int64_t*, int64_t, int64_t, int64_t, bool, \
                                                   bool, cudaStream_t);                                          \
  template cudaError_t batched_eigh<T>(const T*, T*, T*, const int64_t*, int32_t*, double*, int64_t, int64_t,     \
                                       cudaStream_t);
LORAKERN_INSTANTIATE(float)
LORAKERN_INSTANTIATE(double)
#undef LORAKERN_INSTANTIATE

}  // namespace cuda
}  // namespace lorakern
