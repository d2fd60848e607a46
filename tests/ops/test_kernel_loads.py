"""tools/check_kernel_loads.py: the kernels' PTX reads the logits with 16-byte loads in every loop (needs nvcc, not a
GPU), and the rule itself on small hand-written PTX (needs nothing)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[2] / "tools" / "check_kernel_loads.py"
_spec = importlib.util.spec_from_file_location("check_kernel_loads", TOOL)
check_kernel_loads = sys.modules.setdefault(_spec.name, importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(check_kernel_loads)  # registered first: its dataclasses look their module up


def test_every_kernel_reads_the_logits_in_16_byte_vectors():
    if check_kernel_loads.find_nvcc() is None:
        pytest.skip("nvcc not found (set NVCC or CUDA_HOME): the check compiles the kernels to PTX")
    done = subprocess.run([sys.executable, str(TOOL)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    table = done.stdout.splitlines()
    for kernel in ("logprob_stats_kernel", "fused_forward_kernel", "logprob_backward_kernel"):
        for dtype in ("fp32", "bf16", "fp16"):
            assert any(kernel in line and f" {dtype} " in line and line.endswith("ok") for line in table), kernel


# A kernel whose loop reads param_0 (the logits) through LOOP_LOADS, and param_1 (a per-row array) once per
# iteration; the logit of the target is read once, before the loop.
PTX = """
.visible .entry k(
    .param .u64 k_param_0,
    .param .u64 k_param_1
)
{
    .reg .b64 %rd<9>;
    ld.param.u64 %rd1, [k_param_0];
    ld.param.u64 %rd2, [k_param_1];
    cvta.to.global.u64 %rd3, %rd1;
    cvta.to.global.u64 %rd4, %rd2;
    ld.global.u16 %rs1, [%rd3+6];
    mov.u64 %rd5, %rd3;
$L__BB0_1:
    LOOP_LOADS
    ld.global.f32 %f1, [%rd4];
    add.s64 %rd5, %rd5, 16;
    setp.lt.u64 %p1, %rd5, %rd4;
    @%p1 bra $L__BB0_1;
    { cvt.f32.bf16 %f2, %rs1;}
    ret;
}
"""


@pytest.mark.parametrize(
    "loop_loads,problems",
    [
        ("ld.global.nc.v4.u32 {%r1, %r2, %r3, %r4}, [%rd5];", []),
        ("ld.global.v4.u32 {%r1, %r2, %r3, %r4}, [%rd5]; ld.global.v2.u16 {%rs2, %rs3}, [%rd5+16];",
         ["1 loads of the logits narrower than 16 bytes in loops"]),
        ("ld.global.v2.f32 {%f3, %f4}, [%rd5];", ["no 16-byte load of the logits in a loop",
                                                   "1 loads of the logits narrower than 16 bytes in loops"]),
    ],
)
def test_rule_counts_only_the_logits_loads_in_loops(loop_loads, problems):
    (report,) = check_kernel_loads.check(PTX.replace("LOOP_LOADS", loop_loads))
    assert report.problems == problems
    assert report.outside_narrow == 1  # the target's logit, before the loop
    assert report.other_loads == 1  # the per-row array, although its load sits in the loop
