// deformcp_common.cuh — device helpers shared by every kernel family.
//
// This text is concatenated in front of each kernels/<family>.cu source (never #included), so an
// edit here changes the cache key of every compiled module. It must compile three ways: NVRTC for
// the GPU, and the host C++ compiler behind deformcp/_host/prelude.h, which supplies the CUDA
// built-ins (threadIdx, atomicAdd, __half, ...) on the CPU. Rules for code in kernels/:
//   * grid-stride loops only; no __syncthreads, shared memory or warp intrinsics;
//   * no standard-library headers; parameters are pointers, int, long long, float, double;
//   * template <typename T, typename I>: T is the storage type (float, double, __half,
//     __nv_bfloat16), I the index type (int, or long long once an index can pass 2^31 - 1).
#ifndef DEFORMCP_HOST
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#endif

// ---- arithmetic type: half and bfloat16 are loaded into float, computed, and rounded on store ----
template <typename T> struct acc_type { typedef T type; };
template <> struct acc_type<__half> { typedef float type; };
template <> struct acc_type<__nv_bfloat16> { typedef float type; };
// Sums that many terms feed (scatter-added gradients, deform_conv2d's columns) are kept in acc_t<T>, never
// in a 16-bit T: the caller allocates those buffers in float32 and rounds once at the end.
template <typename T> using acc_t = typename acc_type<T>::type;

__device__ __forceinline__ float load_acc(const float v) { return v; }
__device__ __forceinline__ double load_acc(const double v) { return v; }
__device__ __forceinline__ float load_acc(const __half v) { return __half2float(v); }
__device__ __forceinline__ float load_acc(const __nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T store_as(float v);
template <typename T> __device__ __forceinline__ T store_as(double v);
template <> __device__ __forceinline__ float store_as<float>(float v) { return v; }
template <> __device__ __forceinline__ double store_as<double>(double v) { return v; }
template <> __device__ __forceinline__ __half store_as<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 store_as<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// ---- atomics: scatter-adds in backward kernels (nondeterministic order; see README), always into
// float or double buffers (acc_t) ----
__device__ __forceinline__ void atomic_add(float* address, float v) { atomicAdd(address, v); }
__device__ __forceinline__ void atomic_add(double* address, double v) { atomicAdd(address, v); }

// true unless x is NaN or ±inf (no library call, so the same on every compiler)
template <typename A>
__device__ __forceinline__ bool is_finite(A x) { return x - x == (A)0; }

// ---- the grid-stride loop: every kernel visits [0, n) with however many threads were launched ----
#define DEFORMCP_GRID_STRIDE_LOOP(I, index, n)                                        \
  for (I index = (I)blockIdx.x * (I)blockDim.x + (I)threadIdx.x; index < (n);          \
       index += (I)blockDim.x * (I)gridDim.x)

// ---- bilinear sampling over one H×W plane ----
// The sample at (y, x) is zero unless -1 < y < H and -1 < x < W (the comparison is written so that
// NaN and ±inf coordinates take the zero path); inside that range corners that fall outside the
// plane read as zero. This is torchvision's deform_conv2d convention and torch's grid_sample with
// padding_mode="zeros". With closed_below, a sample exactly at y = -1 (x = -1) is set up too: it reads
// 0 · row 0 (column 0), and its derivative from the right is row 0's (column 0's), as in torch's grid_sample;
// torchvision's deform_conv2d and RoI ops give it derivative 0 (closed_below false). The four corners, in
// order: (y0, x0), (y0, x1), (y1, x0), (y1, x1).
template <typename A, typename I>
struct bilinear_corners {
  bool inside[4];  // whether the corner lies in the plane; the fields below are 0 where it does not
  I index[4];      // y * W + x of each corner
  A weight[4];     // interpolation weight
  A dweight_dy[4], dweight_dx[4];  // derivatives of weight[] with respect to y and x
};

template <typename A, typename I>
__device__ __forceinline__ bool bilinear_setup(A y, A x, I H, I W, bilinear_corners<A, I>& c,
                                               bool closed_below = false) {
  const bool above = closed_below ? y >= (A)-1 && x >= (A)-1 : y > (A)-1 && x > (A)-1;
  if (!(above && y < (A)H && x < (A)W)) return false;
  const A fy = floor(y), fx = floor(x);
  const I y0 = (I)fy, x0 = (I)fx;
  const A ly = y - fy, lx = x - fx, hy = (A)1 - ly, hx = (A)1 - lx;
  const A w[4] = {hy * hx, hy * lx, ly * hx, ly * lx};
  const A dy[4] = {-hx, -lx, hx, lx};
  const A dx[4] = {-hy, hy, -ly, ly};
  for (int k = 0; k < 4; ++k) {
    const I cy = y0 + (k >> 1), cx = x0 + (k & 1);
    const bool inside = cy >= 0 && cy < H && cx >= 0 && cx < W;
    c.inside[k] = inside;
    c.index[k] = inside ? cy * W + cx : 0;
    c.weight[k] = inside ? w[k] : (A)0;
    c.dweight_dy[k] = inside ? dy[k] : (A)0;
    c.dweight_dx[k] = inside ? dx[k] : (A)0;
  }
  return true;
}

// Σ_k weight[k] · plane[index[k]] over the corners inside the plane
template <typename A, typename T, typename I>
__device__ __forceinline__ A bilinear_gather(const T* plane, const bilinear_corners<A, I>& c) {
  A v = 0;
  for (int k = 0; k < 4; ++k)
    if (c.inside[k]) v += c.weight[k] * (A)load_acc(plane[c.index[k]]);
  return v;
}

// plane[index[k]] += weight[k] · g for the corners inside the plane (a float or double plane): atomically,
// or with a plain add where the calling thread alone writes this plane (the deterministic backward kernels)
template <typename A, typename I>
__device__ __forceinline__ void bilinear_scatter(A* plane, const bilinear_corners<A, I>& c, A g,
                                                 bool atomic = true) {
  for (int k = 0; k < 4; ++k) {
    if (!c.inside[k]) continue;
    if (atomic) atomic_add(plane + c.index[k], c.weight[k] * g);
    else plane[c.index[k]] += c.weight[k] * g;
  }
}

// d/dy and d/dx of Σ_k weight[k] · plane[index[k]], accumulated into *gy and *gx (scaled by g)
template <typename A, typename T, typename I>
__device__ __forceinline__ void bilinear_coordinate_grad(const T* plane, const bilinear_corners<A, I>& c,
                                                         A g, A* gy, A* gx) {
  for (int k = 0; k < 4; ++k) {
    if (!c.inside[k]) continue;
    const A v = (A)load_acc(plane[c.index[k]]) * g;
    *gy += c.dweight_dy[k] * v;
    *gx += c.dweight_dx[k] * v;
  }
}
