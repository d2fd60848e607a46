#!/usr/bin/env python
"""Benchmark the fused loss paths against the naive one: time and memory of forward + backward, side by side.

Two paths, each implementation in its own process so that peak memory is its own:
  logits   logits [N, V] -> policy loss:  naive (fp32 log_softmax + gather + loss library) vs fused_policy_loss
  linear   hidden [N, H], weight [V, H] -> policy loss:  naive (matmul to full logits, then the naive loss) vs
           fused_linear_policy_loss
  --with-megatron adds Megatron-Core's own route: full logits, then its vocab_parallel_cross_entropy
Working memory = peak - (inputs) - (the gradients the loss must return: dlogits, or dH and dW). Peak is the process's
peak RSS on CPU and torch.cuda.max_memory_allocated on a GPU. On a GPU the tool also times the log-prob statistics
kernel alone and prints its achieved read bandwidth against the device's HBM bandwidth; its inputs are made on the GPU
(at N = 16384 the logits are 2.5 G values: minutes of CPU random numbers). --repeats times several runs after the
warm-up (the median is reported); --json writes every number (tools/gpu_check.sh reads it).

    python tools/bench_fused_loss.py                       # N=2048, V=151936, H=1024, fp32, on CPU
    python tools/bench_fused_loss.py --device cuda --dtype bfloat16 --n 16384 --hidden 4096 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

# Peak HBM bandwidth by device name fragment, GB/s (vendor data sheets).
HBM_GBPS = {"H200": 4800.0, "H100 SXM": 3350.0, "H100 PCIe": 2000.0, "H100 NVL": 3900.0, "H100": 3350.0,
            "A100-SXM4-80GB": 2039.0, "A100": 1555.0, "B200": 8000.0, "GB200": 8000.0}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(args) -> dict:
    import torch

    from megatron_sapo.ops import fused_linear_policy_loss, fused_policy_loss
    from megatron_sapo.ops.reference import naive_linear_policy_loss, naive_policy_loss

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    path, impl = args.worker.split(":")
    g = torch.Generator(device=device if device.type == "cuda" else "cpu").manual_seed(0)
    rand = {"generator": g, "device": g.device}
    n, vocab, hidden_size = args.n, args.vocab, args.hidden
    b = max(1, n // 512)
    t = n // b
    targets = torch.randint(0, vocab, (b, t), **rand).to(device)
    old = (-torch.rand(b, t, **rand) * 8).to(device)
    adv = torch.randn(b, **rand).to(device)
    mask = torch.ones(b, t, dtype=torch.bool, device=device)
    if path == "logits":
        inputs = [torch.randn(b, t, vocab, **rand).to(device=device, dtype=dtype).requires_grad_()]
    else:
        inputs = [torch.randn(b, t, hidden_size, **rand).to(device=device, dtype=dtype).requires_grad_(),
                  (torch.randn(vocab, hidden_size, **rand) / hidden_size ** 0.5).to(device=device, dtype=dtype)
                  .requires_grad_()]
    grad_bytes = sum(x.numel() * x.element_size() for x in inputs)

    def run():
        if impl == "megatron":
            return megatron_route(inputs, targets, old, adv, mask)
        if path == "logits":
            fn = naive_policy_loss if impl == "naive" else fused_policy_loss
        else:
            fn = naive_linear_policy_loss if impl == "naive" else fused_linear_policy_loss
        kwargs = {} if impl == "naive" else {"implementation": impl}
        if impl != "naive" and args.chunk_mib:
            kwargs["chunk_bytes"] = args.chunk_mib << 20
        loss, _ = fn(*inputs, targets, old, adv, mask, **kwargs)
        return torch.autograd.grad(loss, inputs)

    if device.type == "cuda":
        run()  # warm-up: kernel library load, cuBLAS handles
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        grads = run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        del grads
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _peak_rss_bytes()
    result = {"path": path, "impl": impl, "seconds": statistics.median(times), "seconds_all": times,
              "peak_bytes": peak, "working_bytes": peak - base - grad_bytes}
    if device.type == "cuda" and path == "logits" and impl == "cuda":
        result.update(_kernel_bandwidth(inputs[0].detach().reshape(-1, vocab), targets.reshape(-1)))
    return result


def megatron_route(inputs, targets, old, adv, mask):
    """Megatron-Core's own route to per-token log-probs: the output layer's full logits [N, V], then its fused
    vocab_parallel_cross_entropy (here with one tensor-parallel rank), then the loss library."""
    import torch
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_sapo.losses import policy_loss
    from megatron_sapo.policy import cpu_compat, parallel

    parallel.init_distributed()
    cpu_compat.enable()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
    logits = inputs[0] @ inputs[1].t() if len(inputs) == 2 else inputs[0]
    logp = -vocab_parallel_cross_entropy(logits.float(), targets)
    loss, _ = policy_loss(logp, old, adv, mask)
    return torch.autograd.grad(loss, inputs)


def _kernel_bandwidth(logits, targets) -> dict:
    import torch

    from megatron_sapo.ops.kernel_library import KernelBackend

    backend = KernelBackend("cuda")
    for _ in range(3):
        backend.stats(logits, targets, 0, 1.0, False)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = 20
    start.record()
    for _ in range(reps):
        backend.stats(logits, targets, 0, 1.0, False)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / reps
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in HBM_GBPS.items() if k in name), None)
    gbps = logits.numel() * logits.element_size() / seconds / 1e9
    return {"stats_kernel_gbps": gbps, "hbm_gbps": peak, "device_name": name}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2048, help="tokens")
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=1024, help="H of the output-layer path")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--paths", nargs="+", default=["logits", "linear"], choices=["logits", "linear"])
    parser.add_argument("--with-megatron", action="store_true",
                        help="also run Megatron-Core's full-logits vocab_parallel_cross_entropy route")
    parser.add_argument("--chunk-mib", type=int, default=0, help="chunk size of the fused paths (0: their default)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    parser.add_argument("--repeats", type=int, default=1, help="timed runs after the warm-up; the median is reported")
    parser.add_argument("--json", help="also write every result to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    fused_impl = "cuda" if args.device == "cuda" else "torch"
    print(f"N={args.n} V={args.vocab} H={args.hidden} {args.dtype} on {args.device}; forward + backward, one process "
          "per run")
    header = f"{'path':<8}{'impl':<8}{'time s':>9}{'peak MB':>10}{'working MB':>12}{'time/naive':>12}{'work/naive':>12}"
    print(header)
    report = {"config": {k: getattr(args, k) for k in ("n", "vocab", "hidden", "dtype", "device", "repeats",
                                                        "chunk_mib")}, "paths": {}}
    for path in args.paths:
        results = {}
        for impl in ("naive", fused_impl) + (("megatron",) if args.with_megatron else ()):
            cmd = [sys.executable, __file__, "--worker", f"{path}:{impl}"] + [
                f"--{k.replace('_', '-')}={getattr(args, k)}"
                for k in ("n", "vocab", "hidden", "dtype", "device", "threads", "chunk_mib", "repeats")]
            print(f"  running {path}:{impl} ...", file=sys.stderr, flush=True)
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"{path}:{impl} failed:\n{out.stderr[-3000:]}")
            results[impl] = json.loads(out.stdout.strip().splitlines()[-1])
        naive = results["naive"]
        report["paths"][path] = results
        if args.json:  # after each path, so that a later failure leaves the numbers measured before it
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
        for impl, r in results.items():
            print(f"{path:<8}{impl:<8}{r['seconds']:>9.2f}{r['peak_bytes'] / 2**20:>10.0f}"
                  f"{r['working_bytes'] / 2**20:>12.0f}{r['seconds'] / naive['seconds']:>12.3f}"
                  f"{r['working_bytes'] / naive['working_bytes']:>12.3f}")
            if "stats_kernel_gbps" in r:
                share = (f" = {r['stats_kernel_gbps'] / r['hbm_gbps']:.0%} of {r['hbm_gbps']:.0f}"
                         if r["hbm_gbps"] else "")
                print(f"        stats kernel on {r['device_name']}: {r['stats_kernel_gbps']:.0f} GB/s{share}")


if __name__ == "__main__":
    main()
