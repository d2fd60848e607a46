"""The `megatron-sapo` command. Subcommands stay thin: each parses its arguments and calls the library.

  train  RL training from a YAML config with dotted overrides (one process, or under torchrun / srun)
  plot   PNG training curves of a run, read from its metrics.jsonl
  export a run's checkpoint as a Hugging Face folder (one process, or under torchrun / srun in any layout)
  sweep  a grid of training runs (cells) from a sweep file, one after another, skipping finished ones
  compare runs or a sweep side by side: curves over seeds, stability indicators, a table, figures, MLflow
  info   what this installation has: versions, CUDA, the optional accelerators
  gate   SAPO's gate value f(r) and gradient weight w(r) for given ratios and temperatures
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import sys

from . import __version__


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    rows = [
        ("megatron_sapo", __version__),
        ("python", sys.version.split()[0]),
        ("torch", torch.__version__),
        ("megatron-core", _version("megatron-core")),
        ("transformer-engine (optional)", _version("transformer-engine")),
        ("sglang (optional)", _version("sglang")),
        ("cuda available", str(torch.cuda.is_available())),
        ("cuda devices", str(torch.cuda.device_count())),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


def cmd_gate(args: argparse.Namespace) -> int:
    import torch

    from .losses import sapo_gate, sapo_gate_weight
    from .losses.config import check_positive

    for tau in args.tau:
        check_positive("tau", tau)
    ratios = torch.tensor(args.ratios, dtype=torch.float64)
    print("tau      r        f(r)     w(r)")
    for tau in args.tau:
        f, w = sapo_gate(ratios, tau), sapo_gate_weight(ratios, tau)
        for r, fv, wv in zip(ratios.tolist(), f.tolist(), w.tolist()):
            print(f"{tau:<8g} {r:<8g} {fv:<8.4f} {wv:<8.4f}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import logging

    from .config import load_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)  # its INFO lists every parameter and bucket
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        from .config import dump_yaml

        print(dump_yaml(cfg), end="")
        return 0
    from .trainer import Trainer

    Trainer(cfg).run()
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .loop.recorder import METRICS_FILE, read_history
    from .plots import plot_history

    run_dir = Path(args.output_dir)
    if not (run_dir / METRICS_FILE).is_file():
        raise ValueError(f"{run_dir} holds no {METRICS_FILE}: give the output_dir of a training run")
    for path in plot_history(read_history(run_dir), Path(args.out) if args.out else run_dir / "plots"):
        print(path)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .config import split_override
    from .policy.checkpoint import CheckpointError
    from .policy.convert import export_checkpoint

    overrides = {}
    for text in args.overrides:
        key, value = split_override(text)
        if not key.startswith("policy."):
            raise ValueError(f"override {text!r}: only policy.* options apply to an export")
        overrides[key.removeprefix("policy.")] = value
    try:
        export_checkpoint(args.output_dir, args.hf_out, checkpoint=args.checkpoint, overrides=overrides)
    except CheckpointError as err:
        raise ValueError(str(err)) from None
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from .sweeps.runner import SweepRunner, cell_state, prepare_cell, write_manifest
    from .sweeps.spec import load_sweep

    sweep = load_sweep(args.sweep_file)
    cells = sweep.select(args.cell)
    if args.array:
        print(f"0-{len(sweep.cells) - 1}")
        return 0
    if args.list:
        print(f"sweep {sweep.name}: {len(sweep.cells)} cells in {sweep.output_dir}")
        for cell in cells:
            print(f"{cell.index:4d}  {cell_state(cell):8s}  {cell.name}")
        return 0
    if args.prepare:
        if len(cells) != 1:
            raise ValueError("--prepare takes exactly one --cell")
        write_manifest(sweep)
        if cell_state(cells[0]) != "finished":
            print(prepare_cell(cells[0]))
        return 0
    try:
        failed = SweepRunner(sweep, jobs=args.jobs).run(cells)
    except KeyboardInterrupt as stop:
        print(f"megatron-sapo sweep: {stop}", file=sys.stderr)
        return 130
    if failed:
        print(f"megatron-sapo sweep: {len(failed)} cells failed: {', '.join(c.name for c in failed)}; run the same "
              "command to retry them", file=sys.stderr)
        return 1
    if not args.no_compare and all(cell_state(c) == "finished" for c in sweep.cells):
        from .analysis.compare import compare

        compare([sweep.output_dir])
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .analysis.compare import compare
    from .analysis.stability import StabilityConfig

    cfg = StabilityConfig(window=args.window, drop=args.drop, spike_factor=args.spike_factor,
                          ratio_limit=args.ratio_limit, mismatch_limit=args.mismatch_limit)
    compare(args.dirs, args.out, cfg=cfg, tracking_uri=args.tracking_uri, mlflow=not args.no_mlflow)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-sapo",
        description="RL post-training of Mixture-of-Experts LLMs with SAPO on Megatron-Core.",
    )
    parser.add_argument("--version", action="version", version=f"megatron_sapo {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser(
        "train", help="train a policy with SAPO (or GSPO / the GRPO family) from a YAML config",
        description="RL training: prompts -> rollouts -> rewards -> advantages -> mini-batch updates -> weight sync, "
        "with evaluation, checkpoints (resumed automatically) and MLflow tracking. Run it as one process, or under "
        "torchrun / srun for tensor, pipeline and expert parallelism.")
    train.add_argument("config", help="YAML config, e.g. recipes/tiny_cpu.yaml")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="dotted overrides applied after the file, e.g. trainer.steps=10 loss.loss_type=gspo")
    train.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    train.set_defaults(func=cmd_train)

    plot = sub.add_parser("plot", help="draw a run's training curves (reward, pass@1, gate statistics, lengths)",
                          description="Read a run's metrics from its metrics.jsonl and write PNG curves.")
    plot.add_argument("output_dir", help="the run's output_dir")
    plot.add_argument("--out", help="folder for the PNG files (default: output_dir/plots)")
    plot.set_defaults(func=cmd_plot)

    export = sub.add_parser(
        "export", help="write a run's checkpoint as a Hugging Face folder (sharded safetensors + index)",
        description="Export the newest checkpoint of a training run (or --checkpoint PATH) as a Hugging Face folder "
        "that transformers and SGLang load, streamed: no process holds more than its shard of the model and a "
        "bucket. Run it as one process, or under torchrun / srun with a layout given as policy.* overrides.")
    export.add_argument("output_dir", help="the run's output_dir (its checkpoints/ folder is read)")
    export.add_argument("hf_out", help="the folder to write (replaced atomically if it holds an earlier export)")
    export.add_argument("--checkpoint", help="a checkpoint folder (checkpoints/step_XXXXXXXX) instead of the newest")
    export.add_argument("overrides", nargs="*", metavar="policy.KEY=VALUE",
                        help="layout and export options, e.g. policy.tensor_model_parallel_size=2 "
                        "policy.export_shard_mb=2000")
    export.set_defaults(func=cmd_export)

    sweep = sub.add_parser(
        "sweep", help="run a grid of training runs (a sweep file: base config x grid x seeds), then compare them",
        description="Run the cells of a sweep file, each a `megatron-sapo train` process in its own output_dir and "
        "an MLflow run of the sweep's experiment. Finished cells are skipped and unfinished ones resume, so the same "
        "command continues a stopped sweep. When every cell has finished, the comparison report is written to "
        "<output_dir>/report. recipes/sweep.sbatch runs the cells as a Slurm job array instead.")
    sweep.add_argument("sweep_file", help="the sweep YAML, e.g. recipes/sweeps/paper_small.yaml")
    sweep.add_argument("--cell", type=int, nargs="+", help="only these cells (numbers from --list)")
    sweep.add_argument("--jobs", type=int, default=1, help="cells run at once (default 1)")
    sweep.add_argument("--list", action="store_true", help="list the cells and their state, run nothing")
    sweep.add_argument("--array", action="store_true", help="print the Slurm array range of the cells (0-N)")
    sweep.add_argument("--prepare", action="store_true",
                       help="write the one --cell's config and print its path (nothing when it has finished)")
    sweep.add_argument("--no-compare", action="store_true", help="do not write the report at the end")
    sweep.set_defaults(func=cmd_sweep)

    comp = sub.add_parser(
        "compare", help="compare runs or a sweep: curves over seeds, collapse and other stability indicators",
        description="Group the runs (a sweep folder's cells, or training output_dirs grouped by config without the "
        "seed), and write per group the mean and spread over seeds of the reward and eval pass@1 curves, stability "
        "indicators (collapse, grad-norm spikes, ratio and mismatch blow-ups, entropy), a table and figures; also "
        "logged to MLflow.")
    comp.add_argument("dirs", nargs="+", help="a sweep folder, or training runs' output_dirs")
    comp.add_argument("--out", help="the report folder (default: <sweep folder>/report)")
    comp.add_argument("--window", type=int, default=10, help="smoothing window in logged steps (default 10)")
    comp.add_argument("--drop", type=float, default=0.3,
                      help="collapse: smoothed reward below (1 - DROP) x its running best to the end (default 0.3)")
    comp.add_argument("--spike-factor", type=float, default=5.0,
                      help="grad-norm spike: above this factor x the median of the window before (default 5)")
    comp.add_argument("--ratio-limit", type=float, default=10.0, help="ratio blow-up: ratio/max above this (10)")
    comp.add_argument("--mismatch-limit", type=float, default=1.0,
                      help="mismatch blow-up: mismatch/abs_diff_max above this many nats (1)")
    comp.add_argument("--tracking-uri", help="MLflow store for the comparison run (default: the sweep's)")
    comp.add_argument("--no-mlflow", action="store_true", help="write the report only")
    comp.set_defaults(func=cmd_compare)

    info = sub.add_parser("info", help="print versions, CUDA availability and the optional accelerators")
    info.set_defaults(func=cmd_info)

    gate = sub.add_parser("gate", help="print SAPO's gate f(r) and gradient weight w(r) for given ratios")
    gate.add_argument("--tau", type=float, nargs="+", default=[1.0, 1.05], help="gate temperatures (default 1.0 1.05)")
    gate.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.8, 1.0, 1.5, 2.0, 3.0, 5.0],
                      help="importance ratios r to evaluate")
    gate.set_defaults(func=cmd_gate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    # KEY=VALUE overrides may also follow an option (export OUT HF --checkpoint P policy.x=1)
    if rest and hasattr(args, "overrides") and all("=" in r and not r.startswith("-") for r in rest):
        args.overrides += rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command is None:
        parser.print_help()
        return 0
    try:
        code = args.func(args)
    except ValueError as err:
        parser.exit(2, f"megatron-sapo {args.command}: error: {err}\n")
    _leave_process_group()  # after a normal end only: after an error, a peer may still be inside a collective
    return code


def _leave_process_group() -> None:
    """Tear this process's default process group down before the interpreter exits: left to the interpreter's own
    teardown, gloo's threads can abort the process (SIGABRT, "terminate called without an active exception": seen
    once at the end of a 2-process `megatron-sapo export` under torchrun). Local: no collective."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
