// Batched small dense linear algebra on the CPU (k <= 256), registered as torch.ops.lorakern.* for the CPU
// dispatch key; csrc/cuda/small_linalg_glue.cpp registers the same schemas for CUDA.
//
// Layout (the "padded heterogeneous batch"): mats is (n, kmax, kmax), contiguous, float32 or float64, row-major;
// matrix i is its leading k_i x k_i block, k_i = sizes[i] (sizes: int64 (n,), 0 <= k_i <= kmax, on mats' device;
// None: every k_i = kmax). Nothing outside a matrix's k_i x k_i block is read or written, except where an op
// says so (eigh zero-fills the padding of its outputs).
//
//   batched_cholesky_(mats!, sizes?, info!)       lower Cholesky factor in place of each matrix (reads the lower
//       triangle, zeroes the strict upper one); info int32 (n,): 0, or j+1 when the j-th pivot is not positive
//       (the matrix is not numerically positive definite; then rows >= j are left partly factored), as
//       torch.linalg.cholesky_ex. Never raises on a failed matrix.
//   batched_cholesky_inverse_(mats!, sizes?, info!)   the inverse of each SPD matrix (lower triangle read, both
//       triangles written) from its Cholesky factor, in place: L^-T L^-1 (LAPACK potrf + potri, the optimizers'
//       damped r x r inverses in one pass per matrix); info as batched_cholesky_ (the matrix is unspecified
//       where it is not 0).
//   batched_triangular_solve_(tri, rhs!, sizes?, upper, transpose)   rhs (n, kmax, m) <- op(T)^-1 rhs, T the
//       lower (upper=False) or upper triangle of tri[i], op(T) = T^T when transpose: forward substitution when
//       op(T) is lower, back substitution when upper. Rows >= k_i of rhs[i] are untouched. No check of the
//       diagonal (a zero pivot gives Inf/NaN, as LAPACK's trsm).
//   batched_eigh_(mats, sizes?, w!, V!, info!)   symmetric eigendecomposition by cyclic two-sided Jacobi in
//       float64 (reads the lower triangle of mats): w (n, kmax) ascending, V (n, kmax, kmax) with the
//       eigenvectors as columns, both zero outside the k_i block; info 0 when converged, 1 when not within
//       MAX_SWEEPS sweeps, 2 when the input is not finite (w and V are NaN then).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

namespace lorakern {

namespace {

constexpr int64_t KMAX_LIMIT = 256;
constexpr int MAX_SWEEPS = 40;

// ---------------------------------------------------------------------------------------------------------
// The per-matrix kernels (raw pointers, row-major with leading dimension ld). Their inner loops are contiguous
// axpys (no reductions), so the compiler vectorizes them; the batch loops below are compiled for AVX-512, AVX2
// + FMA and baseline x86-64 and picked at load time (GCC target_clones), as LAPACK's kernels are.
// ---------------------------------------------------------------------------------------------------------
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define LK_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LK_CLONES
#endif
#define LK_INLINE inline __attribute__((always_inline))

// x[0:m] -= c0 y0 + c1 y1 + c2 y2 + c3 y3: four rows per pass over x (a quarter of the loads and stores of x)
template <typename T>
LK_INLINE void axpy4(T* __restrict__ x, const T* __restrict__ y0, const T* __restrict__ y1, const T* __restrict__ y2,
                     const T* __restrict__ y3, T c0, T c1, T c2, T c3, int64_t m) {
  for (int64_t l = 0; l < m; ++l) x[l] -= (c0 * y0[l] + c1 * y1[l]) + (c2 * y2[l] + c3 * y3[l]);
}

template <typename T>
LK_INLINE void axpy1(T* __restrict__ x, const T* __restrict__ y, T c, int64_t m) {
  for (int64_t l = 0; l < m; ++l) x[l] -= c * y[l];
}

// Right-looking Cholesky of a's lower triangle (ld) into u = the upper triangle U = L^T (compact, leading
// dimension k), four pivots at a time: the panel's rows are factored, then each trailing row i gets one
// contiguous rank-4 update u[i][i:] -= sum_t u[j+t][i] u[j+t][i:]. Returns 0 or the failing pivot + 1 (the
// pivots before it are done: *factored).
template <typename T>
LK_INLINE int32_t cholesky_factor(const T* a, int64_t k, int64_t ld, T* u, int64_t* factored = nullptr) {
  for (int64_t i = 0; i < k; ++i) {
    for (int64_t j = i; j < k; ++j) u[i * k + j] = a[j * ld + i];
  }
  int32_t info = 0;
  int64_t done = k;
  for (int64_t j0 = 0; j0 < k && info == 0; j0 += 4) {
    const int64_t j1 = std::min(j0 + 4, k);
    for (int64_t j = j0; j < j1; ++j) {  // the panel
      T* uj = u + j * k;
      const T d = uj[j];
      if (!(d > T(0))) {  // also NaN
        info = static_cast<int32_t>(j + 1);
        done = j;
        break;
      }
      const T r = std::sqrt(d);
      uj[j] = r;
      for (int64_t l = j + 1; l < k; ++l) uj[l] /= r;
      for (int64_t i = j + 1; i < j1; ++i) axpy1(u + i * k + i, uj + i, uj[i], k - i);
    }
    if (info != 0) break;
    const T *u0 = u + j0 * k, *u1 = u0 + k, *u2 = u1 + k, *u3 = u2 + k;
    for (int64_t i = j1; i < k; ++i) {  // the trailing rows
      if (j1 - j0 == 4) {
        axpy4(u + i * k + i, u0 + i, u1 + i, u2 + i, u3 + i, u0[i], u1[i], u2[i], u3[i], k - i);
      } else {
        for (int64_t j = j0; j < j1; ++j) axpy1(u + i * k + i, u + j * k + i, u[j * k + i], k - i);
      }
    }
  }
  if (factored != nullptr) *factored = done;
  return info;
}

// The lower Cholesky factor in place of a's lower triangle (strict upper triangle zeroed); workspace u (k^2).
template <typename T>
LK_INLINE int32_t cholesky_one(T* a, int64_t k, int64_t ld, T* u) {
  int64_t done = k;
  const int32_t info = cholesky_factor(a, k, ld, u, &done);
  for (int64_t i = 0; i < k; ++i) {
    T* ai = a + i * ld;
    for (int64_t j = 0; j <= i && j < done; ++j) ai[j] = u[j * k + i];
    if (i < done) std::fill(ai + i + 1, ai + k, T(0));
  }
  return info;
}

// x (k rows of length m, leading dimension ldx) <- op(T)^-1 x; forward substitution when op(T) is lower.
template <typename T>
LK_INLINE void trsm_one(const T* t, int64_t ld, T* x, int64_t ldx, int64_t k, int64_t m, bool upper,
                        bool transpose) {
  const int64_t si = transpose ? 1 : ld, sj = transpose ? ld : 1;  // op(T)(i, j) = t[i si + j sj]
  const bool lower = upper == transpose;
  for (int64_t s = 0; s < k; ++s) {
    const int64_t i = lower ? s : k - 1 - s;
    T* xi = x + i * ldx;
    const T* ti = t + i * si;
    int64_t j = lower ? 0 : i + 1;
    const int64_t j1 = lower ? i : k;
    for (; j + 4 <= j1; j += 4) {
      axpy4(xi, x + j * ldx, x + (j + 1) * ldx, x + (j + 2) * ldx, x + (j + 3) * ldx, ti[j * sj], ti[(j + 1) * sj],
            ti[(j + 2) * sj], ti[(j + 3) * sj], m);
    }
    for (; j < j1; ++j) axpy1(xi, x + j * ldx, ti[j * sj], m);
    const T d = ti[i * sj];
    for (int64_t l = 0; l < m; ++l) xi[l] /= d;
  }
}

// The inverse of the SPD matrix in a (ld; lower triangle read, both triangles written) from its Cholesky factor:
// U = L^T (ws[0:k^2]), Y = L^-1 by forward substitution on the identity (ws[k^2:2k^2], only the lower
// triangle touched), then A^-1 = Y^T Y
// accumulated row by row of Y (contiguous axpys). Returns the Cholesky info; a is unspecified when it fails.
template <typename T>
LK_INLINE int32_t cholesky_inverse_one(T* a, int64_t k, int64_t ld, T* ws) {
  T* u = ws;
  T* y = ws + k * k;
  const int32_t info = cholesky_factor(a, k, ld, u);
  if (info != 0) return info;
  std::fill(y, y + k * k, T(0));
  for (int64_t i = 0; i < k; ++i) {  // row i of L Y = I, L[i][j] = u[j][i]; row j of Y is zero beyond column j
    T* yi = y + i * k;
    yi[i] = T(1);
    for (int64_t j = 0; j < i; ++j) axpy1(yi, y + j * k, u[j * k + i], j + 1);
    const T d = u[i * k + i];
    for (int64_t l = 0; l <= i; ++l) yi[l] /= d;
  }
  for (int64_t i = 0; i < k; ++i) std::fill(a + i * ld, a + i * ld + k, T(0));
  for (int64_t l = 0; l < k; ++l) {  // A^-1 += Y[l]^T Y[l] (Y lower: row l is zero beyond l)
    const T* yl = y + l * k;
    for (int64_t i = 0; i <= l; ++i) axpy1(a + i * ld, yl, -yl[i], l + 1);
  }
  return 0;
}

// Jacobi works in float64 whatever the input dtype: every entry of A and V takes ~2k rounded updates per sweep
// (k-1 rotations touch each row and column), which in float32 left eigenvectors orthogonal to only ~1e-4 at
// k = 64 (LAPACK's syevd: ~1e-5); in float64 the float32 results are correctly rounded to ~1e-7.
// a: k x k, compact (leading dimension k), full symmetric; vt: k x k, row p = the p-th eigenvector.

LK_INLINE void rotate_rows(double* __restrict__ x, double* __restrict__ y, double c, double s, int64_t k) {
  for (int64_t j = 0; j < k; ++j) {
    const double u = x[j], v = y[j];
    x[j] = c * u - s * v;
    y[j] = s * u + c * v;
  }
}

// One rotation: zeroes a[p][q]; rows p, q of A (and by symmetry columns p, q) and rows p, q of vt.
LK_INLINE void rotate(double* a, double* vt, int64_t k, int64_t p, int64_t q, double apq) {
  const double app = a[p * k + p], aqq = a[q * k + q];
  const double tau = (aqq - app) / (2 * apq);
  const double t = (tau >= 0 ? 1.0 : -1.0) / (std::abs(tau) + std::sqrt(1.0 + tau * tau));
  const double c = 1.0 / std::sqrt(1.0 + t * t), s = t * c;
  double* rp = a + p * k;
  double* rq = a + q * k;
  rotate_rows(rp, rq, c, s, k);  // rows p, q of J^T A (= of J^T A J outside columns p, q)
  for (int64_t j = 0; j < k; ++j) {  // columns p, q by symmetry
    a[j * k + p] = rp[j];
    a[j * k + q] = rq[j];
  }
  rp[p] = app - t * apq;
  rq[q] = aqq + t * apq;
  rp[q] = rq[p] = 0.0;
  rotate_rows(vt + p * k, vt + q * k, c, s, k);
}

// One cyclic sweep; returns the number of rotations applied. A pair is skipped when |a_pq| is at or below
// eps sqrt(|a_pp a_qq|) (relative accuracy, Demmel-Veselic) or below eps^2 ||A||_F (absolute floor: a zero
// diagonal would otherwise keep rotating subnormal entries).
LK_INLINE int64_t sweep(double* a, double* vt, int64_t k, double floor) {
  constexpr double eps = std::numeric_limits<double>::epsilon();
  int64_t rotations = 0;
  for (int64_t p = 0; p < k; ++p) {
    for (int64_t q = p + 1; q < k; ++q) {
      const double apq = a[p * k + q];
      const double aa = std::abs(apq);
      if (aa <= floor || aa <= eps * std::sqrt(std::abs(a[p * k + p] * a[q * k + q]))) continue;
      rotate(a, vt, k, p, q, apq);
      ++rotations;
    }
  }
  return rotations;
}

// Sweeps until one applies no rotation (0), or MAX_SWEEPS (1).
LK_CLONES int32_t jacobi_sweeps(double* a, double* vt, int64_t k, double floor) {
  for (int s = 0; s < MAX_SWEEPS; ++s) {
    if (sweep(a, vt, k, floor) == 0) return 0;
  }
  return 1;
}

// Writes w (k) ascending and V (k x k, leading dimension ld) from the diagonal of a and the rows of vt.
template <typename T>
void sorted_output(const double* a, const double* vt, T* w, T* v, int64_t k, int64_t ld) {
  std::vector<int64_t> order(k);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return a[x * k + x] < a[y * k + y]; });
  for (int64_t c = 0; c < k; ++c) {
    const int64_t src = order[c];
    w[c] = static_cast<T>(a[src * k + src]);
    for (int64_t j = 0; j < k; ++j) v[j * ld + c] = static_cast<T>(vt[src * k + j]);
  }
}

// The eigendecomposition of the lower triangle of m (k x k, leading dimension ld) into w and v (ld); ws is
// the caller's workspace (resized to 2 k^2 doubles).
template <typename T>
int32_t jacobi_one(const T* m, T* w, T* v, int64_t k, int64_t ld, std::vector<double>& ws) {
  ws.assign(2 * k * k, 0.0);
  double* a = ws.data();
  double* vt = a + k * k;
  double fro2 = 0;
  bool finite = true;
  for (int64_t i = 0; i < k; ++i) {
    vt[i * k + i] = 1.0;
    for (int64_t j = 0; j <= i; ++j) {
      const double x = static_cast<double>(m[i * ld + j]);
      a[i * k + j] = a[j * k + i] = x;
      finite = finite && std::isfinite(x);
      fro2 += (i == j ? 1.0 : 2.0) * x * x;
    }
  }
  if (!finite) {
    const T nan = std::numeric_limits<T>::quiet_NaN();
    for (int64_t i = 0; i < k; ++i) std::fill(v + i * ld, v + i * ld + k, nan);
    std::fill(w, w + k, nan);
    return 2;
  }
  constexpr double eps = std::numeric_limits<double>::epsilon();
  const double floor = std::max(eps * eps * std::sqrt(fro2), std::numeric_limits<double>::min());
  const int32_t info = jacobi_sweeps(a, vt, k, floor);
  sorted_output(a, vt, w, v, k, ld);
  return info;
}

// The batch loops, compiled per ISA (LK_CLONES); ws: k^2 elements of workspace.
template <typename T>
LK_INLINE void cholesky_range(T* base, const int64_t* k, int32_t* info, int64_t kmax, int64_t b, int64_t e, T* ws) {
  for (int64_t i = b; i < e; ++i) info[i] = cholesky_one(base + i * kmax * kmax, k[i], kmax, ws);
}
LK_CLONES void cholesky_batch(float* base, const int64_t* k, int32_t* info, int64_t kmax, int64_t b, int64_t e,
                              float* ws) {
  cholesky_range(base, k, info, kmax, b, e, ws);
}
LK_CLONES void cholesky_batch(double* base, const int64_t* k, int32_t* info, int64_t kmax, int64_t b, int64_t e,
                              double* ws) {
  cholesky_range(base, k, info, kmax, b, e, ws);
}

template <typename T>
LK_INLINE void cholesky_inverse_range(T* base, const int64_t* k, int32_t* info, int64_t kmax, int64_t b, int64_t e,
                                      T* ws) {
  for (int64_t i = b; i < e; ++i) info[i] = cholesky_inverse_one(base + i * kmax * kmax, k[i], kmax, ws);
}
LK_CLONES void cholesky_inverse_batch(float* base, const int64_t* k, int32_t* info, int64_t kmax, int64_t b,
                                      int64_t e, float* ws) {
  cholesky_inverse_range(base, k, info, kmax, b, e, ws);
}
LK_CLONES void cholesky_inverse_batch(double* base, const int64_t* k, int32_t* info, int64_t kmax, int64_t b,
                                      int64_t e, double* ws) {
  cholesky_inverse_range(base, k, info, kmax, b, e, ws);
}

// tasks = (matrix, block of `cols` right-hand-side columns)
template <typename T>
LK_INLINE void trsm_range(const T* t, T* x, const int64_t* k, int64_t kmax, int64_t m, int64_t cols, bool upper,
                          bool transpose, int64_t b, int64_t e) {
  const int64_t chunks = (m + cols - 1) / cols;
  for (int64_t task = b; task < e; ++task) {
    const int64_t i = task / chunks, c0 = (task % chunks) * cols;
    trsm_one(t + i * kmax * kmax, kmax, x + i * kmax * m + c0, m, k[i], std::min(cols, m - c0), upper, transpose);
  }
}
LK_CLONES void trsm_batch(const float* t, float* x, const int64_t* k, int64_t kmax, int64_t m, int64_t cols,
                          bool upper, bool transpose, int64_t b, int64_t e) {
  trsm_range(t, x, k, kmax, m, cols, upper, transpose, b, e);
}
LK_CLONES void trsm_batch(const double* t, double* x, const int64_t* k, int64_t kmax, int64_t m, int64_t cols,
                          bool upper, bool transpose, int64_t b, int64_t e) {
  trsm_range(t, x, k, kmax, m, cols, upper, transpose, b, e);
}

// The k_i of every matrix, read on the host (the argument checks ran first).
std::vector<int64_t> batch_sizes(const c10::optional<at::Tensor>& sizes, const at::Tensor& mats, const char* op) {
  const int64_t n = mats.size(0), kmax = mats.size(1);
  if (!sizes.has_value() || !sizes->defined()) return std::vector<int64_t>(n, kmax);
  const int64_t* s = sizes->data_ptr<int64_t>();
  std::vector<int64_t> out(s, s + n);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(out[i] >= 0 && out[i] <= kmax, "lorakern::", op, ": sizes[", i, "] = ", out[i],
                      " is outside [0, kmax = ", kmax, "]");
  }
  return out;
}

// Grain of the parallel loop over matrices: about 32k flops of work per task.
int64_t grain(int64_t kmax) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, kmax * kmax * kmax));
}

void check_batch(const at::Tensor& mats, const char* op, const char* name) {
  TORCH_CHECK_VALUE(mats.dim() == 3 && mats.size(1) == mats.size(2), "lorakern::", op, ": ", name,
                    " must have shape (n, kmax, kmax), got ", mats.sizes());
  TORCH_CHECK_VALUE(mats.size(1) <= KMAX_LIMIT, "lorakern::", op, ": kmax = ", mats.size(1), " exceeds ", KMAX_LIMIT);
  TORCH_CHECK_TYPE(mats.scalar_type() == at::kFloat || mats.scalar_type() == at::kDouble, "lorakern::", op, ": ",
                   name, " must be float32 or float64, got ", mats.scalar_type());
  TORCH_CHECK_VALUE(mats.is_contiguous(), "lorakern::", op, ": ", name, " must be contiguous (strides ",
                    mats.strides(), ")");
}

void check_vector(const at::Tensor& t, const at::Tensor& mats, at::ScalarType dtype, const char* op,
                  const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == mats.size(0) && t.is_contiguous(), "lorakern::", op, ": ", name,
                    " must be a contiguous (n,) = (", mats.size(0), ",) tensor, got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, "lorakern::", op, ": ", name, " must be ", dtype, ", got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == mats.device(), "lorakern::", op, ": ", name, " is on ", t.device(), ", mats on ",
                    mats.device());
}

void check_sizes(const c10::optional<at::Tensor>& sizes, const at::Tensor& mats, const char* op) {
  if (sizes.has_value() && sizes->defined()) check_vector(*sizes, mats, at::kLong, op, "sizes");
}

}  // namespace

// Argument checks shared with the CUDA glue (csrc/cuda/small_linalg_glue.cpp declares them): shapes, dtypes,
// contiguity and devices; not the values of sizes (reading them on a GPU would synchronize; the kernels clamp).
namespace small_linalg {

void check_cholesky(const at::Tensor& mats, const c10::optional<at::Tensor>& sizes, const at::Tensor& info,
                    const char* op) {
  check_batch(mats, op, "mats");
  check_vector(info, mats, at::kInt, op, "info");
  check_sizes(sizes, mats, op);
}

void check_triangular_solve(const at::Tensor& tri, const at::Tensor& rhs, const c10::optional<at::Tensor>& sizes) {
  const char* op = "batched_triangular_solve_";
  check_batch(tri, op, "tri");
  TORCH_CHECK_VALUE(rhs.dim() == 3 && rhs.size(0) == tri.size(0) && rhs.size(1) == tri.size(1), "lorakern::", op,
                    ": rhs must have shape (n, kmax, m) = (", tri.size(0), ", ", tri.size(1), ", m), got ",
                    rhs.sizes());
  TORCH_CHECK_TYPE(rhs.scalar_type() == tri.scalar_type(), "lorakern::", op, ": rhs dtype ", rhs.scalar_type(),
                   " differs from tri dtype ", tri.scalar_type());
  TORCH_CHECK_VALUE(rhs.is_contiguous() && rhs.device() == tri.device(), "lorakern::", op,
                    ": rhs must be contiguous and on tri's device");
  check_sizes(sizes, tri, op);
}

void check_eigh(const at::Tensor& mats, const c10::optional<at::Tensor>& sizes, const at::Tensor& w,
                const at::Tensor& V, const at::Tensor& info) {
  const char* op = "batched_eigh_";
  check_batch(mats, op, "mats");
  TORCH_CHECK_VALUE(V.sizes() == mats.sizes() && V.scalar_type() == mats.scalar_type() && V.is_contiguous() &&
                        V.device() == mats.device(),
                    "lorakern::", op, ": V must be a contiguous tensor like mats (", mats.sizes(), ", ",
                    mats.scalar_type(), "), got ", V.sizes(), ", ", V.scalar_type());
  TORCH_CHECK_VALUE(w.dim() == 2 && w.size(0) == mats.size(0) && w.size(1) == mats.size(1) && w.is_contiguous() &&
                        w.scalar_type() == mats.scalar_type() && w.device() == mats.device(),
                    "lorakern::", op, ": w must be a contiguous (n, kmax) tensor of mats' dtype, got ", w.sizes(), ", ",
                    w.scalar_type());
  check_vector(info, mats, at::kInt, op, "info");
  check_sizes(sizes, mats, op);
}

}  // namespace small_linalg

void batched_cholesky_cpu(at::Tensor& mats, const c10::optional<at::Tensor>& sizes, at::Tensor& info) {
  small_linalg::check_cholesky(mats, sizes, info, "batched_cholesky_");
  const auto k = batch_sizes(sizes, mats, "batched_cholesky_");
  const int64_t kmax = mats.size(1);
  int32_t* inf = info.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES(mats.scalar_type(), "batched_cholesky_", [&] {
    scalar_t* base = mats.data_ptr<scalar_t>();
    at::parallel_for(0, mats.size(0), grain(kmax), [&](int64_t b, int64_t e) {
      std::vector<scalar_t> ws(kmax * kmax);
      cholesky_batch(base, k.data(), inf, kmax, b, e, ws.data());
    });
  });
}

void batched_cholesky_inverse_cpu(at::Tensor& mats, const c10::optional<at::Tensor>& sizes, at::Tensor& info) {
  small_linalg::check_cholesky(mats, sizes, info, "batched_cholesky_inverse_");
  const auto k = batch_sizes(sizes, mats, "batched_cholesky_inverse_");
  const int64_t kmax = mats.size(1);
  int32_t* inf = info.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES(mats.scalar_type(), "batched_cholesky_inverse_", [&] {
    scalar_t* base = mats.data_ptr<scalar_t>();
    at::parallel_for(0, mats.size(0), std::max<int64_t>(1, grain(kmax) / 2), [&](int64_t b, int64_t e) {
      std::vector<scalar_t> ws(2 * kmax * kmax);
      cholesky_inverse_batch(base, k.data(), inf, kmax, b, e, ws.data());
    });
  });
}

void batched_triangular_solve_cpu(const at::Tensor& tri, at::Tensor& rhs, const c10::optional<at::Tensor>& sizes,
                                  bool upper, bool transpose) {
  const char* op = "batched_triangular_solve_";
  small_linalg::check_triangular_solve(tri, rhs, sizes);
  const auto k = batch_sizes(sizes, tri, op);
  const int64_t n = tri.size(0), kmax = tri.size(1), m = rhs.size(2);
  if (n == 0 || m == 0) return;
  // tasks: (matrix, block of right-hand-side columns): a kmax x cols block of 64 KB at most stays in cache through
  // the solve (at k = 64 as fast as 32 KB in fp32, faster in fp64); cols a multiple of 16 in [16, 256]
  const int64_t bytes = kmax * static_cast<int64_t>(c10::elementSize(tri.scalar_type()));
  const int64_t cols = std::min<int64_t>(256, std::max<int64_t>(16, (65536 / std::max<int64_t>(1, bytes)) / 16 * 16));
  const int64_t chunks = (m + cols - 1) / cols;
  AT_DISPATCH_FLOATING_TYPES(tri.scalar_type(), "batched_triangular_solve_", [&] {
    const scalar_t* t = tri.data_ptr<scalar_t>();
    scalar_t* x = rhs.data_ptr<scalar_t>();
    const int64_t g = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, kmax * kmax * std::min(m, cols)));
    at::parallel_for(0, n * chunks, g, [&](int64_t b, int64_t e) {
      trsm_batch(t, x, k.data(), kmax, m, cols, upper, transpose, b, e);
    });
  });
}

void batched_eigh_cpu(const at::Tensor& mats, const c10::optional<at::Tensor>& sizes, at::Tensor& w, at::Tensor& V,
                      at::Tensor& info) {
  const char* op = "batched_eigh_";
  small_linalg::check_eigh(mats, sizes, w, V, info);
  const auto k = batch_sizes(sizes, mats, op);
  const int64_t kmax = mats.size(1);
  w.zero_();
  V.zero_();
  int32_t* inf = info.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES(mats.scalar_type(), "batched_eigh_", [&] {
    const scalar_t* a = mats.data_ptr<scalar_t>();
    scalar_t* pw = w.data_ptr<scalar_t>();
    scalar_t* pv = V.data_ptr<scalar_t>();
    at::parallel_for(0, mats.size(0), std::max<int64_t>(1, grain(kmax) / 16), [&](int64_t b, int64_t e) {
      std::vector<double> ws;
      for (int64_t i = b; i < e; ++i) {
        const int64_t off = i * kmax * kmax;
        inf[i] = jacobi_one(a + off, pw + i * kmax, pv + off, k[i], kmax, ws);
      }
    });
  });
}

TORCH_LIBRARY_FRAGMENT(lorakern, m) {
  m.def("batched_cholesky_(Tensor(a!) mats, Tensor? sizes, Tensor(b!) info) -> ()");
  m.def("batched_cholesky_inverse_(Tensor(a!) mats, Tensor? sizes, Tensor(b!) info) -> ()");
  m.def("batched_triangular_solve_(Tensor tri, Tensor(a!) rhs, Tensor? sizes, bool upper, bool transpose) -> ()");
  m.def("batched_eigh_(Tensor mats, Tensor? sizes, Tensor(a!) w, Tensor(b!) V, Tensor(c!) info) -> ()");
}

TORCH_LIBRARY_IMPL(lorakern, CPU, m) {
  m.impl("batched_cholesky_", &batched_cholesky_cpu);
  m.impl("batched_cholesky_inverse_", &batched_cholesky_inverse_cpu);
  m.impl("batched_triangular_solve_", &batched_triangular_solve_cpu);
  m.impl("batched_eigh_", &batched_eigh_cpu);
}

}  // namespace lorakern
