// Self-test kernels for kernels/host/cuda_on_cpu.h. The same source builds with nvcc (sm_80/sm_90) and, through
// the header, with g++ for the host; selftest_main.cpp drives the host build through the C ABI below.
#include "../host/cuda_on_cpu.h"

#include <cuda_bf16.h>

namespace {

constexpr unsigned kFullMask = 0xffffffffu;

// Running max m and sum of exp(x - m) over a set of logits; the empty set is (-inf, 0).
struct MaxSum {
  float m, s;
};

__device__ __forceinline__ void add(MaxSum& acc, float x) {
  if (x > acc.m) {
    acc.s = acc.s * __expf(acc.m - x) + 1.0f;
    acc.m = x;
  } else {
    acc.s += __expf(x - acc.m);
  }
}

__device__ __forceinline__ MaxSum merge(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return a;  // both empty: exp(-inf - -inf) would be NaN
  return {m, a.s * __expf(a.m - m) + b.s * __expf(b.m - m)};
}

__device__ __forceinline__ MaxSum warp_reduce_xor(MaxSum v) {
  for (int offset = 16; offset > 0; offset /= 2)
    v = merge(v, {__shfl_xor_sync(kFullMask, v.m, offset), __shfl_xor_sync(kFullMask, v.s, offset)});
  return v;
}

// Leaves the warp's total in lane 0 only.
__device__ __forceinline__ MaxSum warp_reduce_down(MaxSum v) {
  for (unsigned offset = 16; offset > 0; offset /= 2)
    v = merge(v, {__shfl_down_sync(kFullMask, v.m, offset), __shfl_down_sync(kFullMask, v.s, offset)});
  return v;
}

// One block per row: lse[row] = log(sum(exp(logits[row, :]))), cross-warp merge through static shared memory.
template <int kThreads>
__global__ void __launch_bounds__(kThreads)
    lse_rows_static(const float* __restrict__ logits, int vocab, float* __restrict__ lse) {
  SAPO_SHARED(MaxSum, partial, kThreads / 32);
  const float* row = logits + static_cast<size_t>(blockIdx.x) * vocab;
  MaxSum acc{-INFINITY, 0.0f};
  for (int i = threadIdx.x; i < vocab; i += kThreads) add(acc, row[i]);
  acc = warp_reduce_xor(acc);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) partial[warp] = acc;
  __syncthreads();
  if (warp == 0) {
    acc = warp_reduce_xor(lane < kThreads / 32 ? partial[lane] : MaxSum{-INFINITY, 0.0f});
    if (lane == 0) lse[blockIdx.x] = acc.m + logf(acc.s);
  }
}

// One block per row of bf16 logits: out[row, :] = log_softmax(logits[row, :]) in fp32. Any multiple of 32
// threads; the per-warp partials and the row's log-sum-exp go through dynamic shared memory.
__global__ void log_softmax_rows_dynamic(const __nv_bfloat16* __restrict__ logits, int vocab,
                                         float* __restrict__ out) {
  SAPO_DYNAMIC_SHARED(MaxSum, partial);  // blockDim.x / 32 partials, then the row's lse in partial[0].m
  const size_t offset = static_cast<size_t>(blockIdx.x) * vocab;
  const int warps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  MaxSum acc{-INFINITY, 0.0f};
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) add(acc, __bfloat162float(logits[offset + i]));
  acc = warp_reduce_down(acc);
  if (lane == 0) partial[warp] = acc;
  __syncthreads();
  if (warp == 0) {
    acc = MaxSum{-INFINITY, 0.0f};
    for (int w = lane; w < warps; w += 32) acc = merge(acc, partial[w]);
    acc = warp_reduce_down(acc);
    if (lane == 0) partial[0].m = acc.m + __logf(acc.s);  // partial[0] was read by lane 0 only
  }
  __syncthreads();
  const float lse = partial[0].m;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) out[offset + i] = __bfloat162float(logits[offset + i]) - lse;
}

// One block per row of n values (n <= blockDim.x); threads past the row end return before the first barrier,
// the others keep synchronising and accumulate with shared and global atomics.
__global__ void row_sums_early_exit(const float* __restrict__ values, int n, float* __restrict__ row_sums,
                                    int* max_index, unsigned long long* count, double* total) {
  SAPO_SHARED(float, sum, 1);
  const int t = threadIdx.x;
  if (t == 0) sum[0] = 0.0f;
  if (t >= n) return;
  __syncthreads();
  const float v = values[static_cast<size_t>(blockIdx.x) * n + t];
  atomicAdd(&sum[0], v);
  atomicMax(max_index, t);
  atomicAdd(count, 1ull);
  atomicAdd(total, static_cast<double>(v));
  __syncthreads();
  if (t == 0) row_sums[blockIdx.x] = sum[0];
}

// Grid-stride histogram over a 2D grid of 2D blocks (checks the linear thread numbering and integer atomics).
__global__ void histogram(const int* __restrict__ keys, int n, int* hist, unsigned* hist_u, float* hist_f,
                          int* last_index) {
  const unsigned block_threads = blockDim.x * blockDim.y;
  const unsigned t = threadIdx.y * blockDim.x + threadIdx.x;
  const unsigned stride = gridDim.x * gridDim.y * block_threads;
  for (unsigned i = (blockIdx.y * gridDim.x + blockIdx.x) * block_threads + t; i < unsigned(n); i += stride) {
    atomicAdd(&hist[keys[i]], 1);
    atomicAdd(&hist_u[keys[i]], 2u);
    atomicAdd(&hist_f[keys[i]], 0.5f);
    atomicExch(last_index, static_cast<int>(i));
  }
}

// Each warp op once, with sub-warp widths, for one block of whole warps (at most 1024 threads); thread t's lane
// is t % 32.
__global__ void warp_ops(int* scan, float* broadcast, int* broadcast8, int* down16, double* xor8, unsigned* ballot,
                         int* any_all, int* neighbour) {
  SAPO_SHARED(int, stage, 1024);
  const int t = threadIdx.x, lane = t % 32;
  stage[t] = 7 * t;
  __syncwarp();  // makes the warp's shared-memory writes visible to its other lanes
  neighbour[t] = stage[t ^ 1];
  int sum = t + 1;  // inclusive prefix sum over the warp
  for (unsigned d = 1; d < 32; d *= 2) {
    const int up = __shfl_up_sync(kFullMask, sum, d);
    if (lane >= static_cast<int>(d)) sum += up;
  }
  scan[t] = sum;
  broadcast[t] = __shfl_sync(kFullMask, 0.5f * t, 5);
  broadcast8[t] = __shfl_sync(kFullMask, t, 3, 8);
  down16[t] = __shfl_down_sync(kFullMask, t, 3, 16);
  xor8[t] = __shfl_xor_sync(kFullMask, t + 0.25, 8, 8);  // partner in a later group of 8: own value
  ballot[t] = __ballot_sync(kFullMask, t % 3 == 0);
  any_all[t] = __any_sync(kFullMask, t == 40) | (__all_sync(kFullMask, t < 48) << 1);
}

// Deliberately invalid (host death test): lane 31 exits, then its warp shuffles with the full mask.
__global__ void shuffle_after_lane_exit(float* out) {
  if (threadIdx.x % 32 == 31) return;
  out[threadIdx.x] = __shfl_xor_sync(kFullMask, static_cast<float>(threadIdx.x), 1);
}

}  // namespace

extern "C" {

int selftest_lse_static(const float* logits, int rows, int vocab, float* lse, void* stream) {
  SAPO_LAUNCH(lse_rows_static<256>, rows, 256, 0, static_cast<cudaStream_t>(stream))(logits, vocab, lse);
  return cudaGetLastError();
}

int selftest_log_softmax_dynamic(const void* logits_bf16, int rows, int vocab, int threads, float* out, void* stream) {
  const size_t shmem = (threads / 32) * sizeof(MaxSum);
  SAPO_LAUNCH(log_softmax_rows_dynamic, rows, threads, shmem, static_cast<cudaStream_t>(stream))(
      static_cast<const __nv_bfloat16*>(logits_bf16), vocab, out);
  return cudaGetLastError();
}

int selftest_row_sums_early_exit(const float* values, int rows, int n, int threads, float* row_sums, int* max_index,
                                 unsigned long long* count, double* total, void* stream) {
  SAPO_LAUNCH(row_sums_early_exit, rows, threads, 0, static_cast<cudaStream_t>(stream))(values, n, row_sums,
                                                                                       max_index, count, total);
  return cudaGetLastError();
}

int selftest_histogram(const int* keys, int n, int* hist, unsigned* hist_u, float* hist_f, int* last_index,
                       void* stream) {
  SAPO_LAUNCH(histogram, dim3(3, 2), dim3(32, 4), 0, static_cast<cudaStream_t>(stream))(keys, n, hist, hist_u,
                                                                                        hist_f, last_index);
  return cudaGetLastError();
}

int selftest_warp_ops(int threads, int* scan, float* broadcast, int* broadcast8, int* down16, double* xor8,
                      unsigned* ballot, int* any_all, int* neighbour, void* stream) {
  SAPO_LAUNCH(warp_ops, 1, threads, 0, static_cast<cudaStream_t>(stream))(scan, broadcast, broadcast8, down16, xor8,
                                                                         ballot, any_all, neighbour);
  return cudaGetLastError();
}

int selftest_shuffle_after_lane_exit(float* out, void* stream) {
  SAPO_LAUNCH(shuffle_after_lane_exit, 1, 32, 0, static_cast<cudaStream_t>(stream))(out);
  return cudaGetLastError();
}

}  // extern "C"
