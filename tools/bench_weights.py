#!/usr/bin/env python
"""Moving the weights, round 1's paths against the streaming ones, side by side: seconds and peak extra memory per
rank of the HF load, the disk export and the distributed sync to a real SGLang server, for several model sizes.

    python tools/bench_weights.py                                  # 4, 8, 16 layers (65, 129, 257 MB), EP=2 x PP=2
    python tools/bench_weights.py --layers 4 8 --procs 2 --layout pp2 --no-sync

The paths (every process of a gloo job, real Megatron-Core, a random Qwen3-MoE: hidden 512, 8 experts; fp32):
  load    old: every tensor of the folder read on every rank, then the rank's shards filled (round 1's
          read_safetensors + fill); new: policy/hf_weights.load_hf_weights (each rank reads only its tensors)
  export  old: the full state dict gathered on rank 0 by gather_object, written there as one file (round 1);
          new: policy/hf_export.export_hf (each stage's sender streams its own shards)
  sync    old: the full state dict gathered on rank 0, broadcast from rank 0 in buckets (round 1);
          new: loop/publisher.WeightPublisher (a group per stage's sender, buckets straight from the stream)
Peak MB is the largest, over ranks, of the extra private memory (RssAnon) during the operation, and of the extra
resident memory (VmRSS: private memory plus mapped file pages, which safetensors' reads are); seconds are the
slowest rank's. Each old/new pair runs back to back on the same processes, after one untimed warm-up of each (the
page cache holds the files for both). On a 2-core machine the processes share the cores: read the ratios, not the
absolute seconds, and expect a GPU cluster's NCCL to change the sync numbers entirely.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SGLANG_PYTHON = os.environ.get("SAPO_SGLANG_PYTHON", str(REPO / ".venv-sglang" / "bin" / "python"))
LAYOUTS = {"ep2pp2": dict(expert_model_parallel_size=2, pipeline_model_parallel_size=2),
           "tp2pp2": dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2),
           "tp2ep2": dict(tensor_model_parallel_size=2, expert_model_parallel_size=2),
           "pp2": dict(pipeline_model_parallel_size=2), "ep2": dict(expert_model_parallel_size=2),
           "tp2": dict(tensor_model_parallel_size=2), "single": {}}
MODEL = dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=4, head_dim=64, num_experts=8,
             moe_intermediate_size=256)
OPS = ("load", "export", "sync")


# ---- round 1's paths, kept here as the baseline ----------------------------------------------------------------------

def old_load(model, arch, model_dir, padded_vocab):
    """Every tensor of the folder into memory, then this rank's shards filled from them."""
    from megatron_sapo.policy.hf_weights import Layout, _megatron_params, read_safetensors, rule_for, shard

    tensors = {name: t.clone() for name, t in read_safetensors(model_dir).items()}
    lay = Layout(arch, model.config)
    for name, param in _megatron_params(model).items():
        rule = rule_for(name, arch, lay)
        param.data.copy_(shard(rule, [tensors[k] for k in rule.keys], arch, lay, padded_vocab))


def old_gather(policy):
    """The full HF state dict on rank 0 (None elsewhere): each tensor's owner sends it, pickled, to rank 0."""
    import torch.distributed as dist

    from megatron_sapo.policy.parallel import cpu_world_group

    mine = {name: t.cpu().clone() for bucket in policy.hf_buckets(1 << 62) for name, t in bucket}
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, parts, dst=0, group=cpu_world_group())
    return {k: v for part in parts for k, v in part.items()} if parts else None


def old_export(policy, out: Path, source: Path):
    import shutil

    import torch.distributed as dist
    from safetensors.torch import save_file

    state = old_gather(policy)
    if state is not None:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        shutil.copy2(source / "config.json", out / "config.json")
    dist.barrier()


# ---- one size, on every process ------------------------------------------------------------------------------------

def _measure(name: str, fn, results: dict) -> None:
    import torch.distributed as dist

    from megatron_sapo.memory import PeakMemory

    dist.barrier()
    began = time.perf_counter()
    with PeakMemory() as peak:
        fn()
        dist.barrier()
    results[name] = {"s": time.perf_counter() - began, "anon": peak.anon, "rss": peak.rss}


def _worker(rank, spec):
    import torch
    import transformers

    from megatron_sapo.config import load_config
    from megatron_sapo.loop.publisher import WeightPublisher
    from megatron_sapo.loop.rollouts import EngineOnly, NoRollouts
    from megatron_sapo.policy.hf_weights import load_hf_weights
    from megatron_sapo.policy.model import padded_vocab_size
    from megatron_sapo.policy.policy import Policy
    from megatron_sapo.rollout.weight_sync import WeightUpdateGroup

    torch.set_num_threads(1)
    src, work, url = Path(spec["src"]), Path(spec["work"]), spec["url"]
    overrides = [f"policy.model_path={src}", f"rollout.sglang.bucket_mb={spec['bucket_mb']}",
                 f"policy.export_bucket_mb={spec['bucket_mb']}", "rollout.engine=sglang",
                 "rollout.sglang.weight_sync=distributed", *[f"policy.{k}={v}" for k, v in spec["layout"].items()]]
    if url:
        overrides.append(f"rollout.sglang.urls=[{url}]")
    cfg = load_config(None, overrides)
    policy = Policy(cfg.policy)
    padded = padded_vocab_size(policy.arch, policy.cfg)
    paths = {
        "load": (lambda: old_load(policy.module, policy.arch, src, padded),
                 lambda: load_hf_weights(policy.module, policy.arch, src, padded)),
        "export": (lambda: old_export(policy, work / "old", src), lambda: policy.export_hf(work / "new")),
    }
    publisher = old_group = None
    if url:
        engine = transformers.AutoTokenizer.from_pretrained(src) if rank == 0 else None
        if rank == 0:
            from megatron_sapo.rollout.sglang import SGLangEngine

            engine = SGLangEngine(engine, urls=[url])
            old_group = WeightUpdateGroup([url], master_address="127.0.0.1", backend="gloo", group_name="bench_old",
                                          bucket_bytes=spec["bucket_mb"] << 20, reference_dir=src)
        rollouts = EngineOnly(engine) if rank == 0 else NoRollouts()
        publisher = WeightPublisher(policy, cfg, work, say=print)
        publisher.folder = src
        version = iter(range(1, 100))

        def old_sync():
            state = old_gather(policy)
            if old_group is not None:
                old_group.update(state.items(), f"old-{next(version)}")

        paths["sync"] = (old_sync, lambda: publisher.publish(next(version), rollouts))
    results = {}
    for op, (old, new) in paths.items():
        old()  # warm-up: page cache, groups formed, allocator
        new()
        _measure(f"{op}/old", old, results)
        _measure(f"{op}/new", new, results)
    if publisher is not None:
        publisher.close()
    if old_group is not None:
        old_group.close()
    results["params"] = sum(p.numel() * p.element_size() for p in policy.module.parameters())
    (work / f"rank{rank}.json").write_text(json.dumps(results))


def run_size(layers: int, args, root: Path) -> dict:
    from megatron_sapo.policy.parallel import spawn_local

    spec_path = root / f"l{layers}"
    src, work = spec_path / "src", spec_path / "work"
    work.mkdir(parents=True, exist_ok=True)
    import importlib.util

    loader = importlib.util.spec_from_file_location("tiny_models", REPO / "tools" / "tiny_models.py")
    tiny = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(tiny)
    tiny.build("qwen3_moe", src, num_hidden_layers=layers, **MODEL)
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    server = None
    url = ""
    if args.sync:
        from megatron_sapo.policy.parallel import free_port
        from megatron_sapo.rollout.sglang import SGLangServer

        server = SGLangServer(src, free_port(), python=SGLANG_PYTHON, log_path=spec_path / "sglang.log",
                              extra_args=("--device", "cpu", "--dtype", "float32", "--max-total-tokens", "4096",
                                          "--mem-fraction-static", "0.2", "--sleep-on-idle"),
                              env={"SGLANG_USE_CPU_ENGINE": "1",
                                   "PYTHONPATH": str(REPO / "tools" / "sglang_cpu_stubs")})
        server.start()
        url = f"http://127.0.0.1:{server.port}"
    try:
        spec = {"src": str(src), "work": str(work), "url": url, "bucket_mb": args.bucket_mb,
                "layout": LAYOUTS[args.layout]}
        spawn_local(_worker, args.procs, spec)
    finally:
        if server is not None:
            server.stop()
    ranks = [json.loads((work / f"rank{r}.json").read_text()) for r in range(args.procs)]
    row = {"layers": layers, "model_mb": size / 2**20, "shard_mb": max(r["params"] for r in ranks) / 2**20}
    for key in ranks[0]:
        if key != "params":
            row[key] = {"s": max(r[key]["s"] for r in ranks), "anon": max(r[key]["anon"] for r in ranks) / 2**20,
                        "rss": max(r[key]["rss"] for r in ranks) / 2**20}
    return row


def print_table(rows: list[dict], args) -> None:
    print(f"\n{args.procs} processes, layout {args.layout}, buckets of {args.bucket_mb} MB; peak MB = the largest "
          "rank's extra RssAnon / VmRSS")
    header = (f"{'model MB':>9} {'op':<7} {'old s':>8} {'new s':>8} {'new/old':>8} {'old anon':>9} {'new anon':>9} "
              f"{'old rss':>8} {'new rss':>8} {'new s/GB':>9}")
    print(header)
    print("-" * len(header))
    for row in rows:
        for op in OPS:
            if f"{op}/old" not in row:
                continue
            old, new = row[f"{op}/old"], row[f"{op}/new"]
            print(f"{row['model_mb']:>9.0f} {op:<7} {old['s']:>8.2f} {new['s']:>8.2f} {new['s'] / old['s']:>8.2f} "
                  f"{old['anon']:>9.1f} {new['anon']:>9.1f} {old['rss']:>8.1f} {new['rss']:>8.1f} "
                  f"{new['s'] / (row['model_mb'] / 1024):>9.2f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 8, 16], help="model sizes, in layers")
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="ep2pp2")
    parser.add_argument("--bucket-mb", type=int, default=16)
    parser.add_argument("--no-sync", dest="sync", action="store_false", help="skip the SGLang sync (no server)")
    parser.add_argument("--work-dir", help="keep the models and results here (default: a temporary folder)")
    parser.add_argument("--json", help="write the measurements here as JSON")
    args = parser.parse_args(argv)
    if args.sync and not Path(SGLANG_PYTHON).exists():
        parser.error(f"the SGLang environment {SGLANG_PYTHON} is missing (make sglang-env), or pass --no-sync")
    # see megatron_sapo/memory.py: measure what the code holds, not what glibc keeps; inherited by the processes
    os.environ.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_ARENA_MAX="1", OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory(prefix="bench_weights_") as tmp:
        root = Path(args.work_dir or tmp)
        rows = []
        for layers in args.layers:
            print(f"{layers} layers ...", flush=True)
            rows.append(run_size(layers, args, root))
        print_table(rows, args)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
