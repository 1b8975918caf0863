// deform_conv.cu — deformable convolution v1 and v2 (Dai et al., https://arxiv.org/abs/1703.06211; Zhu et
// al., https://arxiv.org/abs/1811.11168) as im2col / col2im kernels around a GEMM done by the caller, with
// torchvision.ops.deform_conv2d's conventions. Preceded by deformcp_common.cuh. Layouts (C-contiguous):
//   input (N, C, H, W); offset (N, 2·G·K, Ho, Wo), channel g·2K + 2k = Δy and + 1 = Δx of tap k = i·kw + j;
//   mask (N, G·K, Ho, Wo) or null (v1); input channel c belongs to offset group c / (C / G);
//   columns (C·K, n·Pc) in acc_t<T> (float32 for 16-bit T) for a chunk: images [n0, n0 + n_chunk) and, in each,
//   the output pixels [p0, p0 + Pc) (Pc = p_count; a range of whole output rows, or all P = Ho·Wo of them); row
//   c·K + k, column (image − n0)·Pc + p − p0. Tap k of output (ho, wo) samples y = ho·s_h − p_h + i·d_h + Δy
//   (x likewise) with the shared bilinear helper: zero unless −1 < y < H and −1 < x < W, corners outside the
//   image read zero. The caller picks I wide enough for the tap coordinates too ((Ho − 1)·s_h + p_h +
//   (kh − 1)·d_h and the x analogue), not only for the sizes.

// Geometry of a convolution and the chunk, passed as sizes.
#define DEFORM_CONV_SIZES I N, I C, I H, I W, I G, I kh, I kw, I Ho, I Wo, I n0, I n_chunk, I p0, I p_count, \
  I stride_h, I stride_w, I pad_h, I pad_w, I dil_h, I dil_w

// Sample position of tap k at output p of image n, and the mask value (1 without a mask).
template <typename A, typename T, typename I>
__device__ __forceinline__ void deform_tap(const T* offset, const T* mask, I n, I g, I k, I p, I G, I kw, I Ho,
                                          I Wo, I stride_h, I stride_w, I pad_h, I pad_w, I dil_h, I dil_w, I K,
                                          A* y, A* x, A* m) {
  const I P = Ho * Wo, ho = p / Wo, wo = p % Wo, i = k / kw, j = k % kw;
  const T* off = offset + ((n * G + g) * 2 * K + 2 * k) * P + p;
  *y = (A)(ho * stride_h - pad_h + i * dil_h) + load_acc(off[0]);
  *x = (A)(wo * stride_w - pad_w + j * dil_w) + load_acc(off[P]);
  *m = mask != nullptr ? (A)load_acc(mask[((n * G + g) * K + k) * P + p]) : (A)1;
}

// columns[c·K + k, (n − n0)·Pc + p − p0] = mask · input[n, c] sampled at tap k of output p.
template <typename T, typename I>
__global__ void deform_conv_im2col(const T* input, const T* offset, const T* mask, acc_t<T>* columns,
                                   DEFORM_CONV_SIZES) {
  typedef typename acc_type<T>::type A;
  const I K = kh * kw, cols = n_chunk * p_count;
  DEFORMCP_GRID_STRIDE_LOOP(I, index, C * cols) {
    const I q = index % p_count, n = n0 + index / p_count % n_chunk, c = index / cols, p = p0 + q;
    const I g = c / (C / G);
    const T* plane = input + (n * C + c) * H * W;
    for (I k = 0; k < K; ++k) {
      A y, x, m;
      deform_tap(offset, mask, n, g, k, p, G, kw, Ho, Wo, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, K, &y, &x,
                 &m);
      bilinear_corners<A, I> corners;
      const A v = bilinear_setup(y, x, H, W, corners) ? bilinear_gather(plane, corners) * m : (A)0;
      columns[(c * K + k) * cols + (n - n0) * p_count + q] = v;
    }
  }
}

// Scatter the column gradient of channel c, tap k, output p of image n back onto its input plane.
template <typename A, typename T, typename I>
__device__ __forceinline__ void deform_scatter_tap(const T* offset, const T* mask, const A* grad_columns,
                                                   A* plane, I n, I c, I k, I p, I K, I cols, bool atomic,
                                                   DEFORM_CONV_SIZES) {
  A y, x, m;
  deform_tap(offset, mask, n, c / (C / G), k, p, G, kw, Ho, Wo, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, K, &y,
             &x, &m);
  bilinear_corners<A, I> corners;
  if (bilinear_setup(y, x, H, W, corners))
    bilinear_scatter(plane, corners, grad_columns[(c * K + k) * cols + (n - n0) * p_count + p - p0] * m,
                     atomic);
}

// grad_input[n, c] += mask · grad_columns scattered back along the bilinear weights. grad_input (in acc_t<T>,
// like grad_columns) is zero-filled by the caller and accumulates over the chunks. deterministic = 0: one
// thread per (c, image, p), atomics; 1: one thread per input plane (n, c), visiting p in order and, for each,
// the taps k in order, with plain adds. The caller's chunks cover each image's outputs in increasing ranges
// of p, one chunk after another, so the adds into each pixel come in one order — the order of the unchunked
// call: bitwise reproducible, and the same whatever the workspace limit.
template <typename T, typename I>
__global__ void deform_conv_col2im(const T* offset, const T* mask, const acc_t<T>* grad_columns,
                                   acc_t<T>* grad_input, DEFORM_CONV_SIZES, int deterministic) {
  typedef typename acc_type<T>::type A;
  const I K = kh * kw, cols = n_chunk * p_count;
#define DEFORM_CONV_SIZE_ARGS N, C, H, W, G, kh, kw, Ho, Wo, n0, n_chunk, p0, p_count, stride_h, stride_w, pad_h, \
  pad_w, dil_h, dil_w
  if (!deterministic) {
    DEFORMCP_GRID_STRIDE_LOOP(I, index, C * cols) {
      const I p = p0 + index % p_count, n = n0 + index / p_count % n_chunk, c = index / cols;
      for (I k = 0; k < K; ++k)
        deform_scatter_tap<A>(offset, mask, grad_columns, grad_input + (n * C + c) * H * W, n, c, k, p, K, cols, true,
                              DEFORM_CONV_SIZE_ARGS);
    }
    return;
  }
  DEFORMCP_GRID_STRIDE_LOOP(I, index, n_chunk * C) {
    const I n = n0 + index / C, c = index % C;
    for (I p = p0; p < p0 + p_count; ++p)
      for (I k = 0; k < K; ++k)
        deform_scatter_tap<A>(offset, mask, grad_columns, grad_input + (n * C + c) * H * W, n, c, k, p, K, cols, false,
                              DEFORM_CONV_SIZE_ARGS);
  }
#undef DEFORM_CONV_SIZE_ARGS
}

// Gradients of the offsets and the mask: one thread per (image, offset group, tap, p), summing over the
// group's channels (deterministic, no atomics). The offset gradient is the derivative of the bilinear
// sample, taken from the right at integer coordinates, zero where the sample is zero (y ≤ −1, y ≥ H, ...);
// the mask gradient is the unmasked sample times the column gradient. Either output may be null.
template <typename T, typename I>
__global__ void deform_conv_col2im_coord(const T* input, const T* offset, const T* mask,
                                         const acc_t<T>* grad_columns, T* grad_offset, T* grad_mask,
                                         DEFORM_CONV_SIZES) {
  typedef typename acc_type<T>::type A;
  const I K = kh * kw, P = Ho * Wo, cols = n_chunk * p_count, group_channels = C / G;
  DEFORMCP_GRID_STRIDE_LOOP(I, index, n_chunk * G * K * p_count) {
    const I q = index % p_count, k = index / p_count % K, g = index / (p_count * K) % G;
    const I n = n0 + index / (p_count * K * G), p = p0 + q;
    A y, x, m;
    deform_tap(offset, mask, n, g, k, p, G, kw, Ho, Wo, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, K, &y, &x, &m);
    bilinear_corners<A, I> corners;
    A gy = 0, gx = 0, gm = 0;
    if (bilinear_setup(y, x, H, W, corners)) {
      for (I c = g * group_channels; c < (g + 1) * group_channels; ++c) {
        const T* plane = input + (n * C + c) * H * W;
        const A g_col = grad_columns[(c * K + k) * cols + (n - n0) * p_count + q];
        bilinear_coordinate_grad(plane, corners, g_col * m, &gy, &gx);
        gm += g_col * bilinear_gather(plane, corners);
      }
    }
    if (grad_offset != nullptr) {
      T* off = grad_offset + ((n * G + g) * 2 * K + 2 * k) * P + p;
      off[0] = store_as<T>(gy);
      off[P] = store_as<T>(gx);
    }
    if (grad_mask != nullptr) grad_mask[((n * G + g) * K + k) * P + p] = store_as<T>(gm);
  }
}
