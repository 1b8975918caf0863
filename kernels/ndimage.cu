// ndimage.cu — scipy.ndimage's map_coordinates and affine_transform (orders 0 and 1), forward and backward.
// Preceded by deformcp_common.cuh. Layouts (all C-contiguous): input (S0, S1) or (S0, S1, S2), first axis first;
// coordinates (ndim, P) in the accumulation type, row a holding every point's index along axis a; output (P,);
// an affine transform as an (ndim, ndim + 1) matrix [M | shift] in the accumulation type, mapping the output
// index o to the input index M·o + shift (the output of O0 × O1 [× O2] points, in C order).
//
// SciPy's rules, per axis of length n (scipy/ndimage/src/ni_interpolation.c): a coordinate outside [0, n − 1]
// is first mapped into the input by the mode (map_coordinate: mirror, reflect, wrap and grid-wrap fold it with
// SciPy's own arithmetic); "constant" gives cval there, "nearest" and "grid-constant" leave it as it is. Order 0
// reads the tap floor(c + 0.5), order 1 the taps floor(c) and floor(c) + 1 with weights 1 − t and t; a tap
// outside [0, n − 1] is mapped by the mode (grid-constant: it reads cval). A NaN or ±inf coordinate gives
// cval and gradient 0 (deformcp's rule; SciPy's result there depends on the mode).

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

// Tap index i along an axis of length n mapped into [0, n − 1] by the mode; false where it reads cval
// (grid-constant). Folded coordinates put taps at most one step outside, so one reflection suffices.
template <typename I>
__device__ __forceinline__ bool ndimage_tap(I i, I n, int mode, I* index) {
  if (i >= 0 && i < n) { *index = i; return true; }
  if (mode == NDIMAGE_GRID_CONSTANT) { *index = 0; return false; }
  if (n <= 1) { *index = 0; return true; }
  if (mode == NDIMAGE_NEAREST) i = i < 0 ? 0 : n - 1;
  else if (mode == NDIMAGE_REFLECT) i = i < 0 ? -i - 1 : 2 * n - i - 1;
  else if (mode == NDIMAGE_GRID_WRAP) i = i < 0 ? i + n : i - n;
  else i = i < 0 ? -i : 2 * n - 2 - i;  // mirror; also constant and wrap, whose taps outside have weight 0
  *index = i < 0 ? 0 : (i >= n ? n - 1 : i);  // only coordinates past 2^53 need this clamp
  return true;
}

// The taps of one axis: order + 1 indices (already times the axis' stride), weights and their derivatives with
// respect to the coordinate as given (the fold's slope included).
template <typename A, typename I>
struct ndimage_axis {
  I offset[2];
  bool inside[2];
  A weight[2], dweight[2];
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
    if (c < (A)-2 || c > len + (A)1) {  // every tap outside: the edge value, or cval
      if (mode == NDIMAGE_GRID_CONSTANT) return false;
      c = c < (A)0 ? (A)-2 : len + (A)1;
      slope = 0;
    }
  } else {
    c = ndimage_fold(c, len, mode, &slope);
    c = c < (A)-1 ? (A)-1 : (c > len ? len : c);  // rounding of coordinates past 2^53
  }
  const A start = order == 0 ? floor(c + (A)0.5) : floor(c);
  const A t = c - start;
  const A weight[2] = {order == 0 ? (A)1 : (A)1 - t, t};
  const A dweight[2] = {order == 0 ? (A)0 : -slope, slope};
  bool any = false;
  for (int k = 0; k <= order; ++k) {
    I index;
    ax.inside[k] = ndimage_tap((I)start + k, n, mode, &index);
    any = any || ax.inside[k];
    ax.offset[k] = index * stride;
    ax.weight[k] = weight[k];
    ax.dweight[k] = dweight[k];
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

// Tap k's per-axis choice along axis a: bit a of k for order 1, 0 for order 0.
__device__ __forceinline__ int ndimage_digit(int k, int a, int ndim, int order) {
  return order == 0 ? 0 : (k >> (ndim - 1 - a)) & 1;
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

// out[p] = the sample of input at coordinates[:, p]; one thread per point.
template <typename T, typename I>
__global__ void ndimage_map_forward(const T* input, const typename acc_type<T>::type* coordinates, T* out, I P,
                                    I S0, I S1, I S2, int ndim, int order, int mode, double cval) {
  typedef typename acc_type<T>::type A;
  const I sizes[3] = {S0, S1, S2};
  const int taps = order == 0 ? 1 : 1 << ndim;
  DEFORMCP_GRID_STRIDE_LOOP(I, p, P) {
    ndimage_axis<A, I> axes[3];
    if (!ndimage_point_setup(coordinates, p, P, sizes, ndim, order, mode, axes)) {
      out[p] = store_as<T>((A)cval);
      continue;
    }
    A value = 0;
    for (int k = 0; k < taps; ++k) {
      A weight;
      I offset;
      const bool inside = ndimage_combine(axes, k, ndim, order, &weight, &offset);
      value += weight * (inside ? load_acc(input[offset]) : (A)cval);
    }
    out[p] = store_as<T>(value);
  }
}

// The gradients of one point: its taps' weights times g added into grad_input (atomically, or with plain adds
// where the calling thread alone writes grad_input), and its coordinate gradient written to grad_coordinates.
// Either output may be null.
template <typename A, typename T, typename I>
__device__ __forceinline__ void ndimage_point_backward(const T* input, const A* coordinates, A g, I p, I P,
                                                       const I* sizes, int ndim, int order, int mode, A cval,
                                                       A* grad_input, A* grad_coordinates, bool atomic) {
  ndimage_axis<A, I> axes[3];
  const bool ok = ndimage_point_setup(coordinates, p, P, sizes, ndim, order, mode, axes);
  A gc[3] = {0, 0, 0};
  const int taps = order == 0 ? 1 : 1 << ndim;
  for (int k = 0; ok && k < taps; ++k) {
    A weight;
    I offset;
    const bool inside = ndimage_combine(axes, k, ndim, order, &weight, &offset);
    if (grad_input != nullptr && inside) {
      if (atomic) atomic_add(grad_input + offset, weight * g);
      else grad_input[offset] += weight * g;
    }
    if (grad_coordinates != nullptr && order > 0) {
      const A v = (inside ? load_acc(input[offset]) : cval) * g;
      for (int a = 0; a < ndim; ++a) {
        A d = v;
        for (int b = 0; b < ndim; ++b) {
          const int j = ndimage_digit(k, b, ndim, order);
          d *= b == a ? axes[b].dweight[j] : axes[b].weight[j];
        }
        gc[a] += d;
      }
    }
  }
  if (grad_coordinates != nullptr)
    for (int a = 0; a < ndim; ++a) grad_coordinates[a * P + p] = gc[a];
}

// grad_input (float or double, zeroed, may be null) += Σ_p weights · grad_output[p] by atomics, and
// grad_coordinates (ndim, P) (may be null); one thread per point.
template <typename T, typename I>
__global__ void ndimage_map_backward(const T* grad_output, const T* input,
                                     const typename acc_type<T>::type* coordinates,
                                     typename acc_type<T>::type* grad_input,
                                     typename acc_type<T>::type* grad_coordinates, I P, I S0, I S1, I S2, int ndim,
                                     int order, int mode, double cval) {
  typedef typename acc_type<T>::type A;
  const I sizes[3] = {S0, S1, S2};
  DEFORMCP_GRID_STRIDE_LOOP(I, p, P) {
    ndimage_point_backward(input, coordinates, load_acc(grad_output[p]), p, P, sizes, ndim, order, mode, (A)cval,
                           grad_input, grad_coordinates, true);
  }
}

// grad_input (zeroed) += Σ_p weights · grad_output[p], the points added in order by one thread: bitwise the
// same run to run. Launched over one work item.
template <typename T, typename I>
__global__ void ndimage_map_backward_input_deterministic(const T* grad_output, const T* input,
                                                         const typename acc_type<T>::type* coordinates,
                                                         typename acc_type<T>::type* grad_input, I P, I S0, I S1,
                                                         I S2, int ndim, int order, int mode, double cval) {
  typedef typename acc_type<T>::type A;
  const I sizes[3] = {S0, S1, S2};
  DEFORMCP_GRID_STRIDE_LOOP(I, item, (I)1) {
    for (I p = 0; p < P; ++p)
      ndimage_point_backward(input, coordinates, load_acc(grad_output[p]), p, P, sizes, ndim, order, mode,
                             (A)cval, grad_input, (A*)nullptr, false);
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
