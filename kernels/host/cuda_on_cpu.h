// cuda_on_cpu.h - compile and run a subset of CUDA C++ kernels on the CPU, from the same .cu source.
//
// Include this header first in every kernel source. Under nvcc (__CUDACC__ defined) it only defines the
// portable macros below. Under a plain C++20 compiler, e.g.
//   g++ -std=c++20 -O2 -shared -fPIC -Wno-unknown-pragmas -I/usr/local/cuda/include -x c++ kernels.cu
// it emulates the CUDA subset listed here, so kernels can be tested on machines without a GPU.
//
// Portable macros (both worlds):
//   SAPO_SHARED(type, name, count)  static shared array `type name[count]` (plain `__shared__` also works).
//   SAPO_DYNAMIC_SHARED(type, name) declares `type* name` pointing at the launch's dynamic shared memory
//                                   (16-byte aligned; use once per kernel).
//   SAPO_LAUNCH(kernel, grid, block, shmem_bytes, stream)(args...)
//                                   nvcc: kernel<<<grid, block, shmem_bytes, stream>>>(args...). Host: runs the
//                                   whole grid before returning; the stream is ignored. A template kernel whose
//                                   name has a comma must be parenthesised: SAPO_LAUNCH((k<float, 256>), ...).
//
// Host execution model: blocks run one after another; the threads of a block run at once as std::threads
// (created once per launch and reused by every block). `__shared__` becomes a function-local `static` (one
// instance, reused by every block and never cleared, like uninitialised shared memory), so launches are
// serialised by a global mutex, also across host threads.
// The dynamic shared buffer is filled with 0xFF bytes before each block, so reads before writes give NaN / -1.
// Warps are consecutive groups of 32 threads by linear thread index (x fastest); a block whose thread count is
// not a multiple of 32 (or is 0 or above 1024) is rejected: message on stderr, kernel not run,
// cudaGetLastError() == cudaErrorInvalidConfiguration. A thread that returns early leaves its block and warp
// barriers, as on sm_70+. An exception escaping a kernel thread is reported on stderr, that thread leaves its
// barriers, the remaining blocks are skipped and cudaGetLastError() == cudaErrorLaunchFailure.
//
// Host emulation provides:
//   keywords   __global__, __device__, __host__, __forceinline__, __launch_bounds__(...) (no-ops on the host);
//              __restrict__ is native in g++/clang.
//   builtins   threadIdx, blockIdx (uint3) and blockDim, gridDim (dim3) as thread_local values; warpSize = 32.
//   sync       __syncthreads() (std::barrier over the block's live threads); __syncwarp(0xffffffff).
//   warp ops   __shfl_sync, __shfl_up_sync, __shfl_down_sync, __shfl_xor_sync (any trivially copyable type of
//              at most 8 bytes: float, int, unsigned, double, ..., with the optional width argument),
//              __ballot_sync, __any_sync, __all_sync. Full mask 0xffffffff only: any other mask aborts. Every
//              warp op checks that all 32 lanes reached the same op; reading a lane that exited or diverged
//              aborts with a message instead of returning a stale value.
//   atomics    atomicAdd (float, double, int, unsigned, unsigned long long), atomicMax (int),
//              atomicExch (int, unsigned, unsigned long long, float); relaxed order, as on the GPU.
//   math       expf, exp2f, logf, log1pf, fmaxf, fminf, INFINITY from <cmath>; __expf, __logf, rsqrtf (computed at
//              full precision: results differ from the GPU's approximate intrinsics in the last bits).
//   runtime    dim3, uint3, cudaStream_t, cudaError_t, cudaSuccess from <cuda_runtime_api.h> (types only, no
//              libcudart needed) when the CUDA headers are on the include path, else minimal stand-ins;
//              cudaGetLastError() is a macro returning and clearing this host thread's last launch error
//              (call it unqualified); cudaStreamSynchronize(stream) returns cudaSuccess (launches are
//              synchronous); cudaGetErrorName / cudaGetErrorString know the errors this emulation returns
//              (cudaSuccess, cudaErrorInvalidConfiguration, cudaErrorLaunchFailure) and give "unrecognized error
//              code" for others. Do not include <cuda_runtime.h> in host builds.
//
// NOT supported: TMA, wgmma/mma, ldmatrix, cp.async, mbarrier, thread block clusters, inline PTX (asm),
// cooperative groups and grid-wide sync, partial-mask warp ops (including __activemask, __match_*_sync,
// __reduce_*_sync), inter-block communication (spin waits on flags written by other blocks deadlock, since
// blocks run sequentially), concurrent launches or streams, textures, __constant__ + cudaMemcpyToSymbol,
// device-side min/max/__ldg overloads, and GPU fast-math bit patterns (__expf etc. are not bit-exact).
// Divergent warp ops (lanes waiting in different warp ops or at __syncthreads) are undefined on the GPU; here
// they abort when detected and may hang otherwise.
// Cost (2-core machine): ~1-3 us per thread per barrier or warp op plus ~40 us per thread to start a launch's
// threads (about 10 ms for 256), so test kernels at modest shapes.
#pragma once

#define SAPO_SHARED(type, name, count) __shared__ type name[count]

#if defined(__CUDACC__)

#define SAPO_DYNAMIC_SHARED(type, name)                                  \
  extern __shared__ __align__(16) unsigned char sapo_dynamic_shared_[]; \
  type* name = reinterpret_cast<type*>(sapo_dynamic_shared_)
#define SAPO_LAUNCH(kernel, grid, block, shmem_bytes, stream) \
  kernel<<<(grid), (block), (shmem_bytes), (stream)>>>

#else  // host emulation

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if __has_include(<cuda_runtime_api.h>)
#include <cuda_runtime_api.h>  // included first so that its empty __shared__ is overridden below
#else
struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};
typedef struct CUstream_st* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidConfiguration = 9, cudaErrorLaunchFailure = 719 };
#endif

#ifndef __host__
#define __host__
#endif
#ifndef __device__
#define __device__
#endif
#ifndef __global__
#define __global__
#endif
#ifndef __forceinline__
#define __forceinline__ inline __attribute__((always_inline))
#endif
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
// CUDA's host headers define __shared__ as nothing, which would silently give every thread its own copy.
#undef __shared__
#define __shared__ static

inline thread_local uint3 threadIdx, blockIdx;
inline thread_local dim3 blockDim, gridDim;
inline constexpr int warpSize = 32;

namespace sapo_host {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cuda_on_cpu: %s\n", what);
  std::abort();
}

// Staging area for warp ops. Two alternating rows let fast lanes publish the next op while slow lanes still
// read the current one, so each warp op costs one barrier phase. A slot records which op wrote it, to catch
// lanes that exited or diverged.
struct Warp {
  struct Slot {
    std::uint64_t bits, op;
  };
  std::barrier<> barrier{32};
  Slot slots[2][32];
};

struct ThreadState {
  Warp* warp;
  unsigned lane;
  std::uint64_t warp_ops;  // warp ops this thread has executed in its block
};

inline thread_local ThreadState self;
inline thread_local cudaError_t last_error = cudaSuccess;
// Per-launch state; a single global instance is enough because launches are serialised.
inline std::mutex launch_mutex;
inline std::barrier<>* block_barrier;
inline unsigned char* dynamic_shared;

inline cudaError_t take_last_error() { return std::exchange(last_error, cudaSuccess); }

struct ErrorText {
  const char *name, *description;
};

// Only the errors this emulation returns: macros rather than definitions of the runtime's functions, so that a
// process that also loads libcudart never binds its calls to these.
inline ErrorText error_text(cudaError_t error) {
  switch (error) {
    case cudaSuccess:
      return {"cudaSuccess", "no error"};
    case cudaErrorInvalidConfiguration:
      return {"cudaErrorInvalidConfiguration", "invalid configuration argument (host emulation)"};
    case cudaErrorLaunchFailure:
      return {"cudaErrorLaunchFailure", "a kernel thread threw (host emulation)"};
    default:
      return {"unrecognized error code", "not an error this host emulation returns"};
  }
}

// Publishes this lane's value for the next warp op and waits for the whole warp; returns the row of values.
inline const Warp::Slot* warp_exchange(unsigned mask, std::uint64_t bits) {
  if (mask != 0xffffffffu) fail("warp op with a mask other than 0xffffffff (partial masks are not emulated)");
  const std::uint64_t op = ++self.warp_ops;
  Warp::Slot* row = self.warp->slots[op & 1];
  row[self.lane] = {bits, op};
  self.warp->barrier.arrive_and_wait();
  return row;
}

inline std::uint64_t lane_value(const Warp::Slot* row, unsigned lane) {
  if (row[lane].op != self.warp_ops) fail("full-mask warp op: a lane of the warp exited or is in another warp op");
  return row[lane].bits;
}

// source_lane(lane, width) gives the lane to read, or the caller's own lane when out of range.
template <class T, class SourceLane>
T shuffle(unsigned mask, T var, int width, SourceLane source_lane) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= sizeof(std::uint64_t), "shuffle of a type > 8 bytes");
  if (width < 1 || width > warpSize || (width & (width - 1)) != 0) fail("shuffle width must be a power of 2 <= 32");
  std::uint64_t bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  const Warp::Slot* row = warp_exchange(mask, bits);
  bits = lane_value(row, source_lane(self.lane, unsigned(width)));
  std::memcpy(static_cast<void*>(&var), &bits, sizeof(T));  // void*: T may be a class such as __nv_bfloat16
  return var;
}

template <class T>
T atomic_exchange(T* address, T value) {
  return std::atomic_ref<T>(*address).exchange(value, std::memory_order_relaxed);
}

template <class T>
T atomic_add(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value, std::memory_order_relaxed);
}

// Runs body once per thread of every block. Launch configuration errors set last_error and run nothing.
inline void launch(dim3 grid, dim3 block, std::size_t shmem_bytes, const std::function<void()>& body) {
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  const char* invalid = nullptr;
  if (threads == 0 || grid.x == 0 || grid.y == 0 || grid.z == 0) invalid = "empty grid or block";
  else if (threads > 1024) invalid = "more than 1024 threads per block";
  else if (threads % warpSize != 0) invalid = "threads per block not a multiple of 32 (partial warps are not emulated)";
  if (invalid) {
    std::fprintf(stderr, "cuda_on_cpu: launch rejected: %s (block %ux%ux%u)\n", invalid, block.x, block.y, block.z);
    last_error = cudaErrorInvalidConfiguration;
    return;
  }
  const std::lock_guard lock(launch_mutex);
  std::vector<std::max_align_t> shared((shmem_bytes + sizeof(std::max_align_t) - 1) / sizeof(std::max_align_t));
  dynamic_shared = reinterpret_cast<unsigned char*>(shared.data());
  const unsigned long long blocks = 1ull * grid.x * grid.y * grid.z;
  unsigned long long next = 0;
  uint3 block_index{};
  std::optional<std::barrier<>> block_sync;
  std::unique_ptr<Warp[]> warps;
  std::atomic<bool> failed{false};
  bool done = false;
  // Runs while every worker waits between two blocks: gives the next block fresh barriers and shared memory.
  auto next_block = [&]() noexcept {
    done = next == blocks || failed;
    if (done) return;
    block_index = {unsigned(next % grid.x), unsigned(next / grid.x % grid.y), unsigned(next / grid.x / grid.y)};
    ++next;
    block_sync.emplace(static_cast<std::ptrdiff_t>(threads));
    block_barrier = &*block_sync;
    warps = std::make_unique<Warp[]>(threads / warpSize);
    std::memset(dynamic_shared, 0xFF, shmem_bytes);
  };
  next_block();
  // One std::thread per thread of a block, reused for every block: creating threads costs more than the barriers.
  std::barrier between_blocks(static_cast<std::ptrdiff_t>(threads), next_block);
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (unsigned t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      threadIdx = {t % block.x, t / block.x % block.y, t / (block.x * block.y)};
      blockDim = block;
      gridDim = grid;
      while (!done) {
        blockIdx = block_index;
        self = {&warps[t / warpSize], t % warpSize, 0};
        try {
          body();
        } catch (const std::exception& e) {
          std::fprintf(stderr, "cuda_on_cpu: block (%u,%u,%u) thread %u threw: %s\n", blockIdx.x, blockIdx.y,
                       blockIdx.z, t, e.what());
          failed = true;
        } catch (...) {
          std::fprintf(stderr, "cuda_on_cpu: block (%u,%u,%u) thread %u threw\n", blockIdx.x, blockIdx.y,
                       blockIdx.z, t);
          failed = true;
        }
        // A finished thread stops counting towards the barriers its block's other threads still wait at.
        self.warp->barrier.arrive_and_drop();
        block_sync->arrive_and_drop();
        between_blocks.arrive_and_wait();
      }
    });
  for (std::thread& thread : pool) thread.join();
  if (failed) last_error = cudaErrorLaunchFailure;
}

template <class... Params>
struct Launch {
  void (*kernel)(Params...);
  dim3 grid, block;
  std::size_t shmem_bytes;

  template <class... Args>
  void operator()(Args&&... args) const {
    // Converted once to the parameter types, as a CUDA launch does; each thread then gets its own copy.
    const std::tuple<Params...> params(std::forward<Args>(args)...);
    launch(grid, block, shmem_bytes, [&] { std::apply(kernel, params); });
  }
};

template <class... Params>
Launch<Params...> configure(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t shmem_bytes, cudaStream_t) {
  return {kernel, grid, block, shmem_bytes};
}

}  // namespace sapo_host

#define SAPO_DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(::sapo_host::dynamic_shared)
#define SAPO_LAUNCH(kernel, grid, block, shmem_bytes, stream) \
  ::sapo_host::configure(kernel, grid, block, shmem_bytes, stream)
#define cudaGetLastError() (::sapo_host::take_last_error())
#define cudaStreamSynchronize(stream) (static_cast<void>(stream), cudaSuccess)
#define cudaGetErrorName(error) (::sapo_host::error_text(error).name)
#define cudaGetErrorString(error) (::sapo_host::error_text(error).description)

inline void __syncthreads() { sapo_host::block_barrier->arrive_and_wait(); }

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) sapo_host::fail("__syncwarp with a mask other than 0xffffffff");
  ++sapo_host::self.warp_ops;
  sapo_host::self.warp->barrier.arrive_and_wait();
}

template <class T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize) {
  return sapo_host::shuffle(mask, var, width, [=](unsigned lane, unsigned w) {
    return (lane & ~(w - 1)) | (unsigned(src_lane) & (w - 1));
  });
}

template <class T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  return sapo_host::shuffle(mask, var, width, [=](unsigned lane, unsigned w) {
    return (lane & (w - 1)) >= delta ? lane - delta : lane;
  });
}

template <class T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  return sapo_host::shuffle(mask, var, width, [=](unsigned lane, unsigned w) {
    return (lane & (w - 1)) + delta < w ? lane + delta : lane;
  });
}

// Lanes may read earlier width-groups but get their own value when the partner is in a later group.
template <class T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize) {
  return sapo_host::shuffle(mask, var, width, [=](unsigned lane, unsigned w) {
    const unsigned src = lane ^ unsigned(lane_mask);
    return src < (lane & ~(w - 1)) + w ? src : lane;
  });
}

inline unsigned __ballot_sync(unsigned mask, int predicate) {
  const sapo_host::Warp::Slot* row = sapo_host::warp_exchange(mask, predicate != 0);
  unsigned ballot = 0;
  for (unsigned lane = 0; lane < unsigned(warpSize); ++lane)
    ballot |= unsigned(sapo_host::lane_value(row, lane)) << lane;
  return ballot;
}
inline int __any_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }
inline int __all_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) == 0xffffffffu; }

inline float atomicAdd(float* address, float value) { return sapo_host::atomic_add(address, value); }
inline double atomicAdd(double* address, double value) { return sapo_host::atomic_add(address, value); }
inline int atomicAdd(int* address, int value) { return sapo_host::atomic_add(address, value); }
inline unsigned atomicAdd(unsigned* address, unsigned value) { return sapo_host::atomic_add(address, value); }
inline unsigned long long atomicAdd(unsigned long long* address, unsigned long long value) {
  return sapo_host::atomic_add(address, value);
}

inline int atomicMax(int* address, int value) {
  std::atomic_ref<int> target(*address);
  int old = target.load(std::memory_order_relaxed);
  while (old < value && !target.compare_exchange_weak(old, value, std::memory_order_relaxed)) {
  }
  return old;
}

inline int atomicExch(int* address, int value) { return sapo_host::atomic_exchange(address, value); }
inline unsigned atomicExch(unsigned* address, unsigned value) { return sapo_host::atomic_exchange(address, value); }
inline unsigned long long atomicExch(unsigned long long* address, unsigned long long value) {
  return sapo_host::atomic_exchange(address, value);
}
inline float atomicExch(float* address, float value) { return sapo_host::atomic_exchange(address, value); }

inline float __expf(float x) noexcept { return expf(x); }
inline float __logf(float x) noexcept { return logf(x); }
inline float rsqrtf(float x) noexcept { return 1.0f / sqrtf(x); }

#endif  // __CUDACC__
