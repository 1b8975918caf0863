// ms_deform_attn.cu — multi-scale deformable attention (Zhu et al., Deformable DETR, ICLR 2021,
// https://arxiv.org/abs/2010.04159), with RT-DETRv2's per-level point counts and nearest sampling and DCNv4's
// FlashDeformAttn (https://arxiv.org/abs/2401.06197: the softmax fused in), forward and backward.
// Preceded by deformcp_common.cuh. Layouts (all C-contiguous):
//   value (N, S, M, D), the levels concatenated along S, each row-major; output, grad_output (N, Lq, M, D);
//   levels (L, 4), long long rows (H_l, W_l, start_l, P_l);
//   a "head" h = (n·Lq + q)·M + m has T = ΣP_l points, level-major: point t's normalised (x, y) at
//   locations[h·loc_stride + 2t + {0, 1}] and its weight at weights[h·w_stride + w_offset + t] — separate arrays
//   (2T, T, 0) or flash_deform_attn's packed one (3T, 3T, 2T), where the weights are logits, soft-maxed over T
//   (fused). Bilinear sampling at pixel (x·W_l − 0.5, y·H_l − 0.5), zeros outside (closed_below: grid_sample's
//   derivative at exactly −1); nearest: pixel (⌊x·W_l + 0.5⌋, ⌊y·H_l + 0.5⌋) clamped per axis; pixel (DCNv3 and
//   DCNv4, deformcp/ops/dcn.py): bilinear at the locations as given, in pixels, zeros outside the open
//   (−1, H_l) × (−1, W_l), the location gradient in pixels.

#define DEFORMCP_MSDA_BILINEAR 0
#define DEFORMCP_MSDA_DISCRETE 1
#define DEFORMCP_MSDA_PIXEL 2

// The corners of point (x, y) over level (H, W) (indices within the level); false where it samples 0. Nearest
// sampling fills corner 0 only, with weight 1 and no coordinate derivative.
template <typename A, typename I>
__device__ __forceinline__ bool msda_setup(A x, A y, I H, I W, int method, bilinear_corners<A, I>& c) {
  if (method == DEFORMCP_MSDA_PIXEL) return bilinear_setup(y, x, H, W, c);
  if (method != DEFORMCP_MSDA_DISCRETE) return bilinear_setup(y * (A)H - (A)0.5, x * (A)W - (A)0.5, H, W, c, true);
  if (!(is_finite(x) && is_finite(y))) return false;
  A column = floor(x * (A)W + (A)0.5), row = floor(y * (A)H + (A)0.5);
  column = column < (A)0 ? (A)0 : (column > (A)(W - 1) ? (A)(W - 1) : column);
  row = row < (A)0 ? (A)0 : (row > (A)(H - 1) ? (A)(H - 1) : row);
  for (int k = 0; k < 4; ++k) {
    c.inside[k] = k == 0;
    c.index[k] = k == 0 ? (I)row * W + (I)column : 0;
    c.weight[k] = k == 0 ? (A)1 : (A)0;
    c.dweight_dy[k] = 0;
    c.dweight_dx[k] = 0;
  }
  return true;
}

// Softmax statistics of a head's T logits: their maximum and Σ exp(logit − maximum). A NaN or +inf logit makes
// the sum NaN, so every weight of the head is NaN; a −inf logit gets weight 0 (all −inf: NaN).
template <typename A, typename T, typename I>
__device__ __forceinline__ void msda_softmax_stats(const T* logits, I points, A* maximum, A* sum) {
  A top = load_acc(logits[0]);
  for (I t = 1; t < points; ++t) {
    const A v = load_acc(logits[t]);
    if (v > top) top = v;
  }
  A total = 0;
  for (I t = 0; t < points; ++t) total += exp(load_acc(logits[t]) - top);
  *maximum = top;
  *sum = total;
}

// The attention weights of one head, as given or soft-maxed (fused).
template <typename A, typename T, typename I>
struct msda_weights {
  const T* w;
  int fused;
  A maximum, sum;

  __device__ msda_weights(const T* head_weights, I points, int fused_softmax) : w(head_weights), fused(fused_softmax) {
    maximum = 0;
    sum = 1;
    if (fused) msda_softmax_stats(w, points, &maximum, &sum);
  }

  __device__ A operator[](I t) const {
    return fused ? exp(load_acc(w[t]) - maximum) / sum : (A)load_acc(w[t]);
  }
};

// value_grad[pixel · stride] += a_t · weight_k · g for every corner of one head's points (value_grad: pixel 0 of
// the head's channel in image n; pixels stride apart): atomically, or with plain adds where the calling thread
// alone writes this channel of this head (the deterministic backward).
template <typename A, typename T, typename I>
__device__ __forceinline__ void msda_scatter_head(A* value_grad, const long long* levels, const T* loc,
                                                  const msda_weights<A, T, I>& a, A g, I stride, I L, int method,
                                                  bool atomic) {
  I t = 0;
  for (I l = 0; l < L; ++l) {
    const I H = (I)levels[4 * l], W = (I)levels[4 * l + 1], start = (I)levels[4 * l + 2], P = (I)levels[4 * l + 3];
    A* plane = value_grad + start * stride;
    for (I p = 0; p < P; ++p, ++t) {
      bilinear_corners<A, I> c;
      if (!msda_setup(load_acc(loc[2 * t]), load_acc(loc[2 * t + 1]), H, W, method, c)) continue;
      const A ag = a[t] * g;
      for (int k = 0; k < 4; ++k) {
        if (!c.inside[k]) continue;
        if (atomic) atomic_add(plane + c.index[k] * stride, c.weight[k] * ag);
        else plane[c.index[k] * stride] += c.weight[k] * ag;
      }
    }
  }
}

// out[n, q, m, d] = Σ_t a_t · sample_t; one thread per output element.
template <typename T, typename I>
__global__ void ms_deform_attn_forward(const T* value, const long long* levels, const T* locations, const T* weights,
                                       T* output, I N, I S, I M, I D, I Lq, I L, I Tn, I loc_stride, I w_stride,
                                       I w_offset, int method, int fused) {
  typedef typename acc_type<T>::type A;
  DEFORMCP_GRID_STRIDE_LOOP(I, index, N * Lq * M * D) {
    const I d = index % D, head = index / D, m = head % M, n = head / (M * Lq);
    const T* loc = locations + head * loc_stride;
    const msda_weights<A, T, I> a(weights + head * w_stride + w_offset, Tn, fused);
    A total = 0;
    I t = 0;
    for (I l = 0; l < L; ++l) {
      const I H = (I)levels[4 * l], W = (I)levels[4 * l + 1], start = (I)levels[4 * l + 2], P = (I)levels[4 * l + 3];
      const T* plane = value + ((n * S + start) * M + m) * D + d;  // pixel i of the level at plane[i·M·D]
      for (I p = 0; p < P; ++p, ++t) {
        bilinear_corners<A, I> c;
        A sample = 0;
        if (msda_setup(load_acc(loc[2 * t]), load_acc(loc[2 * t + 1]), H, W, method, c))
          for (int k = 0; k < 4; ++k)
            if (c.inside[k]) sample += c.weight[k] * (A)load_acc(plane[c.index[k] * M * D]);
        total += a[t] * sample;
      }
    }
    output[index] = store_as<T>(total);
  }
}

// grad_value (acc_t<T>, zero-filled by the caller) += a_t · weight_k · g for every corner: one thread per
// element of grad_output, scatter-added with atomics.
template <typename T, typename I>
__global__ void ms_deform_attn_backward_value(const T* grad_output, const long long* levels, const T* locations,
                                              const T* weights, acc_t<T>* grad_value, I N, I S, I M, I D, I Lq, I L,
                                              I Tn, I loc_stride, I w_stride, I w_offset, int method, int fused) {
  typedef typename acc_type<T>::type A;
  DEFORMCP_GRID_STRIDE_LOOP(I, index, N * Lq * M * D) {
    const I d = index % D, head = index / D, m = head % M, n = head / (M * Lq);
    const T* loc = locations + head * loc_stride;
    const msda_weights<A, T, I> a(weights + head * w_stride + w_offset, Tn, fused);
    msda_scatter_head(grad_value + (n * S * M + m) * D + d, levels, loc, a, (A)load_acc(grad_output[index]), M * D, L,
                      method, true);
  }
}

// grad_value of ms_deform_attn_backward_value, bitwise reproducible: one thread per (n, m, d) visits the queries
// and points of image n in order and adds with plain stores. grad_value (acc_t<T>) is zero-filled by the caller.
template <typename T, typename I>
__global__ void ms_deform_attn_backward_value_deterministic(const T* grad_output, const long long* levels,
                                                            const T* locations, const T* weights,
                                                            acc_t<T>* grad_value, I N, I S, I M, I D, I Lq, I L,
                                                            I Tn, I loc_stride, I w_stride, I w_offset, int method,
                                                            int fused) {
  typedef typename acc_type<T>::type A;
  DEFORMCP_GRID_STRIDE_LOOP(I, index, N * M * D) {
    const I d = index % D, m = (index / D) % M, n = index / (M * D);
    for (I q = 0; q < Lq; ++q) {
      const I head = (n * Lq + q) * M + m;
      const T* loc = locations + head * loc_stride;
      const msda_weights<A, T, I> a(weights + head * w_stride + w_offset, Tn, fused);
      msda_scatter_head(grad_value + (n * S * M + m) * D + d, levels, loc, a, (A)load_acc(grad_output[head * D + d]),
                        M * D, L, method, false);
    }
  }
}

// Per point: the gradient with respect to its location (a_t · d sample / d(x, y), written in the location
// array's layout; 0 for nearest sampling) and with respect to its attention weight (the sample dotted with the
// output gradient, into grad_weights (N, Lq, M, T) in acc_t<T>: for the fused softmax, the gradient with respect
// to the soft-maxed weight). One thread per point; either pointer may be null.
template <typename T, typename I>
__global__ void ms_deform_attn_backward_sampling(const T* grad_output, const T* value, const long long* levels,
                                                 const T* locations, const T* weights, T* grad_locations,
                                                 acc_t<T>* grad_weights, I N, I S, I M, I D, I Lq, I L, I Tn,
                                                 I loc_stride, I w_stride, I w_offset, int method, int fused) {
  typedef typename acc_type<T>::type A;
  DEFORMCP_GRID_STRIDE_LOOP(I, index, N * Lq * M * Tn) {
    const I t = index % Tn, head = index / Tn, m = head % M, n = head / (M * Lq);
    I l = 0, first = 0;  // the point's level, and the level's first point
    while (first + (I)levels[4 * l + 3] <= t) first += (I)levels[4 * l++ + 3];
    const I H = (I)levels[4 * l], W = (I)levels[4 * l + 1], start = (I)levels[4 * l + 2];
    const T* loc = locations + head * loc_stride;
    const msda_weights<A, T, I> a(weights + head * w_stride + w_offset, Tn, fused);
    A dot = 0, gx = 0, gy = 0;
    bilinear_corners<A, I> c;
    if (msda_setup(load_acc(loc[2 * t]), load_acc(loc[2 * t + 1]), H, W, method, c)) {
      const T* gout = grad_output + head * D;
      const T* plane = value + ((n * S + start) * M + m) * D;
      for (int k = 0; k < 4; ++k) {
        if (!c.inside[k]) continue;
        const T* pixel = plane + c.index[k] * M * D;
        A corner_dot = 0;
        for (I d = 0; d < D; ++d) corner_dot += (A)load_acc(pixel[d]) * (A)load_acc(gout[d]);
        dot += c.weight[k] * corner_dot;
        gx += c.dweight_dx[k] * corner_dot;
        gy += c.dweight_dy[k] * corner_dot;
      }
    }
    if (grad_weights != nullptr) grad_weights[index] = dot;
    if (grad_locations != nullptr) {  // nearest sampling does not move with the location: 0, whatever a_t is
      const bool moves = method != DEFORMCP_MSDA_DISCRETE, pixels = method == DEFORMCP_MSDA_PIXEL;
      T* gloc = grad_locations + head * loc_stride + 2 * t;
      gloc[0] = store_as<T>(moves ? a[t] * gx * (pixels ? (A)1 : (A)W) : (A)0);
      gloc[1] = store_as<T>(moves ? a[t] * gy * (pixels ? (A)1 : (A)H) : (A)0);
    }
  }
}

// flash_deform_attn: the logits' gradient from the soft-maxed weights' (grad_weights, acc_t<T>), a ⊙ (g − Σ a·g),
// into the packed gradient's logit slots. One thread per head.
template <typename T, typename I>
__global__ void flash_deform_attn_backward_softmax(const long long* levels, const T* locations,
                                                   const acc_t<T>* grad_weights, T* grad_locations, I N, I S, I M,
                                                   I D, I Lq, I L, I Tn, I loc_stride, I w_stride, I w_offset,
                                                   int method, int fused) {
  typedef typename acc_type<T>::type A;
  DEFORMCP_GRID_STRIDE_LOOP(I, head, N * Lq * M) {
    const msda_weights<A, T, I> a(locations + head * w_stride + w_offset, Tn, 1);
    const acc_t<T>* g = grad_weights + head * Tn;
    A weighted = 0;
    for (I t = 0; t < Tn; ++t) weighted += a[t] * g[t];
    T* out = grad_locations + head * w_stride + w_offset;
    for (I t = 0; t < Tn; ++t) out[t] = store_as<T>(a[t] * (g[t] - weighted));
  }
}
