"""The `megatron-sapo` command. Subcommands stay thin: each parses its arguments and calls the library.

  train  RL training from a YAML config with dotted overrides (one process, or under torchrun / srun)
  plot   PNG training curves of a run, read from its metrics.jsonl
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
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except ValueError as err:
        parser.exit(2, f"megatron-sapo {args.command}: error: {err}\n")


if __name__ == "__main__":
    sys.exit(main())
