#!/usr/bin/env python
"""Draw the SAPO paper's gate diagnostics (Figs. 2-3 analogues) from a training run's gate dumps: histograms of the
token ratios r and of the within-sequence log-ratio variance Var_i, and D_i against its bound (tau^2 / 4) Var_i, over
the off-policy updates (the 2nd mini-batch onwards) of the earliest and the latest dumped step, or of --steps.

The run must have been trained with trainer.gate_dump_steps (recipes/sweeps/paper_small.yaml dumps steps 2, 150 and
300). Writes gate_diagnostics.png and gate_diagnostics.json (quantiles, the share of sequences within the bound) to
--out (default <run>/plots) and prints the summary.

    python tools/plot_gate_diagnostics.py outputs/sweeps/paper_small/cells/sapo/seed1
    python tools/plot_gate_diagnostics.py RUN_DIR --steps 2 150 300 --out docs/figures/sapo_gate
"""

from __future__ import annotations

import argparse
import json
import sys

from megatron_sapo.analysis.gate_diagnostics import plot_gate_diagnostics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a training run's output_dir (its gate_dumps/ folder is read)")
    parser.add_argument("--steps", type=int, nargs="+", help="dumped steps to draw (default: earliest and latest)")
    parser.add_argument("--out", help="output folder (default: RUN_DIR/plots)")
    args = parser.parse_args(argv)
    try:
        figure, summary = plot_gate_diagnostics(args.run_dir, args.out, args.steps)
    except ValueError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    for step, info in json.loads(summary.read_text()).items():
        print(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in info.items()))
    print(figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
