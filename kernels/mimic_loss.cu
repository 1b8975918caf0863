// mimic_loss.cu — Deformable ConvNets v2's feature-mimicking loss (Zhu et al. 2019,
// https://arxiv.org/abs/1811.11168, section 3.3), forward and backward:
//   L = Σ_k [1 − cos(a_k, b_k)],  cos(a, b) = a·b / sqrt(|a|²·|b|²),
// over the rows k of two (K, D) feature matrices. Preceded by deformcp_common.cuh. Layouts (all
// C-contiguous): f_a, f_b, grad_a, grad_b (K, D); per-row losses (K,) in the accumulation type (the
// caller sums them); grad_output one element.
//
// Numerics, per row (one thread a row, D visited in order, everything in the accumulation type A):
//   * each feature is first scaled by a power of two s = 2^-e that brings its largest |entry| m into
//     [0.5, 1) (e from frexp, clamped so that s stays a normal number of A). Scaling by a power of two
//     is exact, so cos is bit-for-bit that of the unscaled formula wherever the unscaled formula neither
//     overflows nor underflows, and stays accurate for any finite magnitudes (float32 rows of 1e30 or
//     1e-30, float64 rows of 1e300) — then dot, |a|², |b|² and cos = dot / sqrt(|a|²·|b|²);
//   * zero-norm rule: when either feature of a row is all zeros (m == 0), cos is taken as 0 — the
//     row's loss is 1 and both its gradients are 0;
//   * non-finite input is never hidden: a NaN or ±inf entry in a row makes that row's loss and
//     gradients NaN, also when the other feature is all zeros (m is a max that keeps NaN, and
//     0·(m_a + m_b) is NaN exactly when m_a or m_b is NaN or inf);
//   * rounding may put a nearly parallel row's loss a few ulps below 0 (cos is not clamped, so the
//     gradient stays that of the formula); identical rows give exactly 0.
//   Gradients: ∂L/∂a = c·a/|a|² − b/(|a||b|) and symmetrically for b, computed on the scaled features
//   as s_a·(c·a'/|a'|² − b'/n') with n' = sqrt(|a'|²·|b'|²).

// Largest |e| in the scale 2^-e: keeps the scale a normal number (CUDA flushes float subnormals).
__device__ __forceinline__ int mimic_max_scale_exponent(float) { return 126; }
__device__ __forceinline__ int mimic_max_scale_exponent(double) { return 1022; }

__device__ __forceinline__ float mimic_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double mimic_sqrt(double x) { return sqrt(x); }

// max_i |x_i| over one row, NaN if any entry is NaN (0 for D = 0)
template <typename A, typename T, typename I>
__device__ __forceinline__ A mimic_row_max_abs(const T* x, I D) {
  A m = 0;
  for (I i = 0; i < D; ++i) {
    A v = load_acc(x[i]);
    v = v < (A)0 ? -v : v;
    if (v > m || v != v) m = v;
    if (m != m) break;  // NaN is final
  }
  return m;
}

// 2^-e with m = f·2^e, f in [0.5, 1), e clamped to ±mimic_max_scale_exponent(A)
template <typename A>
__device__ __forceinline__ A mimic_scale(A m) {
  int e = 0;
  frexp((double)m, &e);
  const int limit = mimic_max_scale_exponent((A)0);
  const int k = -e < -limit ? -limit : (-e > limit ? limit : -e);
  return (A)ldexp(1.0, k);
}

// Everything one row's loss and gradients need.
template <typename A>
struct mimic_row {
  bool zero;  // either feature is all zeros: cos is taken as 0
  A z;        // 0, or NaN where a feature has a NaN or ±inf entry (added to results of zero rows)
  A sa, sb;   // power-of-two scales of the two features
  A dot, aa, bb, n, c;  // on the scaled features: a'·b', |a'|², |b'|², sqrt(|a'|²·|b'|²), cos
};

template <typename A, typename T, typename I>
__device__ __forceinline__ mimic_row<A> mimic_row_stats(const T* a, const T* b, I D) {
  mimic_row<A> r;
  const A ma = mimic_row_max_abs<A>(a, D), mb = mimic_row_max_abs<A>(b, D);
  r.zero = ma == (A)0 || mb == (A)0;
  r.z = (ma + mb) * (A)0;
  r.sa = mimic_scale(ma);
  r.sb = mimic_scale(mb);
  r.dot = r.aa = r.bb = 0;
  if (!r.zero) {
    for (I i = 0; i < D; ++i) {
      const A x = load_acc(a[i]) * r.sa, y = load_acc(b[i]) * r.sb;
      r.dot += x * y;
      r.aa += x * x;
      r.bb += y * y;
    }
  }
  r.n = mimic_sqrt(r.aa * r.bb);
  r.c = r.zero ? (A)0 : r.dot / r.n;
  return r;
}

// losses[k] = 1 − cos(f_a[k], f_b[k]) in the accumulation type; one thread per row.
template <typename T, typename I>
__global__ void mimic_loss_rows(const T* f_a, const T* f_b, typename acc_type<T>::type* losses, I K, I D) {
  typedef typename acc_type<T>::type A;
  DEFORMCP_GRID_STRIDE_LOOP(I, k, K) {
    const mimic_row<A> r = mimic_row_stats<A>(f_a + k * D, f_b + k * D, D);
    losses[k] = r.zero ? (A)1 + r.z : (A)1 - r.c;
  }
}

// grad_a[k] = g · ∂(1 − cos)/∂a_k and grad_b[k] = g · ∂(1 − cos)/∂b_k, g = grad_output[0]; one thread per
// row writes both rows of gradients completely (no atomics, deterministic). Either output may be null.
template <typename T, typename I>
__global__ void mimic_loss_backward(const T* grad_output, const T* f_a, const T* f_b, T* grad_a, T* grad_b, I K,
                                    I D) {
  typedef typename acc_type<T>::type A;
  const A g = load_acc(grad_output[0]);
  DEFORMCP_GRID_STRIDE_LOOP(I, k, K) {
    const T* a = f_a + k * D;
    const T* b = f_b + k * D;
    const mimic_row<A> r = mimic_row_stats<A>(a, b, D);
    if (r.zero) {
      const T zero_grad = store_as<T>(g * r.z);
      for (I i = 0; i < D; ++i) {
        if (grad_a != nullptr) grad_a[k * D + i] = zero_grad;
        if (grad_b != nullptr) grad_b[k * D + i] = zero_grad;
      }
      continue;
    }
    const A pa = r.c / r.aa, pb = r.c / r.bb, q = (A)1 / r.n;
    for (I i = 0; i < D; ++i) {
      const A x = load_acc(a[i]) * r.sa, y = load_acc(b[i]) * r.sb;
      if (grad_a != nullptr) grad_a[k * D + i] = store_as<T>(g * (pa * x - q * y) * r.sa);
      if (grad_b != nullptr) grad_b[k * D + i] = store_as<T>(g * (pb * y - q * x) * r.sb);
    }
  }
}
