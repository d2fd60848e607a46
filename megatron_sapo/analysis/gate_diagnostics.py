"""The SAPO paper's gate diagnostics (its Figs. 2-3) from real training batches: how far the token ratios spread,
how much log r varies within a sequence (Var_i), and whether the mean token gate stays within the paper's bound of
the sequence gate, D_i <= (tau^2 / 4) Var_i.

The learner writes the data (`GateDump`, at the steps of trainer.gate_dump_steps): before each mini-batch update,
the per-token log-ratio log r = log pi_theta - log pi_old that the update's loss sees, the rows' lengths and their
advantages, to <output_dir>/gate_dumps/step_XXXXXXXX.dpR.pt (R: the data-parallel rank; 4 bytes per response token
plus 8 per row). The first update of a step sees r = 1 (the policy has not moved yet); the paper's figures use the
later, off-policy ones, and so do the statistics here by default.

`gate_statistics` turns a step's updates into per-token ratios and per-sequence Var_i, D_i and bound with the loss
library's own functions (losses/metrics.py); `plot_gate_diagnostics` draws them for the earliest and latest dumped
steps (tools/plot_gate_diagnostics.py is its command line). For a run of another loss (GSPO, GRPO) the same SAPO
gate statistics show what SAPO's gate would do with that run's ratios. Pure torch; matplotlib only when drawing.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import torch

from ..atomic import write_atomic
from ..losses.gates import select_tau
from ..losses.masking import masked_row_mean
from ..losses.metrics import sequence_gate_gap, sequence_log_ratio_variance

DUMP_DIR = "gate_dumps"
FIGURE = "gate_diagnostics.png"
SUMMARY = "gate_diagnostics.json"


class GateDump:
    """One RL step's log-ratios, update by update, as this rank's learner saw them."""

    def __init__(self, step: int, loss_cfg):
        self.step = step
        self.meta = {"loss_type": loss_cfg.loss_type, "tau_pos": loss_cfg.tau_pos, "tau_neg": loss_cfg.tau_neg}
        self.updates: list[dict[str, torch.Tensor]] = []

    def add(self, log_ratio: torch.Tensor, response_mask: torch.Tensor, advantages: torch.Tensor) -> None:
        """One update's [B, T] log-ratios and mask and its [B] or [B, T] advantages (rows without response tokens,
        the padding of a mini-batch, are left out)."""
        mask = response_mask.bool().cpu()
        adv = advantages.detach().float().cpu()
        row_adv = masked_row_mean(adv, mask) if adv.dim() == 2 else adv
        keep = mask.any(dim=1)
        self.updates.append({"log_ratio": log_ratio.detach().float().cpu()[mask],
                             "lengths": mask.sum(dim=1)[keep].to(torch.int32), "advantages": row_adv[keep]})

    def save(self, out_dir: Path, dp_rank: int) -> Path:
        buffer = io.BytesIO()
        torch.save({"step": self.step, **self.meta, "updates": self.updates}, buffer)
        return write_atomic(Path(out_dir) / DUMP_DIR / f"step_{self.step:08d}.dp{dp_rank}.pt", buffer.getvalue())


def dumped_steps(run_dir: str | Path) -> list[int]:
    return sorted({int(p.name[5:13]) for p in (Path(run_dir) / DUMP_DIR).glob("step_*.dp*.pt")})


def load_step(run_dir: str | Path, step: int) -> dict:
    """A step's dump with every data-parallel rank's rows, update by update."""
    paths = sorted((Path(run_dir) / DUMP_DIR).glob(f"step_{step:08d}.dp*.pt"))
    if not paths:
        raise ValueError(f"{run_dir} has no gate dump of step {step} (it has {dumped_steps(run_dir) or 'none'}; "
                         "set trainer.gate_dump_steps)")
    parts = [torch.load(p, weights_only=True) for p in paths]
    merged = {k: v for k, v in parts[0].items() if k != "updates"}
    merged["updates"] = [{key: torch.cat([p["updates"][i][key] for p in parts]) for key in parts[0]["updates"][i]}
                         for i in range(len(parts[0]["updates"]))]
    return merged


def _padded(update: dict) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = update["lengths"].long()
    width = int(lengths.max()) if len(lengths) else 0
    mask = torch.arange(width)[None, :] < lengths[:, None]
    log_ratio = torch.zeros(len(lengths), width, dtype=torch.float64)
    log_ratio[mask] = update["log_ratio"].double()
    return log_ratio, mask


def gate_statistics(dump: dict, updates: slice = slice(1, None)) -> dict[str, torch.Tensor]:
    """Token ratios r and per-sequence Var_i, D_i and bound (tau^2/4) Var_i over the chosen updates of a step's dump
    (default: the 2nd onwards, the off-policy ones), with tau by the sign of each sequence's advantage. Sequences
    with a non-finite log-ratio (a skipped update) are left out."""
    chosen = dump["updates"][updates] or dump["updates"]
    ratios, signs, variances, gaps, bounds = [], [], [], [], []
    for update in chosen:
        log_ratio, mask = _padded(update)
        finite = torch.where(mask, log_ratio, 0.0).isfinite().all(dim=1) & mask.any(dim=1)
        log_ratio, mask = log_ratio[finite], mask[finite]
        adv = update["advantages"][finite].double()
        tau = select_tau(adv, dump["tau_pos"], dump["tau_neg"])
        var = sequence_log_ratio_variance(log_ratio, mask)
        gap, bound = sequence_gate_gap(log_ratio, mask, tau, var)
        ratios.append(log_ratio[mask].exp())
        signs.append(adv.sign()[:, None].expand(mask.shape)[mask])
        variances.append(var)
        gaps.append(gap)
        bounds.append(bound)
    return {"ratio": torch.cat(ratios), "adv_sign": torch.cat(signs), "var": torch.cat(variances),
            "gap": torch.cat(gaps), "bound": torch.cat(bounds)}


def summarize(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    def q(x: torch.Tensor, p: float) -> float:
        return float(torch.quantile(x, p)) if len(x) else math.nan

    r, var, sign = stats["ratio"], stats["var"], stats["adv_sign"]
    return {"tokens": len(r), "sequences": len(var),
            "ratio_p01": q(r, 0.01), "ratio_median": q(r, 0.5), "ratio_p99": q(r, 0.99),
            "ratio_outside_0.8_1.2_frac": float(((r < 0.8) | (r > 1.2)).double().mean()) if len(r) else math.nan,
            # where GRPO's clip (eps 0.2) has stopped the gradient and SAPO's gate has not: A < 0 with r < 0.8
            # (SAPO's weight there is at least sech^2(tau_neg / 2), 0.77 at 1.05), A > 0 with r > 1.2
            "neg_adv_ratio_below_0.8_frac": float(((sign < 0) & (r < 0.8)).double().mean()) if len(r) else math.nan,
            "pos_adv_ratio_above_1.2_frac": float(((sign > 0) & (r > 1.2)).double().mean()) if len(r) else math.nan,
            "var_median": q(var, 0.5), "var_p90": q(var, 0.9),
            "gap_mean": float(stats["gap"].mean()) if len(var) else math.nan,
            "bound_mean": float(stats["bound"].mean()) if len(var) else math.nan,
            "within_bound_frac": float((stats["gap"] <= stats["bound"] + 1e-9).double().mean())
            if len(var) else math.nan}


def plot_gate_diagnostics(run_dir: str | Path, out_dir: str | Path | None = None,
                          steps: list[int] | None = None) -> list[Path]:
    """Histograms of r and Var_i and D_i against its bound, one row per step (default: the earliest and the latest
    dumped), into out_dir (default <run_dir>/plots): gate_diagnostics.png and gate_diagnostics.json."""
    from ..plots import figure_class

    run_dir = Path(run_dir)
    available = dumped_steps(run_dir)
    if not available:
        raise ValueError(f"{run_dir} has no gate dumps ({DUMP_DIR}/): train with trainer.gate_dump_steps=[...]")
    steps = steps or sorted({available[0], available[-1]})
    out_dir = Path(out_dir) if out_dir else run_dir / "plots"
    figure = figure_class()(figsize=(15, 3.6 * len(steps)), layout="constrained")
    axes = figure.subplots(len(steps), 3, squeeze=False)
    summary, meta = {}, None
    for row, step in zip(axes, steps):
        dump = load_step(run_dir, step)
        meta = meta or dump
        stats = gate_statistics(dump)
        summary[step] = info = summarize(stats)
        label = f"step {step}, updates 2-{len(dump['updates'])}" if len(dump["updates"]) > 1 else f"step {step}"
        log_r = stats["ratio"].log10().clamp(-3, 3).numpy()
        row[0].hist(log_r, bins=80, color="C0")
        row[0].set_yscale("log")
        row[0].set_xlabel("log10 r (clamped to +-3)")
        row[0].set_title(f"token ratios, {label}: {100 * info['ratio_outside_0.8_1.2_frac']:.1f}% outside "
                         "[0.8, 1.2]", fontsize="medium")
        var = stats["var"].clamp_min(1e-12).log10().numpy()
        row[1].hist(var, bins=60, color="C1")
        row[1].set_xlabel("log10 Var_i (within-sequence variance of log r)")
        row[1].set_title(f"Var_i: median {info['var_median']:.2g}, p90 {info['var_p90']:.2g}", fontsize="medium")
        floor = 1e-10  # log axes: a sequence of equal log-ratios has D_i = bound = 0
        bound, gap = stats["bound"].clamp_min(floor).numpy(), stats["gap"].clamp_min(floor).numpy()
        row[2].scatter(bound, gap, s=6, alpha=0.5, color="C2", label="sequences")
        top = float(max(bound.max(initial=floor), gap.max(initial=floor)))
        row[2].plot([floor, top], [floor, top], color="k", linewidth=1, label="D_i = bound")
        row[2].set_xscale("log")
        row[2].set_yscale("log")
        row[2].set_xlabel(f"bound (tau^2 / 4) Var_i (floor {floor:g})")
        row[2].set_ylabel("D_i")
        row[2].set_title(f"D_i <= bound for {100 * info['within_bound_frac']:.1f}% of sequences", fontsize="medium")
        row[2].legend(fontsize="small")
        for ax in row:
            ax.grid(alpha=0.3)
    name = "/".join(run_dir.resolve().parts[-2:])  # a sweep cell's group/seed
    figure.suptitle(f"{name}: {meta['loss_type']}, tau_pos {meta['tau_pos']:g}, tau_neg {meta['tau_neg']:g}")
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=100)
    return [write_atomic(out_dir / FIGURE, image.getvalue()),
            write_atomic(out_dir / SUMMARY, json.dumps({str(k): v for k, v in summary.items()}, indent=1) + "\n")]
