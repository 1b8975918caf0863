// spatial_transformer.cu — affine grid generator and grid sampler (Jaderberg et al., NeurIPS 2015,
// https://arxiv.org/abs/1506.02025), forward and backward, with torch.nn.functional's conventions.
// Preceded by deformcp_common.cuh. Layouts (all C-contiguous):
//   theta (N, 2, 3); grid (N, Ho, Wo, 2) with last axis (x, y); input (N, C, H, W);
//   output (N, C, Ho, Wo).
// Bilinear samples are set up on [-1, H) × [-1, W) (closed_below: torch's derivative at exactly -1).

#define DEFORMCP_MODE_BILINEAR 0
#define DEFORMCP_MODE_NEAREST 1
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
    const A x = grid_source_coordinate(load_acc(grid[2 * p]), (long long)W, padding, align_corners, &unused);
    const A y = grid_source_coordinate(load_acc(grid[2 * p + 1]), (long long)H, padding, align_corners, &unused);
    const T* in = input + n * C * in_plane;
    T* out = output + n * C * out_plane + hw;
    if (mode == DEFORMCP_MODE_BILINEAR) {
      bilinear_corners<A, I> corners;
      const bool sampled = bilinear_setup(y, x, H, W, corners, true);
      for (I c = 0; c < C; ++c)
        out[c * out_plane] = store_as<T>(sampled ? bilinear_gather(in + c * in_plane, corners) : (A)0);
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
    const A x = grid_source_coordinate(load_acc(grid[2 * p]), (long long)W, padding, align_corners, &dx_dg);
    const A y = grid_source_coordinate(load_acc(grid[2 * p + 1]), (long long)H, padding, align_corners, &dy_dg);
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
      const A x = grid_source_coordinate(load_acc(grid[2 * p]), (long long)W, padding, align_corners, &unused);
      const A y = grid_source_coordinate(load_acc(grid[2 * p + 1]), (long long)H, padding, align_corners, &unused);
      const A g = load_acc(gout[hw]);
      if (mode == DEFORMCP_MODE_BILINEAR) {
        bilinear_corners<A, I> corners;
        if (bilinear_setup(y, x, H, W, corners, true)) bilinear_scatter(gin, corners, g, false);
      } else {
        const I pixel = nearest_pixel(y, x, H, W);
        if (pixel >= 0) gin[pixel] += g;
      }
    }
  }
}
