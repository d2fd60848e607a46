#!/usr/bin/env python
"""Synchronous against asynchronous rollouts (trainer.max_staleness = 0 vs K), side by side in one run: seconds per
RL step and where they go, the overlap expected from the synchronous run's own parts, and the reward curves.

    python tools/bench_async.py --engine sglang --steps 10                # step time, a real SGLang server
    python tools/bench_async.py --engine embedded --steps 150 --eval-every 50   # the demo's curves, K=0 vs K=1
    python tools/bench_async.py --engine embedded --steps 150 loss.rollout_correction=tis   # with a correction

Each side is `megatron-sapo train recipes/tiny_cpu.yaml` in its own process, one after the other, on the demo inputs
of tools/prepare_demo.py (made first when --work-dir lacks them), with the same seeds and steps; the numbers are the
trainer's own per-step metrics (metrics.jsonl).

What to expect: with K = 1 the batch of step n + 1 is generated while step n trains, so a step costs about
max(rollout, train) + sync instead of rollout + train + sync; the table prints that bound from the synchronous run's
mean rollout and train seconds. On the 2-core CPU machine the engine (the SGLang server, or the embedded engine's
own process) and the trainer get one core each (OMP_NUM_THREADS=--threads). The reward curve shows whether learning
survives the staleness: with K = 1 the updates of step n start from weights one step newer than the ones that
sampled the batch; the old log-probs are recomputed by the trainer, so the SAPO gate measures the whole difference.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "tiny_cpu.yaml"
SGLANG_PYTHON = os.environ.get("SAPO_SGLANG_PYTHON", str(REPO / ".venv-sglang" / "bin" / "python"))


def run_side(demo: Path, out: Path, args, staleness: int) -> list[dict]:
    overrides = [f"output_dir={out}", f"policy.model_path={demo / 'model'}",
                 f"data.train_files=[{demo / 'train.jsonl'}]", f"data.eval_files=[{demo / 'eval.jsonl'}]",
                 f"trainer.steps={args.steps}", f"trainer.eval_every={args.eval_every}", "trainer.checkpoint_every=0",
                 "tracking.enabled=false", f"trainer.max_staleness={staleness}", f"rollout.engine={args.engine}",
                 f"data.prompts_per_step={args.prompts_per_step}", *args.overrides]
    if args.engine == "sglang":
        overrides.append(f"rollout.sglang.python={SGLANG_PYTHON}")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = out.parent / f"staleness_{staleness}.log"
    print(f"max_staleness={staleness}: {args.steps} steps ({log})", flush=True)
    with log.open("w") as f:
        rc = subprocess.run([sys.executable, "-m", "megatron_sapo.cli", "train", str(RECIPE), *overrides], cwd=REPO,
                            env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:])
        sys.exit(f"max_staleness={staleness} failed (exit code {rc}); the end of {log}:\n{tail}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return sorted(rows, key=lambda r: r["step"])


def summary(rows: list[dict], warmup: int) -> dict:
    steps = [r for r in rows if "time/step_s" in r]
    timed = steps[warmup:] or steps
    mean = lambda key: statistics.fmean(r[key] for r in timed)  # noqa: E731
    rewards = [r["reward/mean"] for r in steps]
    k = max(1, min(5, len(rewards) // 2))
    evals = [(r["step"], r["eval/pass_at_1"]) for r in rows if "eval/pass_at_1" in r]
    return {"s per step (mean)": mean("time/step_s"),
            "s per step (median)": statistics.median(r["time/step_s"] for r in timed),
            "  generating a batch s": mean("time/generate_s"), "  waiting for the batch s": mean("time/rollout_s"),
            "  train s": mean("time/train_s"), "  weight sync s": mean("time/sync_s"),
            "    of it waiting for the engine s": mean("time/sync_wait_s"),
            "tokens/s": sum(r["rollout/tokens"] for r in timed) / sum(r["time/step_s"] for r in timed),
            "staleness (mean)": statistics.fmean(r["rollout/staleness"] for r in steps),
            f"reward/mean, first {k} steps": statistics.fmean(rewards[:k]),
            f"reward/mean, last {k} steps": statistics.fmean(rewards[-k:]),
            "eval pass@1, first": evals[0][1] if evals else None, "eval pass@1, last": evals[-1][1] if evals else None,
            "gate/weight_mean (mean)": statistics.fmean(r["gate/weight_mean"] for r in steps),
            "mismatch/abs_diff_max (mean)": statistics.fmean(r["mismatch/abs_diff_max"] for r in steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=("embedded", "sglang"), default="sglang")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup-steps", type=int, default=1, help="first steps left out of the timings")
    parser.add_argument("--staleness", type=int, default=1, help="K of the asynchronous side")
    parser.add_argument("--prompts-per-step", type=int, default=32)
    parser.add_argument("--eval-every", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="OMP threads of the trainer (and of the engine)")
    parser.add_argument("--work-dir", type=Path, help="keep the demo inputs and both runs here (default: temporary)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for both sides, e.g. "
                        "loss.rollout_correction=tis")
    args = parser.parse_args()
    if args.steps < 2 or args.staleness < 1 or args.warmup_steps < 0:
        parser.error("--steps must be >= 2, --staleness >= 1, --warmup-steps >= 0")
    if args.engine == "sglang" and not Path(SGLANG_PYTHON).exists():
        sys.exit(f"no SGLang environment at {SGLANG_PYTHON}: make sglang-env (or set SAPO_SGLANG_PYTHON)")
    with tempfile.TemporaryDirectory(prefix="bench_async_") as tmp:
        work = args.work_dir or Path(tmp)
        demo, runs = work / "demo", work / time.strftime("async_%Y%m%d-%H%M%S")
        runs.mkdir(parents=True)
        if not (demo / "model" / "config.json").is_file():
            subprocess.run([sys.executable, str(REPO / "tools" / "prepare_demo.py"), str(demo)], cwd=REPO, check=True,
                           stdout=subprocess.DEVNULL)
        sync = summary(run_side(demo, runs / "sync", args, 0), args.warmup_steps)
        ahead = summary(run_side(demo, runs / "async", args, args.staleness), args.warmup_steps)
    rollout, train, sync_s = sync["  waiting for the batch s"], sync["  train s"], sync["  weight sync s"]
    bound = (max(rollout, train) + sync_s) / (rollout + train + sync_s)
    print()
    print(f"tiny Qwen3-MoE demo, {args.engine} engine, {args.prompts_per_step} prompts x 8 samples per step, "
          f"{args.steps} steps ({args.warmup_steps} left out of the timings), {args.threads} thread(s) each; "
          f"{os.cpu_count()} cores")
    print(f"{'':<34}{'max_staleness=0':>16}{f'max_staleness={args.staleness}':>17}{'ratio (K / 0)':>15}")
    for key, value in sync.items():
        other = ahead[key]
        cells = [f"{v:.4g}" if v is not None else "-" for v in (value, other)]
        ratio = f"{other / value:.2f}" if value and other is not None and not key.startswith(("reward", "eval",
                                                                                                "gate", "mis")) else ""
        print(f"{key:<34}{cells[0]:>16}{cells[1]:>17}{ratio:>15}")
    print(f"expected step-time ratio from the synchronous parts, (max(rollout, train) + sync) / (rollout + train + "
          f"sync): {bound:.2f}; measured (mean): {ahead['s per step (mean)'] / sync['s per step (mean)']:.2f}")


if __name__ == "__main__":
    main()
