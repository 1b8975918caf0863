// prelude.h — what CUDA provides to kernels/*.cu, for the host C++ compiler.
//
// Placed in front of deformcp_common.cuh and one kernel family; deformcp/_host/__init__.py then adds an
// extern "C" launcher per kernel instantiation. A launch runs every (block, thread) of the grid: blocks
// are spread over the number of OpenMP threads the launcher is given (with 1, OpenMP is not called at all:
// see launch) and the threads of a block run one after another, which is faithful for kernels that keep
// to kernels/'s rules (grid-stride loops, no block synchronisation). atomicAdd is a compare-and-swap
// loop, so concurrent blocks scatter-add correctly.
#define DEFORMCP_HOST 1

#include <cmath>
#include <cstddef>
#include <cstring>
#include <type_traits>
#include <utility>

using std::exp;
using std::floor;
using std::fmod;
using std::rint;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))

struct dim3 {
  unsigned int x, y, z;
};
static thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

// ---- 16-bit floating-point storage types (arithmetic happens in float, as in kernels/) ----
struct __half {
  unsigned short bits;
};
struct __nv_bfloat16 {
  unsigned short bits;
};

static inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.bits, 2);
  return (float)f;
}
static inline __half __float2half_rn(float v) {
  const _Float16 f = (_Float16)v;  // IEEE round-to-nearest-even
  __half h;
  std::memcpy(&h.bits, &f, 2);
  return h;
}
static inline float __bfloat162float(__nv_bfloat16 b) {
  const unsigned int u = (unsigned int)b.bits << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
static inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  unsigned int u;
  std::memcpy(&u, &v, 4);
  __nv_bfloat16 b;
  if (std::isnan(v)) {
    b.bits = (unsigned short)((u >> 16) | 0x40u);  // keep it a quiet NaN
  } else {
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    b.bits = (unsigned short)(u >> 16);
  }
  return b;
}

// ---- atomics ----
template <typename Bits, typename Value, typename Add>
static inline void deformcp_cas_add(Value* address, Add add) {
  Bits* word = reinterpret_cast<Bits*>(address);
  Bits expected = __atomic_load_n(word, __ATOMIC_RELAXED);
  for (;;) {
    Value current;
    std::memcpy(&current, &expected, sizeof(Value));
    const Value next = add(current);
    Bits desired;
    std::memcpy(&desired, &next, sizeof(Value));
    if (__atomic_compare_exchange_n(word, &expected, desired, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
      return;
  }
}
static inline void atomicAdd(float* a, float v) {
  deformcp_cas_add<unsigned int>(a, [v](float c) { return c + v; });
}
static inline void atomicAdd(double* a, double v) {
  deformcp_cas_add<unsigned long long>(a, [v](double c) { return c + v; });
}

// ---- launching: the (grid, block, void** args) interface of cuLaunchKernel ----
namespace deformcp_host {

template <typename... Args, std::size_t... Is>
inline void invoke(void (*kernel)(Args...), void** args, std::index_sequence<Is...>) {
  kernel(*static_cast<typename std::decay<Args>::type*>(args[Is])...);
}

// Runs every thread of block b, one after another.
template <typename... Args>
inline void run_block(void (*kernel)(Args...), const unsigned int* grid, const unsigned int* block, void** args,
                      long long b) {
  gridDim = dim3{grid[0], grid[1], grid[2]};
  blockDim = dim3{block[0], block[1], block[2]};
  blockIdx = dim3{(unsigned int)(b % grid[0]), (unsigned int)(b / grid[0] % grid[1]),
                  (unsigned int)(b / grid[0] / grid[1])};
  for (unsigned int z = 0; z < block[2]; ++z)
    for (unsigned int y = 0; y < block[1]; ++y)
      for (unsigned int x = 0; x < block[0]; ++x) {
        threadIdx = dim3{x, y, z};
        invoke(kernel, args, std::index_sequence_for<Args...>{});
      }
}

// threads: OpenMP threads to spread the blocks over. With 1 no OpenMP call is made at all, which is what a
// forked child needs: libgomp's threads do not survive fork, and a parallel region there waits for them forever.
template <typename... Args>
inline int launch(void (*kernel)(Args...), const unsigned int* grid, const unsigned int* block, void** args,
                  int threads) {
  const long long blocks = (long long)grid[0] * grid[1] * grid[2];
  if (threads > 1 && blocks > 1) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long long b = 0; b < blocks; ++b) run_block(kernel, grid, block, args, b);
  } else {
    for (long long b = 0; b < blocks; ++b) run_block(kernel, grid, block, args, b);
  }
  return 0;
}

}  // namespace deformcp_host
