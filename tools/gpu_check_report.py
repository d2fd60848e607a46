#!/usr/bin/env python
"""The Python half of tools/gpu_check.sh: the preflight probe, the digests of each step's raw output, and the one JSON
report the check writes. Standard library only (the probe imports what it probes), so it runs before anything is
installed.

    gpu_check_report.py probe ENV_FILE NUMBERS_JSON      versions, GPU, TE and megatron-core; exit 1 on a broken setup
    gpu_check_report.py junit JUNIT_XML NUMBERS_JSON     test counts; exit 1 when no test passed
    gpu_check_report.py numbers NUMBERS_JSON KEY=VALUE...  merge values into a step's numbers (numbers parsed)
    gpu_check_report.py record REPORT NAME STATUS SECONDS [--reason R] [--numbers F] [--log F]
    gpu_check_report.py finish REPORT                    the final summary line; exit 1 when a step failed

The report (REPORT, rewritten after each step, so a check cut short still leaves one):
  {"mode", "started", "seconds", "summary": {"passed", "failed", "skipped"},
   "steps": [{"name", "status": passed|failed|skipped, "seconds", "reason", "headline", "numbers", "log",
              "error_tail" (failed steps)}]}
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

TAIL_LINES, TAIL_CHARS = 60, 4000


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def _version(module: str) -> tuple[str | None, str | None]:
    """(version, None) when `module` imports, else (None, the import error)."""
    try:
        mod = importlib.import_module(module)
    except Exception as err:  # noqa: BLE001 - any import failure is the answer
        return None, f"{type(err).__name__}: {err}".splitlines()[0]
    top = sys.modules[module.split(".")[0]]
    return str(getattr(mod, "__version__", None) or getattr(top, "__version__", "unknown")), None


def _nvidia_smi() -> dict | None:
    if shutil.which("nvidia-smi") is None:
        return None
    out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True)
    if out.returncode != 0 or not out.stdout.strip():
        return {"error": (out.stderr or out.stdout).strip()[-300:]}
    name, driver, memory = (x.strip() for x in out.stdout.strip().splitlines()[0].split(","))
    return {"name": name, "driver": driver, "memory": memory, "count": len(out.stdout.strip().splitlines())}


def probe(env_file: Path, numbers_file: Path) -> int:
    """What the machine offers, added to numbers_file. Writes shell assignments (HAVE_GPU, GPU_ARCH, HAVE_TE,
    TE_REASON) for the driver."""
    n: dict = json.loads(numbers_file.read_text()) if numbers_file.is_file() else {}
    n.update(python=sys.version.split()[0], executable=sys.executable, nvidia_smi=_nvidia_smi())
    problems = []
    torch_version, torch_error = _version("torch")
    n["torch"] = torch_version or torch_error
    have_gpu, arch = False, ""
    if torch_version:
        import torch

        n["torch_cuda"] = torch.version.cuda
        have_gpu = torch.cuda.is_available() and torch.cuda.device_count() > 0
        n["cuda_available"] = have_gpu
        if have_gpu:
            major, minor = torch.cuda.get_device_capability()
            arch = f"{major}{minor}"
            props = torch.cuda.get_device_properties(0)
            n.update(device=props.name, capability=f"{major}.{minor}",
                     device_memory_gib=round(props.total_memory / 2**30, 1), device_count=torch.cuda.device_count())
        elif n["nvidia_smi"] and "name" in n["nvidia_smi"]:
            problems.append("nvidia-smi sees a GPU but torch.cuda.is_available() is False")
    else:
        problems.append(f"torch does not import ({torch_error})")
    imports = {}
    for key, module in (("transformers", "transformers"), ("triton", "triton"), ("psutil", "psutil"),
                        ("megatron_core", "megatron.core"), ("transformer_engine", "transformer_engine.pytorch")):
        version, error = _version(module)
        n[key], imports[key] = version or error, version is not None
    if imports["megatron_core"]:
        n["megatron_core_path"] = str(Path(sys.modules["megatron.core"].__file__).parent)
    else:
        problems.append(f"megatron-core does not import ({n['megatron_core']}): run `make gpu-wheels` where "
                        "there is a network and carry outputs/gpu_wheels")
    have_te = imports["transformer_engine"]
    te_reason = "" if have_te else (f"TransformerEngine is not importable ({n['transformer_engine']}); its wheels "
                                    "are far larger than the 64 MiB that travels to the lent GPU machines")
    nvcc = shutil.which("nvcc") or shutil.which(os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"),
                                                             "bin", "nvcc"))
    if nvcc:
        release = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
        n["nvcc"] = release[-1] if release else nvcc
    n["problems"] = problems
    env = {"HAVE_GPU": int(have_gpu), "GPU_ARCH": arch, "HAVE_TE": int(have_te), "TE_REASON": te_reason}
    env_file.write_text("".join(f"{k}={shlex.quote(str(v))}\n" for k, v in env.items()))
    gpu = f"{n['device']} ({n['device_memory_gib']} GiB, sm_{arch})" if have_gpu else "no CUDA GPU"
    smi = n["nvidia_smi"] or {}
    driver = f", driver {smi['driver']}" if "driver" in smi else ""
    n["headline"] = (f"{gpu}{driver}; Python {n['python']}, torch {n['torch']} (CUDA {n.get('torch_cuda')}); "
                     f"megatron-core {n['megatron_core']}; TE {'yes' if have_te else 'no'}")
    _write_json(numbers_file, n)
    for problem in problems:
        print(f"preflight: {problem}", file=sys.stderr)
    print(json.dumps(n, indent=1))
    return 1 if problems else 0


def junit(xml_file: Path, numbers_file: Path) -> int:
    suites = ET.parse(xml_file).getroot()
    suites = [suites] if suites.tag == "testsuite" else list(suites)
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["seconds"] = round(sum(float(s.get("time", 0)) for s in suites), 1)
    counts["failed_tests"] = [f"{case.get('classname')}::{case.get('name')}" for s in suites
                              for case in s.iter("testcase") if case.find("failure") is not None
                              or case.find("error") is not None][:20]
    counts["headline"] = (f"{counts['passed']} passed, {counts['failures'] + counts['errors']} failed, "
                          f"{counts['skipped']} skipped")
    _write_json(numbers_file, counts)
    print(counts["headline"])
    return 0 if counts["passed"] > 0 else 1


def numbers(numbers_file: Path, pairs: list[str]) -> int:
    data = json.loads(numbers_file.read_text()) if numbers_file.is_file() else {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            data[key] = json.loads(value)
        except ValueError:
            data[key] = value
    _write_json(numbers_file, data)
    return 0


def digest_benchmark(raw: dict) -> dict:
    """Per path: each route's time (median, ms), peak and working memory (GiB), the fused route's speed and memory
    against the naive and Megatron routes, and its kernels' bandwidth against the device's HBM peak."""
    cfg = raw["config"]
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[cfg["dtype"]]
    out: dict = {"config": cfg}
    lines = []
    for path, results in raw["paths"].items():
        fused = next(k for k in results if k not in ("naive", "megatron"))
        d = {impl: {"ms": round(r["seconds"] * 1e3, 3), "peak_gib": round(r["peak_bytes"] / 2**30, 3),
                    "working_gib": round(r["working_bytes"] / 2**30, 3)} for impl, r in results.items()}
        for other in ("naive", "megatron"):
            if other in results:
                d[f"speedup_vs_{other}"] = round(results[other]["seconds"] / results[fused]["seconds"], 2)
                d[f"peak_ratio_vs_{other}"] = round(results[fused]["peak_bytes"] / results[other]["peak_bytes"], 3)
        r = results[fused]
        text = f"{path}: fused {d[fused]['ms']:.1f} ms / {d[fused]['peak_gib']:.1f} GiB"
        text += "".join(f", {o} {d[o]['ms']:.1f} ms / {d[o]['peak_gib']:.1f} GiB" for o in ("naive", "megatron")
                        if o in d)
        if path == "logits":
            # forward + backward touch the logits at least 3 times: the forward's read, the backward's read + write
            logits_bytes = cfg["n"] * cfg["vocab"] * itemsize
            d["fwd_bwd_gbps_3_passes"] = round(3 * logits_bytes / r["seconds"] / 1e9, 1)
        if "stats_kernel_gbps" in r:
            d.update(stats_kernel_gbps=round(r["stats_kernel_gbps"], 1), hbm_gbps=r["hbm_gbps"],
                     device=r["device_name"])
            share = r["stats_kernel_gbps"] / r["hbm_gbps"] if r["hbm_gbps"] else None
            d["stats_kernel_hbm_share"] = None if share is None else round(share, 3)
            text += f"; stats kernel {r['stats_kernel_gbps']:.0f} GB/s" + (f" = {share:.0%} of HBM" if share else "")
        out[path] = d
        lines.append(text)
    out["headline"] = " | ".join(lines)
    return out


def digest_policy(raw: dict) -> dict:
    checks = raw.get("checks", {})
    passed = sum(bool(v) for v in checks.values())
    losses = ", ".join(f"{s['loss']:.4f}" for s in raw.get("steps", []))
    lp = raw.get("logprobs", {})
    raw["headline"] = (f"{passed}/{len(checks)} checks ({raw.get('layer_spec')} layers, {raw.get('optimizer')}); "
                       f"losses {losses}; log-prob max err {lp.get('max_abs_err', float('nan')):.3g} "
                       f"(transformers bf16 {lp.get('peer_max_abs_err', float('nan')):.3g})")
    if "packing" in raw:
        raw["headline"] += f"; packed attention: {raw['packing'].get('attention')}"
    failed = [name for name, ok in checks.items() if not ok]
    if failed:
        raw["headline"] += f"; failed: {', '.join(failed)}"
    for phase, lines in raw.get("errors", {}).items():
        raw["headline"] += f"; {phase}: {lines[-1][:160]}"
    return raw


DIGESTS = {"benchmark": digest_benchmark, "policy": digest_policy, "policy_te": digest_policy}


def _tail(log: Path) -> str:
    if not log.is_file():
        return ""
    lines = log.read_text(errors="replace").splitlines()[-TAIL_LINES:]
    return "\n".join(lines)[-TAIL_CHARS:]


def record(report: Path, name: str, status: str, seconds: float, reason: str, numbers: Path | None,
           log: Path | None) -> int:
    data = json.loads(report.read_text()) if report.is_file() else {}
    data.setdefault("started", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    data.setdefault("mode", os.environ.get("GPU_CHECK_MODE", "full"))
    data.setdefault("steps", [])
    step: dict = {"name": name, "status": status, "seconds": round(seconds, 1)}
    if reason:
        step["reason"] = reason
    if numbers is not None and numbers.is_file():
        try:
            values = json.loads(numbers.read_text())
            values = DIGESTS.get(name, lambda x: x)(values)
        except (ValueError, KeyError, TypeError, StopIteration) as err:
            values = {"unreadable": f"{numbers}: {type(err).__name__}: {err}"}
        step["headline"] = values.pop("headline", "") if isinstance(values, dict) else ""
        step["numbers"] = values
    if log is not None:
        step["log"] = os.path.relpath(log, report.parent)
        if status == "failed":
            step["error_tail"] = _tail(log)
    data["steps"] = [s for s in data["steps"] if s["name"] != name] + [step]
    data["summary"] = {k: sum(s["status"] == k for s in data["steps"]) for k in ("passed", "failed", "skipped")}
    data["seconds"] = round(sum(s["seconds"] for s in data["steps"]), 1)
    _write_json(report, data)
    detail = step.get("headline") or reason
    if status == "failed" and not reason:
        last = [line for line in step.get("error_tail", "").splitlines() if line.strip()]
        detail = (detail + " | " if detail else "") + (last[-1][:200] if last else "")
    print(f"[{status:^7}] {name:<13} {seconds:6.1f} s  {detail}", flush=True)
    return 0


def finish(report: Path) -> int:
    data = json.loads(report.read_text())
    s = data["summary"]
    print(f"gpu check ({data['mode']}): {s['passed']} passed, {s['failed']} failed, {s['skipped']} skipped in "
          f"{data['seconds']:.0f} s -> {report}")
    return 1 if s["failed"] else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("probe")
    p.add_argument("env_file", type=Path)
    p.add_argument("numbers", type=Path)
    p = sub.add_parser("junit")
    p.add_argument("xml", type=Path)
    p.add_argument("numbers", type=Path)
    p = sub.add_parser("numbers")
    p.add_argument("numbers", type=Path)
    p.add_argument("pairs", nargs="+", metavar="KEY=VALUE")
    p = sub.add_parser("record")
    p.add_argument("report", type=Path)
    p.add_argument("name")
    p.add_argument("status", choices=["passed", "failed", "skipped"])
    p.add_argument("seconds", type=float)
    p.add_argument("--reason", default="")
    p.add_argument("--numbers", type=Path)
    p.add_argument("--log", type=Path)
    p = sub.add_parser("finish")
    p.add_argument("report", type=Path)
    args = parser.parse_args()
    if args.command == "probe":
        sys.exit(probe(args.env_file, args.numbers))
    if args.command == "junit":
        sys.exit(junit(args.xml, args.numbers))
    if args.command == "numbers":
        sys.exit(numbers(args.numbers, args.pairs))
    if args.command == "record":
        sys.exit(record(args.report, args.name, args.status, args.seconds, args.reason, args.numbers, args.log))
    sys.exit(finish(args.report))


if __name__ == "__main__":
    main()
