/* The C ABI of the fused log-prob / ratio / SAPO-gate kernels.
 *
 * One source (sapo_kernels.cu) builds two libraries with this same ABI:
 *   build/libsapo_kernels_cuda.so  nvcc, device pointers, launches on `stream` (a cudaStream_t, NULL = default)
 *   build/libsapo_kernels_host.so  g++ through host/cuda_on_cpu.h, host pointers, runs the kernels on CPU threads
 * Python loads either with ctypes (megatron_sapo/ops/kernel_library.py).
 *
 * Shapes and conventions (n = rows = tokens, v = this rank's vocab shard width):
 *   logits       [n, v] rows `row_stride` elements apart, last dimension contiguous, dtype SAPO_F32/BF16/F16
 *   targets      [n] int64 GLOBAL token ids; the shard holds ids [vocab_start, vocab_start + v);
 *                a negative target marks an ignored row (log-prob 0, loss 0, gradient 0)
 *   z            logits * inv_temperature, computed in fp32
 *   -inf logits are valid (padded vocab entries) and contribute nothing.
 * Pointers are aligned to their element size (as torch's are); each row is read in 16-byte vectors from its first
 * 16-byte boundary on. Each launching function launches one kernel with one block per row and does not synchronise.
 * Every launching function returns 0 on success, a negative SAPO_ERR_* for bad arguments, or a positive CUDA error
 * code (cudaGetLastError() after the launch; sapo_error_string names both). Arguments are checked in the order
 * dtype, shape, loss parameters; then n == 0 returns 0 without launching (empty tensors may have NULL data); then
 * the pointers. A fault while the kernel runs shows at the next synchronisation: sapo_synchronize reports it.
 * ABI 2 added sapo_probe, sapo_synchronize and sapo_error_string.
 */
#ifndef SAPO_KERNELS_H
#define SAPO_KERNELS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SAPO_ABI_VERSION 2

enum sapo_dtype { SAPO_F32 = 0, SAPO_BF16 = 1, SAPO_F16 = 2 };

enum sapo_loss_kind { SAPO_LOSS_NONE = 0, SAPO_LOSS_SAPO = 1, SAPO_LOSS_GRPO = 2 };

enum sapo_error {
  SAPO_ERR_BAD_DTYPE = -1,
  SAPO_ERR_BAD_SHAPE = -2,    /* n < 0, n > INT32_MAX (one block per row), v <= 0, row_stride < v; backward:
                                 grad_row_stride < v, or in place (grad_logits == logits) with another stride */
  SAPO_ERR_NULL_POINTER = -3, /* a required pointer is NULL (only checked when n > 0) */
  SAPO_ERR_BAD_LOSS = -4,     /* unknown loss kind or invalid parameter: SAPO tau_pos or tau_neg <= 0, GRPO
                                 ratio_low > ratio_high or clip_c NaN, log_ratio_clamp <= 0 (NaN is invalid) */
};

/* Per-token loss of the fused forward, as in megatron_sapo.losses (../shared/ALGORITHM.md):
 *   log_ratio = clamp(logp - old_logp, -log_ratio_clamp, log_ratio_clamp), r = exp(log_ratio)
 *   SAPO: tau = adv > 0 ? tau_pos : tau_neg;  l = -sigmoid(tau (r - 1)) * 4 / tau * adv
 *         dl/dlogp = -adv * 4 sigmoid(x) sigmoid(-x) * r, x = tau (r - 1)
 *   GRPO: l = max(-adv r, -adv clamp(r, ratio_low, ratio_high)); if adv < 0 and clip_c > 0: l = min(l, -adv clip_c)
 *         dl/dlogp = -adv r where the unclipped term is kept (ties included) and the dual cap is not active, else 0
 *   dl/dlogp is 0 where |logp - old_logp| > log_ratio_clamp (the clamp's gradient).
 */
typedef struct {
  int32_t loss_kind;
  float tau_pos;
  float tau_neg;
  float ratio_low;  /* 1 - clip_eps_low */
  float ratio_high; /* 1 + clip_eps_high */
  float clip_c;     /* dual clip; <= 0 disables */
  float log_ratio_clamp;
} sapo_loss_params;

int sapo_abi_version(void);

/* 0 if this library can launch its kernels on the calling thread's current device, else the CUDA error that stops
 * it, e.g. 35 cudaErrorInsufficientDriver (no driver, or an older one than this build's runtime), 100
 * cudaErrorNoDevice, 209 cudaErrorNoKernelImageForDevice or 98 cudaErrorInvalidDeviceFunction (a GPU this build
 * has no code for). Launches nothing. The host build returns 0. */
int sapo_probe(void);

/* Waits for the work on `stream` and returns 0 or its CUDA error (a fault of an earlier launch). The host build runs
 * launches synchronously and returns 0. */
int sapo_synchronize(void* stream);

/* What a return code means: "no error" for 0, the library's message for a SAPO_ERR_*, and "<cudaGetErrorName>:
 * <cudaGetErrorString>" for a CUDA error (the host build names the errors of its emulation). The string is valid
 * until this thread calls sapo_error_string again. */
const char* sapo_error_string(int code);

/* Partial statistics of each row over this shard (for the vocab-parallel merge):
 *   row_max[i]    = max_v z[i, v]                      (-inf if the shard row is all -inf)
 *   row_sumexp[i] = sum_v exp(z[i, v] - row_max[i])    (0 if all -inf)
 *   row_zexp[i]   = sum_v exp(z[i, v] - row_max[i]) (row_max[i] - z[i, v])   (only if row_zexp != NULL; entropy;
 *                   every term >= 0, so entropy = zexp / sumexp + log(sumexp) has no cancellation)
 *   target_z[i]   = z[i, targets[i] - vocab_start] if the target lies in this shard, else 0
 * Ignored rows (target < 0) get row_max = 0, row_sumexp = 1, row_zexp = 0, target_z = 0. */
int sapo_logprob_stats(const void* logits, int32_t dtype, int64_t n, int64_t v, int64_t row_stride,
                       const int64_t* targets, int64_t vocab_start, float inv_temperature,
                       float* row_max, float* row_sumexp, float* row_zexp, float* target_z, void* stream);

/* Single-rank fused forward: the statistics of a whole-vocab row, then in the same kernel
 *   logp[i] = target_z - lse, lse[i] = max + log(sumexp), entropy[i] = zexp / sumexp + log(sumexp) (if != NULL)
 * and, if params.loss_kind != SAPO_LOSS_NONE, the per-token loss and its gradient coefficient, weighted:
 *   loss[i] = weights[i] * l_i,   grad_coeff[i] = weights[i] * dl_i/dlogp_i
 * (old_logp, advantages, weights, loss, grad_coeff are required then; weights carry the aggregation mode and any
 * rollout-correction weight, 0 for tokens outside the response mask). A zero weight gives loss = grad_coeff = 0
 * exactly, without reading that token's old_logp and advantage (they may hold anything, NaN included).
 * Ignored rows give 0 in every output. A target >= v reads no logit (target z = 0, as in sapo_logprob_stats): the
 * caller checks the ids. */
int sapo_fused_forward(const void* logits, int32_t dtype, int64_t n, int64_t v, int64_t row_stride,
                       const int64_t* targets, float inv_temperature, const float* old_logp,
                       const float* advantages, const float* weights, sapo_loss_params params, float* logp,
                       float* lse, float* entropy, float* loss, float* grad_coeff, void* stream);

/* Backward of log-prob (and entropy) with respect to the logits of this shard:
 *   p = exp(z - lse[i])
 *   grad_logits[i, v] = inv_temperature * ( grad_logp[i] * (1[v == target] - p)
 *                                          - grad_entropy[i] * p * (z - lse[i] + entropy[i]) )
 * written in the logits' dtype; grad_entropy and entropy may be NULL (no entropy term; a non-NULL grad_entropy needs
 * entropy). grad_logits may be the logits buffer itself (in place, same row stride). Entries whose logit is -inf and
 * ignored rows get exactly 0; the columns between v and grad_row_stride are not written. */
int sapo_logprob_backward(const void* logits, int32_t dtype, int64_t n, int64_t v, int64_t row_stride,
                          const int64_t* targets, int64_t vocab_start, float inv_temperature, const float* lse,
                          const float* grad_logp, const float* grad_entropy, const float* entropy,
                          void* grad_logits, int64_t grad_row_stride, void* stream);

#ifdef __cplusplus
}
#endif

#endif /* SAPO_KERNELS_H */
