"""The plain-torch implementation of the row statistics and of the log-prob backward, a chunk of rows at a time.

It is the default for CPU tensors and wherever the CUDA library is not built. Its working memory is bounded by
`chunk_bytes`: fp32 logits are read in place, and a chunk costs at most one fp32 temporary of [rows, V] in the
forward (logsumexp's), none in the backward when the gradient is fp32 (it is computed in the output buffer), one
otherwise; the entropy adds one more. It never holds an fp32 [n, V] tensor.

For the output-layer path, whose logits chunk is a temporary of its own, stats_inplace and grad_from_exp_inplace
work inside that buffer: no temporary at all, and fewer passes over it.

Its `stats` use the row's log-sum-exp as the shift: max = lse and sumexp = 1 (0 for a row of only -inf), which
merges across ranks exactly like a (max, sum-exp) pair.
"""

from __future__ import annotations

import torch

from .row_stats import RowStats

DEFAULT_CHUNK_BYTES = 64 * 1024 * 1024


def rows_per_chunk(vocab: int, chunk_bytes: int) -> int:
    return max(1, chunk_bytes // (4 * vocab))


def _shift(row_max: torch.Tensor) -> torch.Tensor:
    """The row max as an exp shift; 0 for rows of only -inf, so that exp gives 0 rather than exp(nan)."""
    return torch.where(row_max == float("-inf"), torch.zeros_like(row_max), row_max)


def _as_fp32(x: torch.Tensor, inv_temperature: float) -> torch.Tensor:
    """z = x / T in fp32; no copy when x is already fp32 and T = 1."""
    z = x.float()
    return z if inv_temperature == 1.0 else z * inv_temperature


class TorchChunkedBackend:
    name = "torch"
    has_fused_loss = False

    def __init__(self, chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        self.chunk_bytes = chunk_bytes

    def _chunks(self, n: int, vocab: int):
        step = rows_per_chunk(vocab, self.chunk_bytes)
        return (slice(i, min(i + step, n)) for i in range(0, n, step))

    @staticmethod
    def _local_targets(targets: torch.Tensor, vocab_start: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
        local = targets - vocab_start
        inside = (targets >= 0) & (local >= 0) & (local < vocab)
        return local.clamp(0, vocab - 1), inside

    def stats(self, logits, targets, vocab_start: int, inv_temperature: float, with_entropy: bool) -> RowStats:
        n, vocab = logits.shape
        local, inside = self._local_targets(targets, vocab_start, vocab)
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        target_z = torch.empty_like(lse)
        zexp = torch.empty_like(lse) if with_entropy else None
        for rows in self._chunks(n, vocab):
            z = _as_fp32(logits[rows], inv_temperature)
            lse[rows] = torch.logsumexp(z, dim=-1)
            target_z[rows] = torch.where(inside[rows], z.gather(1, local[rows, None])[:, 0], 0.0)
            if with_entropy:
                centred = lse[rows, None] - z
                # sum p (lse - z) with 0 (not nan) at -inf entries, where p = 0
                zexp[rows] = torch.where(centred < float("inf"), torch.exp(-centred) * centred, 0.0).sum(dim=-1)
                del centred
            del z
        ignored = targets < 0
        sumexp = (lse > float("-inf")).to(torch.float32).masked_fill_(ignored, 1.0)
        lse.masked_fill_(ignored, 0.0)
        target_z.masked_fill_(ignored, 0.0)
        if zexp is not None:
            zexp.masked_fill_(ignored, 0.0)
        return RowStats(lse, sumexp, zexp, target_z)

    def stats_inplace(self, buf: torch.Tensor, targets, vocab_start: int, inv_temperature: float) -> RowStats:
        """Statistics of an fp32 chunk that the caller owns, with no temporary: buf is left holding
        exp(z - shift), shift = max (0 for a row of only -inf), for grad_from_exp_inplace."""
        vocab = buf.shape[1]
        local, inside = self._local_targets(targets, vocab_start, vocab)
        if inv_temperature != 1.0:
            buf.mul_(inv_temperature)
        target_z = torch.where(inside, buf.gather(1, local[:, None])[:, 0], 0.0)
        row_max = buf.amax(dim=-1)
        buf.sub_(_shift(row_max)[:, None]).exp_()
        ignored = targets < 0
        sumexp = buf.sum(dim=-1).masked_fill_(ignored, 1.0)
        return RowStats(row_max.masked_fill_(ignored, 0.0), sumexp, None, target_z.masked_fill_(ignored, 0.0))

    def grad_from_exp_inplace(self, buf, targets, vocab_start, inv_temperature, local: RowStats, merged: RowStats,
                              grad_logp) -> torch.Tensor:
        """Turn buf = exp(z - shift) (from stats_inplace) into inv_T * g (onehot - p) in place, with p normalised by
        the merged (whole-vocab) statistics."""
        index, inside = self._local_targets(targets, vocab_start, buf.shape[1])
        g = torch.where(targets >= 0, grad_logp.to(torch.float32), 0.0)
        to_prob = torch.exp(_shift(local.max) - merged.max) / merged.sumexp
        buf.mul_((-g * to_prob)[:, None])
        buf.scatter_add_(1, index[:, None], torch.where(inside, g, 0.0)[:, None])
        return buf.mul_(inv_temperature) if inv_temperature != 1.0 else buf

    def backward(self, logits, targets, vocab_start, inv_temperature, lse, grad_logp, grad_entropy, entropy, out):
        """out[i, v] = inv_T * (g_logp (1[v = target] - p) - g_entropy p (z - lse + entropy)); out may be logits."""
        n, vocab = logits.shape
        local, inside = self._local_targets(targets, vocab_start, vocab)
        valid = targets >= 0
        g_logp = torch.where(valid, grad_logp.to(torch.float32), 0.0)
        direct = out.dtype == torch.float32 and out.stride(1) == 1
        for rows in self._chunks(n, vocab):
            z = _as_fp32(logits[rows], inv_temperature)
            # log p, computed straight into the output rows when they are fp32 (in place when out is the logits)
            grad = torch.sub(z, lse[rows, None], out=out[rows] if direct else None)
            del z
            if grad_entropy is not None:
                g_ent = torch.where(valid[rows], grad_entropy[rows].to(torch.float32), 0.0)[:, None]
                p = torch.exp(grad)
                ent_term = torch.where(p > 0, p * (grad + entropy[rows, None]), 0.0).mul_(g_ent)
                del p
            grad.exp_().mul_(-g_logp[rows, None])
            if grad_entropy is not None:
                grad.sub_(ent_term)
                del ent_term
            grad.scatter_add_(1, local[rows, None], torch.where(inside[rows], g_logp[rows], 0.0)[:, None])
            if inv_temperature != 1.0:
                grad.mul_(inv_temperature)
            if not direct:
                out[rows] = grad
            del grad
        return out
