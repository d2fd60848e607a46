"""The plain-torch implementation of the row statistics and of the log-prob backward, a chunk of rows at a time.

It is the default for CPU tensors and wherever the CUDA library is not built. Its working memory is bounded by
`chunk_bytes`: one chunk holds an fp32 copy of its logits plus one fp32 temporary of the same size (and a boolean
mask for -inf entries), never the full [n, v] in fp32.
"""

from __future__ import annotations

import torch

from .row_stats import RowStats

DEFAULT_CHUNK_BYTES = 64 * 1024 * 1024


def rows_per_chunk(vocab: int, chunk_bytes: int) -> int:
    return max(1, chunk_bytes // (4 * vocab))


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
        out = [torch.empty(n, dtype=torch.float32, device=logits.device) for _ in range(4)]
        row_max, row_sumexp, row_zexp, target_z = out
        for rows in self._chunks(n, vocab):
            z = logits[rows].to(torch.float32, copy=True).mul_(inv_temperature)
            target_z[rows] = torch.where(inside[rows], z.gather(1, local[rows, None])[:, 0], 0.0)
            m = z.amax(dim=-1)
            # rows of only -inf: shift by 0 so that exp gives 0 instead of exp(nan)
            m_shift = torch.where(m == float("-inf"), torch.zeros_like(m), m)
            z.sub_(m_shift[:, None])
            e = torch.exp(z)
            row_max[rows], row_sumexp[rows] = m, e.sum(dim=-1)
            if with_entropy:
                # sum e * z_original = sum e * (z - m) + m * sum e; -inf entries (e = 0) must give 0, not nan
                z.masked_fill_(e == 0, 0.0)
                row_zexp[rows] = e.mul_(z).sum(dim=-1) + m_shift * row_sumexp[rows]
            del z, e
        ignored = targets < 0
        row_max.masked_fill_(ignored, 0.0)
        row_sumexp.masked_fill_(ignored, 1.0)
        row_zexp.masked_fill_(ignored, 0.0)
        return RowStats(row_max, row_sumexp, row_zexp if with_entropy else None, target_z)

    def backward(self, logits, targets, vocab_start, inv_temperature, lse, grad_logp, grad_entropy, entropy, out):
        """out[i, v] = inv_T * (g_logp (1[v = target] - p) - g_entropy p (z - lse + entropy)); out may be logits."""
        n, vocab = logits.shape
        local, inside = self._local_targets(targets, vocab_start, vocab)
        valid = (targets >= 0).to(torch.float32)
        g_logp = grad_logp.to(torch.float32) * valid
        for rows in self._chunks(n, vocab):
            logp = logits[rows].to(torch.float32, copy=True).mul_(inv_temperature).sub_(lse[rows, None])
            p = torch.exp(logp)
            if grad_entropy is not None:
                g_ent = (grad_entropy[rows].to(torch.float32) * valid[rows])[:, None]
                # p (log p + H), with 0 (not nan) at -inf entries where p = 0
                ent_term = logp.masked_fill_(p == 0, 0.0).add_(entropy[rows, None]).mul_(p).mul_(g_ent)
            grad = p.mul_(-g_logp[rows, None])
            if grad_entropy is not None:
                grad.sub_(ent_term)
            del logp
            grad.scatter_add_(1, local[rows, None], torch.where(inside[rows], g_logp[rows], 0.0)[:, None])
            out[rows] = grad.mul_(inv_temperature)
            del grad, p
        return out
