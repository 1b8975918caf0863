// ndimage.cu — scipy.ndimage's map_coordinates and affine_transform (orders 0, 1 and 3), forward and backward.
// Preceded by deformcp_common.cuh. Layouts (all C-contiguous): input (B, S0, S1) or (B, S0, S1, S2), B images
// sampled at the same points, first spatial axis first; coordinates (ndim, P) in the accumulation type, row a
// holding every point's index along axis a; output (B, P);
// an affine transform as an (ndim, ndim + 1) matrix [M | shift] in the accumulation type, mapping the output
// index o to the input index M·o + shift (the output of O0 × O1 [× O2] points, in C order).
//
// SciPy's rules, per axis of length n (scipy/ndimage/src/ni_interpolation.c): a coordinate outside [0, n − 1]
// is first mapped into the input by the mode (map_coordinate: mirror, reflect, wrap and grid-wrap fold it with
// SciPy's own arithmetic); "constant" gives cval there, "nearest" and "grid-constant" leave it as it is. Order 0
// reads the tap floor(c + 0.5), order 1 the taps floor(c) and floor(c) + 1 with weights 1 − t and t, order 3 the
// taps floor(c) − 1 .. floor(c) + 2 with the cubic B-spline's weights; a tap outside [0, n − 1] is mapped by the
// mode (constant and wrap: mirror; grid-constant: it reads cval). A NaN or ±inf coordinate gives cval and
// gradient 0 (deformcp's rule; SciPy's result there depends on the mode).
//
// Order 3 with SciPy's prefilter reads the spline coefficients that ndimage_spline_filter computes in place along
// each axis of the input (the caller pads "nearest" and "grid-constant" input first, as SciPy does, and shifts
// the coordinates by the padding); the input gradient goes back through its transpose.

#define NDIMAGE_CONSTANT 0
#define NDIMAGE_NEAREST 1
#define NDIMAGE_REFLECT 2
#define NDIMAGE_MIRROR 3
#define NDIMAGE_WRAP 4
#define NDIMAGE_GRID_CONSTANT 5
#define NDIMAGE_GRID_WRAP 6

// x rounded towards zero (C's integer cast, without its overflow)
template <typename A>
__device__ __forceinline__ A ndimage_trunc(A x) { return x < (A)0 ? -floor(-x) : floor(x); }

// SciPy's map_coordinate for the folding modes: c outside [0, n − 1] folded back; *slope receives dc'/dc (±1).
template <typename A>
__device__ __forceinline__ A ndimage_fold(A c, A n, int mode, A* slope) {
  *slope = 1;
  if (!(c < (A)0 || c > n - (A)1)) return c;
  if (n <= (A)1) { *slope = 0; return (A)0; }
  if (c < (A)0) {
    if (mode == NDIMAGE_MIRROR) {
      const A s2 = 2 * n - 2;
      c = s2 * floor(-c / s2) + c;
      if (c <= (A)1 - n) return c + s2;
      *slope = -1;
      return -c;
    }
    if (mode == NDIMAGE_REFLECT) {
      const A s2 = 2 * n;
      if (c < -s2) c = s2 * floor(-c / s2) + c;
      if (c < -n) return c + s2;
      *slope = -1;
      return -c - (A)1;
    }
    if (mode == NDIMAGE_WRAP) {
      const A s = n - 1;
      return c + s * (floor(-c / s) + (A)1);
    }
    return c + n * (ndimage_trunc((-(A)1 - c) / n) + (A)1);  // grid-wrap
  }
  if (mode == NDIMAGE_MIRROR) {
    const A s2 = 2 * n - 2;
    c -= s2 * floor(c / s2);
    if (c >= n) { *slope = -1; return s2 - c; }
    return c;
  }
  if (mode == NDIMAGE_REFLECT) {
    const A s2 = 2 * n;
    c -= s2 * floor(c / s2);
    if (c >= n) { *slope = -1; return s2 - c - (A)1; }
    return c;
  }
  if (mode == NDIMAGE_WRAP) {
    const A s = n - 1;
    return c - s * floor(c / s);
  }
  return c - n * floor(c / n);  // grid-wrap
}

// Tap index i along an axis of length n mapped into [0, n − 1] by the mode, as SciPy maps it (constant and wrap:
// mirror); false where it reads cval (grid-constant).
template <typename I>
__device__ __forceinline__ bool ndimage_tap(I i, I n, int mode, I* index) {
  if (i >= 0 && i < n) { *index = i; return true; }
  if (mode == NDIMAGE_GRID_CONSTANT) { *index = 0; return false; }
  if (n <= 1) { *index = 0; return true; }
  if (mode == NDIMAGE_NEAREST) { *index = i < 0 ? 0 : n - 1; return true; }
  if (mode == NDIMAGE_GRID_WRAP) {
    i %= n;
    *index = i < 0 ? i + n : i;
    return true;
  }
  const bool half = mode == NDIMAGE_REFLECT;  // reflect: d c b a | a b c d; mirror: d c b | a b c d
  const I period = half ? 2 * n : 2 * n - 2;
  i %= period;
  if (i < 0) i += period;
  *index = i >= n ? period - i - (half ? 1 : 0) : i;
  return true;
}

// The taps of one axis: order + 1 indices (already times the axis' stride), weights and their derivatives with
// respect to the coordinate as given (the fold's slope included).
template <typename A, typename I>
struct ndimage_axis {
  I offset[4];
  bool inside[4];
  A weight[4], dweight[4];
};

// Sets up axis taps for coordinate c; false where the sample is cval (constant mode outside [0, n − 1], a
// non-finite coordinate, or grid-constant with every tap outside).
template <typename A, typename I>
__device__ __forceinline__ bool ndimage_axis_setup(A c, I n, I stride, int order, int mode, ndimage_axis<A, I>& ax) {
  if (!is_finite(c)) return false;
  const A len = (A)n;
  A slope = 1;
  if (mode == NDIMAGE_CONSTANT) {
    if (!(c >= (A)0 && c <= len - (A)1)) return false;
  } else if (mode == NDIMAGE_NEAREST || mode == NDIMAGE_GRID_CONSTANT) {
    const A reach = (A)(order / 2 + 2);  // beyond it every tap is outside: the edge value, or cval
    if (c < -reach || c > len - (A)1 + reach) {
      if (mode == NDIMAGE_GRID_CONSTANT) return false;
      c = c < (A)0 ? -reach : len - (A)1 + reach;
      slope = 0;
    }
  } else {
    c = ndimage_fold(c, len, mode, &slope);
    c = c < (A)-1 ? (A)-1 : (c > len ? len : c);  // rounding of coordinates past 2^53
  }
  const A base = order == 0 ? floor(c + (A)0.5) : floor(c);
  const A t = c - base;
  if (order == 0) {
    ax.weight[0] = 1;
    ax.dweight[0] = 0;
  } else if (order == 1) {
    ax.weight[0] = (A)1 - t;
    ax.weight[1] = t;
    ax.dweight[0] = -slope;
    ax.dweight[1] = slope;
  } else {  // the cubic B-spline, SciPy's arithmetic (the last weight 1 − the others)
    const A u = (A)1 - t;
    ax.weight[0] = u * u * u / (A)6;
    ax.weight[1] = (t * t * (t - (A)2) * (A)3 + (A)4) / (A)6;
    ax.weight[2] = (u * u * (u - (A)2) * (A)3 + (A)4) / (A)6;
    ax.weight[3] = (A)1 - ax.weight[0] - ax.weight[1] - ax.weight[2];
    ax.dweight[0] = -u * u / (A)2 * slope;
    ax.dweight[1] = t * ((A)1.5 * t - (A)2) * slope;
    ax.dweight[2] = -u * ((A)1.5 * u - (A)2) * slope;
    ax.dweight[3] = t * t / (A)2 * slope;
  }
  const I start = (I)base - (order == 3 ? 1 : 0);
  bool any = false;
  for (int k = 0; k <= order; ++k) {
    I index;
    ax.inside[k] = ndimage_tap(start + k, n, mode, &index);
    any = any || ax.inside[k];
    ax.offset[k] = index * stride;
  }
  return any;
}

// Every axis of point p set up; false where the sample is cval.
template <typename A, typename I>
__device__ __forceinline__ bool ndimage_point_setup(const A* coordinates, I p, I P, const I* sizes, int ndim,
                                                    int order, int mode, ndimage_axis<A, I>* axes) {
  I stride = 1;
  bool ok = true;
  for (int a = ndim - 1; a >= 0; --a) {
    ok = ndimage_axis_setup(coordinates[a * P + p], sizes[a], stride, order, mode, axes[a]) && ok;
    stride *= sizes[a];
  }
  return ok;
}

// Tap k's per-axis choice along axis a (axis 0's slowest): 0 for order 0, one bit of k for order 1, two for 3.
__device__ __forceinline__ int ndimage_digit(int k, int a, int ndim, int order) {
  const int bits = order == 3 ? 2 : 1;
  return order == 0 ? 0 : (k >> (bits * (ndim - 1 - a))) & ((1 << bits) - 1);
}

// The number of taps of a point: (order + 1)^ndim.
__device__ __forceinline__ int ndimage_taps(int ndim, int order) {
  return order == 0 ? 1 : 1 << ((order == 3 ? 2 : 1) * ndim);
}

// Tap k of a point (axis 0's choice slowest): its weight, the product of its axes' weights in axis order, and its
// flat offset; false where it reads cval (a grid-constant tap outside the input).
template <typename A, typename I>
__device__ __forceinline__ bool ndimage_combine(const ndimage_axis<A, I>* axes, int k, int ndim, int order, A* weight,
                                                I* offset) {
  *weight = 1;
  *offset = 0;
  bool inside = true;
  for (int a = 0; a < ndim; ++a) {
    const int j = ndimage_digit(k, a, ndim, order);
    *weight *= axes[a].weight[j];
    *offset += axes[a].offset[j];
    inside = inside && axes[a].inside[j];
  }
  return inside;
}

// out[b, p] = the sample of image b of input at coordinates[:, p]; one thread per point, its taps set up once for
// the B images.
template <typename T, typename I>
__global__ void ndimage_map_forward(const T* input, const typename acc_type<T>::type* coordinates, T* out, I P, I B,
                                    I S0, I S1, I S2, int ndim, int order, int mode, double cval) {
  typedef typename acc_type<T>::type A;
  const I sizes[3] = {S0, S1, S2};
  const I volume = S0 * S1 * S2;
  const int taps = ndimage_taps(ndim, order);
  DEFORMCP_GRID_STRIDE_LOOP(I, p, P) {
    ndimage_axis<A, I> axes[3];
    const bool ok = ndimage_point_setup(coordinates, p, P, sizes, ndim, order, mode, axes);
    for (I b = 0; b < B; ++b) {
      A value = (A)cval;
      if (ok) {
        const T* image = input + b * volume;
        value = 0;
        for (int k = 0; k < taps; ++k) {
          A weight;
          I offset;
          const bool inside = ndimage_combine(axes, k, ndim, order, &weight, &offset);
          value += weight * (inside ? load_acc(image[offset]) : (A)cval);
        }
      }
      out[b * P + p] = store_as<T>(value);
    }
  }
}

// The gradients of one point over the B images: each tap's weight times grad_output[b, p] added into image b of
// grad_input (atomically, or with plain adds where the calling thread alone writes grad_input), and its coordinate
// gradient (summed over the images in order) written to grad_coordinates. Either output may be null.
template <typename A, typename T, typename I>
__device__ __forceinline__ void ndimage_point_backward(const T* grad_output, const T* input, const A* coordinates,
                                                       I p, I P, I B, const I* sizes, int ndim, int order, int mode,
                                                       A cval, A* grad_input, A* grad_coordinates, bool atomic) {
  ndimage_axis<A, I> axes[3];
  const bool ok = ndimage_point_setup(coordinates, p, P, sizes, ndim, order, mode, axes);
  const I volume = sizes[0] * sizes[1] * sizes[2];
  const bool wants_coordinates = grad_coordinates != nullptr && order > 0;
  A gc[3] = {0, 0, 0};
  const int taps = ndimage_taps(ndim, order);
  for (int k = 0; ok && k < taps; ++k) {
    A weight;
    I offset;
    const bool inside = ndimage_combine(axes, k, ndim, order, &weight, &offset);
    A v = 0;  // Σ_b value · g over the images
    for (I b = 0; b < B; ++b) {
      const A g = load_acc(grad_output[b * P + p]);
      if (grad_input != nullptr && inside) {
        A* target = grad_input + b * volume + offset;
        if (atomic) atomic_add(target, weight * g);
        else *target += weight * g;
      }
      if (wants_coordinates) v += (inside ? load_acc(input[b * volume + offset]) : cval) * g;
    }
    if (wants_coordinates) {
      for (int a = 0; a < ndim; ++a) {
        A d = v;
        for (int c = 0; c < ndim; ++c) {
          const int j = ndimage_digit(k, c, ndim, order);
          d *= c == a ? axes[c].dweight[j] : axes[c].weight[j];
        }
        gc[a] += d;
      }
    }
  }
  if (grad_coordinates != nullptr)
    for (int a = 0; a < ndim; ++a) grad_coordinates[a * P + p] = gc[a];
}

// grad_input (B, S0, S1[, S2]) (float or double, zeroed, may be null) += Σ_p weights · grad_output[b, p] by
// atomics, and grad_coordinates (ndim, P) (may be null); one thread per point.
template <typename T, typename I>
__global__ void ndimage_map_backward(const T* grad_output, const T* input,
                                     const typename acc_type<T>::type* coordinates,
                                     typename acc_type<T>::type* grad_input,
                                     typename acc_type<T>::type* grad_coordinates, I P, I B, I S0, I S1, I S2,
                                     int ndim, int order, int mode, double cval) {
  typedef typename acc_type<T>::type A;
  const I sizes[3] = {S0, S1, S2};
  DEFORMCP_GRID_STRIDE_LOOP(I, p, P) {
    ndimage_point_backward(grad_output, input, coordinates, p, P, B, sizes, ndim, order, mode, (A)cval, grad_input,
                           grad_coordinates, true);
  }
}

// grad_input (zeroed) += Σ_p weights · grad_output[b, p], the points added in order by one thread: bitwise the
// same run to run. Launched over one work item.
template <typename T, typename I>
__global__ void ndimage_map_backward_input_deterministic(const T* grad_output, const T* input,
                                                         const typename acc_type<T>::type* coordinates,
                                                         typename acc_type<T>::type* grad_input, I P, I B, I S0,
                                                         I S1, I S2, int ndim, int order, int mode, double cval) {
  typedef typename acc_type<T>::type A;
  const I sizes[3] = {S0, S1, S2};
  DEFORMCP_GRID_STRIDE_LOOP(I, item, (I)1) {
    for (I p = 0; p < P; ++p)
      ndimage_point_backward(grad_output, input, coordinates, p, P, B, sizes, ndim, order, mode, (A)cval,
                             grad_input, (A*)nullptr, false);
  }
}

// coordinates[h, p] = Σ_l o_l · M[h, l] + shift[h] for the output index o of point p (C order over O0 × O1 [× O2]),
// summed in SciPy's order; transform (ndim, ndim + 1) = [M | shift]. One thread per point.
template <typename T, typename I>
__global__ void ndimage_affine_coordinates(const typename acc_type<T>::type* transform,
                                           typename acc_type<T>::type* coordinates, I P, I O0, I O1, I O2,
                                           int ndim) {
  typedef typename acc_type<T>::type A;
  const I sizes[3] = {O0, O1, O2};
  DEFORMCP_GRID_STRIDE_LOOP(I, p, P) {
    A o[3];
    I rest = p;
    for (int l = ndim - 1; l >= 0; --l) {
      o[l] = (A)(rest % sizes[l]);
      rest /= sizes[l];
    }
    for (int h = 0; h < ndim; ++h) {
      const A* row = transform + h * (ndim + 1);
      A c = 0;
      for (int l = 0; l < ndim; ++l) c += o[l] * row[l];
      coordinates[h * P + p] = c + row[ndim];
    }
  }
}

// partials[j] (ndim, ndim + 1) = Σ_p grad_coordinates[h, p] · (o_l(p), 1) over chunk j of `chunk` consecutive points,
// added in order in double (a deterministic reduction, in float64 whatever T; the caller sums the chunks). One
// thread per chunk.
template <typename T, typename I>
__global__ void ndimage_affine_partial_sums(const typename acc_type<T>::type* grad_coordinates, double* partials,
                                            I chunks, I chunk, I P, I O0, I O1, I O2, int ndim) {
  const I sizes[3] = {O0, O1, O2};
  DEFORMCP_GRID_STRIDE_LOOP(I, j, chunks) {
    double sums[12];
    for (int k = 0; k < 12; ++k) sums[k] = 0;
    const I end = (j + 1) * chunk < P ? (j + 1) * chunk : P;
    for (I p = j * chunk; p < end; ++p) {
      double o[3];
      I rest = p;
      for (int l = ndim - 1; l >= 0; --l) {
        o[l] = (double)(rest % sizes[l]);
        rest /= sizes[l];
      }
      for (int h = 0; h < ndim; ++h) {
        const double g = (double)grad_coordinates[h * P + p];
        for (int l = 0; l < ndim; ++l) sums[h * (ndim + 1) + l] += g * o[l];
        sums[h * (ndim + 1) + ndim] += g;
      }
    }
    for (int k = 0; k < ndim * (ndim + 1); ++k) partials[j * ndim * (ndim + 1) + k] = sums[k];
  }
}

// The cubic B-spline prefilter's boundary initialisations (SciPy's apply_filter per mode: whole-sample symmetric,
// periodic, half-sample symmetric with SciPy's causal sum, which reads its partly accumulated first coefficient at
// its last term); deformcp.reference.ndimage.FILTER_INIT gives each mode's.
#define NDIMAGE_INIT_MIRROR 0
#define NDIMAGE_INIT_WRAP 1
#define NDIMAGE_INIT_REFLECT 2
#define NDIMAGE_POLE -0.267949192431122706472553658494127633  // sqrt(3) − 2

// A line of n ≥ 2 starts its causal pass from c_0 = α·Σ_{j ≤ n−2} z^j c_j + β·Σ_{j ≥ 1} z^(n−1−j) c_j + γ·c_(n−1)
// + δ·c_0 and its anticausal pass from c_(n−1) = ρ·c_(n−1) + σ·c_(n−2) + τ·Σ_{j ≤ n−2} z^(j+1) c_j
// (deformcp.reference.ndimage.filter_constants).
template <typename A>
struct ndimage_filter {
  A alpha, beta, gamma, delta, rho, sigma, tau;
};

template <typename A, typename I>
__device__ __forceinline__ ndimage_filter<A> ndimage_filter_setup(I n, int init) {
  const A z = (A)NDIMAGE_POLE;
  A zn1 = 1;  // z^(n − 1)
  for (I i = 1; i < n; ++i) zn1 *= z;
  const A zn = zn1 * z;
  ndimage_filter<A> f;
  f.gamma = f.delta = f.sigma = f.tau = 0;
  if (init == NDIMAGE_INIT_MIRROR) {
    const A d = (A)1 - zn1 * zn1;
    f.alpha = (A)1 / d;
    f.beta = zn1 / d;
    f.rho = z / (z * z - (A)1);
    f.sigma = z * z / (z * z - (A)1);
  } else if (init == NDIMAGE_INIT_WRAP) {
    const A d = (A)1 - zn;
    f.alpha = 0;
    f.beta = z / d;
    f.delta = (A)1 / d;
    f.rho = f.tau = z / (zn - (A)1);
  } else {
    const A e = z / ((A)1 - zn * zn), g = (A)1 + zn * zn1;
    f.alpha = e * g;
    f.beta = e * g * zn;
    f.gamma = e * zn1;
    f.delta = 1;
    f.rho = z / (z - (A)1);
  }
  return f;
}

// The prefilter (transpose = 0) or its transpose (1) in place along one axis of c (C-contiguous, in the
// accumulation type): line l of `lines` holds n ≥ 2 elements `stride` apart from (l / stride)·n·stride + l % stride.
// The prefilter: gain, causal initialisation and pass, anticausal initialisation and pass; the transpose: the
// transposed steps in reverse order. One thread per line.
template <typename T, typename I>
__global__ void ndimage_spline_filter(typename acc_type<T>::type* c, I lines, I n, I stride, int init,
                                      int transpose) {
  typedef typename acc_type<T>::type A;
  const A z = (A)NDIMAGE_POLE;
  const A gain = ((A)1 - z) * ((A)1 - (A)1 / z);
  const ndimage_filter<A> f = ndimage_filter_setup<A>(n, init);
  DEFORMCP_GRID_STRIDE_LOOP(I, l, lines) {
    A* x = c + (l / stride) * n * stride + l % stride;
    A zj;
    if (!transpose) {
      for (I i = 0; i < n; ++i) x[i * stride] *= gain;
      A ascending = 0, descending = 0;
      zj = 1;
      for (I j = 0; j + 1 < n; ++j, zj *= z) ascending += zj * x[j * stride];
      zj = 1;
      for (I j = n - 1; j >= 1; --j, zj *= z) descending += zj * x[j * stride];
      x[0] = f.alpha * ascending + f.beta * descending + f.gamma * x[(n - 1) * stride] + f.delta * x[0];
      for (I i = 1; i < n; ++i) x[i * stride] += z * x[(i - 1) * stride];
      A sum = 0;
      zj = z;
      for (I j = 0; j + 1 < n; ++j, zj *= z) sum += zj * x[j * stride];
      x[(n - 1) * stride] = f.rho * x[(n - 1) * stride] + f.sigma * x[(n - 2) * stride] + f.tau * sum;
      for (I i = n - 2; i >= 0; --i) x[i * stride] = z * (x[(i + 1) * stride] - x[i * stride]);
      continue;
    }
    for (I i = 1; i < n; ++i) {  // the anticausal pass
      x[i * stride] += z * x[(i - 1) * stride];
      x[(i - 1) * stride] *= -z;
    }
    A t = x[(n - 1) * stride];  // its initialisation
    x[(n - 1) * stride] = f.rho * t;
    x[(n - 2) * stride] += f.sigma * t;
    zj = z;
    for (I j = 0; j + 1 < n; ++j, zj *= z) x[j * stride] += f.tau * zj * t;
    for (I i = n - 2; i >= 0; --i) x[i * stride] += z * x[(i + 1) * stride];  // the causal pass
    t = x[0];  // its initialisation
    x[0] = f.delta * t;
    zj = 1;
    for (I j = 0; j + 1 < n; ++j, zj *= z) x[j * stride] += f.alpha * zj * t;
    zj = 1;
    for (I j = n - 1; j >= 1; --j, zj *= z) x[j * stride] += f.beta * zj * t;
    x[(n - 1) * stride] += f.gamma * t;
    for (I i = 0; i < n; ++i) x[i * stride] *= gain;
  }
}
