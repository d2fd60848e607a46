"""The prepared GPU check where there is no GPU: `tools/gpu_check.sh --quick` must still run end to end (every step in
its JSON report, none failed, each GPU step skipped with a reason, the kernel build and its PTX check passed where
nvcc exists), so that a broken script shows before a GPU session is spent on it. The parts that only a GPU runs are
checked here on the CPU: the report's digest of the benchmark's JSON, and tools/gpu_check_policy.py --cpu. (shellcheck
covers tools/*.sh in tests/test_slurm.py.)"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
STEPS = ["preflight", "build", "kernel_tests", "sanitizer", "benchmark", "policy", "policy_te"]
GPU_STEPS = STEPS[2:]


def _report_module():
    spec = importlib.util.spec_from_file_location("gpu_check_report", REPO / "tools" / "gpu_check_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _env(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, **extra}


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the check takes minutes: run tools/gpu_check.sh")
def test_quick_check_without_gpu_reports_every_step(tmp_path):
    run = subprocess.run(["bash", str(REPO / "tools" / "gpu_check.sh"), "--quick"], capture_output=True, text=True,
                         timeout=600, env=_env(OUT=str(tmp_path)))
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps) == STEPS and report["mode"] == "quick"
    assert report["summary"]["failed"] == 0, [s for s in report["steps"] if s["status"] == "failed"]
    for name in GPU_STEPS:
        assert steps[name]["status"] == "skipped" and "no CUDA GPU" in steps[name]["reason"], steps[name]
    preflight = steps["preflight"]
    assert preflight["status"] == "passed" and preflight["numbers"]["cuda_available"] is False
    assert preflight["numbers"]["megatron_core"][0].isdigit(), preflight["numbers"]
    nvcc = shutil.which("nvcc") or shutil.which(os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin",
                                                             "nvcc"))
    if nvcc:
        build = steps["build"]
        assert build["status"] == "passed", build
        assert build["numbers"]["arch"] == "sm_90" and build["numbers"]["cuda_lib_bytes"] > 0
        assert build["numbers"]["ptx_check"] == "passed" or not (REPO / "tools" / "check_kernel_loads.py").exists()
    else:
        assert steps["build"]["status"] == "skipped" and "nvcc" in steps["build"]["reason"]
    for name in STEPS:
        assert f"] {name}" in run.stdout
    assert (tmp_path / "logs" / "preflight.log").is_file()


@pytest.mark.slow
def test_benchmark_json_digests_into_the_report(tmp_path):
    """The benchmark step's numbers: the tool's JSON (a tiny CPU run here) as the report digests it."""
    raw = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, str(REPO / "tools" / "bench_fused_loss.py"), "--n", "64", "--vocab", "300",
                          "--paths", "logits", "--repeats", "2", "--json", str(raw)],
                         capture_output=True, text=True, timeout=300, env=_env())
    assert run.returncode == 0, run.stdout + run.stderr
    module = _report_module()
    report = tmp_path / "gpu_check.json"
    module.record(report, "benchmark", "passed", 1.0, "", raw, None)
    step = json.loads(report.read_text())["steps"][0]
    logits = step["numbers"]["logits"]
    assert set(logits) >= {"naive", "torch", "speedup_vs_naive", "peak_ratio_vs_naive", "fwd_bwd_gbps_3_passes"}
    assert logits["naive"]["ms"] > 0 and step["headline"].startswith("logits: fused ")
    assert len(json.loads(raw.read_text())["paths"]["logits"]["torch"]["seconds_all"]) == 2


def test_benchmark_digest_of_gpu_numbers():
    """The GPU-only fields: the Megatron route and the stats kernel's bandwidth against the HBM peak."""
    def run(impl, ms, peak_gib, **extra):
        return {"path": "logits", "impl": impl, "seconds": ms / 1e3, "peak_bytes": peak_gib * 2**30,
                "working_bytes": peak_gib * 2**29, **extra}
    raw = {"config": {"n": 16384, "vocab": 151936, "hidden": 4096, "dtype": "bfloat16", "device": "cuda",
                      "repeats": 5, "chunk_mib": 0},
           "paths": {"logits": {"naive": run("naive", 40.0, 30), "megatron": run("megatron", 30.0, 25),
                                "cuda": run("cuda", 8.0, 10, stats_kernel_gbps=2680.0, hbm_gbps=3350.0,
                                            device_name="NVIDIA H100 80GB HBM3")}}}
    digest = _report_module().digest_benchmark(raw)
    logits = digest["logits"]
    assert logits["speedup_vs_naive"] == 5.0 and logits["speedup_vs_megatron"] == 3.75
    assert logits["peak_ratio_vs_megatron"] == 0.4 and logits["stats_kernel_hbm_share"] == 0.8
    assert logits["fwd_bwd_gbps_3_passes"] == round(3 * 16384 * 151936 * 2 / 8e-3 / 1e9, 1)
    assert "stats kernel 2680 GB/s = 80% of HBM" in digest["headline"]


def test_report_marks_failures_with_the_log_tail(tmp_path):
    module = _report_module()
    log = tmp_path / "logs" / "x.log"
    log.parent.mkdir()
    log.write_text("".join(f"line {i}\n" for i in range(100)) + "RuntimeError: boom\n")
    report = tmp_path / "gpu_check.json"
    module.record(report, "preflight", "passed", 2.0, "", None, None)
    module.record(report, "x", "failed", 3.0, "", None, log)
    module.record(report, "y", "skipped", 0.0, "no CUDA GPU here", None, None)
    data = json.loads(report.read_text())
    assert data["summary"] == {"passed": 1, "failed": 1, "skipped": 1} and data["seconds"] == 5.0
    failed = data["steps"][1]
    assert failed["log"] == "logs/x.log" and failed["error_tail"].endswith("RuntimeError: boom")
    assert "line 0\n" not in failed["error_tail"]
    assert module.finish(report) == 1


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU check runs the script on the GPU")
def test_policy_check_runs_on_cpu(tmp_path):
    """tools/gpu_check_policy.py --cpu: the GPU step's script on the CPU (fp32, no distributed optimizer), so that it
    keeps up with the Policy API between GPU sessions."""
    out = tmp_path / "result.json"
    run = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_check_policy.py"), "--cpu", "--out",
                          str(tmp_path / "work"), "--json", str(out)], capture_output=True, text=True, timeout=600,
                         env=_env())
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert all(result["checks"].values()) and len(result["checks"]) == 11, result["checks"]
    assert len(result["steps"]) == 3 and result["layer_spec"] == "local"
    digest = _report_module().digest_policy(result)
    assert digest["headline"].startswith("11/11 checks (local layers")
    assert result["packing"]["attention"].startswith("blocks") and max(result["packing"]["rows_per_micro_batch"]) > 1
    assert "packed attention: blocks" in digest["headline"]
