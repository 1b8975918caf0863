// deform_ps_roi_pool.cu — deformable position-sensitive RoI pooling (Dai et al., "Deformable Convolutional
// Networks", ICCV 2017, https://arxiv.org/abs/1703.06211) with the semantics of the original DCNv1
// DeformablePSROIPooling operator (mmcv's DeformRoIPoolingFunction), forward and backward. Preceded by
// deformcp_common.cuh. Layouts (all C-contiguous):
//   input (N, C, H, W) with C = output_dim · G²; rois (K, 5) = [batch_index, x1, y1, x2, y2];
//   offset (K, 2 · num_classes, S, S), channel 2·class = Δx, 2·class + 1 = Δy (S = part_size);
//   output (K, output_dim, P, P) (P = pooled_size). Output channel ctop of bin (ph, pw) reads input channel
//   (ctop · G + gh) · G + gw, gh = ph · G / P, gw = pw · G / P, with the offset of class ctop / (output_dim /
//   num_classes) and part (ph · S / P, pw · S / P) (integer divisions).
// Samples (ih, iw) in [0, spp)² of a bin sit at (hstart + ih · sub_h, wstart + iw · sub_w) (not centred); a
// sample outside [-0.5, H - 0.5] × [-0.5, W - 0.5] (NaN included) is skipped and not counted; inside, the
// coordinates are clamped to [0, H - 1] × [0, W - 1] and read bilinearly. The bin averages its counted
// samples (0 when none).

// C's round(): half away from zero (NaN and ±inf pass through).
template <typename A>
__device__ __forceinline__ A round_half_away(A x) {
  const A a = x < (A)0 ? -x : x;
  const A f = floor(a);
  const A r = a - f >= (A)0.5 ? f + (A)1 : f;  // a - floor(a) is exact for a >= 0
  return x < (A)0 ? -r : r;
}

// Everything one output bin (k, ctop, ph, pw) needs to visit its samples.
template <typename A, typename I>
struct dpsroi_bin {
  bool finite;           // false for a RoI with a NaN or ±inf coordinate: it pools to 0, no gradient
  I plane;               // n · C + c: the input plane the bin reads
  I offset_x;            // index of the bin's Δx in offset; Δy is at offset_x + S·S
  A wstart, hstart;      // first sample
  A sub_w, sub_h;        // sample spacing
  A dw_dx, dh_dy;        // trans_std · roi_w, trans_std · roi_h: the sample's move per unit of offset
};

template <typename A, typename T, typename I>
__device__ dpsroi_bin<A, I> dpsroi_locate(const T* rois, const T* offset, I k, I ctop, I ph, I pw, I C, I C_out,
                                          I P, I S, I G, I num_classes, I spp, int no_trans, A scale,
                                          A trans_std) {
  dpsroi_bin<A, I> b;
  const T* box = rois + 5 * k;
  const A start_w = round_half_away((A)load_acc(box[1])) * scale - (A)0.5;
  const A start_h = round_half_away((A)load_acc(box[2])) * scale - (A)0.5;
  const A end_w = (round_half_away((A)load_acc(box[3])) + (A)1) * scale - (A)0.5;
  const A end_h = (round_half_away((A)load_acc(box[4])) + (A)1) * scale - (A)0.5;
  A roi_w = end_w - start_w, roi_h = end_h - start_h;
  b.finite = is_finite(start_w) && is_finite(start_h) && is_finite(roi_w) && is_finite(roi_h);
  roi_w = roi_w > (A)0.1 ? roi_w : (A)0.1;  // the original's "avoid 0"
  roi_h = roi_h > (A)0.1 ? roi_h : (A)0.1;
  const A bin_w = roi_w / (A)P, bin_h = roi_h / (A)P;
  b.sub_w = bin_w / (A)spp;
  b.sub_h = bin_h / (A)spp;
  const I part_h = ph * S / P, part_w = pw * S / P;  // floor(ph / P · S), exactly
  const I class_id = ctop / (C_out / num_classes);
  b.offset_x = ((k * num_classes + class_id) * 2 * S + part_h) * S + part_w;
  A trans_x = 0, trans_y = 0;
  if (!no_trans) {
    trans_x = (A)load_acc(offset[b.offset_x]) * trans_std;
    trans_y = (A)load_acc(offset[b.offset_x + S * S]) * trans_std;
  }
  b.wstart = (A)pw * bin_w + start_w;
  b.wstart += trans_x * roi_w;
  b.hstart = (A)ph * bin_h + start_h;
  b.hstart += trans_y * roi_h;
  b.dw_dx = trans_std * roi_w;
  b.dh_dy = trans_std * roi_h;
  I gw = pw * G / P, gh = ph * G / P;
  gw = gw < 0 ? 0 : (gw > G - 1 ? G - 1 : gw);
  gh = gh < 0 ? 0 : (gh > G - 1 ? G - 1 : gh);
  const I n = b.finite ? (I)load_acc(box[0]) : (I)0;  // batch indices are checked integers in [0, N)
  b.plane = n * C + (ctop * G + gh) * G + gw;
  return b;
}

// Whether the sample at (h, w) is counted: inside [-0.5, H - 0.5] × [-0.5, W - 0.5], NaN excluded.
template <typename A, typename I>
__device__ __forceinline__ bool dpsroi_counted(A h, A w, I H, I W) {
  return w >= (A)-0.5 && w <= (A)W - (A)0.5 && h >= (A)-0.5 && h <= (A)H - (A)0.5;
}

// A counted sample's corners at the clamped coordinates; *free_y / *free_x: whether the coordinate was
// not clamped (0 < h < H - 1), i.e. whether the value moves with it.
template <typename A, typename I>
__device__ __forceinline__ void dpsroi_corners(A h, A w, I H, I W, bilinear_corners<A, I>& c, bool* free_y,
                                               bool* free_x) {
  const A top = (A)(H - 1), right = (A)(W - 1);
  *free_y = h > (A)0 && h < top;
  *free_x = w > (A)0 && w < right;
  h = h <= (A)0 ? (A)0 : (h >= top ? top : h);
  w = w <= (A)0 ? (A)0 : (w >= right ? right : w);
  bilinear_setup(h, w, H, W, c);
}

template <typename A, typename T, typename I>
__device__ A dpsroi_pool(const T* input, const dpsroi_bin<A, I>& b, I H, I W, I spp) {
  if (!b.finite) return (A)0;
  const T* plane = input + b.plane * H * W;
  A sum = 0;
  I count = 0;
  for (I ih = 0; ih < spp; ++ih) {
    const A h = b.hstart + (A)ih * b.sub_h;
    for (I iw = 0; iw < spp; ++iw) {
      const A w = b.wstart + (A)iw * b.sub_w;
      if (!dpsroi_counted(h, w, H, W)) continue;
      bilinear_corners<A, I> c;
      bool free_y, free_x;
      dpsroi_corners(h, w, H, W, c, &free_y, &free_x);
      sum += bilinear_gather(plane, c);
      ++count;
    }
  }
  return count == 0 ? (A)0 : sum / (A)count;
}

// Gradient of one bin: grad / count scattered onto the input plane (when grad_input is not null; atomically
// or with plain adds), and the derivative with respect to the bin's (Δx, Δy) added to *gx, *gy (when gx is
// not null): trans_std · roi_w · Σ_samples ∂value/∂w · grad / count, ∂value/∂w = 0 where w was clamped.
// Returns false when the bin has no counted sample (nothing added).
template <typename A, typename T, typename I>
__device__ bool dpsroi_bin_backward(const T* input, A* grad_input, const dpsroi_bin<A, I>& b, I H, I W, I spp,
                                    A grad, bool atomic, A* gx, A* gy) {
  if (!b.finite) return false;
  I count = 0;
  for (I ih = 0; ih < spp; ++ih) {
    const A h = b.hstart + (A)ih * b.sub_h;
    for (I iw = 0; iw < spp; ++iw)
      if (dpsroi_counted(h, b.wstart + (A)iw * b.sub_w, H, W)) ++count;
  }
  if (count == 0) return false;
  const A share = grad / (A)count;
  const T* plane = input + b.plane * H * W;
  A sx = 0, sy = 0;
  for (I ih = 0; ih < spp; ++ih) {
    const A h = b.hstart + (A)ih * b.sub_h;
    for (I iw = 0; iw < spp; ++iw) {
      const A w = b.wstart + (A)iw * b.sub_w;
      if (!dpsroi_counted(h, w, H, W)) continue;
      bilinear_corners<A, I> c;
      bool free_y, free_x;
      dpsroi_corners(h, w, H, W, c, &free_y, &free_x);
      if (grad_input) bilinear_scatter(grad_input + b.plane * H * W, c, share, atomic);
      if (gx && (free_x || free_y)) {
        A dy = 0, dx = 0;
        bilinear_coordinate_grad(plane, c, share, &dy, &dx);
        if (free_x) sx += dx;
        if (free_y) sy += dy;
      }
    }
  }
  if (gx) {
    *gx += sx * b.dw_dx;
    *gy += sy * b.dh_dy;
  }
  return true;
}

// output[k, ctop, ph, pw]: one thread per output element.
template <typename T, typename I>
__global__ void deform_ps_roi_pool_forward(const T* input, const T* rois, const T* offset, T* output, I K, I C,
                                           I H, I W, I C_out, I P, I S, I G, I num_classes, I spp, int no_trans,
                                           double spatial_scale, double trans_std) {
  typedef typename acc_type<T>::type A;
  DEFORMCP_GRID_STRIDE_LOOP(I, index, K * C_out * P * P) {
    const I pw = index % P, ph = index / P % P, ctop = index / (P * P) % C_out, k = index / (P * P * C_out);
    const dpsroi_bin<A, I> b = dpsroi_locate<A>(rois, offset, k, ctop, ph, pw, C, C_out, P, S, G, num_classes,
                                                spp, no_trans, (A)spatial_scale, (A)trans_std);
    output[index] = store_as<T>(dpsroi_pool(input, b, H, W, spp));
  }
}

// The default backward: one thread per output element, scatter-adding into grad_input (N, C, H, W) and
// grad_offset (K, 2 · num_classes, S, S) with atomics; both in acc_t<T> and zero-filled by the caller, either
// may be null (not wanted). Float sums may differ in the last bits between runs.
template <typename T, typename I>
__global__ void deform_ps_roi_pool_backward(const T* grad_output, const T* input, const T* rois, const T* offset,
                                            acc_t<T>* grad_input, acc_t<T>* grad_offset, I K, I C, I H, I W, I C_out,
                                            I P, I S, I G, I num_classes, I spp, int no_trans, double spatial_scale,
                                            double trans_std) {
  typedef typename acc_type<T>::type A;
  const bool want_offset = grad_offset && !no_trans;
  DEFORMCP_GRID_STRIDE_LOOP(I, index, K * C_out * P * P) {
    const I pw = index % P, ph = index / P % P, ctop = index / (P * P) % C_out, k = index / (P * P * C_out);
    const dpsroi_bin<A, I> b = dpsroi_locate<A>(rois, offset, k, ctop, ph, pw, C, C_out, P, S, G, num_classes,
                                                spp, no_trans, (A)spatial_scale, (A)trans_std);
    A gx = 0, gy = 0;
    if (dpsroi_bin_backward(input, grad_input, b, H, W, spp, (A)load_acc(grad_output[index]), true,
                            want_offset ? &gx : (A*)0, &gy) && want_offset) {
      atomic_add(grad_offset + b.offset_x, gx);
      atomic_add(grad_offset + b.offset_x + S * S, gy);
    }
  }
}

// Deterministic input gradient: one thread per input plane (n, c), visiting the bins that read it (RoIs of
// image n, in order, bins (ph, pw) with (gh, gw) = c's) with plain adds — bitwise reproducible. grad_input
// (in acc_t<T>) zero-filled by the caller.
template <typename T, typename I>
__global__ void deform_ps_roi_pool_backward_input(const T* grad_output, const T* input, const T* rois,
                                                  const T* offset, acc_t<T>* grad_input, I N, I K, I C, I H, I W,
                                                  I C_out, I P, I S, I G, I num_classes, I spp, int no_trans,
                                                  double spatial_scale, double trans_std) {
  typedef typename acc_type<T>::type A;
  DEFORMCP_GRID_STRIDE_LOOP(I, plane, N * C) {
    const I n = plane / C, c = plane % C;
    const I ctop = c / (G * G), gh = c / G % G, gw = c % G;
    for (I k = 0; k < K; ++k) {
      if ((I)load_acc(rois[5 * k]) != n) continue;
      for (I ph = 0; ph < P; ++ph) {
        I h_group = ph * G / P;
        h_group = h_group > G - 1 ? G - 1 : h_group;
        if (h_group != gh) continue;
        for (I pw = 0; pw < P; ++pw) {
          I w_group = pw * G / P;
          w_group = w_group > G - 1 ? G - 1 : w_group;
          if (w_group != gw) continue;
          const dpsroi_bin<A, I> b = dpsroi_locate<A>(rois, offset, k, ctop, ph, pw, C, C_out, P, S, G,
                                                      num_classes, spp, no_trans, (A)spatial_scale, (A)trans_std);
          dpsroi_bin_backward(input, grad_input, b, H, W, spp,
                              (A)load_acc(grad_output[((k * C_out + ctop) * P + ph) * P + pw]), false, (A*)0,
                              (A*)0);
        }
      }
    }
  }
}

// Deterministic offset gradient: one thread per (k, class, part_h, part_w), summing over the bins that
// share that offset pair (the class's channels, the part's bins) in a fixed order. Writes every element of
// grad_offset (K, 2 · num_classes, S, S).
template <typename T, typename I>
__global__ void deform_ps_roi_pool_backward_offset(const T* grad_output, const T* input, const T* rois,
                                                   const T* offset, T* grad_offset, I K, I C, I H, I W, I C_out,
                                                   I P, I S, I G, I num_classes, I spp, int no_trans,
                                                   double spatial_scale, double trans_std) {
  typedef typename acc_type<T>::type A;
  const I channels_each_class = C_out / num_classes;
  DEFORMCP_GRID_STRIDE_LOOP(I, index, K * num_classes * S * S) {
    const I part_w = index % S, part_h = index / S % S, class_id = index / (S * S) % num_classes,
            k = index / (S * S * num_classes);
    A gx = 0, gy = 0;
    if (!no_trans) {
      for (I ctop = class_id * channels_each_class; ctop < (class_id + 1) * channels_each_class; ++ctop)
        for (I ph = 0; ph < P; ++ph) {
          if (ph * S / P != part_h) continue;
          for (I pw = 0; pw < P; ++pw) {
            if (pw * S / P != part_w) continue;
            const dpsroi_bin<A, I> b = dpsroi_locate<A>(rois, offset, k, ctop, ph, pw, C, C_out, P, S, G,
                                                        num_classes, spp, no_trans, (A)spatial_scale,
                                                        (A)trans_std);
            dpsroi_bin_backward(input, (A*)0, b, H, W, spp,
                                (A)load_acc(grad_output[((k * C_out + ctop) * P + ph) * P + pw]), false, &gx, &gy);
          }
        }
    }
    const I x_index = ((k * num_classes + class_id) * 2 * S + part_h) * S + part_w;
    grad_offset[x_index] = store_as<T>(gx);
    grad_offset[x_index + S * S] = store_as<T>(gy);
  }
}
