// roi_align.cu — RoI pooling by bilinear sampling: RoIAlign (He et al., "Mask R-CNN", ICCV 2017,
// https://arxiv.org/abs/1703.06870) and its position-sensitive form, with torchvision's conventions
// (average pooling) and mmcv's (max pooling); and deformable RoI pooling (Dai et al., Deformable ConvNets,
// https://arxiv.org/abs/1703.06211; modulated: Zhu et al., https://arxiv.org/abs/1811.11168) with mmcv's.
// Forward and backward. Preceded by deformcp_common.cuh. Layouts (all C-contiguous):
//   input (N, C, H, W); boxes (K, 5) = [batch_index, x1, y1, x2, y2] in input-image coordinates;
//   output (K, C_out, PH, PW), C_out = C (plain) or C / (PH · PW) (position-sensitive: output channel c
//   of bin (ph, pw) reads input channel (c · PH + ph) · PW + pw); deformable RoI pooling: offset (K, 2, PH, PW)
//   with channel 0 = Δx and 1 = Δy (in units of γ · RoI size), mask (K, 1, PH, PW) multiplying the output.

#define DEFORMCP_POOL_AVG 0
#define DEFORMCP_POOL_MAX 1

// The sampling grid of one RoI, in input pixels.
template <typename A>
struct roi_grid {
  A start_y, start_x;  // top-left corner of bin (0, 0)
  A roi_h, roi_w;      // RoI size (after the legacy 1×1 minimum)
  A bin_h, bin_w;      // bin size
  A samples_y, samples_x;  // samples per bin along each axis: sampling_ratio, or ceil(bin size); < 1 means none
  A count;             // divisor of the average: max(samples_y · samples_x, 1)
  bool finite;         // false when a coordinate is NaN or ±inf: the RoI pools to 0 and gets no gradient
};

template <typename A, typename T>
__device__ __forceinline__ roi_grid<A> roi_geometry(const T* box, A scale, long long PH, long long PW,
                                                    int sampling_ratio, int aligned) {
  roi_grid<A> g;
  const A offset = aligned ? (A)0.5 : (A)0;
  g.start_x = load_acc(box[1]) * scale - offset;
  g.start_y = load_acc(box[2]) * scale - offset;
  A roi_w = load_acc(box[3]) * scale - offset - g.start_x;
  A roi_h = load_acc(box[4]) * scale - offset - g.start_y;
  g.finite = is_finite(g.start_x) && is_finite(g.start_y) && is_finite(roi_w) && is_finite(roi_h);
  if (!aligned) {  // legacy behaviour: a RoI is at least 1×1
    roi_w = roi_w > (A)1 ? roi_w : (A)1;
    roi_h = roi_h > (A)1 ? roi_h : (A)1;
  }
  g.roi_h = roi_h;
  g.roi_w = roi_w;
  g.bin_h = roi_h / (A)PH;
  g.bin_w = roi_w / (A)PW;
  g.samples_y = sampling_ratio > 0 ? (A)sampling_ratio : ceil(roi_h / (A)PH);
  g.samples_x = sampling_ratio > 0 ? (A)sampling_ratio : ceil(roi_w / (A)PW);
  const A count = g.samples_y * g.samples_x;
  g.count = count > (A)1 ? count : (A)1;
  return g;
}

// The samples i in [0, n) of one axis sit at start + (i + 0.5) · step. Only those landing in [-1, size]
// can be non-zero; [*first, *end) covers all of them (with a margin of one), so that a huge RoI costs
// no more than the image it overlaps. Samples outside the span are exactly zero. Both ends are clamped to
// SAMPLE_INDEX_MAX in floating point before they become integers (a RoI 10^19 samples wide would overflow
// long long): samples past it along an axis are not visited.
#define SAMPLE_INDEX_MAX 4611686018427387904.0  // 2^62, exact in float and double
template <typename A>
__device__ __forceinline__ void sample_span(A start, A step, A n, long long size, long long* first,
                                            long long* end) {
  A lo = 0, hi = n >= (A)1 ? n : (A)0;
  if (step != (A)0 && hi > (A)0) {
    A a = ((A)-1 - start) / step - (A)0.5, b = ((A)size - start) / step - (A)0.5;
    if (step < (A)0) { const A t = a; a = b; b = t; }
    lo = floor(a) - 1;
    lo = lo > (A)0 ? lo : (A)0;
    A top = floor(b) + 2;
    hi = top < hi ? top : hi;
    hi = hi > lo ? hi : lo;
  }
  lo = lo < (A)SAMPLE_INDEX_MAX ? lo : (A)SAMPLE_INDEX_MAX;
  hi = hi < (A)SAMPLE_INDEX_MAX ? hi : (A)SAMPLE_INDEX_MAX;
  *first = (long long)lo;
  *end = (long long)hi;
}

// RoIAlign's read of one sample (torchvision's bilinear_interpolate): zero outside [-1, H] × [-1, W]
// (NaN included); inside, coordinates below 0 read row/column 0 and those at or past H - 1 (W - 1)
// read the last row (column). Then the shared bilinear helper.
template <typename A, typename I>
__device__ __forceinline__ bool roi_sample(A y, A x, I H, I W, bilinear_corners<A, I>& c) {
  if (!(y >= (A)-1 && y <= (A)H && x >= (A)-1 && x <= (A)W)) return false;
  y = y <= (A)0 ? (A)0 : (y >= (A)(H - 1) ? (A)(H - 1) : y);
  x = x <= (A)0 ? (A)0 : (x >= (A)(W - 1) ? (A)(W - 1) : x);
  return bilinear_setup(y, x, H, W, c);
}

// Accumulate g · ∂(roi_sample value)/∂y and ∂x into *gy, *gx: the bilinear derivative (from the right at
// integers) where the coordinate passes through, 0 where roi_sample clamps it (y ≤ 0, y ≥ H − 1) or zeroes it.
template <typename A, typename T, typename I>
__device__ __forceinline__ void roi_sample_coordinate_grad(const T* plane, A y, A x, I H, I W, A g, A* gy, A* gx) {
  if (!(y >= (A)-1 && y <= (A)H && x >= (A)-1 && x <= (A)W)) return;
  const bool free_y = y > (A)0 && y < (A)(H - 1), free_x = x > (A)0 && x < (A)(W - 1);
  bilinear_corners<A, I> c;
  if (!roi_sample(y, x, H, W, c)) return;
  A ty = 0, tx = 0;
  bilinear_coordinate_grad(plane, c, g, &ty, &tx);
  if (free_y) *gy += ty;
  if (free_x) *gx += tx;
}

// Max pooling's order: a larger value wins, NaN beats any number, ties go to the earlier sample.
template <typename A>
__device__ __forceinline__ bool beats(A value, A best) {
  return value > best || (value != value && best == best);
}

// One output bin (ph, pw) of RoI grid g over an H×W plane: the pooled value and, for max pooling, the
// winning sample (has_winner is false when it lies outside the image: it has no gradient).
template <typename A>
struct pooled_bin {
  A value;
  bool has_winner;
  A y, x;  // the winner's coordinates
};

template <typename A, typename T, typename I>
__device__ pooled_bin<A> pool_bin(const T* plane, const roi_grid<A>& g, I ph, I pw, I H, I W, int pool_mode) {
  pooled_bin<A> r;
  r.value = 0;
  r.has_winner = false;
  r.y = r.x = 0;
  if (!g.finite) return r;
  const A y_start = g.start_y + (A)ph * g.bin_h, x_start = g.start_x + (A)pw * g.bin_w;
  long long y0, y1, x0, x1;
  sample_span(y_start, g.bin_h / g.samples_y, g.samples_y, (long long)H, &y0, &y1);
  sample_span(x_start, g.bin_w / g.samples_x, g.samples_x, (long long)W, &x0, &x1);
  A sum = 0, best = 0;
  double best_order = -1;  // position of the best sample in (iy, ix) order; -1: none yet
  for (long long iy = y0; iy < y1; ++iy) {
    const A y = y_start + ((A)iy + (A)0.5) * g.bin_h / g.samples_y;
    for (long long ix = x0; ix < x1; ++ix) {
      const A x = x_start + ((A)ix + (A)0.5) * g.bin_w / g.samples_x;
      bilinear_corners<A, I> c;
      const A v = roi_sample(y, x, H, W, c) ? bilinear_gather(plane, c) : (A)0;
      sum += v;
      if (pool_mode == DEFORMCP_POOL_MAX && (best_order < 0 || beats(v, best))) {
        best = v;
        best_order = (double)iy * (double)g.samples_x + (double)ix;
        r.y = y;
        r.x = x;
      }
    }
  }
  if (pool_mode == DEFORMCP_POOL_AVG) {
    r.value = sum / g.count;
    return r;
  }
  if (!(g.samples_y >= (A)1 && g.samples_x >= (A)1)) return r;  // an empty bin pools to 0
  // samples outside the spans are zeros; the first of them in (iy, ix) order competes too
  double zero_order = -1;
  if (y0 > 0 || x0 > 0 || y1 == y0 || x1 == x0) zero_order = 0;
  else if ((A)x1 < g.samples_x) zero_order = (double)x1;
  else if ((A)y1 < g.samples_y) zero_order = (double)y1 * (double)g.samples_x;
  const bool zero_wins = zero_order >= 0 &&
      (best_order < 0 || beats((A)0, best) || (best == (A)0 && zero_order < best_order));
  r.value = zero_wins ? (A)0 : best;
  r.has_winner = !zero_wins;
  return r;
}

// Gradient of one bin: scatter g over its samples (average) or onto its winner (max).
template <typename A, typename T, typename I>
__device__ void pool_bin_backward(const T* plane, A* grad_plane, const roi_grid<A>& g, I ph, I pw, I H, I W,
                                  int pool_mode, A grad, bool atomic) {
  if (!g.finite) return;
  bilinear_corners<A, I> c;
  if (pool_mode == DEFORMCP_POOL_MAX) {
    const pooled_bin<A> r = pool_bin(plane, g, ph, pw, H, W, pool_mode);
    if (r.has_winner && roi_sample(r.y, r.x, H, W, c)) bilinear_scatter(grad_plane, c, grad, atomic);
    return;
  }
  const A y_start = g.start_y + (A)ph * g.bin_h, x_start = g.start_x + (A)pw * g.bin_w;
  const A share = grad / g.count;
  long long y0, y1, x0, x1;
  sample_span(y_start, g.bin_h / g.samples_y, g.samples_y, (long long)H, &y0, &y1);
  sample_span(x_start, g.bin_w / g.samples_x, g.samples_x, (long long)W, &x0, &x1);
  for (long long iy = y0; iy < y1; ++iy) {
    const A y = y_start + ((A)iy + (A)0.5) * g.bin_h / g.samples_y;
    for (long long ix = x0; ix < x1; ++ix) {
      const A x = x_start + ((A)ix + (A)0.5) * g.bin_w / g.samples_x;
      if (roi_sample(y, x, H, W, c)) bilinear_scatter(grad_plane, c, share, atomic);
    }
  }
}

// output[k, c, ph, pw]: one thread per output element.
template <typename T, typename I>
__global__ void roi_align_forward(const T* input, const T* boxes, T* output, I K, I C, I H, I W, I C_out, I PH,
                                  I PW, int sampling_ratio, int aligned, int pool_mode, int position_sensitive,
                                  double spatial_scale) {
  typedef typename acc_type<T>::type A;
  DEFORMCP_GRID_STRIDE_LOOP(I, index, K * C_out * PH * PW) {
    const I pw = index % PW, ph = index / PW % PH, c = index / (PW * PH) % C_out, k = index / (PW * PH * C_out);
    const T* box = boxes + 5 * k;
    const I n = (I)load_acc(box[0]);
    const I c_in = position_sensitive ? (c * PH + ph) * PW + pw : c;
    const roi_grid<A> g = roi_geometry<A>(box, (A)spatial_scale, (long long)PH, (long long)PW, sampling_ratio,
                                          aligned);
    output[index] = store_as<T>(pool_bin(input + (n * C + c_in) * H * W, g, ph, pw, H, W, pool_mode).value);
  }
}

// grad_input (N, C, H, W) in acc_t<T>, zero-filled by the caller. deterministic = 0: one thread per output element,
// scatter-adding with atomics. deterministic = 1: one thread per input plane (n, c), visiting the bins
// that read it in a fixed order with plain adds — bitwise reproducible.
template <typename T, typename I>
__global__ void roi_align_backward(const T* grad_output, const T* input, const T* boxes, acc_t<T>* grad_input,
                                   I N, I K, I C, I H, I W, I C_out, I PH, I PW, int sampling_ratio, int aligned,
                                   int pool_mode, int position_sensitive, int deterministic, double spatial_scale) {
  typedef typename acc_type<T>::type A;
  const I plane_size = H * W;
  if (!deterministic) {
    DEFORMCP_GRID_STRIDE_LOOP(I, index, K * C_out * PH * PW) {
      const I pw = index % PW, ph = index / PW % PH, c = index / (PW * PH) % C_out, k = index / (PW * PH * C_out);
      const T* box = boxes + 5 * k;
      const I plane = (I)load_acc(box[0]) * C + (position_sensitive ? (c * PH + ph) * PW + pw : c);
      const roi_grid<A> g = roi_geometry<A>(box, (A)spatial_scale, (long long)PH, (long long)PW, sampling_ratio,
                                            aligned);
      pool_bin_backward(input + plane * plane_size, grad_input + plane * plane_size, g, ph, pw, H, W, pool_mode,
                        (A)load_acc(grad_output[index]), true);
    }
    return;
  }
  DEFORMCP_GRID_STRIDE_LOOP(I, plane, N * C) {
    const I n = plane / C, c_in = plane % C;
    // the bins that read channel c_in: every (c_in, ph, pw), or the one (c, ph, pw) mapped onto it
    const I c = position_sensitive ? c_in / (PH * PW) : c_in;
    const I ph_first = position_sensitive ? c_in / PW % PH : 0, ph_end = position_sensitive ? ph_first + 1 : PH;
    const I pw_first = position_sensitive ? c_in % PW : 0, pw_end = position_sensitive ? pw_first + 1 : PW;
    for (I k = 0; k < K; ++k) {
      const T* box = boxes + 5 * k;
      if ((I)load_acc(box[0]) != n) continue;
      const roi_grid<A> g = roi_geometry<A>(box, (A)spatial_scale, (long long)PH, (long long)PW, sampling_ratio,
                                            aligned);
      for (I ph = ph_first; ph < ph_end; ++ph)
        for (I pw = pw_first; pw < pw_end; ++pw)
          pool_bin_backward(input + plane * plane_size, grad_input + plane * plane_size, g, ph, pw, H, W,
                            pool_mode, (A)load_acc(grad_output[((k * C_out + c) * PH + ph) * PW + pw]), false);
    }
  }
}

// ---- deformable RoI pooling (mmcv's DeformRoIPool; modulated: ModulatedDeformRoIPool) ----

// RoIAlign's aligned geometry with bin (ph, pw) moved by γ · RoI size · (Δx, Δy). A NaN or ±inf offset
// makes the bin non-finite: it pools to 0 and gets no gradient.
template <typename A, typename T, typename I>
__device__ __forceinline__ roi_grid<A> deform_bin_geometry(const T* box, const T* offset, I k, I ph, I pw, I PH,
                                                           I PW, int sampling_ratio, A scale, A gamma) {
  roi_grid<A> g = roi_geometry<A>(box, scale, (long long)PH, (long long)PW, sampling_ratio, 1);
  if (offset != nullptr) {
    const T* off = offset + k * 2 * PH * PW + ph * PW + pw;
    const A dx = gamma * g.roi_w * load_acc(off[0]), dy = gamma * g.roi_h * load_acc(off[PH * PW]);
    g.finite = g.finite && is_finite(dx) && is_finite(dy);
    g.start_x += dx;
    g.start_y += dy;
  }
  return g;
}

// output[k, c, ph, pw] = mask · average of the bin's samples.
template <typename T, typename I>
__global__ void deform_roi_pool_forward(const T* input, const T* boxes, const T* offset, const T* mask, T* output,
                                        I K, I C, I H, I W, I PH, I PW, int sampling_ratio, double spatial_scale,
                                        double gamma) {
  typedef typename acc_type<T>::type A;
  DEFORMCP_GRID_STRIDE_LOOP(I, index, K * C * PH * PW) {
    const I pw = index % PW, ph = index / PW % PH, c = index / (PW * PH) % C, k = index / (PW * PH * C);
    const T* box = boxes + 5 * k;
    const roi_grid<A> g = deform_bin_geometry<A>(box, offset, k, ph, pw, PH, PW, sampling_ratio, (A)spatial_scale,
                                                 (A)gamma);
    const I plane = (I)load_acc(box[0]) * C + c;
    const A m = mask != nullptr ? (A)load_acc(mask[(k * PH + ph) * PW + pw]) : (A)1;
    output[index] = store_as<T>(pool_bin(input + plane * H * W, g, ph, pw, H, W, DEFORMCP_POOL_AVG).value * m);
  }
}

// grad_input (in acc_t<T>, zero-filled by the caller): deterministic = 0, one thread per output element with atomics;
// 1, one thread per input plane (n, c) visiting its RoIs' bins in order.
template <typename T, typename I>
__global__ void deform_roi_pool_backward(const T* grad_output, const T* boxes, const T* offset, const T* mask,
                                         acc_t<T>* grad_input, I N, I K, I C, I H, I W, I PH, I PW, int sampling_ratio,
                                         int deterministic, double spatial_scale, double gamma) {
  typedef typename acc_type<T>::type A;
  const I plane_size = H * W;
  if (!deterministic) {
    DEFORMCP_GRID_STRIDE_LOOP(I, index, K * C * PH * PW) {
      const I pw = index % PW, ph = index / PW % PH, c = index / (PW * PH) % C, k = index / (PW * PH * C);
      const T* box = boxes + 5 * k;
      const roi_grid<A> g = deform_bin_geometry<A>(box, offset, k, ph, pw, PH, PW, sampling_ratio,
                                                   (A)spatial_scale, (A)gamma);
      const A m = mask != nullptr ? (A)load_acc(mask[(k * PH + ph) * PW + pw]) : (A)1;
      const I plane = (I)load_acc(box[0]) * C + c;
      pool_bin_backward((const T*)nullptr, grad_input + plane * plane_size, g, ph, pw, H, W, DEFORMCP_POOL_AVG,
                        (A)load_acc(grad_output[index]) * m, true);
    }
    return;
  }
  DEFORMCP_GRID_STRIDE_LOOP(I, plane, N * C) {
    const I n = plane / C, c = plane % C;
    for (I k = 0; k < K; ++k) {
      const T* box = boxes + 5 * k;
      if ((I)load_acc(box[0]) != n) continue;
      for (I ph = 0; ph < PH; ++ph)
        for (I pw = 0; pw < PW; ++pw) {
          const roi_grid<A> g = deform_bin_geometry<A>(box, offset, k, ph, pw, PH, PW, sampling_ratio,
                                                       (A)spatial_scale, (A)gamma);
          const A m = mask != nullptr ? (A)load_acc(mask[(k * PH + ph) * PW + pw]) : (A)1;
          pool_bin_backward((const T*)nullptr, grad_input + plane * plane_size, g, ph, pw, H, W, DEFORMCP_POOL_AVG,
                            (A)load_acc(grad_output[((k * C + c) * PH + ph) * PW + pw]) * m, false);
        }
    }
  }
}

// Gradients of the offset (both channels) and the mask: one thread per bin (k, ph, pw), summing over the
// channels (no atomics, deterministic). Either output may be null.
template <typename T, typename I>
__global__ void deform_roi_pool_backward_offset(const T* grad_output, const T* input, const T* boxes, const T* offset,
                                                const T* mask, T* grad_offset, T* grad_mask, I K, I C, I H, I W, I PH,
                                                I PW, int sampling_ratio, double spatial_scale, double gamma) {
  typedef typename acc_type<T>::type A;
  DEFORMCP_GRID_STRIDE_LOOP(I, bin, K * PH * PW) {
    const I pw = bin % PW, ph = bin / PW % PH, k = bin / (PW * PH);
    const T* box = boxes + 5 * k;
    const roi_grid<A> g = deform_bin_geometry<A>(box, offset, k, ph, pw, PH, PW, sampling_ratio, (A)spatial_scale,
                                                 (A)gamma);
    const A m = mask != nullptr ? (A)load_acc(mask[bin]) : (A)1;
    const I image = (I)load_acc(box[0]);
    A gy = 0, gx = 0, gm = 0;
    if (g.finite) {
      const A y_start = g.start_y + (A)ph * g.bin_h, x_start = g.start_x + (A)pw * g.bin_w;
      long long y0, y1, x0, x1;
      sample_span(y_start, g.bin_h / g.samples_y, g.samples_y, (long long)H, &y0, &y1);
      sample_span(x_start, g.bin_w / g.samples_x, g.samples_x, (long long)W, &x0, &x1);
      for (I c = 0; c < C; ++c) {
        const T* plane = input + (image * C + c) * H * W;
        const A grad = load_acc(grad_output[((k * C + c) * PH + ph) * PW + pw]);
        if (grad_mask != nullptr) gm += grad * pool_bin(plane, g, ph, pw, H, W, DEFORMCP_POOL_AVG).value;
        const A share = grad * m / g.count;
        for (long long iy = y0; iy < y1; ++iy) {
          const A y = y_start + ((A)iy + (A)0.5) * g.bin_h / g.samples_y;
          for (long long ix = x0; ix < x1; ++ix) {
            const A x = x_start + ((A)ix + (A)0.5) * g.bin_w / g.samples_x;
            roi_sample_coordinate_grad(plane, y, x, H, W, share, &gy, &gx);
          }
        }
      }
    }
    if (grad_offset != nullptr) {
      const I base = k * 2 * PH * PW + ph * PW + pw;
      const bool moves = offset != nullptr && g.finite;
      grad_offset[base] = store_as<T>(moves ? (A)gamma * g.roi_w * gx : (A)0);
      grad_offset[base + PH * PW] = store_as<T>(moves ? (A)gamma * g.roi_h * gy : (A)0);
    }
    if (grad_mask != nullptr) grad_mask[bin] = store_as<T>(gm);
  }
}
