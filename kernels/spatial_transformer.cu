// spatial_transformer.cu — affine grid generator and grid sampler (Jaderberg et al., NeurIPS 2015,
// https://arxiv.org/abs/1506.02025), forward and backward, with torch.nn.functional's conventions.
// Preceded by deformcp_common.cuh. Layouts (all C-contiguous):
//   theta (N, 2, 3); grid (N, Ho, Wo, 2) with last axis (x, y); input (N, C, H, W);
//   output (N, C, Ho, Wo).
// Bilinear samples are set up on [-1, H) × [-1, W) (closed_below: torch's derivative at exactly -1).
// Bicubic samples (torch's: Keys' kernel with A = -0.75 over the 4×4 taps around the unpadded coordinate, the
// padding mode applied to each tap) read 0 at a NaN coordinate, and at ±inf but with border padding.

#define DEFORMCP_MODE_BILINEAR 0
#define DEFORMCP_MODE_NEAREST 1
#define DEFORMCP_MODE_BICUBIC 2
#define DEFORMCP_PADDING_ZEROS 0
#define DEFORMCP_PADDING_BORDER 1
#define DEFORMCP_PADDING_REFLECTION 2

// Normalised coordinate of pixel i of n along one axis of affine_grid's base grid.
template <typename A, typename I>
__device__ __forceinline__ A base_grid_coordinate(I i, I n, int align_corners) {
  if (n <= 1) return (A)0;
  const A numerator = (A)(2 * i - (n - 1));
  return align_corners ? numerator / (A)(n - 1) : numerator / (A)n;
}

// Clamps x to [0, limit]; the derivative is 1 strictly inside, 0 where clamped. NaN passes through.
template <typename A>
__device__ __forceinline__ A clip_coordinate(A x, A limit, A* dx) {
  if (x <= (A)0) { *dx = 0; return (A)0; }
  if (x >= limit) { *dx = 0; return limit; }
  *dx = 1;
  return x;
}

// Reflects x into [twice_low / 2, twice_high / 2]; the derivative is ±1. NaN and ±inf give NaN.
template <typename A>
__device__ __forceinline__ A reflect_coordinate(A x, A twice_low, A twice_high, A* dx) {
  if (twice_low == twice_high) { *dx = 0; return (A)0; }
  const A low = twice_low / 2, span = (twice_high - twice_low) / 2;
  A distance = x - low, sign = 1;
  if (distance < (A)0) { sign = -1; distance = -distance; }
  const A extra = fmod(distance, span);
  const A flips = floor(distance / span);
  if (fmod(flips, (A)2) == (A)0) { *dx = sign; return extra + low; }
  *dx = -sign;
  return span - extra + low;
}

// Pixel coordinate sampled for the normalised grid value g along an axis of `size` pixels, after
// padding; *dsource_dg receives its derivative with respect to g.
template <typename A>
__device__ __forceinline__ A grid_source_coordinate(A g, long long size, int padding, int align_corners,
                                                    A* dsource_dg) {
  A x, d;
  if (align_corners) { x = (g + 1) / 2 * (A)(size - 1); d = (A)(size - 1) / 2; }
  else { x = ((g + 1) * (A)size - 1) / 2; d = (A)size / 2; }
  if (padding == DEFORMCP_PADDING_REFLECTION) {
    A dreflect;
    x = align_corners ? reflect_coordinate(x, (A)0, (A)(2 * (size - 1)), &dreflect)
                      : reflect_coordinate(x, (A)-1, (A)(2 * size - 1), &dreflect);
    d *= dreflect;
  }
  if (padding != DEFORMCP_PADDING_ZEROS) {
    A dclip;
    x = clip_coordinate(x, (A)(size - 1), &dclip);
    d *= dclip;
  }
  *dsource_dg = d;
  return x;
}

// Flat index y * W + x of the pixel nearest to (y, x) (ties to even), or -1 outside the plane.
template <typename A, typename I>
__device__ __forceinline__ I nearest_pixel(A y, A x, I H, I W) {
  const A ry = rint(y), rx = rint(x);
  if (!(ry >= (A)0 && ry < (A)H && rx >= (A)0 && rx < (A)W)) return -1;
  return (I)ry * W + (I)rx;
}

// Keys' cubic convolution weights (A = -0.75, as torch) of the taps floor(x) - 1 … floor(x) + 2 at t = x - floor(x),
// written as torch writes them, and their derivatives with respect to t.
template <typename A>
__device__ __forceinline__ void cubic_weights(A t, A* w, A* dw) {
  const A a = (A)-0.75, d0 = t + 1, d1 = t, d2 = 1 - t, d3 = d2 + 1;
  w[0] = ((a * d0 - 5 * a) * d0 + 8 * a) * d0 - 4 * a;
  w[1] = ((a + 2) * d1 - (a + 3)) * d1 * d1 + 1;
  w[2] = ((a + 2) * d2 - (a + 3)) * d2 * d2 + 1;
  w[3] = ((a * d3 - 5 * a) * d3 + 8 * a) * d3 - 4 * a;
  dw[0] = (3 * a * d0 - 10 * a) * d0 + 8 * a;
  dw[1] = (3 * (a + 2) * d1 - 2 * (a + 3)) * d1;
  dw[2] = -((3 * (a + 2) * d2 - 2 * (a + 3)) * d2);
  dw[3] = -((3 * a * d3 - 10 * a) * d3 + 8 * a);
}

// The pixel that the tap at integer coordinate c (in A) reads along an axis of `size` pixels after the padding
// mode, or -1 where it reads 0.
template <typename A, typename I>
__device__ __forceinline__ I cubic_tap(A c, I size, int padding, int align_corners) {
  A unused;
  if (padding == DEFORMCP_PADDING_REFLECTION)
    c = align_corners ? reflect_coordinate(c, (A)0, (A)(2 * (size - 1)), &unused)
                      : reflect_coordinate(c, (A)-1, (A)(2 * size - 1), &unused);
  if (padding != DEFORMCP_PADDING_ZEROS) c = clip_coordinate(c, (A)(size - 1), &unused);
  return c >= (A)0 && c <= (A)(size - 1) ? (I)c : (I)-1;
}

// One axis of a bicubic sample: the pixels that its taps floor(s) - 1 … floor(s) + 2 read (-1: they read 0), their
// weights, and the weights' derivatives with respect to s.
template <typename A, typename I>
struct cubic_axis {
  I tap[4];
  A w[4], dw[4];
};

// Sets up one axis at the unpadded pixel coordinate s over `size` pixels; false where the sample reads 0 (s NaN, or
// ±inf but with border padding, where a coordinate beyond the taps' reach reads the border pixels).
template <typename A, typename I>
__device__ __forceinline__ bool cubic_axis_setup(A s, I size, int padding, int align_corners, cubic_axis<A, I>& c) {
  if (padding == DEFORMCP_PADDING_BORDER)  // NaN stays NaN
    s = s < (A)-2 ? (A)-2 : (s > (A)(size + 1) ? (A)(size + 1) : s);
  if (!is_finite(s)) return false;
  const A f = floor(s);
  cubic_weights(s - f, c.w, c.dw);
  for (int i = 0; i < 4; ++i) c.tap[i] = cubic_tap(f + (A)(i - 1), size, padding, align_corners);
  return true;
}

// The 4×4 taps of a bicubic sample: (y.tap[j], x.tap[i]) with weight y.w[j] · x.w[i].
template <typename A, typename I>
struct cubic_taps {
  cubic_axis<A, I> y, x;
};

template <typename A, typename I>
__device__ __forceinline__ bool cubic_setup(A y, A x, I H, I W, int padding, int align_corners,
                                            cubic_taps<A, I>& c) {
  return cubic_axis_setup(x, W, padding, align_corners, c.x) && cubic_axis_setup(y, H, padding, align_corners, c.y);
}

// Σ_j wy[j] · Σ_i wx[i] · plane[row j, column i] over the taps that read the plane (torch's order)
template <typename A, typename T, typename I>
__device__ __forceinline__ A cubic_gather(const T* plane, I W, const cubic_taps<A, I>& c) {
  A v = 0;
  for (int j = 0; j < 4; ++j) {
    A along_row = 0;
    for (int i = 0; i < 4; ++i)
      if (c.y.tap[j] >= 0 && c.x.tap[i] >= 0) along_row += c.x.w[i] * (A)load_acc(plane[c.y.tap[j] * W + c.x.tap[i]]);
    v += c.y.w[j] * along_row;
  }
  return v;
}

// plane[row j, column i] += wx[i] · wy[j] · g for the taps that read the plane: atomically, or with a plain add
// where the calling thread alone writes this plane
template <typename A, typename I>
__device__ __forceinline__ void cubic_scatter(A* plane, I W, const cubic_taps<A, I>& c, A g, bool atomic = true) {
  for (int j = 0; j < 4; ++j)
    for (int i = 0; i < 4; ++i) {
      if (c.y.tap[j] < 0 || c.x.tap[i] < 0) continue;
      A* at = plane + c.y.tap[j] * W + c.x.tap[i];
      if (atomic) atomic_add(at, g * c.x.w[i] * c.y.w[j]);
      else *at += g * c.x.w[i] * c.y.w[j];
    }
}

// d/dy and d/dx of the bicubic sample, accumulated into *gy and *gx (scaled by g)
template <typename A, typename T, typename I>
__device__ __forceinline__ void cubic_coordinate_grad(const T* plane, I W, const cubic_taps<A, I>& c, A g, A* gy,
                                                      A* gx) {
  for (int j = 0; j < 4; ++j)
    for (int i = 0; i < 4; ++i) {
      if (c.y.tap[j] < 0 || c.x.tap[i] < 0) continue;
      const A v = (A)load_acc(plane[c.y.tap[j] * W + c.x.tap[i]]) * g;
      *gx += v * c.x.dw[i] * c.y.w[j];
      *gy += v * c.x.w[i] * c.y.dw[j];
    }
}

// The 4×4×4 taps of a tricubic sample (volumes): (z.tap[k], y.tap[j], x.tap[i]) with weight z.w[k] · y.w[j] · x.w[i].
template <typename A, typename I>
struct tricubic_taps {
  cubic_axis<A, I> z, y, x;
};

template <typename A, typename I>
__device__ __forceinline__ bool tricubic_setup(A z, A y, A x, I D, I H, I W, int padding, int align_corners,
                                               tricubic_taps<A, I>& c) {
  return cubic_axis_setup(x, W, padding, align_corners, c.x) && cubic_axis_setup(y, H, padding, align_corners, c.y)
         && cubic_axis_setup(z, D, padding, align_corners, c.z);
}

// Σ_k wz[k] · Σ_j wy[j] · Σ_i wx[i] · volume[z k, y j, x i] over the taps that read the volume
template <typename A, typename T, typename I>
__device__ __forceinline__ A tricubic_gather(const T* volume, I H, I W, const tricubic_taps<A, I>& c) {
  A v = 0;
  for (int k = 0; k < 4; ++k) {
    if (c.z.tap[k] < 0) continue;
    A along_plane = 0;
    for (int j = 0; j < 4; ++j) {
      if (c.y.tap[j] < 0) continue;
      A along_row = 0;
      const T* row = volume + (c.z.tap[k] * H + c.y.tap[j]) * W;
      for (int i = 0; i < 4; ++i)
        if (c.x.tap[i] >= 0) along_row += c.x.w[i] * (A)load_acc(row[c.x.tap[i]]);
      along_plane += c.y.w[j] * along_row;
    }
    v += c.z.w[k] * along_plane;
  }
  return v;
}

// The gradients of tricubic_gather for the output gradient g: volume += its weights · g (atomically, or with plain
// adds; grad null: not wanted), and the derivatives with respect to (x, y, z) added to d[0..2] (null: not wanted).
template <typename A, typename T, typename I>
__device__ __forceinline__ void tricubic_backward(const T* volume, A* grad, I H, I W, const tricubic_taps<A, I>& c,
                                                  A g, bool atomic, A* d) {
  for (int k = 0; k < 4; ++k)
    for (int j = 0; j < 4; ++j)
      for (int i = 0; i < 4; ++i) {
        if (c.z.tap[k] < 0 || c.y.tap[j] < 0 || c.x.tap[i] < 0) continue;
        const I at = (c.z.tap[k] * H + c.y.tap[j]) * W + c.x.tap[i];
        if (grad != nullptr) {
          const A add = g * c.x.w[i] * c.y.w[j] * c.z.w[k];
          if (atomic) atomic_add(grad + at, add);
          else grad[at] += add;
        }
        if (d != nullptr) {
          const A v = (A)load_acc(volume[at]) * g;
          d[0] += v * c.x.dw[i] * c.y.w[j] * c.z.w[k];
          d[1] += v * c.x.w[i] * c.y.dw[j] * c.z.w[k];
          d[2] += v * c.x.w[i] * c.y.w[j] * c.z.dw[k];
        }
      }
}

// The pixel coordinate that `mode` samples for the normalised grid value g along an axis of `size` pixels: after
// the padding mode, but for bicubic sampling, which pads each tap instead. *dsource_dg: its derivative.
template <typename A>
__device__ __forceinline__ A mode_source_coordinate(A g, long long size, int mode, int padding, int align_corners,
                                                    A* dsource_dg) {
  return grid_source_coordinate(g, size, mode == DEFORMCP_MODE_BICUBIC ? DEFORMCP_PADDING_ZEROS : padding,
                                align_corners, dsource_dg);
}

// grid (N, H, W, 2) = base (H, W, [x, y, 1]) · theta[n]ᵀ
template <typename T, typename I>
__global__ void affine_grid_forward(const T* theta, T* grid, I N, I H, I W, int align_corners) {
  typedef typename acc_type<T>::type A;
  DEFORMCP_GRID_STRIDE_LOOP(I, p, N * H * W) {
    const I n = p / (H * W), h = (p / W) % H, w = p % W;
    const A bx = base_grid_coordinate<A>(w, W, align_corners);
    const A by = base_grid_coordinate<A>(h, H, align_corners);
    const T* t = theta + 6 * n;
    grid[2 * p] = store_as<T>(load_acc(t[0]) * bx + load_acc(t[1]) * by + load_acc(t[2]));
    grid[2 * p + 1] = store_as<T>(load_acc(t[3]) * bx + load_acc(t[4]) * by + load_acc(t[5]));
  }
}

// grad_theta[n, r, k] = Σ_{h,w} grad_grid[n, h, w, r] · base[h, w, k]; one thread per element, a fixed
// summation order, so the result is deterministic.
template <typename T, typename I>
__global__ void affine_grid_backward(const T* grad_grid, T* grad_theta, I N, I H, I W, int align_corners) {
  typedef typename acc_type<T>::type A;
  DEFORMCP_GRID_STRIDE_LOOP(I, q, N * 6) {
    const I n = q / 6, r = (q % 6) / 3, k = q % 3;
    const T* g = grad_grid + n * H * W * 2 + r;
    A sum = 0;
    for (I h = 0; h < H; ++h) {
      const A by = base_grid_coordinate<A>(h, H, align_corners);
      for (I w = 0; w < W; ++w) {
        const A base = k == 0 ? base_grid_coordinate<A>(w, W, align_corners) : (k == 1 ? by : (A)1);
        sum += load_acc(g[2 * (h * W + w)]) * base;
      }
    }
    grad_theta[q] = store_as<T>(sum);
  }
}

// ---- sampling at one normalised location: the sampler's work for a location read from a grid (grid_sample) or
// made from theta (affine_sample)

// out[c · out_plane] = plane c of the C planes at `in` (H × W each) sampled at the normalised location (gx, gy).
template <typename T, typename A, typename I>
__device__ __forceinline__ void sample_2d(const T* in, T* out, I C, I H, I W, I out_plane, A gx, A gy, int mode,
                                          int padding, int align_corners) {
  A unused;
  const A x = mode_source_coordinate(gx, (long long)W, mode, padding, align_corners, &unused);
  const A y = mode_source_coordinate(gy, (long long)H, mode, padding, align_corners, &unused);
  const I in_plane = H * W;
  if (mode == DEFORMCP_MODE_BILINEAR) {
    bilinear_corners<A, I> corners;
    const bool sampled = bilinear_setup(y, x, H, W, corners, true);
    for (I c = 0; c < C; ++c)
      out[c * out_plane] = store_as<T>(sampled ? bilinear_gather(in + c * in_plane, corners) : (A)0);
  } else if (mode == DEFORMCP_MODE_BICUBIC) {
    cubic_taps<A, I> taps;
    const bool sampled = cubic_setup(y, x, H, W, padding, align_corners, taps);
    for (I c = 0; c < C; ++c)
      out[c * out_plane] = store_as<T>(sampled ? cubic_gather(in + c * in_plane, W, taps) : (A)0);
  } else {
    const I pixel = nearest_pixel(y, x, H, W);
    for (I c = 0; c < C; ++c)
      out[c * out_plane] = pixel >= 0 ? in[c * in_plane + pixel] : store_as<T>((A)0);
  }
}

// Gradients of sample_2d for the output gradients gout[c · out_plane]: scatter-added with atomics into grad_in (C
// planes in acc_t<T>; null: not wanted), and the derivatives with respect to (gx, gy) added to *dgx, *dgy (both
// null: not wanted).
template <typename T, typename A, typename I>
__device__ __forceinline__ void sample_2d_backward(const T* gout, const T* in, A* grad_in, I C, I H, I W, I out_plane,
                                                   A gx, A gy, int mode, int padding, int align_corners, A* dgx,
                                                   A* dgy) {
  A dx_dg, dy_dg;
  const A x = mode_source_coordinate(gx, (long long)W, mode, padding, align_corners, &dx_dg);
  const A y = mode_source_coordinate(gy, (long long)H, mode, padding, align_corners, &dy_dg);
  const I in_plane = H * W;
  A sx = 0, sy = 0;
  if (mode == DEFORMCP_MODE_BILINEAR) {
    bilinear_corners<A, I> corners;
    if (bilinear_setup(y, x, H, W, corners, true)) {
      for (I c = 0; c < C; ++c) {
        const A g = load_acc(gout[c * out_plane]);
        if (grad_in != nullptr) bilinear_scatter(grad_in + c * in_plane, corners, g);
        if (dgx != nullptr) bilinear_coordinate_grad(in + c * in_plane, corners, g, &sy, &sx);
      }
    }
  } else if (mode == DEFORMCP_MODE_BICUBIC) {
    cubic_taps<A, I> taps;
    if (cubic_setup(y, x, H, W, padding, align_corners, taps)) {
      for (I c = 0; c < C; ++c) {
        const A g = load_acc(gout[c * out_plane]);
        if (grad_in != nullptr) cubic_scatter(grad_in + c * in_plane, W, taps, g);
        if (dgx != nullptr) cubic_coordinate_grad(in + c * in_plane, W, taps, g, &sy, &sx);
      }
    }
  } else if (grad_in != nullptr) {
    const I pixel = nearest_pixel(y, x, H, W);
    if (pixel >= 0)
      for (I c = 0; c < C; ++c) atomic_add(grad_in + c * in_plane + pixel, load_acc(gout[c * out_plane]));
  }
  if (dgx != nullptr) {
    *dgx += sx * dx_dg;
    *dgy += sy * dy_dg;
  }
}

// One plane's gradient of sample_2d at (gx, gy) for the output gradient g, added with plain stores (the
// deterministic kernels, where one thread owns the plane).
template <typename A, typename I>
__device__ __forceinline__ void sample_2d_scatter(A* gin, I H, I W, A gx, A gy, A g, int mode, int padding,
                                                  int align_corners) {
  A unused;
  const A x = mode_source_coordinate(gx, (long long)W, mode, padding, align_corners, &unused);
  const A y = mode_source_coordinate(gy, (long long)H, mode, padding, align_corners, &unused);
  if (mode == DEFORMCP_MODE_BILINEAR) {
    bilinear_corners<A, I> corners;
    if (bilinear_setup(y, x, H, W, corners, true)) bilinear_scatter(gin, corners, g, false);
  } else if (mode == DEFORMCP_MODE_BICUBIC) {
    cubic_taps<A, I> taps;
    if (cubic_setup(y, x, H, W, padding, align_corners, taps)) cubic_scatter(gin, W, taps, g, false);
  } else {
    const I pixel = nearest_pixel(y, x, H, W);
    if (pixel >= 0) gin[pixel] += g;
  }
}

// output[n, c, ho, wo] = input[n, c] sampled at grid[n, ho, wo]; one thread per output location.
template <typename T, typename I>
__global__ void grid_sample_forward(const T* input, const T* grid, T* output, I N, I C, I H, I W, I Ho,
                                    I Wo, int mode, int padding, int align_corners) {
  typedef typename acc_type<T>::type A;
  const I out_plane = Ho * Wo;
  DEFORMCP_GRID_STRIDE_LOOP(I, p, N * out_plane) {
    const I n = p / out_plane;
    sample_2d(input + n * C * H * W, output + n * C * out_plane + p % out_plane, C, H, W, out_plane,
              (A)load_acc(grid[2 * p]), (A)load_acc(grid[2 * p + 1]), mode, padding, align_corners);
  }
}

// Gradients of grid_sample_forward: grad_input (in acc_t<T>, zero-filled by the caller; scatter-added with
// atomics) and grad_grid (written once per location). Either pointer may be null when not wanted.
template <typename T, typename I>
__global__ void grid_sample_backward(const T* grad_output, const T* input, const T* grid, acc_t<T>* grad_input,
                                     T* grad_grid, I N, I C, I H, I W, I Ho, I Wo, int mode, int padding,
                                     int align_corners) {
  typedef typename acc_type<T>::type A;
  const I out_plane = Ho * Wo, in_plane = H * W;
  DEFORMCP_GRID_STRIDE_LOOP(I, p, N * out_plane) {
    const I n = p / out_plane;
    A dg[2] = {0, 0};
    const bool want_grid = grad_grid != nullptr;
    sample_2d_backward(grad_output + n * C * out_plane + p % out_plane, input + n * C * in_plane,
                       grad_input == nullptr ? (A*)nullptr : grad_input + n * C * in_plane, C, H, W, out_plane,
                       (A)load_acc(grid[2 * p]), (A)load_acc(grid[2 * p + 1]), mode, padding, align_corners,
                       want_grid ? dg : (A*)nullptr, want_grid ? dg + 1 : (A*)nullptr);
    if (want_grid) {
      grad_grid[2 * p] = store_as<T>(dg[0]);
      grad_grid[2 * p + 1] = store_as<T>(dg[1]);
    }
  }
}

// grad_input of grid_sample_forward, bitwise reproducible: one thread per input plane (n, c) visits every
// output location of image n in order and adds with plain stores. grad_input (in acc_t<T>) is zero-filled by
// the caller.
template <typename T, typename I>
__global__ void grid_sample_backward_input_deterministic(const T* grad_output, const T* grid, acc_t<T>* grad_input, I N,
                                                         I C, I H, I W, I Ho, I Wo, int mode, int padding,
                                                         int align_corners) {
  typedef typename acc_type<T>::type A;
  const I out_plane = Ho * Wo;
  DEFORMCP_GRID_STRIDE_LOOP(I, plane, N * C) {
    const I n = plane / C;
    const T* gout = grad_output + plane * out_plane;
    A* gin = grad_input + plane * H * W;
    for (I hw = 0; hw < out_plane; ++hw) {
      const I p = n * out_plane + hw;
      sample_2d_scatter(gin, H, W, (A)load_acc(grid[2 * p]), (A)load_acc(grid[2 * p + 1]), (A)load_acc(gout[hw]),
                        mode, padding, align_corners);
    }
  }
}

// ---- volumes: theta (N, 3, 4); grid (N, Do, Ho, Wo, 3) with last axis (x, y, z); input (N, C, D, H, W);
// output (N, C, Do, Ho, Wo). Trilinear samples follow the bilinear rule along each axis (set up on [-1, size)).

// The eight corners of a trilinear sample, in torch's order: (z0, y0, x0), (z0, y0, x1), (z0, y1, x0), …, (z1, y1, x1)
// (corner k: z0 + (k >> 2), y0 + (k >> 1 & 1), x0 + (k & 1)). A corner's weight is the product of its axes' weights
// (trilinear_weight); the per-axis weights are kept rather than the eight products and their derivatives, which
// would take three times the registers.
template <typename A, typename I>
struct trilinear_corners {
  bool inside[8];  // whether the corner lies in the volume (it reads 0 where it does not)
  I index[8];      // (z · H + y) · W + x of each corner inside, else 0
  A w[3][2];       // along z, y, x: the weight of the lower and of the upper corner
};

template <typename A, typename I>
__device__ __forceinline__ bool trilinear_setup(A z, A y, A x, I D, I H, I W, trilinear_corners<A, I>& c) {
  if (!(z >= (A)-1 && y >= (A)-1 && x >= (A)-1 && z < (A)D && y < (A)H && x < (A)W)) return false;
  const A fz = floor(z), fy = floor(y), fx = floor(x);
  const I z0 = (I)fz, y0 = (I)fy, x0 = (I)fx;
  const A l[3] = {z - fz, y - fy, x - fx};  // the upper corner's weight along z, y, x
  for (int a = 0; a < 3; ++a) {
    c.w[a][0] = (A)1 - l[a];
    c.w[a][1] = l[a];
  }
  for (int k = 0; k < 8; ++k) {
    const I cz = z0 + (k >> 2), cy = y0 + (k >> 1 & 1), cx = x0 + (k & 1);
    c.inside[k] = cz >= 0 && cz < D && cy >= 0 && cy < H && cx >= 0 && cx < W;
    c.index[k] = c.inside[k] ? (cz * H + cy) * W + cx : 0;
  }
  return true;
}

// Corner k's weight; with `axis` (0, 1, 2: z, y, x), its derivative with respect to that coordinate.
template <typename A, typename I>
__device__ __forceinline__ A trilinear_weight(const trilinear_corners<A, I>& c, int k, int axis = -1) {
  const int bit[3] = {k >> 2, k >> 1 & 1, k & 1};
  A w[3];
  for (int a = 0; a < 3; ++a) w[a] = a == axis ? (bit[a] ? (A)1 : (A)-1) : c.w[a][bit[a]];
  return w[0] * w[1] * w[2];
}

// Flat index (z · H + y) · W + x of the voxel nearest to (z, y, x) (ties to even), or -1 outside the volume.
template <typename A, typename I>
__device__ __forceinline__ I nearest_voxel(A z, A y, A x, I D, I H, I W) {
  const A rz = rint(z);
  const I pixel = nearest_pixel(y, x, H, W);
  if (!(rz >= (A)0 && rz < (A)D) || pixel < 0) return -1;
  return (I)rz * H * W + pixel;
}

// grid (N, D, H, W, 3) = base (D, H, W, [x, y, z, 1]) · theta[n]ᵀ
template <typename T, typename I>
__global__ void affine_grid_3d_forward(const T* theta, T* grid, I N, I D, I H, I W, int align_corners) {
  typedef typename acc_type<T>::type A;
  DEFORMCP_GRID_STRIDE_LOOP(I, p, N * D * H * W) {
    const I n = p / (D * H * W), d = p / (H * W) % D, h = p / W % H, w = p % W;
    const A b[3] = {base_grid_coordinate<A>(w, W, align_corners), base_grid_coordinate<A>(h, H, align_corners),
                    base_grid_coordinate<A>(d, D, align_corners)};
    const T* t = theta + 12 * n;
    for (int r = 0; r < 3; ++r)
      grid[3 * p + r] = store_as<T>(load_acc(t[4 * r]) * b[0] + load_acc(t[4 * r + 1]) * b[1] +
                                    load_acc(t[4 * r + 2]) * b[2] + load_acc(t[4 * r + 3]));
  }
}

// grad_theta[n, r, k] = Σ_{d,h,w} grad_grid[n, d, h, w, r] · base[d, h, w, k]; one thread per element, in order.
template <typename T, typename I>
__global__ void affine_grid_3d_backward(const T* grad_grid, T* grad_theta, I N, I D, I H, I W, int align_corners) {
  typedef typename acc_type<T>::type A;
  DEFORMCP_GRID_STRIDE_LOOP(I, q, N * 12) {
    const I n = q / 12, r = q % 12 / 4, k = q % 4;
    const T* g = grad_grid + n * D * H * W * 3 + r;
    A sum = 0;
    for (I d = 0; d < D; ++d) {
      const A bz = base_grid_coordinate<A>(d, D, align_corners);
      for (I h = 0; h < H; ++h) {
        const A by = base_grid_coordinate<A>(h, H, align_corners);
        for (I w = 0; w < W; ++w) {
          const A base = k == 0 ? base_grid_coordinate<A>(w, W, align_corners) : k == 1 ? by : k == 2 ? bz : (A)1;
          sum += load_acc(g[3 * ((d * H + h) * W + w)]) * base;
        }
      }
    }
    grad_theta[q] = store_as<T>(sum);
  }
}

// The source coordinates (x, y, z) that `mode` samples for the normalised location g (x, y, z) (after the padding
// mode, but for tricubic sampling, which pads each tap), and their derivatives.
template <typename A, typename I>
__device__ __forceinline__ void volume_source(const A* g, I D, I H, I W, int mode, int padding, int align_corners,
                                              A* s, A* ds) {
  const I size[3] = {W, H, D};
  for (int a = 0; a < 3; ++a)
    s[a] = mode_source_coordinate(g[a], (long long)size[a], mode, padding, align_corners, ds + a);
}

// out[c · out_volume] = volume c of the C volumes at `in` (D × H × W each) sampled at the normalised location g.
template <typename T, typename A, typename I>
__device__ __forceinline__ void sample_3d(const T* in, T* out, I C, I D, I H, I W, I out_volume, const A* g, int mode,
                                          int padding, int align_corners) {
  A s[3], unused[3];
  volume_source(g, D, H, W, mode, padding, align_corners, s, unused);
  const I in_volume = D * H * W;
  if (mode == DEFORMCP_MODE_BILINEAR) {
    trilinear_corners<A, I> c;
    const bool sampled = trilinear_setup(s[2], s[1], s[0], D, H, W, c);
    for (I ch = 0; ch < C; ++ch) {
      A v = 0;
      for (int k = 0; sampled && k < 8; ++k)
        if (c.inside[k]) v += trilinear_weight(c, k) * (A)load_acc(in[ch * in_volume + c.index[k]]);
      out[ch * out_volume] = store_as<T>(v);
    }
  } else if (mode == DEFORMCP_MODE_BICUBIC) {
    tricubic_taps<A, I> c;
    const bool sampled = tricubic_setup(s[2], s[1], s[0], D, H, W, padding, align_corners, c);
    for (I ch = 0; ch < C; ++ch)
      out[ch * out_volume] = store_as<T>(sampled ? tricubic_gather(in + ch * in_volume, H, W, c) : (A)0);
  } else {
    const I voxel = nearest_voxel(s[2], s[1], s[0], D, H, W);
    for (I ch = 0; ch < C; ++ch)
      out[ch * out_volume] = voxel >= 0 ? in[ch * in_volume + voxel] : store_as<T>((A)0);
  }
}

// Gradients of sample_3d for the output gradients gout[c · out_volume]: scatter-added with atomics into grad_in
// (C volumes in acc_t<T>; null: not wanted), the derivatives with respect to g added to dg[0..2] (null: not wanted).
template <typename T, typename A, typename I>
__device__ __forceinline__ void sample_3d_backward(const T* gout, const T* in, A* grad_in, I C, I D, I H, I W,
                                                   I out_volume, const A* g, int mode, int padding,
                                                   int align_corners, A* dg) {
  A s[3], ds[3];
  volume_source(g, D, H, W, mode, padding, align_corners, s, ds);
  const I in_volume = D * H * W;
  A gz = 0, gy = 0, gx = 0;
  if (mode == DEFORMCP_MODE_BILINEAR) {
    trilinear_corners<A, I> c;
    if (trilinear_setup(s[2], s[1], s[0], D, H, W, c)) {
      for (I ch = 0; ch < C; ++ch) {
        const A go = load_acc(gout[ch * out_volume]);
        for (int k = 0; k < 8; ++k) {
          if (!c.inside[k]) continue;
          if (grad_in != nullptr) atomic_add(grad_in + ch * in_volume + c.index[k], trilinear_weight(c, k) * go);
          if (dg != nullptr) {
            const A v = (A)load_acc(in[ch * in_volume + c.index[k]]) * go;
            gz += trilinear_weight(c, k, 0) * v;
            gy += trilinear_weight(c, k, 1) * v;
            gx += trilinear_weight(c, k, 2) * v;
          }
        }
      }
    }
  } else if (mode == DEFORMCP_MODE_BICUBIC) {
    tricubic_taps<A, I> c;
    if (tricubic_setup(s[2], s[1], s[0], D, H, W, padding, align_corners, c)) {
      A d[3] = {0, 0, 0};
      for (I ch = 0; ch < C; ++ch)
        tricubic_backward(in + ch * in_volume, grad_in == nullptr ? (A*)nullptr : grad_in + ch * in_volume, H, W, c,
                          (A)load_acc(gout[ch * out_volume]), true, dg == nullptr ? (A*)nullptr : d);
      gx = d[0], gy = d[1], gz = d[2];
    }
  } else if (grad_in != nullptr) {
    const I voxel = nearest_voxel(s[2], s[1], s[0], D, H, W);
    if (voxel >= 0)
      for (I ch = 0; ch < C; ++ch) atomic_add(grad_in + ch * in_volume + voxel, load_acc(gout[ch * out_volume]));
  }
  if (dg != nullptr) {
    dg[0] += gx * ds[0];
    dg[1] += gy * ds[1];
    dg[2] += gz * ds[2];
  }
}

// One volume's gradient of sample_3d at g for the output gradient go, added with plain stores.
template <typename A, typename I>
__device__ __forceinline__ void sample_3d_scatter(A* gin, I D, I H, I W, const A* g, A go, int mode, int padding,
                                                  int align_corners) {
  A s[3], unused[3];
  volume_source(g, D, H, W, mode, padding, align_corners, s, unused);
  if (mode == DEFORMCP_MODE_BILINEAR) {
    trilinear_corners<A, I> c;
    if (trilinear_setup(s[2], s[1], s[0], D, H, W, c))
      for (int k = 0; k < 8; ++k)
        if (c.inside[k]) gin[c.index[k]] += trilinear_weight(c, k) * go;
  } else if (mode == DEFORMCP_MODE_BICUBIC) {
    tricubic_taps<A, I> c;
    if (tricubic_setup(s[2], s[1], s[0], D, H, W, padding, align_corners, c))
      tricubic_backward((const A*)nullptr, gin, H, W, c, go, false, (A*)nullptr);  // no derivatives: nothing read
  } else {
    const I voxel = nearest_voxel(s[2], s[1], s[0], D, H, W);
    if (voxel >= 0) gin[voxel] += go;
  }
}

// The normalised grid location g (x, y, z) of point p of a (N, Do, Ho, Wo, 3) grid.
template <typename T, typename A, typename I>
__device__ __forceinline__ void grid_location_3d(const T* grid, I p, A* g) {
  for (int a = 0; a < 3; ++a) g[a] = load_acc(grid[3 * p + a]);
}

// output[n, c, do, ho, wo] = input[n, c] sampled at grid[n, do, ho, wo]; one thread per output location.
template <typename T, typename I>
__global__ void grid_sample_3d_forward(const T* input, const T* grid, T* output, I N, I C, I D, I H, I W, I Do,
                                       I Ho, I Wo, int mode, int padding, int align_corners) {
  typedef typename acc_type<T>::type A;
  const I out_volume = Do * Ho * Wo;
  DEFORMCP_GRID_STRIDE_LOOP(I, p, N * out_volume) {
    const I n = p / out_volume;
    A g[3];
    grid_location_3d(grid, p, g);
    sample_3d(input + n * C * D * H * W, output + n * C * out_volume + p % out_volume, C, D, H, W, out_volume, g,
              mode, padding, align_corners);
  }
}

// Gradients of grid_sample_3d_forward: grad_input (in acc_t<T>, zero-filled by the caller; scatter-added with
// atomics) and grad_grid (written once per location). Either pointer may be null when not wanted.
template <typename T, typename I>
__global__ void grid_sample_3d_backward(const T* grad_output, const T* input, const T* grid, acc_t<T>* grad_input,
                                        T* grad_grid, I N, I C, I D, I H, I W, I Do, I Ho, I Wo, int mode,
                                        int padding, int align_corners) {
  typedef typename acc_type<T>::type A;
  const I out_volume = Do * Ho * Wo, in_volume = D * H * W;
  DEFORMCP_GRID_STRIDE_LOOP(I, p, N * out_volume) {
    const I n = p / out_volume;
    A g[3], dg[3] = {0, 0, 0};
    grid_location_3d(grid, p, g);
    sample_3d_backward(grad_output + n * C * out_volume + p % out_volume, input + n * C * in_volume,
                       grad_input == nullptr ? (A*)nullptr : grad_input + n * C * in_volume, C, D, H, W, out_volume,
                       g, mode, padding, align_corners, grad_grid == nullptr ? (A*)nullptr : dg);
    if (grad_grid != nullptr)
      for (int a = 0; a < 3; ++a) grad_grid[3 * p + a] = store_as<T>(dg[a]);
  }
}

// grad_input of grid_sample_3d_forward, bitwise reproducible: one thread per input volume (n, c) visits every
// output location of sample n in order and adds with plain stores (grad_input in acc_t<T>, zero-filled).
template <typename T, typename I>
__global__ void grid_sample_3d_backward_input_deterministic(const T* grad_output, const T* grid,
                                                            acc_t<T>* grad_input, I N, I C, I D, I H, I W, I Do,
                                                            I Ho, I Wo, int mode, int padding, int align_corners) {
  typedef typename acc_type<T>::type A;
  const I out_volume = Do * Ho * Wo;
  DEFORMCP_GRID_STRIDE_LOOP(I, volume, N * C) {
    const I n = volume / C;
    const T* gout = grad_output + volume * out_volume;
    A* gin = grad_input + volume * D * H * W;
    for (I o = 0; o < out_volume; ++o) {
      A g[3];
      grid_location_3d(grid, n * out_volume + o, g);
      sample_3d_scatter(gin, D, H, W, g, (A)load_acc(gout[o]), mode, padding, align_corners);
    }
  }
}

// ---- the fused affine sampler: grid_sample(input, affine_grid(theta, size)) with each location made from theta
// where it is sampled (the grid is never stored). theta's gradient Σ_p dL/dg[p] · base[p] is reduced in two
// steps of fixed order: each thread sums DEFORMCP_AFFINE_CHUNK consecutive output locations of one image into a
// partial sum, then affine_sample_theta adds an image's partials in order: bitwise reproducible.
#define DEFORMCP_AFFINE_CHUNK 64

// The normalised location g = theta[n] · base (and base = (x, y, 1)) of output pixel (h, w) of an Ho × Wo grid,
// computed as affine_grid_forward computes it.
template <typename T, typename A, typename I>
__device__ __forceinline__ void affine_location_2d(const T* theta, I n, I h, I w, I Ho, I Wo, int align_corners,
                                                   A* g, A* base) {
  base[0] = base_grid_coordinate<A>(w, Wo, align_corners);
  base[1] = base_grid_coordinate<A>(h, Ho, align_corners);
  base[2] = 1;
  const T* t = theta + 6 * n;
  for (int r = 0; r < 2; ++r)
    g[r] = load_acc(t[3 * r]) * base[0] + load_acc(t[3 * r + 1]) * base[1] + load_acc(t[3 * r + 2]);
}

// The same for output voxel (d, h, w) of a Do × Ho × Wo grid: base = (x, y, z, 1), theta (N, 3, 4).
template <typename T, typename A, typename I>
__device__ __forceinline__ void affine_location_3d(const T* theta, I n, I d, I h, I w, I Do, I Ho, I Wo,
                                                   int align_corners, A* g, A* base) {
  base[0] = base_grid_coordinate<A>(w, Wo, align_corners);
  base[1] = base_grid_coordinate<A>(h, Ho, align_corners);
  base[2] = base_grid_coordinate<A>(d, Do, align_corners);
  base[3] = 1;
  const T* t = theta + 12 * n;
  for (int r = 0; r < 3; ++r)
    g[r] = load_acc(t[4 * r]) * base[0] + load_acc(t[4 * r + 1]) * base[1] + load_acc(t[4 * r + 2]) * base[2] +
           load_acc(t[4 * r + 3]);
}

// output (N, C, Ho, Wo) = input (N, C, H, W) sampled at theta's grid; one thread per output location.
template <typename T, typename I>
__global__ void affine_sample_forward(const T* input, const T* theta, T* output, I N, I C, I H, I W, I Ho, I Wo,
                                      int mode, int padding, int align_corners) {
  typedef typename acc_type<T>::type A;
  const I out_plane = Ho * Wo;
  DEFORMCP_GRID_STRIDE_LOOP(I, p, N * out_plane) {
    const I n = p / out_plane, hw = p % out_plane;
    A g[2], base[3];
    affine_location_2d(theta, n, hw / Wo, hw % Wo, Ho, Wo, align_corners, g, base);
    sample_2d(input + n * C * H * W, output + n * C * out_plane + hw, C, H, W, out_plane, g[0], g[1], mode, padding,
              align_corners);
  }
}

// Gradients of affine_sample_forward, one thread per chunk of DEFORMCP_AFFINE_CHUNK output locations of one
// image, in order: grad_input (acc_t<T>, zero-filled; scatter-added with atomics) and the chunk's sum of
// dL/dg · base into partial[(n · chunks + chunk) · 6 + 3 · r + k] (acc_t<T>). Either may be null.
template <typename T, typename I>
__global__ void affine_sample_backward(const T* grad_output, const T* input, const T* theta, acc_t<T>* grad_input,
                                       acc_t<T>* partial, I N, I C, I H, I W, I Ho, I Wo, int mode, int padding,
                                       int align_corners) {
  typedef typename acc_type<T>::type A;
  const I out_plane = Ho * Wo, in_plane = H * W;
  const I chunks = (out_plane + DEFORMCP_AFFINE_CHUNK - 1) / DEFORMCP_AFFINE_CHUNK;
  DEFORMCP_GRID_STRIDE_LOOP(I, q, N * chunks) {
    const I n = q / chunks, first = q % chunks * DEFORMCP_AFFINE_CHUNK;
    const I last = first + DEFORMCP_AFFINE_CHUNK < out_plane ? first + DEFORMCP_AFFINE_CHUNK : out_plane;
    A sum[6] = {0, 0, 0, 0, 0, 0};
    for (I hw = first; hw < last; ++hw) {
      A g[2], base[3], dg[2] = {0, 0};
      affine_location_2d(theta, n, hw / Wo, hw % Wo, Ho, Wo, align_corners, g, base);
      sample_2d_backward(grad_output + n * C * out_plane + hw, input + n * C * in_plane,
                         grad_input == nullptr ? (A*)nullptr : grad_input + n * C * in_plane, C, H, W, out_plane,
                         g[0], g[1], mode, padding, align_corners, partial == nullptr ? (A*)nullptr : dg,
                         partial == nullptr ? (A*)nullptr : dg + 1);
      for (int r = 0; r < 2; ++r)
        for (int k = 0; k < 3; ++k) sum[3 * r + k] += dg[r] * base[k];
    }
    if (partial != nullptr)
      for (int i = 0; i < 6; ++i) partial[6 * q + i] = sum[i];
  }
}

// grad_input of affine_sample_forward, bitwise reproducible: one thread per input plane (n, c) visits every output
// location of image n in order and adds with plain stores (grad_input in acc_t<T>, zero-filled).
template <typename T, typename I>
__global__ void affine_sample_backward_input_deterministic(const T* grad_output, const T* theta, acc_t<T>* grad_input,
                                                           I N, I C, I H, I W, I Ho, I Wo, int mode, int padding,
                                                           int align_corners) {
  typedef typename acc_type<T>::type A;
  const I out_plane = Ho * Wo;
  DEFORMCP_GRID_STRIDE_LOOP(I, plane, N * C) {
    const I n = plane / C;
    const T* gout = grad_output + plane * out_plane;
    A* gin = grad_input + plane * H * W;
    for (I hw = 0; hw < out_plane; ++hw) {
      A g[2], base[3];
      affine_location_2d(theta, n, hw / Wo, hw % Wo, Ho, Wo, align_corners, g, base);
      sample_2d_scatter(gin, H, W, g[0], g[1], (A)load_acc(gout[hw]), mode, padding, align_corners);
    }
  }
}

// output (N, C, Do, Ho, Wo) = input (N, C, D, H, W) sampled at theta's grid; one thread per output location.
template <typename T, typename I>
__global__ void affine_sample_3d_forward(const T* input, const T* theta, T* output, I N, I C, I D, I H, I W, I Do,
                                         I Ho, I Wo, int mode, int padding, int align_corners) {
  typedef typename acc_type<T>::type A;
  const I out_volume = Do * Ho * Wo;
  DEFORMCP_GRID_STRIDE_LOOP(I, p, N * out_volume) {
    const I n = p / out_volume, o = p % out_volume;
    A g[3], base[4];
    affine_location_3d(theta, n, o / (Ho * Wo), o / Wo % Ho, o % Wo, Do, Ho, Wo, align_corners, g, base);
    sample_3d(input + n * C * D * H * W, output + n * C * out_volume + o, C, D, H, W, out_volume, g, mode, padding,
              align_corners);
  }
}

// Gradients of affine_sample_3d_forward, as affine_sample_backward's: partial[(n · chunks + chunk) · 12 + 4 · r + k].
template <typename T, typename I>
__global__ void affine_sample_3d_backward(const T* grad_output, const T* input, const T* theta, acc_t<T>* grad_input,
                                          acc_t<T>* partial, I N, I C, I D, I H, I W, I Do, I Ho, I Wo, int mode,
                                          int padding, int align_corners) {
  typedef typename acc_type<T>::type A;
  const I out_volume = Do * Ho * Wo, in_volume = D * H * W;
  const I chunks = (out_volume + DEFORMCP_AFFINE_CHUNK - 1) / DEFORMCP_AFFINE_CHUNK;
  DEFORMCP_GRID_STRIDE_LOOP(I, q, N * chunks) {
    const I n = q / chunks, first = q % chunks * DEFORMCP_AFFINE_CHUNK;
    const I last = first + DEFORMCP_AFFINE_CHUNK < out_volume ? first + DEFORMCP_AFFINE_CHUNK : out_volume;
    // the chunk's sums stay in its own 12 entries of partial (in registers they would spill: 12 sums beside the
    // tricubic taps)
    A* sum = partial == nullptr ? (A*)nullptr : partial + 12 * q;
    for (int i = 0; sum != nullptr && i < 12; ++i) sum[i] = 0;
    for (I o = first; o < last; ++o) {
      A g[3], base[4], dg[3] = {0, 0, 0};
      affine_location_3d(theta, n, o / (Ho * Wo), o / Wo % Ho, o % Wo, Do, Ho, Wo, align_corners, g, base);
      sample_3d_backward(grad_output + n * C * out_volume + o, input + n * C * in_volume,
                         grad_input == nullptr ? (A*)nullptr : grad_input + n * C * in_volume, C, D, H, W, out_volume,
                         g, mode, padding, align_corners, sum == nullptr ? (A*)nullptr : dg);
      for (int r = 0; sum != nullptr && r < 3; ++r)
        for (int k = 0; k < 4; ++k) sum[4 * r + k] += dg[r] * base[k];
    }
  }
}

// grad_input of affine_sample_3d_forward, bitwise reproducible (one thread per input volume, plain stores).
template <typename T, typename I>
__global__ void affine_sample_3d_backward_input_deterministic(const T* grad_output, const T* theta,
                                                              acc_t<T>* grad_input, I N, I C, I D, I H, I W, I Do,
                                                              I Ho, I Wo, int mode, int padding, int align_corners) {
  typedef typename acc_type<T>::type A;
  const I out_volume = Do * Ho * Wo;
  DEFORMCP_GRID_STRIDE_LOOP(I, volume, N * C) {
    const I n = volume / C;
    const T* gout = grad_output + volume * out_volume;
    A* gin = grad_input + volume * D * H * W;
    for (I o = 0; o < out_volume; ++o) {
      A g[3], base[4];
      affine_location_3d(theta, n, o / (Ho * Wo), o / Wo % Ho, o % Wo, Do, Ho, Wo, align_corners, g, base);
      sample_3d_scatter(gin, D, H, W, g, (A)load_acc(gout[o]), mode, padding, align_corners);
    }
  }
}

// grad_theta[n, i] = Σ_chunk partial[(n · chunks + chunk) · size + i], in order (size: 6, or 12 for volumes).
template <typename T, typename I>
__global__ void affine_sample_theta(const acc_t<T>* partial, T* grad_theta, I N, I chunks, I size) {
  typedef typename acc_type<T>::type A;
  DEFORMCP_GRID_STRIDE_LOOP(I, q, N * size) {
    const I n = q / size, i = q % size;
    A sum = 0;
    for (I chunk = 0; chunk < chunks; ++chunk) sum += partial[(n * chunks + chunk) * size + i];
    grad_theta[q] = store_as<T>(sum);
  }
}
