"""SASS report: registers, spills and issued instructions per vocabulary element of the sm_90 kernels.

    python benchmarks/sass_report.py [--json] [--cuda-only | --triton-only] [--divergences D ...]
                                     [--dtypes f32 bf16 f16] [--paths resident stream] [--md FILE]

No GPU is needed: the CUDA row kernels (csrc/cuda/kd_rows.cuh) are compiled for sm_90 with nvcc (``-O3
-std=c++17``, the flags CMakeLists.txt gives the .cu files, plus ``-lineinfo``, which only adds a line table)
into a cubin, and the dense Triton kernel (kd_kernels/_triton_kernels.py, imported from PYTHONPATH) is compiled
with ``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` with the launch configuration and arguments
kd_kernels/_backends/triton_backend.py would use at V = 128256 (its ``launch`` is run against a recorder
instead of the kernel). Both cubins are disassembled with nvdisasm; cuobjdump -res-usage gives the registers.

What is counted (one row per kernel x divergence x path x dtype; student and teacher in the same dtype):

- ``registers``: REG of the kernel (cuobjdump -res-usage).
- ``spills``: local-memory stores (STL instructions) in the kernel; the kernels keep no arrays in local
  memory, so every STL is a register spill.
- ``instr_per_elem``: issued instructions per vocabulary element per thread, summed over the passes the kernel
  makes over the row (with a gradient). Found from the SASS control flow, not from the source:
    1. basic blocks and edges from the branches (``BRA`` with a guard or a predicate operand is conditional,
       a bare ``BRA`` is not, ``EXIT`` without a guard ends a block's path);
    2. a loop is a back edge u -> h (h at an address <= u's) with its natural body (h and every block that
       reaches u without passing h); the loops over the vocabulary are the innermost loops that touch the
       row: for CUDA those whose code comes from ``for_groups`` (the -lineinfo inline chain names it; this
       keeps out the warp-slot and cluster merge loops, which also read shared memory), for Triton those
       with a global load;
    3. one trip's issued instructions: along the path from h to u through the loop's acyclic body that
       executes the most MUFU instructions and, among those, the fewest instructions -- i.e. every group of
       the trip present (the unrolled ``u < U`` guards true) and the 16-byte vector loads / stores taken
       (the element-by-element fallback for unaligned rows and the row's tail is longer and has no more
       MUFU). Predicated-off instructions count: they are issued;
    4. elements per trip and thread: the bytes of global loads on that path / (|s| + |t|) (every pass that
       reads global memory reads s and t once); for a loop without global loads (the resident kernel's later
       passes, which read the slice from shared memory), the bytes of global stores / |s| (the gradient pass)
       or else the bytes of 16-byte shared loads / (|s| + |t|);
    5. instr_per_elem = sum over the vocabulary loops of (instructions per trip / elements per trip).
- ``mufu_per_elem``: the same sum for MUFU instructions (ex2, lg2, rcp, ...).

The estimate (printed with the table, and with --json on stderr): at N = 8192, V = 128256 bf16 on an H200,
    issue time = N V instr_per_elem / (SMs x clock x issue rate)      with 132 SMs, 1.755 GHz (boost),
                 4 warp schedulers x 1 warp-instruction / clock = 128 thread-instructions / clock / SM
    HBM time   = N V (|s| + |t| + |grad|) / 4.8 TB/s                  (each input read once, gradient written)
The resident CUDA kernel reads s and t once; the streaming CUDA kernel and Triton re-read them per pass
(2 or 3 reads), which the HBM column of those rows counts. Latency, occupancy and dual issue are ignored: the
issue time is a lower bound of the time spent issuing, the HBM time a lower bound of the memory time.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

DIVERGENCES = [
    "forward_kl",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "jsd",
    "tvd",
    "jeffreys",
    "alpha_beta",
    "renyi",
]
CENTERED = {"skew_forward_kl", "skew_reverse_kl", "jsd", "tvd", "alpha_beta"}
DTYPES = {"f32": (0, 4), "bf16": (1, 2), "f16": (2, 2)}  # name -> (kd_math.h DType code, bytes)

# The estimate's machine: an H200 SXM.
H200_SMS = 132
H200_CLOCK_HZ = 1.755e9
ISSUE_PER_CLK_PER_SM = 128  # 4 schedulers x 1 warp instruction (32 threads) per clock
HBM_BYTES_PER_S = 4.8e12
EST_N, EST_V = 8192, 128256


# --------------------------------------------------------------------------------------------------------
# Tools
# --------------------------------------------------------------------------------------------------------


def find_tool(name: str) -> str | None:
    """nvdisasm / cuobjdump / nvcc: on PATH, in CUDA_HOME, /usr/local/cuda, or the copies triton ships."""
    cands = [shutil.which(name)]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            cands.append(os.path.join(os.environ[var], "bin", name))
    cands.append(f"/usr/local/cuda/bin/{name}")
    try:
        import importlib.util

        spec = importlib.util.find_spec("triton")
        if spec is not None and spec.origin:
            cands.append(
                os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", name)
            )
    except Exception:  # pragma: no cover - a broken triton install
        pass
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def _run(cmd: list[str], **kw) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd[:3])} ... failed ({done.returncode}):\n{done.stderr[-3000:]}"
        )
    return done.stdout


# --------------------------------------------------------------------------------------------------------
# SASS parsing and the control-flow analysis
# --------------------------------------------------------------------------------------------------------

_INS = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LAB = re.compile(r"^(\.L_x_\d+):")
_FUN = re.compile(r"^\.text\.(\S+):")
_LINE = re.compile(r'^\s*//## File "([^"]+)", line (\d+)(?: inlined at "([^"]+)", line (\d+))?')
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")


@dataclasses.dataclass
class Instr:
    addr: int
    text: str
    guard: str  # "@P0", "@!P1" or ""
    op: str  # opcode with modifiers, e.g. "MUFU.EX2"
    frames: frozenset  # (file basename, line) of every inline frame the line table gives this instruction


def parse_sass(text: str) -> dict[str, tuple[list[Instr], dict[str, int]]]:
    """nvdisasm -c [-gi] output -> {function: (instructions, label -> instruction index)}."""
    funcs: dict[str, tuple[list[Instr], dict[str, int]]] = {}
    cur = None
    pending: list[str] = []
    frames: set = set()
    new_loc = True
    for line in text.splitlines():
        m = _FUN.match(line)
        if m:
            cur = m.group(1)
            funcs[cur] = ([], {})
            pending, frames = [], set()
            continue
        if cur is None:
            continue
        m = _LINE.match(line)
        if m:
            if new_loc:
                frames, new_loc = set(), False
            frames.add((os.path.basename(m.group(1)), int(m.group(2))))
            if m.group(3):
                frames.add((os.path.basename(m.group(3)), int(m.group(4))))
            continue
        m = _LAB.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = _INS.match(line)
        if m:
            new_loc = True
            ins, labels = funcs[cur]
            for lab in pending:
                labels[lab] = len(ins)
            pending = []
            body = m.group(2).strip()
            guard = ""
            if body.startswith("@"):
                guard, body = body.split(None, 1)
            op = body.split()[0] if body else ""
            ins.append(Instr(int(m.group(1), 16), body, guard, op, frozenset(frames)))
    return funcs


def _is_branch(i: Instr) -> bool:
    return i.op.split(".")[0] in ("BRA", "BRX", "JMP", "JMX")


def _unconditional(i: Instr) -> bool:
    if i.guard and i.guard not in ("@PT",):
        return False
    # "BRA `(.L_x_3)" is unconditional; "BRA P4, `(.L..)" / "BRA.DIV UR4, ..." depend on a predicate / mask.
    rest = i.text.split(None, 1)[1] if " " in i.text else ""
    return rest.startswith("`(")


def basic_blocks(ins: list[Instr], labels: dict[str, int]):
    """Blocks as (start, end) instruction index ranges and successor lists."""
    leaders = {0}
    for k, i in enumerate(ins):
        if _is_branch(i) or (i.op in ("EXIT", "RET", "RET.REL", "RET.ABS") and not i.guard):
            leaders.add(k + 1)
            m = _TARGET.search(i.text)
            if m and m.group(1) in labels:
                leaders.add(labels[m.group(1)])
    leaders = sorted(x for x in leaders if x < len(ins))
    blocks = [
        (s, (leaders[n + 1] if n + 1 < len(leaders) else len(ins))) for n, s in enumerate(leaders)
    ]
    start_of = {s: n for n, (s, _) in enumerate(blocks)}
    succ: list[list[int]] = []
    for n, (_, e) in enumerate(blocks):
        last = ins[e - 1]
        out = []
        fall = n + 1 < len(blocks)
        if _is_branch(last):
            m = _TARGET.search(last.text)
            if m and m.group(1) in labels and labels[m.group(1)] in start_of:
                out.append(start_of[labels[m.group(1)]])
            if not (last.op == "BRA" and _unconditional(last)):
                if fall:
                    out.append(n + 1)
        elif last.op.startswith(("EXIT", "RET")) and not last.guard:
            pass
        elif fall:
            out.append(n + 1)
        succ.append(out)
    return blocks, succ


@dataclasses.dataclass
class Loop:
    header: int
    latch: int
    body: set
    instrs: int = 0  # issued per trip on the hot path
    mufu: int = 0
    elems: float = 0.0
    first_addr: int = 0


def natural_loops(blocks, succ) -> list[Loop]:
    pred = collections.defaultdict(list)
    for u, vs in enumerate(succ):
        for v in vs:
            pred[v].append(u)
    loops = []
    for u, vs in enumerate(succ):
        for h in vs:
            if blocks[h][0] <= blocks[u][0]:  # back edge in layout order
                body = {h, u}
                stack = [u] if u != h else []
                while stack:
                    x = stack.pop()
                    for p in pred[x]:
                        if p not in body:
                            body.add(p)
                            stack.append(p)
                loops.append(Loop(h, u, body))
    return loops


def hot_path(ins, blocks, succ, loop: Loop, weigh) -> tuple[int, int, collections.Counter]:
    """Along the acyclic body from header to latch: the path with the most MUFU, then the fewest
    instructions. Returns (instructions, MUFU, per-opcode counter of that path)."""
    # Topological order of the body without the edges into the header (blocks may be laid out after their
    # successors, e.g. a load placed out of line); edges closing any other cycle are dropped too.
    order, state = [], {}

    def visit(b):
        stack = [(b, iter(succ[b]))]
        state[b] = 1
        while stack:
            x, it = stack[-1]
            nxt = next(
                (
                    y
                    for y in it
                    if y in loop.body
                    and y != loop.header
                    and state.get(y) is None
                    and x != loop.latch
                ),
                None,
            )
            if nxt is None:
                stack.pop()
                state[x] = 2
                order.append(x)
            else:
                state[nxt] = 1
                stack.append((nxt, iter(succ[nxt])))

    visit(loop.header)
    order.reverse()
    rank = {b: k for k, b in enumerate(order)}
    best: dict[int, tuple] = {}
    for b in order:
        s, e = blocks[b]
        mufu = sum(1 for i in ins[s:e] if i.op.startswith("MUFU"))
        mem = sum(_width(i.op) for i in ins[s:e] if _MEM.match(i.op))
        n = e - s
        if b == loop.header:
            prev = (0, 0, 0, None)
        else:
            cands = [
                best[p] + (p,)
                for p in best
                if b in succ[p] and p != loop.latch and rank[p] < rank[b]
            ]
            if not cands:
                continue
            # the most MUFU, then the most bytes moved (a trip's loads and stores all taken), then the fewest
            # instructions (vector rather than element-by-element loads, which move the same bytes)
            c = max(cands, key=lambda c: (c[0], c[1], -c[2]))
            prev = (c[0], c[1], c[2], c[4])
        best[b] = (prev[0] + mufu, prev[1] + mem, prev[2] + n, prev[3])
    if loop.latch not in best:
        return 0, 0, collections.Counter()
    # walk back for the per-opcode counts
    path = []
    b = loop.latch
    while b is not None:
        path.append(b)
        b = best[b][3]
    ops = collections.Counter()
    for b in path:
        s, e = blocks[b]
        for i in ins[s:e]:
            ops[i.op] += 1
    m, _, n, _ = best[loop.latch]
    return n, m, ops


_MEM = re.compile(r"^(LDG|STG|LDS|STS|LDGSTS)(?:\.[A-Z0-9_]+)*$")


def _width(op: str) -> int:
    """Bytes one thread moves with a load / store opcode (LDG.E.128 -> 16, LDG.E.U16 -> 2, LDG.E -> 4)."""
    for tok, w in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1), (".S8", 1)):
        if tok in op:
            return w
    return 4


def vocab_loops(ins, labels, loop_filter) -> list[Loop]:
    blocks, succ = basic_blocks(ins, labels)
    loops = natural_loops(blocks, succ)
    cand = [lp for lp in loops if loop_filter(ins, blocks, lp)]
    # innermost among the candidates: no other candidate's header strictly inside
    inner = [
        lp
        for lp in cand
        if not any(o is not lp and o.header in lp.body and o.body < lp.body for o in cand)
    ]
    # one loop per header (several back edges to one header form one loop)
    seen, out = set(), []
    for lp in inner:
        if lp.header in seen:
            continue
        seen.add(lp.header)
        out.append(lp)
    for lp in out:
        lp.first_addr = ins[blocks[lp.header][0]].addr
        lp.instrs, lp.mufu, lp.ops = hot_path(ins, blocks, succ, lp, None)
    return out


def elems_per_trip(ops: collections.Counter, bytes_s: int, bytes_t: int) -> float:
    ldg = sum(n * _width(op) for op, n in ops.items() if op.startswith(("LDG", "LDGSTS")))
    if ldg:
        return ldg / (bytes_s + bytes_t)
    stg = sum(n * _width(op) for op, n in ops.items() if op.startswith("STG"))
    if stg:
        return stg / bytes_s
    lds = sum(n * 16 for op, n in ops.items() if op.startswith("LDS") and ".128" in op)
    return lds / (bytes_s + bytes_t)


def res_usage(cuobjdump: str, cubin: str) -> dict[str, int]:
    out = _run([cuobjdump, "-res-usage", cubin])
    regs, fn = {}, None
    for line in out.splitlines():
        m = re.search(r"Function (\S+):", line)
        if m:
            fn = m.group(1)
        m = re.search(r"REG:(\d+)", line)
        if m and fn:
            regs[fn] = int(m.group(1))
    return regs


def analyse(cubin: str, loop_filter, bytes_s: int, bytes_t: int, tools) -> dict[str, dict]:
    sass = _run([tools["nvdisasm"], "-c", "-gi", cubin])
    regs = res_usage(tools["cuobjdump"], cubin)
    out = {}
    for fn, (ins, labels) in parse_sass(sass).items():
        loops = vocab_loops(ins, labels, loop_filter)
        per = []
        tot_i = tot_m = 0.0
        for lp in loops:
            e = elems_per_trip(lp.ops, bytes_s, bytes_t)
            if e <= 0:
                continue
            per.append(
                {
                    "addr": hex(lp.first_addr),
                    "instr_per_trip": lp.instrs,
                    "mufu_per_trip": lp.mufu,
                    "elems_per_trip": e,
                }
            )
            tot_i += lp.instrs / e
            tot_m += lp.mufu / e
        out[fn] = {
            "registers": regs.get(fn, -1),
            "spills": sum(1 for i in ins if i.op.startswith("STL")),
            "instr_per_elem": round(tot_i, 2),
            "mufu_per_elem": round(tot_m, 3),
            "loops": per,
        }
    return out


# --------------------------------------------------------------------------------------------------------
# CUDA
# --------------------------------------------------------------------------------------------------------


def _for_groups_lines(header: Path) -> set[int]:
    """Line numbers of the body of for_groups in kd_rows.cuh (the helper every vocabulary pass runs in)."""
    lines = header.read_text().splitlines()
    start = next(
        (k for k, ln in enumerate(lines) if re.search(r"\bvoid for_groups\s*\(", ln)), None
    )
    if start is None:
        raise RuntimeError(f"{header}: no for_groups() found; the CUDA loop finder keys on it")
    end = next(k for k in range(start + 1, len(lines)) if lines[k].startswith("}"))
    return set(range(start + 1, end + 2))


def cuda_rows(divs, dtypes, paths, tools, src_root: Path = ROOT) -> list[dict]:
    cuda_dir = src_root / "csrc" / "cuda"
    fg_lines = _for_groups_lines(cuda_dir / "kd_rows.cuh")

    def is_vocab(ins, blocks, lp):
        for b in lp.body:
            s, e = blocks[b]
            for i in ins[s:e]:
                if any(f == "kd_rows.cuh" and ln in fg_lines for f, ln in i.frames):
                    return True
        return False

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for div in divs:
            d = DIVERGENCES.index(div)
            lines = ['#include "kd_rows.cuh"', "namespace kd { namespace cuda_detail {"]
            wanted = {}
            for dt in dtypes:
                code, _ = DTYPES[dt]
                for path in paths:
                    res = "true" if path == "resident" else "false"
                    lines.append(
                        f"template __global__ void kd_rows_kernel<{d}, {code}, {code}, {res}>"
                        "(const KernelParams);"
                    )
                    wanted[(dt, path)] = (
                        f"kd_rows_kernelILi{d}ELi{code}ELi{code}ELb{1 if res == 'true' else 0}E"
                    )
            lines.append("}}")
            cu = Path(tmp) / f"sass_{div}.cu"
            cu.write_text("\n".join(lines) + "\n")
            cubin = Path(tmp) / f"sass_{div}.cubin"
            _run(
                [
                    tools["nvcc"],
                    "-arch=sm_90",
                    "-cubin",
                    "-O3",
                    "-std=c++17",
                    "-lineinfo",
                    f"-I{src_root / 'csrc' / 'include'}",
                    f"-I{cuda_dir}",
                    str(cu),
                    "-o",
                    str(cubin),
                ]
            )
            for dt in dtypes:
                nbytes = DTYPES[dt][1]
                res = analyse(str(cubin), is_vocab, nbytes, nbytes, tools)
                for path in paths:
                    key = wanted[(dt, path)]
                    fn = next((f for f in res if key in f), None)
                    if fn is None:
                        raise RuntimeError(f"{div} {dt} {path}: kernel {key} not in the cubin")
                    r = res[fn]
                    rows.append(
                        {
                            "kernel": "kd_rows_kernel",
                            "divergence": div,
                            "path": path,
                            "dtype": dt,
                            "registers": r["registers"],
                            "spills": r["spills"],
                            "instr_per_elem": r["instr_per_elem"],
                            "mufu_per_elem": r["mufu_per_elem"],
                            "loops": r["loops"],
                        }
                    )
    return rows


# --------------------------------------------------------------------------------------------------------
# Triton
# --------------------------------------------------------------------------------------------------------


class _Recorder:
    """Stands in for the jitted kernel in triton_backend.launch: records the arguments and the meta."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        def call(*args, **meta):
            self.calls.append((args, meta))

        return call


_TORCH_TO_TRITON = {
    "float32": "fp32",
    "bfloat16": "bf16",
    "float16": "fp16",
    "int64": "i64",
    "int32": "i32",
}
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def triton_rows(divs, dtypes, tools, v: int = EST_V) -> list[dict]:
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import kd_kernels
    from kd_kernels import _spec
    from kd_kernels._backends import triton_backend as TB

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the report compiles the kernels for sm_90")
    jit = TB._kernel(False)
    torch_dt = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
    rows = []
    orig = TB._kernel
    with tempfile.TemporaryDirectory() as tmp:
        for div in divs:
            for dt in dtypes:
                rec = _Recorder()
                TB._kernel = lambda autotuned, _r=rec: _r
                try:
                    s = torch.zeros(2, v, dtype=torch_dt[dt])
                    t = torch.zeros(2, v, dtype=torch_dt[dt])
                    w = torch.ones(2)
                    spec = _spec.KDSpec.make(div) if hasattr(_spec.KDSpec, "make") else None
                    if spec is None:
                        raise RuntimeError("kd_kernels._spec.KDSpec.make is missing")
                    TB.launch(s, t, w, spec, torch.empty_like(s), autotune=False)
                finally:
                    TB._kernel = orig
                args, meta = rec.calls[-1]
                sig, attrs, consts = {}, {}, {}
                it = iter(args)
                for k, name in enumerate(jit.arg_names):
                    if name in meta:
                        sig[name] = "constexpr"
                        consts[(k,)] = meta[name]
                        continue
                    a = next(it)
                    if isinstance(a, torch.Tensor):
                        sig[name] = "*" + _TORCH_TO_TRITON[str(a.dtype).replace("torch.", "")]
                        attrs[(k,)] = [
                            ["tt.divisibility", 16]
                        ]  # torch allocations are 16-byte aligned
                    elif isinstance(a, bool):
                        sig[name] = "i1"
                    elif isinstance(a, int):
                        sig[name] = "i32" if -(2**31) <= a < 2**31 else "i64"
                        if a % 16 == 0:
                            attrs[(k,)] = [
                                ["tt.divisibility", 16]
                            ]  # what the launcher specializes on
                    else:
                        sig[name] = "fp32"
                opts = {k: meta[k] for k in _LAUNCH_OPTIONS if k in meta}
                src = ASTSource(fn=jit, signature=sig, constexprs=consts, attrs=attrs)
                k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
                cubin = Path(tmp) / f"tr_{div}_{dt}.cubin"
                cubin.write_bytes(k.asm["cubin"])
                nbytes = DTYPES[dt][1]

                def has_ldg(ins, blocks, lp):
                    return any(
                        i.op.startswith(("LDG", "LDGSTS"))
                        for b in lp.body
                        for i in ins[blocks[b][0] : blocks[b][1]]
                    )

                res = analyse(str(cubin), has_ldg, nbytes, nbytes, tools)
                r = next(iter(res.values()))
                rows.append(
                    {
                        "kernel": jit.__name__
                        if hasattr(jit, "__name__")
                        else "kd_loss_grad_kernel",
                        "divergence": div,
                        "path": "triton",
                        "dtype": dt,
                        "registers": r["registers"],
                        "spills": r["spills"],
                        "instr_per_elem": r["instr_per_elem"],
                        "mufu_per_elem": r["mufu_per_elem"],
                        "loops": r["loops"],
                        "config": {
                            kk: meta[kk] for kk in meta if kk in ("BLOCK_V",) + _LAUNCH_OPTIONS
                        },
                    }
                )
    del kd_kernels
    return rows


# --------------------------------------------------------------------------------------------------------
# Estimate and output
# --------------------------------------------------------------------------------------------------------


def estimate(row: dict) -> dict:
    b = DTYPES[row["dtype"]][1]
    n_el = EST_N * EST_V
    issue_s = n_el * row["instr_per_elem"] / (H200_SMS * H200_CLOCK_HZ * ISSUE_PER_CLK_PER_SM)
    reads = 1
    if row["path"] != "resident":
        reads = 3 if row["divergence"] in CENTERED else 2
        if row["path"] == "triton" and _triton_online(row["divergence"]):
            reads = 2
    hbm_s = n_el * (2 * b * reads + b) / HBM_BYTES_PER_S
    return {"issue_ms": round(issue_s * 1e3, 3), "hbm_ms": round(hbm_s * 1e3, 3), "reads": reads}


def _triton_online(div: str) -> bool:
    try:
        from kd_kernels import _spec

        return bool(_spec.Divergence[div.upper()].info.online)
    except Exception:
        return div not in CENTERED


def markdown(rows: list[dict]) -> str:
    head = (
        "| kernel | divergence | path | dtype | registers | spills | instr/elem | MUFU/elem | "
        "issue ms | HBM ms | bound |\n|---|---|---|---|---:|---:|---:|---:|---:|---:|---|\n"
    )
    body = []
    for r in rows:
        e = estimate(r)
        bound = "issue" if e["issue_ms"] > e["hbm_ms"] else "HBM"
        body.append(
            f"| {r['kernel']} | {r['divergence']} | {r['path']} | {r['dtype']} | {r['registers']} | "
            f"{r['spills']} | {r['instr_per_elem']:.1f} | {r['mufu_per_elem']:.2f} | "
            f"{e['issue_ms']:.2f} | {e['hbm_ms']:.2f} | {bound} |"
        )
    note = (
        f"\nEstimate at N = {EST_N}, V = {EST_V} (the dtype of the row), H200: {H200_SMS} SMs x "
        f"{H200_CLOCK_HZ / 1e9:.3f} GHz x {ISSUE_PER_CLK_PER_SM} thread-instructions / clock (issue), "
        f"{HBM_BYTES_PER_S / 1e12:.1f} TB/s (HBM; s and t read once by the resident kernel, per pass by "
        "the others, the gradient written once).\n"
    )
    return head + "\n".join(body) + "\n" + note


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--json", action="store_true", help="print the rows as a JSON list (estimate on stderr)"
    )
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--cuda-only", action="store_true")
    g.add_argument("--triton-only", action="store_true")
    ap.add_argument("--divergences", nargs="+", default=DIVERGENCES, choices=DIVERGENCES)
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument(
        "--paths",
        nargs="+",
        default=["resident", "stream"],
        choices=["resident", "stream"],
        help="CUDA paths",
    )
    ap.add_argument("--loops", action="store_true", help="keep the per-loop breakdown in the JSON")
    ap.add_argument("--md", help="also write the markdown table to this file")
    args = ap.parse_args(argv)

    tools = {n: find_tool(n) for n in ("nvdisasm", "cuobjdump", "nvcc")}
    need = ["nvdisasm", "cuobjdump"] + ([] if args.triton_only else ["nvcc"])
    missing = [n for n in need if tools[n] is None]
    if missing:
        print(
            f"sass_report: {', '.join(missing)} not found (set CUDA_HOME or install the CUDA toolkit / "
            "triton's NVIDIA backend)",
            file=sys.stderr,
        )
        return 2
    rows = []
    if not args.triton_only:
        rows += cuda_rows(args.divergences, args.dtypes, args.paths, tools)
    if not args.cuda_only:
        rows += triton_rows(args.divergences, args.dtypes, tools)
    for r in rows:
        r.update(estimate(r))
        if not args.loops:
            r.pop("loops", None)
    md = markdown(rows)
    if args.md:
        Path(args.md).write_text(md)
    if args.json:
        print(json.dumps(rows, indent=1))
        print(md, file=sys.stderr)
    else:
        print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
