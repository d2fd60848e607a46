// sapo_kernels.cu - the fused log-prob / entropy / SAPO-gate kernels behind the C ABI of sapo_kernels.h.
//
// One CUDA block per row: each thread keeps an online (max, sum exp, sum exp * z) over its columns, read as 16-byte
// vectors from the row's first 16-byte boundary on (tools/check_kernel_loads.py checks the PTX); warps merge with
// shuffles and the warps through shared memory (one block barrier per row). The forward kernels read the logits
// once; the backward reads them once more and writes the gradient, with no barrier at all. The same source builds
// for the host through host/cuda_on_cpu.h, so only the CUDA subset that header documents is used here.
#include "host/cuda_on_cpu.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <type_traits>

#include "sapo_kernels.h"

#ifndef SAPO_BLOCK_THREADS
#define SAPO_BLOCK_THREADS 256
#endif

namespace {

constexpr int kThreads = SAPO_BLOCK_THREADS;
static_assert(kThreads >= 32 && kThreads <= 1024 && (kThreads & (kThreads - 1)) == 0,
              "SAPO_BLOCK_THREADS must be a power of two in [32, 1024] (the cross-warp merge is a xor butterfly)");
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;

// ---- element access -------------------------------------------------------------------------------------------

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <class T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half(x); }

// Elements per 16-byte vector.
template <class T>
constexpr int kPack = 16 / sizeof(T);

// Columns before the row's first 16-byte boundary (pointers are element-aligned, as every torch tensor is): fewer
// than kPack<T>.
template <class T>
__device__ __forceinline__ int64_t aligned_head(const void* row, int64_t v) {
  const int64_t head = (16 - reinterpret_cast<uintptr_t>(row) % 16) % 16 / sizeof(T);
  return head < v ? head : v;
}

// One 16-byte vector at a 16-byte-aligned p. On the GPU a uint4 load, unpacked in registers: nvcc lowers a memcpy
// to 2- or 8-byte accesses even from an assumed-aligned pointer. The store is __stwb (st.global.wb.v4, the default
// store as inline PTX): a plain uint4 store of floats came out as 4 + 4 + 8 bytes once the loop was unrolled. On the
// host a memcpy keeps the build free of type-punning. tools/check_kernel_loads.py checks the PTX.
template <class T>
__device__ __forceinline__ void load_vector(const T* p, T (&x)[kPack<T>]) {
#ifdef __CUDA_ARCH__
  const uint4 bits = *reinterpret_cast<const uint4*>(p);
  memcpy(x, &bits, sizeof(bits));
#else
  memcpy(x, __builtin_assume_aligned(p, 16), sizeof(x));
#endif
}

template <class T>
__device__ __forceinline__ void store_vector(T* p, const T (&x)[kPack<T>]) {
#ifdef __CUDA_ARCH__
  uint4 bits;
  memcpy(&bits, x, sizeof(bits));
  __stwb(reinterpret_cast<uint4*>(p), bits);
#else
  memcpy(__builtin_assume_aligned(p, 16), x, sizeof(x));
#endif
}

// z[k] = p[k] * scale for N consecutive elements: one element, or a 16-byte vector from a 16-byte-aligned p.
template <class T, int N>
__device__ __forceinline__ void load_scaled(const T* p, float scale, float (&z)[N]) {
  static_assert(N == 1 || N == kPack<T>, "a span is one element or one 16-byte vector");
  T x[N];
  if constexpr (N == 1) {
    x[0] = *p;
  } else {
    load_vector(p, x);
  }
#pragma unroll
  for (int k = 0; k < N; ++k) z[k] = to_float(x[k]) * scale;
}

// p[k] = g[k] for N consecutive elements; a vector as one 16-byte store if kAligned (p is then 16-byte aligned),
// else element by element.
template <bool kAligned, class T, int N>
__device__ __forceinline__ void store(T* p, const float (&g)[N]) {
  T x[N];
#pragma unroll
  for (int k = 0; k < N; ++k) x[k] = from_float<T>(g[k]);
  if constexpr (kAligned && N == kPack<T>) {
    store_vector(p, x);
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) p[k] = x[k];
  }
}

template <int N>
struct Span {
  static constexpr int size = N;
};

// Calls fn(col, Span<N>{}) for this thread's share of the columns [0, v) of a row: N = kPack<T> for the vectors of
// the aligned body (consecutive threads take consecutive vectors, so the block's loads coalesce) and N = 1 for the
// `head` < kPack<T> columns before it (aligned_head) and the ragged tail. Head and tail each take one pass of the
// block's threads, outside any loop: every load that repeats with the vocab is a 16-byte vector.
template <class T, class Fn>
__device__ __forceinline__ void for_each_span(int64_t v, int64_t head, Fn&& fn) {
  constexpr int W = kPack<T>;
  static_assert(W <= kThreads, "head and tail must fit one pass of the block");
  const int64_t vectors = (v - head) / W;
  const int64_t tail = head + vectors * W;
  const int64_t t = threadIdx.x;
  if (t < head) fn(t, Span<1>{});
  for (int64_t j = t; j < vectors; j += kThreads) fn(head + j * W, Span<W>{});
  if (tail + t < v) fn(tail + t, Span<1>{});
}

// e^x of a difference x <= 0 (a logit minus its row's max or lse) as 2^(x log2 e): one MUFU.EX2 and a multiply,
// where expf spends ~8 instructions on range reduction. log2 e multiplies the difference, not the inverse
// temperature: folded there, the row max and lse would be rounded in base-2 units and converted back, ~1 ulp of
// |lse| (4e-6 at |lse| ~ 50) added to every log-prob and to p near 1 in the backward. Here the one extra rounding
// is relative to x, a few 1e-7 of e^x for the terms that matter (|x| < 20).
constexpr float kLog2e = 1.44269504088896341f;
__device__ __forceinline__ float exp_diff(float x) { return exp2f(x * kLog2e); }

// ---- online softmax statistics ---------------------------------------------------------------------------------

// Running max m, s = sum exp(z - m) and t = sum exp(z - m) (m - z) (entropy only) over a set of columns. Every term
// of t is >= 0, so entropy = t / s + log(s) suffers no cancellation (lse - sum p z would, for peaked rows). The empty
// set, and a set of only -inf (padded) columns, is (-inf, 0, 0).
struct RowStats {
  float m, s, t;
};

__device__ __forceinline__ RowStats empty_stats() { return {-INFINITY, 0.0f, 0.0f}; }

// t of `st` re-centred on a new max m >= st.m: exp(st.m - m) (t + s (m - st.m)); 0 for the empty set (s = 0), whose
// m - st.m would be inf.
__device__ __forceinline__ float recentre(const RowStats& st, float m, float rescale) {
  return st.s == 0.0f ? 0.0f : rescale * (st.t + st.s * (m - st.m));
}

// Adds N values with one rescale: a vector costs N + 1 exponentials instead of 2N.
template <bool kEntropy, int N>
__device__ __forceinline__ void accumulate(RowStats& st, const float (&z)[N]) {
  float m = st.m;
#pragma unroll
  for (int k = 0; k < N; ++k) m = fmaxf(m, z[k]);
  if (m == -INFINITY) return;  // nothing finite yet: exp(-inf - -inf) would be NaN
  const float rescale = exp_diff(st.m - m);
  if (kEntropy) st.t = recentre(st, m, rescale);
  st.s *= rescale;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    const float e = exp_diff(z[k] - m);
    st.s += e;
    if (kEntropy) st.t += z[k] == -INFINITY ? 0.0f : e * (m - z[k]);  // e = 0 there, and 0 * inf is NaN
  }
  st.m = m;
}

template <bool kEntropy>
__device__ __forceinline__ RowStats merge(const RowStats& a, const RowStats& b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return a;
  const float ea = exp_diff(a.m - m), eb = exp_diff(b.m - m);
  return {m, a.s * ea + b.s * eb, kEntropy ? recentre(a, m, ea) + recentre(b, m, eb) : 0.0f};
}

// Xor butterfly over lanes [0, kWidth) of each group of kWidth: every lane ends with its group's total.
template <bool kEntropy, int kWidth>
__device__ __forceinline__ RowStats warp_merge(RowStats st) {
#pragma unroll
  for (int offset = kWidth / 2; offset > 0; offset /= 2) {
    // (m, s) travel as one 64-bit shuffle: the same two SHFLs on the GPU, half the warp exchanges on the host.
    unsigned long long ms;
    memcpy(&ms, &st, sizeof(ms));
    ms = __shfl_xor_sync(kFullMask, ms, offset);
    RowStats other;
    memcpy(&other, &ms, sizeof(ms));
    other.t = kEntropy ? __shfl_xor_sync(kFullMask, st.t, offset) : 0.0f;
    st = merge<kEntropy>(st, other);
  }
  return st;
}
static_assert(offsetof(RowStats, s) == sizeof(float), "warp_merge copies (m, s) as 8 contiguous bytes");

// The block's total of every thread's st, valid in thread 0. Uses its shared buffer once: a kernel that merged
// twice would need a barrier between the merges.
template <bool kEntropy>
__device__ __forceinline__ RowStats block_merge(RowStats st) {
  SAPO_SHARED(RowStats, partial, kWarps);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  st = warp_merge<kEntropy, 32>(st);
  if (lane == 0) partial[warp] = st;
  __syncthreads();
  if (warp == 0) st = warp_merge<kEntropy, kWarps>(lane < kWarps ? partial[lane] : empty_stats());
  return st;
}

// Statistics of z = row * inv_temperature over [0, v), valid in thread 0; every thread of the block must call it.
template <class T, bool kEntropy>
__device__ __forceinline__ RowStats row_stats(const T* row, int64_t v, float inv_temperature) {
  RowStats st = empty_stats();
  for_each_span<T>(v, aligned_head<T>(row, v), [&](int64_t col, auto span) {
    float z[decltype(span)::size];
    load_scaled(row + col, inv_temperature, z);
    accumulate<kEntropy>(st, z);
  });
  return block_merge<kEntropy>(st);
}

// z at the target's column, or 0 when the target lies outside [0, v).
template <class T>
__device__ __forceinline__ float target_logit(const T* row, int64_t col, int64_t v, float inv_temperature) {
  return col >= 0 && col < v ? to_float(row[col]) * inv_temperature : 0.0f;
}

// ---- per-token loss ---------------------------------------------------------------------------------------------

// A token's unweighted loss l and dl/dlogp (sapo_kernels.h spells out the definitions).
struct TokenLoss {
  float loss, grad;
};

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// Comparisons rather than fminf/fmaxf, so that NaN stays NaN as in torch.clamp.
__device__ __forceinline__ float clamp(float x, float low, float high) { return x < low ? low : (x > high ? high : x); }

__device__ __forceinline__ TokenLoss token_loss(const sapo_loss_params& p, float logp, float old_logp, float adv) {
  const float log_ratio = logp - old_logp;
  const float r = expf(clamp(log_ratio, -p.log_ratio_clamp, p.log_ratio_clamp));
  TokenLoss out;
  if (p.loss_kind == SAPO_LOSS_SAPO) {
    const float tau = adv > 0.0f ? p.tau_pos : p.tau_neg;
    const float x = tau * (r - 1.0f);
    const float gate = sigmoid(x);
    out.loss = -gate * (4.0f / tau) * adv;
    // 4 sigmoid(x) sigmoid(-x) rather than 4 p (1 - p): 1 - p cancels once p is near 1.
    out.grad = -adv * 4.0f * gate * sigmoid(-x) * r;
  } else {
    const float unclipped = -adv * r;
    const float clipped = -adv * clamp(r, p.ratio_low, p.ratio_high);
    const bool keep_unclipped = unclipped >= clipped;  // on a tie both branches have this gradient
    out.loss = keep_unclipped ? unclipped : clipped;
    out.grad = keep_unclipped ? -adv * r : 0.0f;
    if (adv < 0.0f && p.clip_c > 0.0f && out.loss > -adv * p.clip_c) out = {-adv * p.clip_c, 0.0f};
  }
  if (fabsf(log_ratio) > p.log_ratio_clamp) out.grad = 0.0f;
  return out;
}

// ---- kernels ------------------------------------------------------------------------------------------------------

// A row's target is read by every thread, so the early return of an ignored row is uniform over the block.

template <class T, bool kEntropy>
__global__ void __launch_bounds__(kThreads)
    logprob_stats_kernel(const T* __restrict__ logits, int64_t v, int64_t row_stride,
                         const int64_t* __restrict__ targets, int64_t vocab_start, float inv_temperature,
                         float* __restrict__ row_max, float* __restrict__ row_sumexp, float* __restrict__ row_zexp,
                         float* __restrict__ target_z) {
  const int64_t i = blockIdx.x, target = targets[i];
  if (target < 0) {
    if (threadIdx.x == 0) {
      row_max[i] = 0.0f;
      row_sumexp[i] = 1.0f;
      if (kEntropy) row_zexp[i] = 0.0f;
      target_z[i] = 0.0f;
    }
    return;
  }
  const T* row = logits + i * row_stride;
  const RowStats st = row_stats<T, kEntropy>(row, v, inv_temperature);
  if (threadIdx.x == 0) {
    row_max[i] = st.m;
    row_sumexp[i] = st.s;
    if (kEntropy) row_zexp[i] = st.t;
    target_z[i] = target_logit(row, target - vocab_start, v, inv_temperature);
  }
}

template <class T, bool kEntropy>
__global__ void __launch_bounds__(kThreads)
    fused_forward_kernel(const T* __restrict__ logits, int64_t v, int64_t row_stride,
                         const int64_t* __restrict__ targets, float inv_temperature,
                         const float* __restrict__ old_logp, const float* __restrict__ advantages,
                         const float* __restrict__ weights, sapo_loss_params params, float* __restrict__ logp,
                         float* __restrict__ lse, float* __restrict__ entropy, float* __restrict__ loss,
                         float* __restrict__ grad_coeff) {
  const int64_t i = blockIdx.x, target = targets[i];
  const bool with_loss = params.loss_kind != SAPO_LOSS_NONE;
  if (target < 0) {
    if (threadIdx.x == 0) {
      logp[i] = lse[i] = 0.0f;
      if (kEntropy) entropy[i] = 0.0f;
      if (with_loss) loss[i] = grad_coeff[i] = 0.0f;
    }
    return;
  }
  const T* row = logits + i * row_stride;
  const RowStats st = row_stats<T, kEntropy>(row, v, inv_temperature);
  if (threadIdx.x != 0) return;
  const float row_lse = st.m + logf(st.s);
  const float token_logp = target_logit(row, target, v, inv_temperature) - row_lse;
  logp[i] = token_logp;
  lse[i] = row_lse;
  if (kEntropy) entropy[i] = st.t / st.s + logf(st.s);
  if (!with_loss) return;
  // A zero weight (a token outside the response mask) gives exact zeros, whatever its old_logp and advantage hold.
  const float w = weights[i];
  const TokenLoss tl = w == 0.0f ? TokenLoss{0.0f, 0.0f} : token_loss(params, token_logp, old_logp[i], advantages[i]);
  loss[i] = w * tl.loss;
  grad_coeff[i] = w * tl.grad;
}

// Not __restrict__: grad_logits may be the logits buffer. Each element is read and then written by one thread.
template <class T>
__global__ void __launch_bounds__(kThreads)
    logprob_backward_kernel(const T* logits, int64_t v, int64_t row_stride, const int64_t* targets,
                            int64_t vocab_start, float inv_temperature, const float* lse, const float* grad_logp,
                            const float* grad_entropy, const float* entropy, T* grad_logits,
                            int64_t grad_row_stride) {
  const int64_t i = blockIdx.x, target = targets[i];
  const T* row = logits + i * row_stride;
  T* out = grad_logits + i * grad_row_stride;
  // The spans follow the input's alignment. The output stores them as 16-byte vectors where its row reaches a
  // 16-byte boundary at the same column (always in place), else element by element. One loop per case, so that the
  // choice is not a branch in the loop: nvcc merges the stores of such branches into narrower ones.
  const int64_t head = aligned_head<T>(row, v);
  const auto write_row = [&](auto aligned_out) {
    constexpr bool kAligned = decltype(aligned_out)::value;
    if (target < 0) {
      for_each_span<T>(v, head, [&](int64_t col, auto span) {
        const float zeros[decltype(span)::size] = {};
        store<kAligned>(out + col, zeros);
      });
      return;
    }
    const int64_t target_col = target - vocab_start;
    const float row_lse = lse[i], g_logp = grad_logp[i];
    const float g_entropy = grad_entropy ? grad_entropy[i] : 0.0f, row_entropy = grad_entropy ? entropy[i] : 0.0f;
    for_each_span<T>(v, head, [&](int64_t col, auto span) {
      constexpr int N = decltype(span)::size;
      float z[N], g[N];
      load_scaled(row + col, inv_temperature, z);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const float p = exp_diff(z[k] - row_lse);
        const float hit = col + k == target_col ? 1.0f : 0.0f;
        g[k] = z[k] == -INFINITY
                   ? 0.0f  // a padded column: p = 0, and its z would turn the entropy term into NaN
                   : inv_temperature * (g_logp * (hit - p) - g_entropy * p * (z[k] - row_lse + row_entropy));
      }
      store<kAligned>(out + col, g);
    });
  };
  if (aligned_head<T>(out, v) == head) {
    write_row(std::true_type{});
  } else {
    write_row(std::false_type{});
  }
}

// ---- launchers ----------------------------------------------------------------------------------------------------

int check_rows(int32_t dtype, int64_t n, int64_t v, int64_t row_stride) {
  if (dtype != SAPO_F32 && dtype != SAPO_BF16 && dtype != SAPO_F16) return SAPO_ERR_BAD_DTYPE;
  // One block per row: gridDim.x is at most 2^31 - 1.
  if (n < 0 || n > INT32_MAX || v <= 0 || row_stride < v) return SAPO_ERR_BAD_SHAPE;
  return 0;
}

int check_loss(const sapo_loss_params& p) {
  // Written as !(x > 0) so that NaN parameters are rejected too.
  switch (p.loss_kind) {
    case SAPO_LOSS_NONE:
      return 0;
    case SAPO_LOSS_SAPO:
      if (!(p.tau_pos > 0.0f) || !(p.tau_neg > 0.0f)) return SAPO_ERR_BAD_LOSS;
      break;
    case SAPO_LOSS_GRPO:
      if (!(p.ratio_low <= p.ratio_high) || std::isnan(p.clip_c)) return SAPO_ERR_BAD_LOSS;
      break;
    default:
      return SAPO_ERR_BAD_LOSS;
  }
  return p.log_ratio_clamp > 0.0f ? 0 : SAPO_ERR_BAD_LOSS;
}

// Calls fn(T{}) with T the element type of dtype (already checked).
template <class Fn>
void with_element_type(int32_t dtype, Fn&& fn) {
  switch (dtype) {
    case SAPO_F32:
      return fn(float{});
    case SAPO_BF16:
      return fn(__nv_bfloat16{});
    default:
      return fn(__half{});
  }
}

// 0 or the launch's CUDA error (a positive cudaError_t).
int launch_status() { return static_cast<int>(cudaGetLastError()); }

}  // namespace

extern "C" {

int sapo_abi_version(void) { return SAPO_ABI_VERSION; }

int sapo_probe(void) {
#ifdef __CUDACC__
  // A kernel's attributes need the runtime, the device and this build's code for it, and launch nothing.
  cudaFuncAttributes attributes;
  const cudaError_t err = cudaFuncGetAttributes(&attributes, logprob_stats_kernel<float, false>);
  cudaGetLastError();  // not left for the next launch's status to report
  return static_cast<int>(err);
#else
  return 0;
#endif
}

int sapo_synchronize(void* stream) {
  return static_cast<int>(cudaStreamSynchronize(static_cast<cudaStream_t>(stream)));
}

const char* sapo_error_string(int code) {
  switch (code) {
    case 0:
      return "no error";
    case SAPO_ERR_BAD_DTYPE:
      return "unsupported dtype (SAPO_ERR_BAD_DTYPE)";
    case SAPO_ERR_BAD_SHAPE:
      return "bad shape: n < 0 or > INT32_MAX, v <= 0, a row stride < v, or in place with another stride "
             "(SAPO_ERR_BAD_SHAPE)";
    case SAPO_ERR_NULL_POINTER:
      return "a required pointer is NULL (SAPO_ERR_NULL_POINTER)";
    case SAPO_ERR_BAD_LOSS:
      return "unknown loss kind or invalid loss parameter (SAPO_ERR_BAD_LOSS)";
    default:
      break;
  }
  if (code < 0) return "unknown library error";
  thread_local char message[256];
  const auto err = static_cast<cudaError_t>(code);
  std::snprintf(message, sizeof(message), "%s: %s", cudaGetErrorName(err), cudaGetErrorString(err));
  return message;
}

int sapo_logprob_stats(const void* logits, int32_t dtype, int64_t n, int64_t v, int64_t row_stride,
                       const int64_t* targets, int64_t vocab_start, float inv_temperature, float* row_max,
                       float* row_sumexp, float* row_zexp, float* target_z, void* stream) {
  if (const int err = check_rows(dtype, n, v, row_stride)) return err;
  if (n == 0) return 0;
  if (!logits || !targets || !row_max || !row_sumexp || !target_z) return SAPO_ERR_NULL_POINTER;
  with_element_type(dtype, [&](auto element) {
    using T = decltype(element);
    const auto kernel = row_zexp ? logprob_stats_kernel<T, true> : logprob_stats_kernel<T, false>;
    SAPO_LAUNCH(kernel, dim3(static_cast<unsigned>(n)), dim3(kThreads), 0, static_cast<cudaStream_t>(stream))(
        static_cast<const T*>(logits), v, row_stride, targets, vocab_start, inv_temperature, row_max, row_sumexp,
        row_zexp, target_z);
  });
  return launch_status();
}

int sapo_fused_forward(const void* logits, int32_t dtype, int64_t n, int64_t v, int64_t row_stride,
                       const int64_t* targets, float inv_temperature, const float* old_logp,
                       const float* advantages, const float* weights, sapo_loss_params params, float* logp,
                       float* lse, float* entropy, float* loss, float* grad_coeff, void* stream) {
  if (const int err = check_rows(dtype, n, v, row_stride)) return err;
  if (const int err = check_loss(params)) return err;
  if (n == 0) return 0;
  if (!logits || !targets || !logp || !lse) return SAPO_ERR_NULL_POINTER;
  if (params.loss_kind != SAPO_LOSS_NONE && (!old_logp || !advantages || !weights || !loss || !grad_coeff))
    return SAPO_ERR_NULL_POINTER;
  with_element_type(dtype, [&](auto element) {
    using T = decltype(element);
    const auto kernel = entropy ? fused_forward_kernel<T, true> : fused_forward_kernel<T, false>;
    SAPO_LAUNCH(kernel, dim3(static_cast<unsigned>(n)), dim3(kThreads), 0, static_cast<cudaStream_t>(stream))(
        static_cast<const T*>(logits), v, row_stride, targets, inv_temperature, old_logp, advantages, weights,
        params, logp, lse, entropy, loss, grad_coeff);
  });
  return launch_status();
}

int sapo_logprob_backward(const void* logits, int32_t dtype, int64_t n, int64_t v, int64_t row_stride,
                          const int64_t* targets, int64_t vocab_start, float inv_temperature, const float* lse,
                          const float* grad_logp, const float* grad_entropy, const float* entropy,
                          void* grad_logits, int64_t grad_row_stride, void* stream) {
  if (const int err = check_rows(dtype, n, v, row_stride)) return err;
  // In place, another stride would make one row's writes land on rows other blocks are still reading.
  if (grad_row_stride < v || (grad_logits == logits && grad_row_stride != row_stride)) return SAPO_ERR_BAD_SHAPE;
  if (n == 0) return 0;
  if (!logits || !targets || !lse || !grad_logp || !grad_logits || (grad_entropy && !entropy))
    return SAPO_ERR_NULL_POINTER;
  with_element_type(dtype, [&](auto element) {
    using T = decltype(element);
    SAPO_LAUNCH(logprob_backward_kernel<T>, dim3(static_cast<unsigned>(n)), dim3(kThreads), 0,
                static_cast<cudaStream_t>(stream))(static_cast<const T*>(logits), v, row_stride, targets,
                                                   vocab_start, inv_temperature, lse, grad_logp, grad_entropy,
                                                   entropy, static_cast<T*>(grad_logits), grad_row_stride);
  });
  return launch_status();
}

}  // extern "C"
