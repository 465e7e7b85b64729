"""Static cost of a kernel from its SASS: the instructions a thread issues per element of its
main loop, counted from `cuobjdump -sass` without a GPU (docs/design.md, "Static cost").

A kernel's main loop is one of its outermost loops (a backward branch to an earlier address; the
vocabulary loop of a row program), or the whole kernel where it has none (the (row, block)
grid backwards). Its cost is the longest path through it, once: both sides of an if are never
counted together, and a loop nested in it counts as many times as it iterates (given: the
SASS does not say). Divided by the elements a thread handles per iteration it gives
instructions, MUFU (special function unit) operations, loads and stores per element; against
the H200's rates it gives the fraction of copy bandwidth the kernel can reach at most.

    python -m benchmarks.sass_cost kernel.cubin [loop]   # counts per iteration, for a look
"""
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import NamedTuple

# H200 (docs/design.md): 132 SMs at ~1.98 GHz, each issuing 4 warp instructions a clock
# (128 thread instructions) and 16 MUFU results a clock (ex2, lg2, rcp share the unit); copy
# bandwidth as measured there (bytes read + written).
SMS, CLOCK, LANES, MUFU_LANES, COPY_BW = 132, 1.98e9, 128, 16, 4.3e12


def ceilings(bytes_per_element):
    """(instructions, MUFU operations) per element that an H200 issues in the time it moves the
    element's bytes at copy bandwidth: above either, a kernel cannot be memory-bound."""
    per_s = COPY_BW / bytes_per_element   # elements a second
    return SMS * CLOCK * LANES / per_s, SMS * CLOCK * MUFU_LANES / per_s


class Inst(NamedTuple):
    addr: int
    op: str         # the opcode with its modifiers: "MUFU.EX2", "LDG.E.128", ...
    target: int     # branch target address, -1 if none
    cond: bool      # predicated (@P0, @!P1), or a branch on a predicate operand (BRA P1, ...)


_INST = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)([^;]*);")
_FUNC = re.compile(r"^\s*Function\s*:\s*(\S+)")


def parse(sass):
    """{function name: [Inst]} from `cuobjdump -sass` text."""
    funcs, insts = {}, None
    for line in sass.splitlines():
        m = _FUNC.match(line)
        if m:
            insts = funcs.setdefault(m.group(1), [])
            continue
        m = _INST.match(line)
        if m and insts is not None:
            addr, guard, op, rest = m.groups()
            target, cond = -1, (guard or "@PT").strip() != "@PT"
            if op.startswith("BRA"):
                target = int(re.findall(r"0x([0-9a-f]+)", rest)[-1], 16)
                cond = cond or op != "BRA" or "," in rest   # BRA.DIV, BRA P1, target
            insts.append(Inst(int(addr, 16), op, target, cond))
    return funcs


def cuobjdump_tool():
    """The cuobjdump that ships in the Triton wheel (the CUDA toolkit here has none), else the
    one on PATH."""
    import triton
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(tool) if tool.exists() else shutil.which("cuobjdump")


def cuobjdump(binary, tool, *flags):
    """cuobjdump's output for a cubin or object file (bytes)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(binary)
        f.flush()
        return subprocess.run([tool, *flags, f.name], capture_output=True, text=True,
                              check=True).stdout


def disassemble(binary, tool):
    """{function name: [Inst]} of a cubin or object file (bytes)."""
    return parse(cuobjdump(binary, tool, "-sass"))


class Loop(NamedTuple):
    lo: int         # index of the first instruction (the branch target)
    hi: int         # index of the backward branch
    inner: list     # the loops directly inside, in address order


# A loop of fewer instructions is a retry (a tensor-memory allocation on sm_100), not a loop
# over data: the longest path passes it once.
MIN_LOOP = 8


def _last_exit(insts):
    """Index of the last unconditional EXIT. The code after it is out of line: slow paths
    (fdiv's) and sm_100's mbarrier try-wait retries, which return into the body. The path
    analysis leaves them out: a retry costs waiting, not issue."""
    return max((i for i, inst in enumerate(insts) if inst.op == "EXIT" and not inst.cond),
               default=len(insts) - 1)


def loops(insts):
    """The loop tree (outermost loops, in address order) from the backward branches before the
    last EXIT; branches back to one header are one loop."""
    index = {inst.addr: i for i, inst in enumerate(insts)}
    spans = {}
    for i, inst in enumerate(insts[:_last_exit(insts)]):
        if 0 <= inst.target < inst.addr and i - index[inst.target] >= MIN_LOOP - 1:
            lo = index[inst.target]
            spans[lo] = max(spans.get(lo, i), i)
    top, stack = [], []
    for lo, hi in sorted(spans.items()):
        while stack and stack[-1].hi < lo:
            stack.pop()
        loop = Loop(lo, hi, [])
        if stack:
            assert hi <= stack[-1].hi, f"loops overlap at {insts[lo].addr:#x}"
            stack[-1].inner.append(loop)
        else:
            top.append(loop)
        stack.append(loop)
    return top


def _walk(loop):
    yield loop
    for inner in loop.inner:
        yield from _walk(inner)


def _longest(insts, lo, hi, inner, trips):
    """Opcode counts along the longest path from instruction lo to past hi (or an EXIT), the
    loops in `inner` collapsed into their bodies times their trip counts (taken from `trips`,
    an iterator, in address order); branches out of line are not taken."""
    index = {inst.addr: i for i, inst in enumerate(insts)}
    cold = _last_exit(insts)
    best = {lo: Counter()}
    ends = []

    def reach(i, path):
        if i > hi:
            ends.append(path)
        elif i not in best or path.total() > best[i].total():
            best[i] = path

    bodies = {}
    for loop in inner:
        n = next(trips)
        body = _longest(insts, loop.lo, loop.hi, loop.inner, trips)
        bodies[loop.lo] = (loop.hi, Counter({op: n * c for op, c in body.items()}))
    i = lo
    while i <= hi:
        path = best.get(i)
        if path is None:
            i += 1
            continue
        if i in bodies:   # a nested loop: its iterations, then the instruction after it
            end, body = bodies[i]
            reach(end + 1, path + body)
            i = end + 1
            continue
        inst = insts[i]
        path = path + Counter({inst.op: 1})
        taken = inst.target >= 0 and not (inst.target > inst.addr and index[inst.target] > cold)
        if taken and inst.target > inst.addr:
            reach(index[inst.target], path)
        elif taken or inst.op == "EXIT":
            ends.append(path)   # the loop's back edge (one iteration done), the trap, an EXIT
        if inst.cond or not taken and inst.op != "EXIT":
            reach(i + 1, path)
        i += 1
    assert ends, "no path through the region"
    return max(ends, key=Counter.total)


def loop_cost(insts, loop=None, trips=()):
    """Opcode counts of one iteration of outermost loop number `loop` (address order), or of the
    whole kernel (None); `trips`: the iteration counts of the loops nested in it (of every loop
    for the whole kernel), in address order. Fails if the count of nested loops differs."""
    top = loops(insts)
    if loop is None:
        region, inner = (0, len(insts) - 1), top
    else:
        assert loop < len(top), f"{len(top)} outermost loops, no loop {loop}"
        region, inner = (top[loop].lo, top[loop].hi), top[loop].inner
    nested = sum(1 for L in inner for _ in _walk(L))
    assert nested == len(trips), f"{nested} nested loops but {len(trips)} trip counts"
    return _longest(insts, *region, inner, iter(trips))


def _width(op):
    """Bits a global memory instruction moves per thread: .128, .64, .U16, F32x4 ...; 32 else."""
    for tok in reversed(op.split(".")):
        if re.fullmatch(r"128|64|[US](16|8)", tok):
            return int(tok.lstrip("US"))
        m = re.fullmatch(r"B?F(16|32|64)x(\d)", tok)   # a vector atomic: F32x4, BF16x2 ...
        if m:
            return int(m.group(1)) * int(m.group(2))
    return 32


def summary(counts, elements):
    """Per-element figures of opcode `counts` covering `elements` elements per thread."""
    def n(pred):
        return sum(c for op, c in counts.items() if pred(op))

    def widths(prefixes):
        out = Counter()
        for op, c in counts.items():
            if op.split(".")[0] in prefixes:
                out[_width(op)] += c
        return dict(sorted(out.items(), reverse=True))

    per = 1.0 / elements
    return dict(
        elements=elements,
        instructions=n(lambda op: op != "NOP") * per,
        ex2=n(lambda op: op == "MUFU.EX2") * per,
        mufu=n(lambda op: op.startswith("MUFU")) * per,
        loads=widths(("LDG", "LDGSTS")),                 # per iteration: {bits: count}
        stores=widths(("STG",)),
        bar=n(lambda op: op.startswith("BAR")),          # per iteration
        shfl=n(lambda op: op.startswith("SHFL")),
        mma=n(lambda op: "MMA" in op.split(".")[0]) * per,
        atomic_bytes=sum(c * _width(op) // 8 for op, c in counts.items()
                         if op.split(".")[0] in ("RED", "REDG", "ATOM", "ATOMG")) * per,
    )


def _main():
    funcs = disassemble(Path(sys.argv[1]).read_bytes(), cuobjdump_tool())
    loop = int(sys.argv[2]) if len(sys.argv) > 2 else None
    for name, insts in funcs.items():
        nested = [sum(1 for _ in _walk(L)) - 1 for L in loops(insts)]
        print(f"{name}: {len(insts)} instructions, outermost loops (nested loops) {nested}")
        if loop is None and not nested or loop is not None and not nested[loop]:
            print("  " + ", ".join(f"{op} {c}" for op, c in
                                   loop_cost(insts, loop).most_common()))


if __name__ == "__main__":
    _main()
