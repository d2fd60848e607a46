"""Check in the PTX that every fused kernel reads the logits with 16-byte vector loads in its loops.

The kernels of kernels/sapo_kernels.cu are bound by the bandwidth of one pass over [tokens, vocab] logits, and a
16-byte load (ld.global.v4.u32 / .v4.f32 / .nc.v4.*) moves 8 bf16 or 4 fp32 values per instruction where 2- or 4-byte
loads need 8 or 4 instructions. The source asks for vectors, but nvcc may still split them (it lowered the earlier
memcpy of a 16-byte vector to ld.global.u16 for bf16/fp16 and to v2.f32 + f32 for fp32), and nothing fails when it
does: the results stay right and only the speed drops. This tool compiles the source to PTX (nvcc -ptx, compute_90
unless --arch says otherwise; NVCC, else CUDA_HOME/bin/nvcc, else nvcc on PATH) and checks each .entry.

The rule, per kernel:
  * The logits' loads are the global loads (ld.global*, .nc included) whose address register derives from the
    kernel's first parameter, the logits pointer of every kernel here: registers are followed from
    `ld.param [.._param_0]` through any instruction except loads (a loaded value is data, not an address).
    Loads of targets, lse, advantages, ... derive from other parameters and are counted apart ("other").
  * A load is "in a loop" if it lies in a natural loop of the kernel's control-flow graph (basic blocks split at
    labels and branches; a back edge is a branch to a block that dominates it).
  * The kernel passes if at least one logits load in a loop is 16 bytes and none in a loop is narrower.
Narrow logits loads outside loops are allowed and reported: the columns before a row's first 16-byte boundary, the
ragged tail (each fewer than 8 elements, one pass of the block's threads) and the target's logit are a bounded
amount per row, whereas a narrow load in a loop repeats with the vocab. Counting loops instead of the logits'
element type keeps the rule working for fp32, whose per-row float arrays share the element type of the logits.
The same table reports global stores in loops (the backward's gradient): at least one must be 16 bytes if there are
any; narrower ones remain where the gradient's rows are aligned differently from the logits' rows.

Exit status: 0 if every kernel passes, 1 (naming the kernels) if one fails, 2 if nvcc or the PTX is unusable.
    python tools/check_kernel_loads.py [--arch compute_90] [--source kernels/sapo_kernels.cu] [--ptx FILE]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "kernels" / "sapo_kernels.cu"
DTYPES = {"float": "fp32", "__nv_bfloat16": "bf16", "__half": "fp16"}
REGISTER = re.compile(r"%[A-Za-z_][\w$]*")
LABEL = re.compile(r"^\s*(\$?[A-Za-z_$][\w$]*)\s*:(?!:)")


def find_nvcc() -> str | None:
    if os.environ.get("NVCC"):
        return shutil.which(os.environ["NVCC"])
    cuda_nvcc = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"
    return str(cuda_nvcc) if cuda_nvcc.exists() else shutil.which("nvcc")


def compile_ptx(nvcc: str, source: Path, arch: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "kernels.ptx"
        cmd = [nvcc, "-ptx", "-O3", "-std=c++20", f"-I{REPO / 'kernels'}", f"-arch={arch}", str(source), "-o", str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr}")
        return out.read_text()


@dataclass
class Instruction:
    guarded: bool
    opcode: str
    operands: list[str]


def split_operands(text: str) -> list[str]:
    """Commas outside {vector} and [address] brackets separate operands."""
    operands, depth, current = [], 0, ""
    for ch in text:
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        if ch == "," and depth == 0:
            operands.append(current.strip())
            current = ""
        else:
            current += ch
    if current.strip():
        operands.append(current.strip())
    return operands


def parse_body(body: str) -> tuple[list[Instruction], dict[str, int]]:
    """Instructions of one .entry body and the index of the instruction each label precedes."""
    body = re.sub(r"//[^\n]*", "", body)
    instructions, labels = [], {}
    for statement in body.split(";"):
        statement = statement.strip().lstrip("{}").strip()
        while match := LABEL.match(statement):
            labels[match.group(1)] = len(instructions)
            statement = statement[match.end():].lstrip().lstrip("{}").strip()
        if not statement or statement.startswith("."):
            continue
        guarded = statement.startswith("@")
        if guarded:
            statement = statement.split(None, 1)[1]
        opcode, _, rest = statement.partition(" ")
        instructions.append(Instruction(guarded, opcode.strip(), split_operands(rest.strip())))
    return instructions, labels


def loop_instructions(instructions: list[Instruction], labels: dict[str, int]) -> set[int]:
    """Indices of the instructions inside a natural loop of the control-flow graph."""
    starts = {0, *labels.values()}
    for i, ins in enumerate(instructions):
        if ins.opcode.split(".")[0] in ("bra", "ret", "exit", "trap"):
            starts.add(i + 1)
    starts = sorted(s for s in starts if s < len(instructions))
    block_of = {}
    for b, start in enumerate(starts):
        end = starts[b + 1] if b + 1 < len(starts) else len(instructions)
        for i in range(start, end):
            block_of[i] = b
    succ = {b: set() for b in range(len(starts))}
    for b, start in enumerate(starts):
        end = starts[b + 1] if b + 1 < len(starts) else len(instructions)
        last = instructions[end - 1]
        kind = last.opcode.split(".")[0]
        if kind == "bra":
            succ[b].add(block_of[labels[last.operands[0]]])
        if (kind not in ("bra", "ret", "exit", "trap") or last.guarded) and b + 1 < len(starts):
            succ[b].add(b + 1)
    pred = {b: set() for b in succ}
    for b, targets in succ.items():
        for t in targets:
            pred[t].add(b)
    blocks = set(succ)
    dom = {b: ({0} if b == 0 else set(blocks)) for b in blocks}
    changed = True
    while changed:
        changed = False
        for b in sorted(blocks - {0}):
            new = {b} | (set.intersection(*(dom[p] for p in pred[b])) if pred[b] else set())
            if new != dom[b]:
                dom[b], changed = new, True
    in_loop_blocks = set()
    for tail, targets in succ.items():
        for head in targets:
            if head in dom[tail]:  # back edge tail -> head: the loop is head plus what reaches tail avoiding head
                body, stack = {head}, []
                if tail != head:
                    body.add(tail)
                    stack.append(tail)
                while stack:
                    for p in pred[stack.pop()]:
                        if p not in body:
                            body.add(p)
                            stack.append(p)
                in_loop_blocks |= body
    return {i for i, b in block_of.items() if b in in_loop_blocks}


def access_bytes(opcode: str) -> int:
    """Bytes moved by one ld/st: `ld.global.nc.v4.u32` -> 16, `ld.global.u16` -> 2."""
    lanes, size = 1, 0
    for part in opcode.split("."):
        if vector := re.fullmatch(r"v(\d+)", part):
            lanes = int(vector.group(1))
        elif scalar := re.fullmatch(r"(?:[bsuf]|bf)(\d+)(?:x(\d+))?", part):
            size = int(scalar.group(1)) // 8 * int(scalar.group(2) or 1)
    return lanes * size


def logits_registers(instructions: list[Instruction], logits_param: str) -> set[str]:
    """Registers holding values derived from the logits pointer (flow-insensitive, to a fixed point)."""
    tainted: set[str] = set()
    for ins in instructions:
        if ins.opcode.startswith("ld.param") and any(logits_param == op.strip("[]") for op in ins.operands[1:]):
            tainted.update(REGISTER.findall(ins.operands[0]))
    changed = True
    while changed:
        changed = False
        for ins in instructions:
            kind = ins.opcode.split(".")[0]
            if kind in ("ld", "st", "bra", "ret", "exit", "bar", "membar", "fence", "call") or not ins.operands:
                continue
            if any(r in tainted for op in ins.operands[1:] for r in REGISTER.findall(op)):
                new = set(REGISTER.findall(ins.operands[0])) - tainted
                if new:
                    tainted |= new
                    changed = True
    return tainted


@dataclass
class KernelReport:
    mangled: str
    name: str = ""
    dtype: str = "?"
    loop_wide: int = 0        # 16-byte logits loads in loops
    loop_narrow: int = 0      # narrower logits loads in loops
    outside_narrow: int = 0   # narrower logits loads outside loops (head, tail, target)
    outside_wide: int = 0
    other_loads: int = 0      # global loads of the other arrays
    store_wide: int = 0       # 16-byte global stores in loops
    store_narrow: int = 0
    problems: list[str] = field(default_factory=list)


def analyse_entry(mangled: str, body: str) -> KernelReport:
    report = KernelReport(mangled)
    instructions, labels = parse_body(body)
    in_loop = loop_instructions(instructions, labels)
    tainted = logits_registers(instructions, f"{mangled}_param_0")
    for i, ins in enumerate(instructions):
        if not ins.opcode.startswith(("ld.global", "st.global")):
            continue
        wide = access_bytes(ins.opcode) >= 16
        if ins.opcode.startswith("st."):
            if i in in_loop:
                report.store_wide += wide
                report.store_narrow += not wide
            continue
        address = next(op for op in ins.operands[1:] if op.startswith("["))
        if not set(REGISTER.findall(address)) & tainted:
            report.other_loads += 1
        elif i in in_loop:
            report.loop_wide += wide
            report.loop_narrow += not wide
        else:
            report.outside_wide += wide
            report.outside_narrow += not wide
    if report.loop_wide + report.loop_narrow + report.outside_wide + report.outside_narrow:
        if report.loop_wide == 0:
            report.problems.append("no 16-byte load of the logits in a loop")
        if report.loop_narrow:
            report.problems.append(f"{report.loop_narrow} loads of the logits narrower than 16 bytes in loops")
    if report.store_narrow and not report.store_wide:
        report.problems.append("stores in loops, none of them 16 bytes")
    return report


def entries(ptx: str) -> list[tuple[str, str]]:
    """(mangled name, body) of every .entry; braces balance within each PTX line, so depth counting finds the end."""
    found = []
    for match in re.finditer(r"^(?:\.visible\s+|\.weak\s+)?\.entry\s+([\w$]+)\s*\(", ptx, re.M):
        start = ptx.index("{", ptx.index(")", match.end()))
        depth, pos = 0, start
        while True:
            ch = ptx[pos]
            depth += ch == "{"
            depth -= ch == "}"
            pos += 1
            if depth == 0:
                break
        found.append((match.group(1), ptx[start + 1:pos - 1]))
    return found


def demangle(names: list[str]) -> list[str]:
    """`logprob_stats_kernel<__nv_bfloat16, true>` from the mangled name (c++filt), else the mangled name."""
    tool = shutil.which("c++filt")
    if not tool or not names:
        return names
    done = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    plain = done.stdout.splitlines() if done.returncode == 0 else names
    short = []
    for full in plain:
        full = re.sub(r"\(anonymous namespace\)::", "", full)
        head = full.split("(", 1)[0] if "(" in full else full
        short.append(head.split(" ", 1)[1] if head.startswith("void ") else head)
    return short


def check(ptx: str) -> list[KernelReport]:
    found = entries(ptx)
    reports = [analyse_entry(name, body) for name, body in found]
    for report, name in zip(reports, demangle([r.mangled for r in reports])):
        report.name = name
        template = re.search(r"<([^,>]+)", name)
        report.dtype = DTYPES.get(template.group(1).strip(), "?") if template else "?"
    return reports


def print_table(reports: list[KernelReport]) -> None:
    header = ("kernel", "dtype", "loop 16B", "loop <16B", "outside 16B", "outside <16B", "other loads",
              "st loop 16B", "st loop <16B", "")
    width = max([len(header[0])] + [len(r.name) for r in reports])
    print(f"{header[0]:<{width}}  " + "  ".join(header[1:-1]) + "   (loads of the logits; other = other arrays)")
    for r in reports:
        cells = (r.dtype, r.loop_wide, r.loop_narrow, r.outside_wide, r.outside_narrow, r.other_loads, r.store_wide,
                 r.store_narrow)
        row = "  ".join(f"{c:>{len(h)}}" for c, h in zip(cells, header[1:-1]))
        print(f"{r.name:<{width}}  {row}  {'FAIL' if r.problems else 'ok'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="compute_90", help="virtual architecture for -arch (default compute_90)")
    parser.add_argument("--source", type=Path, default=SOURCE, help="the .cu to compile (default the kernels)")
    parser.add_argument("--ptx", type=Path, help="check this PTX file instead of compiling")
    args = parser.parse_args(argv)
    if args.ptx:
        ptx = args.ptx.read_text()
    else:
        nvcc = find_nvcc()
        if not nvcc:
            print("error: nvcc not found: set NVCC or CUDA_HOME, or put nvcc on PATH", file=sys.stderr)
            return 2
        try:
            ptx = compile_ptx(nvcc, args.source, args.arch)
        except RuntimeError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    reports = check(ptx)
    if not reports:
        print("error: no .entry in the PTX", file=sys.stderr)
        return 2
    print_table(reports)
    failed = [r for r in reports if r.problems]
    for r in failed:
        print(f"FAIL {r.name}: {'; '.join(r.problems)}")
    if failed:
        return 1
    print(f"ok: {len(reports)} kernels read the logits with 16-byte loads in their loops")
    return 0


if __name__ == "__main__":
    sys.exit(main())
