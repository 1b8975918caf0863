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

// The 4×4 taps of a bicubic sample: row[j] and column[i] (-1: reads 0), weights wy[j] · wx[i], and the weights'
// derivatives with respect to y and x.
template <typename A, typename I>
struct cubic_taps {
  I row[4], column[4];
  A wy[4], wx[4], dwy[4], dwx[4];
};

// Sets up the bicubic sample at the unpadded pixel coordinate (y, x); false where it reads 0 (a NaN coordinate,
// or ±inf but with border padding, where a coordinate beyond the taps' reach reads the border pixels).
template <typename A, typename I>
__device__ __forceinline__ bool cubic_setup(A y, A x, I H, I W, int padding, int align_corners,
                                            cubic_taps<A, I>& c) {
  if (padding == DEFORMCP_PADDING_BORDER) {  // NaN stays NaN
    x = x < (A)-2 ? (A)-2 : (x > (A)(W + 1) ? (A)(W + 1) : x);
    y = y < (A)-2 ? (A)-2 : (y > (A)(H + 1) ? (A)(H + 1) : y);
  }
  if (!(is_finite(x) && is_finite(y))) return false;
  const A fx = floor(x), fy = floor(y);
  cubic_weights(x - fx, c.wx, c.dwx);
  cubic_weights(y - fy, c.wy, c.dwy);
  for (int i = 0; i < 4; ++i) {
    c.column[i] = cubic_tap(fx + (A)(i - 1), W, padding, align_corners);
    c.row[i] = cubic_tap(fy + (A)(i - 1), H, padding, align_corners);
  }
  return true;
}

// Σ_j wy[j] · Σ_i wx[i] · plane[row[j], column[i]] over the taps that read the plane (torch's order)
template <typename A, typename T, typename I>
__device__ __forceinline__ A cubic_gather(const T* plane, I W, const cubic_taps<A, I>& c) {
  A v = 0;
  for (int j = 0; j < 4; ++j) {
    A along_row = 0;
    for (int i = 0; i < 4; ++i)
      if (c.row[j] >= 0 && c.column[i] >= 0) along_row += c.wx[i] * (A)load_acc(plane[c.row[j] * W + c.column[i]]);
    v += c.wy[j] * along_row;
  }
  return v;
}

// plane[row[j], column[i]] += wx[i] · wy[j] · g for the taps that read the plane: atomically, or with a plain add
// where the calling thread alone writes this plane
template <typename A, typename I>
__device__ __forceinline__ void cubic_scatter(A* plane, I W, const cubic_taps<A, I>& c, A g, bool atomic = true) {
  for (int j = 0; j < 4; ++j)
    for (int i = 0; i < 4; ++i) {
      if (c.row[j] < 0 || c.column[i] < 0) continue;
      A* at = plane + c.row[j] * W + c.column[i];
      if (atomic) atomic_add(at, g * c.wx[i] * c.wy[j]);
      else *at += g * c.wx[i] * c.wy[j];
    }
}

// d/dy and d/dx of the bicubic sample, accumulated into *gy and *gx (scaled by g)
template <typename A, typename T, typename I>
__device__ __forceinline__ void cubic_coordinate_grad(const T* plane, I W, const cubic_taps<A, I>& c, A g, A* gy,
                                                      A* gx) {
  for (int j = 0; j < 4; ++j)
    for (int i = 0; i < 4; ++i) {
      if (c.row[j] < 0 || c.column[i] < 0) continue;
      const A v = (A)load_acc(plane[c.row[j] * W + c.column[i]]) * g;
      *gx += v * c.dwx[i] * c.wy[j];
      *gy += v * c.wx[i] * c.dwy[j];
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

// output[n, c, ho, wo] = input[n, c] sampled at grid[n, ho, wo]; one thread per output location.
template <typename T, typename I>
__global__ void grid_sample_forward(const T* input, const T* grid, T* output, I N, I C, I H, I W, I Ho,
                                    I Wo, int mode, int padding, int align_corners) {
  typedef typename acc_type<T>::type A;
  const I out_plane = Ho * Wo, in_plane = H * W;
  DEFORMCP_GRID_STRIDE_LOOP(I, p, N * out_plane) {
    const I n = p / out_plane, hw = p % out_plane;
    A unused;
    const A x = mode_source_coordinate(load_acc(grid[2 * p]), (long long)W, mode, padding, align_corners, &unused);
    const A y = mode_source_coordinate(load_acc(grid[2 * p + 1]), (long long)H, mode, padding, align_corners,
                                       &unused);
    const T* in = input + n * C * in_plane;
    T* out = output + n * C * out_plane + hw;
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
    const I n = p / out_plane, hw = p % out_plane;
    A dx_dg, dy_dg;
    const A x = mode_source_coordinate(load_acc(grid[2 * p]), (long long)W, mode, padding, align_corners, &dx_dg);
    const A y = mode_source_coordinate(load_acc(grid[2 * p + 1]), (long long)H, mode, padding, align_corners,
                                       &dy_dg);
    const T* in = input + n * C * in_plane;
    const T* gout = grad_output + n * C * out_plane + hw;
    A gx = 0, gy = 0;
    if (mode == DEFORMCP_MODE_BILINEAR) {
      bilinear_corners<A, I> corners;
      if (bilinear_setup(y, x, H, W, corners, true)) {
        for (I c = 0; c < C; ++c) {
          const A g = load_acc(gout[c * out_plane]);
          if (grad_input != nullptr) bilinear_scatter(grad_input + (n * C + c) * in_plane, corners, g);
          if (grad_grid != nullptr) bilinear_coordinate_grad(in + c * in_plane, corners, g, &gy, &gx);
        }
      }
    } else if (mode == DEFORMCP_MODE_BICUBIC) {
      cubic_taps<A, I> taps;
      if (cubic_setup(y, x, H, W, padding, align_corners, taps)) {
        for (I c = 0; c < C; ++c) {
          const A g = load_acc(gout[c * out_plane]);
          if (grad_input != nullptr) cubic_scatter(grad_input + (n * C + c) * in_plane, W, taps, g);
          if (grad_grid != nullptr) cubic_coordinate_grad(in + c * in_plane, W, taps, g, &gy, &gx);
        }
      }
    } else if (grad_input != nullptr) {
      const I pixel = nearest_pixel(y, x, H, W);
      if (pixel >= 0)
        for (I c = 0; c < C; ++c)
          atomic_add(grad_input + (n * C + c) * in_plane + pixel, load_acc(gout[c * out_plane]));
    }
    if (grad_grid != nullptr) {
      grad_grid[2 * p] = store_as<T>(gx * dx_dg);
      grad_grid[2 * p + 1] = store_as<T>(gy * dy_dg);
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
      A unused;
      const A x = mode_source_coordinate(load_acc(grid[2 * p]), (long long)W, mode, padding, align_corners,
                                         &unused);
      const A y = mode_source_coordinate(load_acc(grid[2 * p + 1]), (long long)H, mode, padding, align_corners,
                                         &unused);
      const A g = load_acc(gout[hw]);
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
  }
}

// ---- volumes: theta (N, 3, 4); grid (N, Do, Ho, Wo, 3) with last axis (x, y, z); input (N, C, D, H, W);
// output (N, C, Do, Ho, Wo). Trilinear samples follow the bilinear rule along each axis (set up on [-1, size)).

// The eight corners of a trilinear sample, in torch's order: (z0, y0, x0), (z0, y0, x1), (z0, y1, x0), …, (z1, y1, x1)
// (corner k: z0 + (k >> 2), y0 + (k >> 1 & 1), x0 + (k & 1)); the fields are 0 where the corner is outside.
template <typename A, typename I>
struct trilinear_corners {
  bool inside[8];
  I index[8];  // (z · H + y) · W + x
  A weight[8], dweight_dz[8], dweight_dy[8], dweight_dx[8];
};

template <typename A, typename I>
__device__ __forceinline__ bool trilinear_setup(A z, A y, A x, I D, I H, I W, trilinear_corners<A, I>& c) {
  if (!(z >= (A)-1 && y >= (A)-1 && x >= (A)-1 && z < (A)D && y < (A)H && x < (A)W)) return false;
  const A fz = floor(z), fy = floor(y), fx = floor(x);
  const I z0 = (I)fz, y0 = (I)fy, x0 = (I)fx;
  const A l[3] = {z - fz, y - fy, x - fx};     // upper corner's weight along z, y, x
  for (int k = 0; k < 8; ++k) {
    const int bit[3] = {k >> 2, k >> 1 & 1, k & 1};
    const I cz = z0 + bit[0], cy = y0 + bit[1], cx = x0 + bit[2];
    A w[3], dw[3];
    for (int a = 0; a < 3; ++a) { w[a] = bit[a] ? l[a] : (A)1 - l[a]; dw[a] = bit[a] ? (A)1 : (A)-1; }
    const bool inside = cz >= 0 && cz < D && cy >= 0 && cy < H && cx >= 0 && cx < W;
    c.inside[k] = inside;
    c.index[k] = inside ? (cz * H + cy) * W + cx : 0;
    c.weight[k] = inside ? w[0] * w[1] * w[2] : (A)0;
    c.dweight_dz[k] = inside ? dw[0] * w[1] * w[2] : (A)0;
    c.dweight_dy[k] = inside ? w[0] * dw[1] * w[2] : (A)0;
    c.dweight_dx[k] = inside ? w[0] * w[1] * dw[2] : (A)0;
  }
  return true;
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

// The sample's source coordinates (x, y, z) of grid point p, after the padding mode, and their derivatives.
template <typename T, typename A, typename I>
__device__ __forceinline__ void volume_source(const T* grid, I p, I D, I H, I W, int padding, int align_corners,
                                              A* s, A* ds) {
  const I size[3] = {W, H, D};
  for (int a = 0; a < 3; ++a)
    s[a] = grid_source_coordinate(load_acc(grid[3 * p + a]), (long long)size[a], padding, align_corners, ds + a);
}

// output[n, c, do, ho, wo] = input[n, c] sampled at grid[n, do, ho, wo]; one thread per output location.
template <typename T, typename I>
__global__ void grid_sample_3d_forward(const T* input, const T* grid, T* output, I N, I C, I D, I H, I W, I Do,
                                       I Ho, I Wo, int mode, int padding, int align_corners) {
  typedef typename acc_type<T>::type A;
  const I out_volume = Do * Ho * Wo, in_volume = D * H * W;
  DEFORMCP_GRID_STRIDE_LOOP(I, p, N * out_volume) {
    const I n = p / out_volume;
    A s[3], unused[3];
    volume_source(grid, p, D, H, W, padding, align_corners, s, unused);
    const T* in = input + n * C * in_volume;
    T* out = output + n * C * out_volume + p % out_volume;
    if (mode == DEFORMCP_MODE_BILINEAR) {
      trilinear_corners<A, I> c;
      const bool sampled = trilinear_setup(s[2], s[1], s[0], D, H, W, c);
      for (I ch = 0; ch < C; ++ch) {
        A v = 0;
        for (int k = 0; sampled && k < 8; ++k)
          if (c.inside[k]) v += c.weight[k] * (A)load_acc(in[ch * in_volume + c.index[k]]);
        out[ch * out_volume] = store_as<T>(v);
      }
    } else {
      const I voxel = nearest_voxel(s[2], s[1], s[0], D, H, W);
      for (I ch = 0; ch < C; ++ch)
        out[ch * out_volume] = voxel >= 0 ? in[ch * in_volume + voxel] : store_as<T>((A)0);
    }
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
    A s[3], ds[3];
    volume_source(grid, p, D, H, W, padding, align_corners, s, ds);
    const T* in = input + n * C * in_volume;
    const T* gout = grad_output + n * C * out_volume + p % out_volume;
    A gz = 0, gy = 0, gx = 0;
    if (mode == DEFORMCP_MODE_BILINEAR) {
      trilinear_corners<A, I> c;
      if (trilinear_setup(s[2], s[1], s[0], D, H, W, c)) {
        for (I ch = 0; ch < C; ++ch) {
          const A g = load_acc(gout[ch * out_volume]);
          for (int k = 0; k < 8; ++k) {
            if (!c.inside[k]) continue;
            if (grad_input != nullptr) atomic_add(grad_input + (n * C + ch) * in_volume + c.index[k], c.weight[k] * g);
            if (grad_grid != nullptr) {
              const A v = (A)load_acc(in[ch * in_volume + c.index[k]]) * g;
              gz += c.dweight_dz[k] * v;
              gy += c.dweight_dy[k] * v;
              gx += c.dweight_dx[k] * v;
            }
          }
        }
      }
    } else if (grad_input != nullptr) {
      const I voxel = nearest_voxel(s[2], s[1], s[0], D, H, W);
      if (voxel >= 0)
        for (I ch = 0; ch < C; ++ch)
          atomic_add(grad_input + (n * C + ch) * in_volume + voxel, load_acc(gout[ch * out_volume]));
    }
    if (grad_grid != nullptr) {
      grad_grid[3 * p] = store_as<T>(gx * ds[0]);
      grad_grid[3 * p + 1] = store_as<T>(gy * ds[1]);
      grad_grid[3 * p + 2] = store_as<T>(gz * ds[2]);
    }
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
      A s[3], unused[3];
      volume_source(grid, n * out_volume + o, D, H, W, padding, align_corners, s, unused);
      const A g = load_acc(gout[o]);
      if (mode == DEFORMCP_MODE_BILINEAR) {
        trilinear_corners<A, I> c;
        if (trilinear_setup(s[2], s[1], s[0], D, H, W, c))
          for (int k = 0; k < 8; ++k)
            if (c.inside[k]) gin[c.index[k]] += c.weight[k] * g;
      } else {
        const I voxel = nearest_voxel(s[2], s[1], s[0], D, H, W);
        if (voxel >= 0) gin[voxel] += g;
      }
    }
  }
}
