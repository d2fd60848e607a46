#!/usr/bin/env python
"""Rollout throughput of the SGLang engine (a real server in its own environment) and of the embedded engine on
the same tiny model and batch, and weight-sync time per GB for both (SGLang: /update_weights_from_disk of an
exported folder; embedded: reloading it). Prints the numbers side by side.

    python tools/bench_rollout.py --prompts 16 --samples 4 --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))


def _tokens(groups) -> int:
    return sum(len(c.output_ids) for group in groups for c in group)


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--sync-hidden", type=int, default=512, help="hidden size of the model used for sync timing")
    parser.add_argument("--sglang-python", default=os.environ.get("SAPO_SGLANG_PYTHON",
                                                                   str(REPO / ".venv-sglang" / "bin" / "python")))
    args = parser.parse_args()

    import tiny_models
    import transformers

    from megatron_sapo.data import sort_digits_examples
    from megatron_sapo.policy.parallel import free_port
    from megatron_sapo.rollout import EmbeddedEngine, SamplingParams
    from megatron_sapo.rollout.sglang import SGLangEngine, SGLangServer

    prompts = [row["prompt"] for row in sort_digits_examples(args.prompts, seed=0)]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sync_kwargs = dict(hidden_size=args.sync_hidden, intermediate_size=4 * args.sync_hidden,
                           moe_intermediate_size=args.sync_hidden, num_hidden_layers=4)
        tiny_models.build("qwen3_moe", tmp / "model", **sync_kwargs)
        tiny_models.build("qwen3_moe", tmp / "model2", seed=1, **sync_kwargs)
        gigabytes = _folder_bytes(tmp / "model2") / 1e9
        print(f"Qwen3-MoE, hidden {args.sync_hidden}, 4 layers ({gigabytes * 1e3:.0f} MB fp32); "
              f"{args.prompts} prompts x {args.samples} samples, up to {args.max_new_tokens} new tokens")

        server = SGLangServer(tmp / "model", free_port(), python=args.sglang_python, log_path=tmp / "server.log",
                              extra_args=("--device", "cpu", "--dtype", "float32", "--max-total-tokens", "16384"),
                              env={"SGLANG_USE_CPU_ENGINE": "1",
                                   "PYTHONPATH": str(REPO / "tools" / "sglang_cpu_stubs")})
        server.start()
        results = {}
        try:
            engines = {"sglang": SGLangEngine(transformers.AutoTokenizer.from_pretrained(tmp / "model"),
                                              servers=[server]),
                       "embedded": EmbeddedEngine(tmp / "model")}
            for name, engine in engines.items():
                engine.generate(prompts[:2], 1, SamplingParams(max_new_tokens=4))  # warm-up
                start = time.perf_counter()
                groups = engine.generate(prompts, args.samples, params)
                seconds = time.perf_counter() - start
                start = time.perf_counter()
                engine.update_weights(tmp / "model2", "v1")
                sync = time.perf_counter() - start
                results[name] = (_tokens(groups) / seconds, sync / gigabytes)
        finally:
            server.stop()
    base = results["embedded"][0]
    print(f"{'engine':<10}{'tokens/s':>12}{'x embedded':>12}{'sync s/GB':>12}")
    for name, (tps, sync) in results.items():
        print(f"{name:<10}{tps:>12.0f}{tps / base:>12.2f}{sync:>12.2f}")


if __name__ == "__main__":
    main()
