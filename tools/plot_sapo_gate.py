#!/usr/bin/env python
"""Draw the SAPO paper's Figure 1 for this implementation: the surrogate objective per unit advantage and the weight
on the policy gradient r * grad log p, against the importance ratio r, for several gate temperatures, beside
GRPO's hard clip (eps 0.2) and GSPO's band (eps 3e-4 / 4e-4), for A > 0 and A < 0.

Every curve comes from `megatron_sapo.losses.policy_loss` (values by evaluation, weights by autograd), not from a
copy of the formulas, so the picture shows what the library computes. Also prints the weights at the ratios that
../shared/ALGORITHM.md tabulates.

    python tools/plot_sapo_gate.py --out outputs/sapo_gate.png
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from megatron_sapo.losses import policy_loss

PAPER_POINTS = [(1.0, [0.8, 1.5, 2.0, 3.0, 5.0]), (1.05, [1.5, 2.0, 5.0])]


def library_curves(ratios: torch.Tensor, advantage: float, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """(objective per unit |A|, gradient weight) at each ratio, from single-token sequences through policy_loss."""
    n = ratios.numel()
    old = torch.full((n, 1), -1.0, dtype=torch.float64)
    log_probs = (old + ratios.log()[:, None]).requires_grad_()
    adv = torch.full((n,), advantage, dtype=torch.float64)
    mask = torch.ones(n, 1, dtype=torch.bool)
    # seq-mean-token-sum over one "total sequence": the loss is the sum of the rows' losses, so the gradient of row i
    # is its own d loss_i / d log p_i = -A * weight_i * r_i.
    loss, _ = policy_loss(log_probs, old, adv, mask, loss_agg_mode="seq-mean-token-sum", total_seqs=1,
                          compute_metrics=False, **options)
    (grad,) = torch.autograd.grad(loss, log_probs)
    weight = grad[:, 0] / (-advantage * ratios)
    values = torch.stack([
        policy_loss(log_probs[i:i + 1].detach(), old[i:i + 1], adv[i:i + 1], mask[i:i + 1],
                    compute_metrics=False, **options)[0]
        for i in range(n)
    ])
    return -values / abs(advantage), weight


def draw(out: Path, taus: list[float], r_max: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = torch.linspace(0.02, r_max, 300, dtype=torch.float64)
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True)
    for row, adv in enumerate((1.0, -1.0)):
        ax_obj, ax_w = axes[row]
        for tau in taus:
            tau_opts = {"tau_pos": tau} if adv > 0 else {"tau_neg": tau}
            obj, w = library_curves(ratios, adv, loss_type="sapo", **tau_opts)
            ax_obj.plot(ratios, obj, label=f"SAPO tau={tau:g}")
            ax_w.plot(ratios, w, label=f"SAPO tau={tau:g}")
        obj, w = library_curves(ratios, adv, loss_type="grpo", clip_ratio_c=None)
        ax_obj.plot(ratios, obj, "k--", label="GRPO clip eps=0.2")
        ax_w.plot(ratios, w, "k--", label="GRPO clip eps=0.2")
        obj, w = library_curves(ratios, adv, loss_type="gspo")
        ax_obj.plot(ratios, obj, ":", color="tab:gray", label="GSPO (seq. ratio) eps=3e-4/4e-4")
        ax_w.axvspan(1 - 3e-4, 1 + 4e-4, color="tab:red", alpha=0.5, lw=2, label="GSPO band (weight 1 inside)")
        sign = "A > 0" if adv > 0 else "A < 0"
        ax_obj.set_title(f"surrogate objective per unit |A|, {sign}")
        ax_w.set_title(f"weight on r * grad log p, {sign}")
        ax_w.set_ylim(-0.05, 1.1)
        for ax in (ax_obj, ax_w):
            ax.axvline(1.0, color="0.8", lw=0.8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("importance ratio r")
    fig.suptitle("SAPO soft gate vs. hard clipping (computed by megatron_sapo.losses.policy_loss)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, out)
    plt.close(fig)


def print_weight_table() -> None:
    print("gate weight w(r) from the library's gradient (ALGORITHM.md lists these to 3 decimals)")
    for tau, rs in PAPER_POINTS:
        _, w = library_curves(torch.tensor(rs, dtype=torch.float64), 1.0, loss_type="sapo", tau_pos=tau)
        print(f"  tau={tau:<5g}" + "".join(f"  w({r:g})={x:.3f}" for r, x in zip(rs, w.tolist())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/sapo_gate.png"), help="PNG to write")
    parser.add_argument("--tau", type=float, nargs="+", default=[0.5, 1.0, 1.05, 2.0], help="gate temperatures")
    parser.add_argument("--r-max", type=float, default=3.0, help="largest ratio on the x axis")
    args = parser.parse_args()
    if args.r_max <= 1.0:
        parser.error(f"--r-max must be above 1, got {args.r_max}")
    start = time.perf_counter()
    print_weight_table()
    draw(args.out, args.tau, args.r_max)
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
