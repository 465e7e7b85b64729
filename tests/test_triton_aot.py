"""Every Triton kernel, as its launcher specialises it, compiled ahead of time for real GPUs.

The Triton interpreter (how the other tests run kernels on CPU) sees no target: a kernel that
does not compile for one, asks for more shared memory than a block may have, or spills registers
passes there and fails or crawls on a GPU. This module compiles each kernel for sm_80, sm_86,
sm_90 and sm_100 without a GPU and fails on

- a compile error;
- shared memory (the compile metadata) above the target's per-block opt-in limit;
- any stack frame (cuobjdump --dump-resource-usage of the cubin; Triton kernels have no local
  arrays, so it is spilled registers): no kernel may spill, at any shape, k or head dtype.

Launch configurations come from the launchers, never from a copy here: each case calls a real
launcher on stand-in tensors (CPU; meta for fused-linear heads, which may be GBs) while
KernelInterface.__getitem__ records the launch instead of running it and every kernel module's
`launch_target` answers the target being compiled for, as it answers a GPU's compute capability
on a real launch. A new constexpr flag or tile choice is therefore picked up as it is; a new
option needs its values in a case. The recorded arguments are specialised as JITFunction.run
does at launch (Triton's own native_specialize_impl: pointers and integers divisible by 16,
integers equal to 1), identical compiles are merged, and triton.compile runs in worker
processes, one per core, that import the kernels with TRITON_INTERPRET=0. Cases use sizes that
change the generated code: V and H divisible by 16 or not, vocabulary and top-k blocks full or
not, one top-k step or several.

The same compiles carry the static cost check (COST, docs/design.md "Static cost"): for the
headline rows on sm_90 and sm_100, the worker disassembles the cubin it has just built and counts
the main loop (benchmarks/sass_cost.py); the tests hold each row to its budgets per element.

Triton versions: the installed one (3.9) in this process, and 3.6.0 (the GPU machine's, with
torch 2.11) in a subprocess whose PYTHONPATH starts with .triton-3.6/ (`pip install --no-deps
--target .triton-3.6 triton==3.6.0`, part of the README's test command), for sm_80/86/90.

    python tests/test_triton_aot.py --table benchmarks/kernel_resources.md   # the resource table
"""
import contextlib
import importlib
import inspect
import itertools
import json
import os
import pkgutil
import queue
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable, NamedTuple

ROOT = Path(__file__).resolve().parent.parent
if __name__ == "__main__":   # as a script: the kernels under test are this checkout's, and
    sys.path.insert(0, str(ROOT))   # launches are recorded as under pytest (conftest.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from benchmarks import sass_cost  # noqa: E402

# Per-block shared memory a kernel may opt in to (cudaDevAttrMaxSharedMemoryPerBlockOptin).
SHARED_LIMIT = {80: 166912, 86: 101376, 90: 232448, 100: 232448}


# --- recording: what the launchers launch -------------------------------------------------

def _kernel_modules():
    import hrmkernels.kernels.triton as pkg
    return [importlib.import_module(f"{pkg.__name__}.{m.name}")
            for m in pkgutil.iter_modules(pkg.__path__)]


@contextlib.contextmanager
def _recording(target):
    """Launches made inside the block are recorded, not run, as (kernel fn, args, kwargs);
    launch_target answers `target`, so launch configurations are the ones chosen on it."""
    from triton.runtime.jit import KernelInterface
    launches = []

    def getitem(kernel, grid):
        return lambda *args, **kwargs: launches.append((kernel.fn, args, kwargs))

    saved = [(KernelInterface, "__getitem__", KernelInterface.__getitem__)]
    saved += [(m, "launch_target", m.launch_target) for m in _kernel_modules()
              if hasattr(m, "launch_target")]
    KernelInterface.__getitem__ = getitem
    for m, name, _ in saved[1:]:
        setattr(m, name, lambda device: target)
    try:
        yield launches
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def _specialise(fn, args, kwargs, backend):
    """The (signature, constexprs, attrs, options) JITFunction.run compiles for this call."""
    from triton._C.libtriton import native_specialize_impl
    params = inspect.signature(fn).parameters
    options = {k: kwargs.pop(k) for k in list(kwargs) if k not in params}
    bound = inspect.signature(fn).bind(*args, **kwargs)
    bound.apply_defaults()
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, value) in enumerate(bound.arguments.items()):
        if "constexpr" in str(params[name].annotation):
            signature[name], constexprs[name] = "constexpr", value
            continue
        ty, spec = native_specialize_impl(backend, value, False, True, True)
        signature[name] = ty
        if ty == "constexpr":            # an integer equal to 1, or None
            constexprs[name] = value
        elif isinstance(spec, str):      # "D": divisible by 16 (pointers: 16-byte aligned)
            attrs[str(i)] = backend.parse_attr(spec)
    return signature, constexprs, attrs, options


def record(cases, target):
    """Compile specs for `cases` [(label, launcher call)] on `target`.

    A spec is a JSON-able dict; identical compiles are merged (the first label is kept, and
    `labels` holds every case's: the teacher-less CE compiles as the KL at T = 1 does).
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    backend = make_backend(GPUTarget("cuda", target, 32))
    specs = {}
    for label, call in cases:
        with _recording(target) as launches:
            call()
        assert launches, f"{label}: the launcher launched nothing"
        for fn, args, kwargs in launches:
            signature, constexprs, attrs, options = _specialise(fn, args, dict(kwargs), backend)
            spec = dict(module=fn.__module__, kernel=fn.__name__, target=target,
                        signature=signature, constexprs=constexprs, attrs=attrs, options=options)
            key = json.dumps(spec, sort_keys=True)
            specs.setdefault(key, dict(spec, label=label, labels=[]))["labels"].append(label)
    return list(specs.values())


# --- compiling: worker processes -----------------------------------------------------------

def _resource_usage(cubin, tool):
    """(registers, stack frame bytes) of the one kernel in `cubin`, from cuobjdump."""
    out = sass_cost.cuobjdump(cubin, tool, "--dump-resource-usage")
    line = next(ln for ln in out.splitlines() if "REG:" in ln)
    usage = dict(item.split(":", 1) for item in line.split())
    return int(usage["REG"]), int(usage["STACK"])


def _static_cost(cubin, tool, kernel, requests):
    """{cost row: opcode counts of its main loop} for the spec's cost requests (cost_requests),
    or {cost row: {"error": why}} where the SASS does not have the loops the row expects."""
    insts = sass_cost.disassemble(cubin, tool)[kernel]
    out = {}
    for name, loop, trips in requests:
        try:
            out[name] = sass_cost.loop_cost(insts, loop, trips)
        except AssertionError as e:
            out[name] = {"error": str(e)}
    return out


def compile_spec(spec, tool):
    """triton.compile one spec; its resources (and static cost, if asked), or the error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    attrs = {(int(i),): v for i, v in spec["attrs"].items()}
    src = ASTSource(fn, spec["signature"], spec["constexprs"], attrs)
    try:
        kernel = triton.compile(src, target=GPUTarget("cuda", spec["target"], 32),
                                options=spec["options"])
    except Exception as e:   # noqa: BLE001 -- any compiler error is a finding
        return dict(error=f"{type(e).__name__}: {e}"[:3000])
    cubin = kernel.asm["cubin"]
    regs, stack = _resource_usage(cubin, tool)
    cost = _static_cost(cubin, tool, spec["kernel"], spec["cost"]) if spec.get("cost") else {}
    return dict(error=None, shared=kernel.metadata.shared, regs=regs, stack=stack, cost=cost)


def _worker():
    """--worker: one JSON spec per stdin line in, one JSON result per stdout line out."""
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)   # anything the compiler prints goes to stderr, not into the results
    tool = sass_cost.cuobjdump_tool()
    for line in sys.stdin:
        out.write(json.dumps(compile_spec(json.loads(line), tool)) + "\n")
        out.flush()


def compile_all(specs, jobs=None):
    """Compile specs in `jobs` worker processes (default: one per core); the results, in order.

    The workers import this checkout's kernels with TRITON_INTERPRET=0 and the Triton this
    process has (PYTHONPATH is passed on). A worker that dies fails its spec and is replaced.
    """
    env = dict(os.environ, TRITON_INTERPRET="0",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    todo = queue.Queue()
    for item in enumerate(specs):
        todo.put(item)
    results = [None] * len(specs)

    def start():
        return subprocess.Popen([sys.executable, __file__, "--worker"], cwd=ROOT, env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def drive():
        proc = start()
        while True:
            try:
                i, spec = todo.get_nowait()
            except queue.Empty:
                break
            proc.stdin.write(json.dumps(spec) + "\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
            if not line:
                results[i] = dict(error=f"the compiler process died (exit {proc.wait()})")
                proc = start()
                continue
            results[i] = json.loads(line)
        proc.stdin.close()
        proc.wait()

    if jobs is None:
        jobs = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = [threading.Thread(target=drive) for _ in range(jobs or 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [dict(spec, **r) for spec, r in zip(specs, results)]



# --- the cases: launcher calls on stand-in tensors -------------------------------------------

F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
NAMES = {F32: "fp32", BF16: "bf16", F16: "fp16", F64: "fp64", torch.int32: "i32",
         torch.int64: "i64"}
# beta, as the launchers take it: forward KL, reverse KL, and the JSD (its own branches, and a
# second forward pass or sweep)
DIVERGENCES = (0.0, 1.0, 0.5)


def _grid(**axes):
    """Every combination of the axes' values, as dicts."""
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


def _label(**kw):
    return " ".join(f"{k}={NAMES.get(v, v)}" for k, v in kw.items())


def _rows(n, v, dtype):
    """(2, n, v) rows as a causal LM passes them: x[:, :-1] of a (2, n + 1, v) batch."""
    return torch.empty(2, n + 1, v, dtype=dtype)[:, :-1]


def dense_cases():
    """hrm_loss fwd and bwd: every option combination at bf16 and fp32, V = 128256 (at hrm = 0
    the backward has no divergence term and the launcher one specialisation for every beta);
    every (student, teacher) dtype pair at V = 50257 (rows not 16-byte aligned), and fp64;
    small V (BLOCK_V 1024 with int32 labels; V = 1); no teacher (hrm = 0: the student's logits
    stand in, api/hrm_loss.py). No spills, whatever the shape."""
    from hrmkernels.kernels.triton.hrm_loss import hrm_loss_bwd, hrm_loss_fwd
    cases = []

    def add(v, zt, ut, beta, temperature, eps, hrm=0.5, du=False, scalar_grad=True,
            labels=torch.int64, fwd=True, teacher=True):
        label = _label(z=zt, u=ut if teacher else "none", V=v, T=temperature, eps=eps,
                       beta=beta)
        opts = dict(hrm=hrm, temperature=temperature, label_smoothing=eps, ignore_index=-100,
                    beta=beta)

        def inputs():
            z = _rows(15, v, zt)
            return z, _rows(15, v, ut) if teacher else z, torch.zeros(30, dtype=labels)

        def forward():
            hrm_loss_fwd(*inputs(), **opts)

        def backward():
            z, u, y = inputs()
            grad = torch.ones(()).expand(30) if scalar_grad else torch.ones(30)
            hrm_loss_bwd(z, u, y, torch.zeros(30, 5), grad, dz=z, du=u if du else None, **opts)
        if fwd:
            cases.append((f"fwd {label}", forward))
        cases.append((f"bwd {label} hrm={hrm} du={du} scalar_grad={scalar_grad}", backward))

    for dt in (BF16, F32):
        for o in _grid(beta=DIVERGENCES, temperature=(1.0, 2.0), eps=(0.0, 0.1)):
            add(128256, dt, dt, **o)
            add(128256, dt, dt, **o, du=True, fwd=False)      # the teacher's gradient too
        for temperature, du in itertools.product((1.0, 2.0), (False, True)):
            add(128256, dt, dt, 0.0, temperature, 0.1, hrm=0.0, du=du, fwd=False)   # no D term
    add(128256, BF16, BF16, 0.5, 2.0, 0.1, scalar_grad=False, fwd=False)   # reduction="none"
    add(128256, BF16, BF16, 0.0, 1.0, 0.0, hrm=0.0, teacher=False)
    for (zt, ut), beta in itertools.product(itertools.product((F32, BF16, F16), repeat=2),
                                            (1.0, 0.5)):
        add(50257, zt, ut, beta, 2.0, 0.1, du=True)
    add(1000, BF16, BF16, 0.5, 2.0, 0.1, du=True, labels=torch.int32)
    add(1, BF16, BF16, 0.5, 2.0, 0.1, du=True)             # V = 1 is a constexpr
    return cases


def topk_cases():
    """Top-k fwd and bwd, both modes: every option combination at k = 64 (at hrm = 0 one
    backward specialisation for every beta, as for the dense kernels); k from 1 to 32768 (one
    step, several, not a power of two) for each divergence; student, id and log-probability
    dtypes. No spills, whatever k."""
    from hrmkernels.kernels.triton.topk import hrm_loss_topk_bwd, hrm_loss_topk_fwd
    cases = []
    v = 128256

    def add(k, beta, renormalize, temperature, eps, hrm=0.5, zt=BF16, it=torch.int64, lt=F32,
            fwd=True):
        label = _label(z=zt, ids=it, lp=lt, V=v, k=k, renormalize=renormalize, T=temperature,
                       eps=eps, hrm=hrm, beta=beta)
        opts = dict(hrm=hrm, temperature=temperature, label_smoothing=eps, ignore_index=-100,
                    beta=beta, renormalize=renormalize)

        def inputs():
            idx = _rows(15, k, it)
            idx.copy_(torch.arange(k))   # distinct ids: the forward sorts them
            return _rows(15, v, zt), idx, _rows(15, k, lt), torch.zeros(30, dtype=torch.int64)

        def forward():
            hrm_loss_topk_fwd(*inputs(), **opts)

        def backward():
            z, idx, lp, y = inputs()
            hrm_loss_topk_bwd(z, idx, lp, y, torch.zeros(30, 4), torch.ones(()).expand(30),
                              dz=z, **opts)
        if fwd:
            cases.append((f"fwd {label}", forward))
        cases.append((f"bwd {label}", backward))

    for o in _grid(beta=DIVERGENCES, renormalize=(False, True), temperature=(1.0, 2.0),
                   eps=(0.0, 0.1)):
        add(64, **o)
    for renormalize, temperature in itertools.product((False, True), (1.0, 2.0)):
        add(64, 0.0, renormalize, temperature, 0.0, hrm=0.0, fwd=False)   # no D term
    for k, beta, renormalize in itertools.product((1, 1000, 32768), DIVERGENCES, (False, True)):
        add(k, beta, renormalize, 2.0, 0.1)
    add(64, 0.5, False, 2.0, 0.1, zt=F32, it=torch.int32, lt=BF16)
    add(64, 1.0, True, 2.0, 0.1, zt=F16)
    return cases


# The heads' dot classes: fp32 at each torch.set_float32_matmul_precision, bf16, fp16 (float64
# never reaches Triton: it computes in float32 and refuses it).
HEADS = ((F32, "highest"), (F32, "high"), (F32, "medium"), (BF16, "highest"),
         (F16, "highest"))


def linear_cases():
    """Fused-linear fwd (with the JSD's second sweep) and bwd. Each head dtype (fp32 at each
    matmul precision, bf16, fp16) at V = 50257, H = 1000 (no 16-divisible size) with a
    teacher head and every gradient, plainly and with everything that costs registers at once
    (the JSD, a softcap on each head); at V = 128256, H = 4096 with precomputed teacher logits
    (and their gradient), plainly and with the JSD and a student softcap; at bf16, each option
    and gradient mask on its own, no teacher (hrm = 0), the mixed shapes and fp32 teacher
    logits.

    fp32 at "high" (tf32x3) or "highest" (FMA) and fp64 take a quarter of the tile and up to
    255 registers (linear.py lets ptxas use them: maxnreg), and spill nothing either.
    """
    from hrmkernels.kernels.triton.linear import linear_hrm_loss_bwd, linear_hrm_loss_fwd
    cases = []
    all_grads, student_grads = (True,) * 6 + (False,), (True,) * 3 + (False,) * 4

    def add(dtype, precision, v, h, teacher="hidden", bias=True, beta=0.0, temperature=2.0,
            eps=0.1, hrm=0.5, caps=(None, None), want=None, logits=None, scalar_grad=True,
            fwd=True):
        heads = NAMES[dtype] + (f" {precision}" if dtype == F32 else "")
        label = _label(heads=heads, V=v, H=h, teacher=teacher,
                       logits=logits or dtype if teacher == "logits" else "-", bias=bias,
                       caps="".join("-" if c is None else "c" for c in caps), T=temperature,
                       eps=eps, hrm=hrm, beta=beta)
        want = want or {"hidden": all_grads, "none": student_grads,
                        "logits": (True,) * 3 + (False,) * 3 + (True,)}[teacher]
        want = (want[0], want[1], want[2] and bias, *want[3:5], want[5] and bias, want[6])
        # scales are runtime values; a softcap's presence is a constexpr
        transforms = tuple((0.5, cap) for cap in caps)
        opts = dict(hrm=hrm, temperature=temperature, label_smoothing=eps, ignore_index=-100,
                    beta=beta, transforms=transforms)

        def heads():
            meta = dict(dtype=dtype, device="meta")
            x, w = torch.empty(30, h, **meta), torch.empty(v, h, **meta)
            b = torch.empty(v, **meta) if bias else None
            y = torch.zeros(30, dtype=torch.int64, device="meta")
            if teacher == "logits":
                u = torch.empty(30, v, dtype=logits or dtype, device="meta")
                return x, w, b, None, None, None, u, y
            if teacher == "none":
                return x, w, b, None, None, None, None, y
            return x, w, b, x, w, b, None, y

        def forward():
            with _float32_matmul_precision(precision):
                linear_hrm_loss_fwd(*heads(), **opts)

        def backward():
            *h7, y = heads()
            grad = torch.ones((), device="meta").expand(30) if scalar_grad else \
                torch.ones(30, device="meta")
            with _float32_matmul_precision(precision):
                linear_hrm_loss_bwd(*h7, y, torch.zeros(30, 5, device="meta"), grad, want=want,
                                    **opts)
        if fwd:
            cases.append((f"fwd {label}", forward))
        cases.append((f"bwd {label} want={''.join('x' if w else '-' for w in want)} "
                      f"scalar_grad={scalar_grad}", backward))

    for dtype, precision in HEADS:
        add(dtype, precision, 50257, 1000)
        add(dtype, precision, 50257, 1000, beta=0.5, caps=(30.0, 50.0))
        if dtype != F16:   # fp16 compiles as bf16 does but for the conversions
            add(dtype, precision, 128256, 4096, teacher="logits")
            add(dtype, precision, 128256, 4096, teacher="logits", beta=0.5, caps=(30.0, None))
    b = (BF16, "highest")
    add(*b, 128256, 4096)
    add(*b, 50257, 4096)
    add(*b, 128256, 1000)
    add(*b, 128256, 4096, bias=False, temperature=1.0)
    add(*b, 128256, 4096, teacher="logits", bias=False, temperature=1.0)
    add(*b, 128256, 4096, beta=1.0, eps=0.0)
    add(*b, 128256, 4096, beta=0.5)
    add(*b, 128256, 4096, beta=0.5, temperature=1.0, eps=0.0)
    add(*b, 128256, 4096, caps=(30.0, None))
    add(*b, 128256, 4096, caps=(None, 50.0))
    add(*b, 128256, 4096, hrm=0.0)                         # D reported, no D gradient
    add(*b, 128256, 4096, teacher="none", hrm=0.0)         # the fused linear cross-entropy
    add(*b, 128256, 4096, teacher="none", hrm=0.0, caps=(30.0, None), temperature=1.0)
    add(*b, 128256, 4096, want=(True,) + (False,) * 6, fwd=False)   # frozen head: d hidden
    add(*b, 128256, 4096, want=student_grads, fwd=False)   # frozen teacher
    add(*b, 128256, 4096, scalar_grad=False, fwd=False)    # reduction="none"
    add(*b, 128256, 4096, teacher="logits", logits=F32)
    return cases


@contextlib.contextmanager
def _float32_matmul_precision(precision):
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


def all_cases():
    return dense_cases() + topk_cases() + linear_cases()


# --- the static cost check: per element of the main loops, from the SASS ------------------------

COST_TARGETS = (90, 100)   # the H200 the budgets are derived for (docs/design.md), and Blackwell


def _k_steps(loops):
    """Trip counts of `loops` dot loops over H = 4096 in BLOCK_K steps (fused linear)."""
    return lambda c: (4096 // c["BLOCK_K"],) * loops


class Cost(NamedTuple):
    """A row of the static cost check: a case compiled above, the loop that is its main one,
    the bytes per element it must move, and its budgets per element (None: reported only)."""
    kernel: str
    label: str                # the case's label
    loop: int | None          # outermost loop (address order) that is the main loop; None: all
    trips: Callable           # constexprs -> iterations of the loops nested in it, in order
    read: int                 # bytes per element of the main loop's streams, in and out: the
    write: int                # ceiling (sass_cost.ceilings); the 128-bit loads must carry `read`
    instructions: float | None
    ex2: float | None
    over: dict = {}           # budget -> why it is missed today (an xfail; strict: remove it
                              # when a kernel meets it)


D = "z=bf16 u=bf16 V=128256"
TOPK = "z=bf16 ids=i64 lp=fp32 V=128256 k=64"
LIN = "heads=bf16 V=128256 H=4096 teacher=hidden logits=- bias=True caps=-- T=2.0 eps=0.1 hrm=0.5"
LIN_CE = "heads=bf16 V=128256 H=4096 teacher=none logits=- bias=True caps=-- T=2.0 eps=0.1 hrm=0.0"
NONE = lambda c: ()   # noqa: E731 -- no nested loops
# Why budgets are missed today, from the SASS:
SLOW_EXP = ("tl.exp takes 6 instructions: x - m, a log2(e) multiply, MUFU.EX2 and a denormal "
            "fix-up (FSETP, 2 FMUL)")
SLOW_FWD = "block reductions (BAR, SHFL) every iteration; " + SLOW_EXP
LOG_MIX = ("the JSD's log-mixture per element: two logs of the mixture's terms, their max, min, "
           "a MUFU.EX2 and a MUFU.LG2, and the guards of both models' masked entries")
# The budgets, bf16, V = 128256 (docs/design.md, "Static cost"): instructions a quarter below
# the H200's issue ceiling at the bytes moved (2 B: 15.6 -> 12, 4 B: 31.1 -> 24, 6 B: 46.7 -> 34,
# 8 B: 62.2 -> 46); exponentials as many as the streams need, plus 0.2 for the rescales per block.
# The top-k forward's 2 B allow 1.95 MUFU operations an element: it cannot be memory-bound
# with the 3 exponentials of its streams (z, z/T, the rest), so its MUFU count is reported only.
FWD, BWD, TOP, LINEAR = "_hrm_loss_fwd_kernel", "_hrm_loss_bwd_kernel", \
    "_hrm_loss_topk_", "_linear_hrm_loss_"
COST = {
    "dense fwd KL T=2": Cost(FWD, f"fwd {D} T=2.0 eps=0.0 beta=0.0", 0, NONE, 4, 0, 24, 3.2),
    "dense fwd KL T=1": Cost(FWD, f"fwd {D} T=1.0 eps=0.0 beta=0.0", 0, NONE, 4, 0, 24, 2.2),
    "dense fwd KL T=2 eps=0.1": Cost(FWD, f"fwd {D} T=2.0 eps=0.1 beta=0.0", 0, NONE, 4, 0, 24,
                                     3.2),
    "dense fwd reverse KL T=2": Cost(FWD, f"fwd {D} T=2.0 eps=0.0 beta=1.0", 0, NONE, 4, 0, 24,
                                     3.2),
    "dense fwd JSD T=2 pass 1": Cost(FWD, f"fwd {D} T=2.0 eps=0.0 beta=0.5", 0, NONE, 4, 0, 24,
                                     3.2),
    "dense fwd JSD T=2 pass 2": Cost(FWD, f"fwd {D} T=2.0 eps=0.0 beta=0.5", 1, NONE, 4, 0, 24,
                                     3.2, {"instructions": LOG_MIX}),
    # fused_hrm_loss(z, None, y, 0): the CE reads z alone (2 B), one exponential an element
    "dense fwd CE": Cost(FWD, "fwd z=bf16 u=none V=128256 T=1.0 eps=0.0 beta=0.0", 0, NONE, 2, 0,
                         12, 1.2),
    "dense bwd KL T=2": Cost(BWD, f"bwd {D} T=2.0 eps=0.0 beta=0.0 hrm=0.5 du=False "
                             "scalar_grad=True", None, NONE, 4, 2, 34, None),
    "dense bwd KL T=1": Cost(BWD, f"bwd {D} T=1.0 eps=0.0 beta=0.0 hrm=0.5 du=False "
                             "scalar_grad=True", None, NONE, 4, 2, 34, None),
    "dense bwd reverse KL T=2": Cost(BWD, f"bwd {D} T=2.0 eps=0.0 beta=1.0 hrm=0.5 du=False "
                                     "scalar_grad=True", None, NONE, 4, 2, 34, None),
    "dense bwd JSD T=2": Cost(BWD, f"bwd {D} T=2.0 eps=0.0 beta=0.5 hrm=0.5 du=False "
                              "scalar_grad=True", None, NONE, 4, 2, 34, None,
                              {"instructions": LOG_MIX}),
    "dense bwd KL T=2 du": Cost(BWD, f"bwd {D} T=2.0 eps=0.0 beta=0.0 hrm=0.5 du=True "
                                "scalar_grad=True", None, NONE, 4, 4, 46, None),
    "dense bwd CE": Cost(BWD, "bwd z=bf16 u=none V=128256 T=1.0 eps=0.0 beta=0.0 hrm=0.0 "
                         "du=False scalar_grad=True", None, NONE, 2, 2, 24, None),
    # "rest": the vocabulary loop holds the sorted-id scan (one step at k = 64) and the member
    # mask, one pass per top-k id in the block: k BLOCK_V / V of them
    "top-k fwd rest KL T=2": Cost(TOP + "fwd_kernel", f"fwd {TOPK} renormalize=False T=2.0 "
                                  "eps=0.0 hrm=0.5 beta=0.0", 0,
                                  lambda c: (1, 64 * c["BLOCK_V"] / 128256), 2, 0, 12, None,
                                  {"instructions": SLOW_FWD + "; a block-wide compare per "
                                   "member"}),
    "top-k fwd renormalize KL T=2": Cost(TOP + "fwd_kernel", f"fwd {TOPK} renormalize=True "
                                         "T=2.0 eps=0.0 hrm=0.5 beta=0.0", 0, NONE, 2, 0, 12,
                                         None, {"instructions": SLOW_FWD}),
    "top-k bwd rest KL T=2": Cost(TOP + "bwd_kernel", f"bwd {TOPK} renormalize=False T=2.0 "
                                  "eps=0.0 hrm=0.5 beta=0.0", None, lambda c: (1,), 2, 2, 24,
                                  None, {"instructions": SLOW_EXP + "; the top-k overwrite"}),
    # Fused linear, per logit: GEMM-bound (no byte budget); the dot loops run H / BLOCK_K times
    "linear fwd KL T=2": Cost(LINEAR + "fwd_kernel", f"fwd {LIN} beta=0.0", 0, _k_steps(2), 0,
                              0, None, None),
    "linear bwd KL T=2 frozen teacher": Cost(LINEAR + "bwd_kernel", f"bwd {LIN} beta=0.0 "
                                             "want=xxx---- scalar_grad=True", None, _k_steps(3),
                                             0, 0, None, None),
    "linear bwd KL T=2 both heads": Cost(LINEAR + "bwd_kernel", f"bwd {LIN} beta=0.0 "
                                         "want=xxxxxx- scalar_grad=True", None, _k_steps(4), 0,
                                         0, None, None),
    "linear fwd CE": Cost(LINEAR + "fwd_kernel", f"fwd {LIN_CE} beta=0.0", 0, _k_steps(1), 0, 0,
                          None, None),
    "linear bwd CE": Cost(LINEAR + "bwd_kernel", f"bwd {LIN_CE} beta=0.0 want=xxx---- "
                          "scalar_grad=True", None, _k_steps(2), 0, 0, None, None),
}


def cost_requests(spec):
    """[[row, loop, trips]] of the COST rows this spec compiles, on COST_TARGETS."""
    if spec["target"] not in COST_TARGETS:
        return []
    return [[name, row.loop, row.trips(spec["constexprs"])] for name, row in COST.items()
            if row.kernel == spec["kernel"] and row.label in spec["labels"]]


def cost_rows(results):
    """[(row, result, per-element summary or {"error": why})] of every cost row in results."""
    out = []
    for r in results:
        c = r["constexprs"]
        block = c["KSUB"] * c["THREADS"] * c["VEC"] if "KSUB" in c else c.get("BLOCK_V", 1)
        elements = block * c.get("BLOCK_N", 1) / (32 * r["options"]["num_warps"])
        for name, counts in (r.get("cost") or {}).items():
            out.append((name, r, counts if "error" in counts
                        else sass_cost.summary(counts, elements)))
    return out


def over_budget(name, s):
    """{budget: why} for each budget of COST[name] that summary s misses."""
    row = COST[name]
    if "error" in s:
        return dict.fromkeys(("instructions", "ex2", "loads"), s["error"])
    out = {}
    if row.instructions is not None and s["instructions"] > row.instructions:
        out["instructions"] = f"{s['instructions']:.1f} instructions > {row.instructions}"
    if row.ex2 is not None and s["ex2"] > row.ex2:
        out["ex2"] = f"{s['ex2']:.2f} MUFU.EX2 > {row.ex2}"
    wide = s["loads"].get(128, 0) * 16 / s["elements"]   # bytes per element in 128-bit loads
    if row.read and wide < row.read:
        out["loads"] = f"{wide:g} B per element in 128-bit loads < {row.read} B"
    return out



# --- checks, the table, the tests -----------------------------------------------------------

def problems(results):
    """One line per compile that fails, overflows shared memory or spills."""
    out = []
    for r in results:
        where = f"Triton {r['triton']} sm_{r['target']} {r['kernel']} [{r['label']}]"
        if r["error"]:
            out.append(f"{where}: does not compile: {r['error']}")
        elif r["shared"] > SHARED_LIMIT[r["target"]]:
            out.append(f"{where}: {r['shared']} B of shared memory > the block limit "
                       f"{SHARED_LIMIT[r['target']]} B")
        elif r["stack"]:
            out.append(f"{where}: spills {r['stack']} B ({r['regs']} registers)")
    return out


def run(targets=tuple(SHARED_LIMIT)):
    """Record every case on every target, compile, and return the results of this Triton."""
    import triton
    specs = [spec for target in targets for spec in record(all_cases(), target)]
    for spec in specs:
        spec["cost"] = cost_requests(spec)
    return [dict(r, triton=triton.__version__) for r in compile_all(specs)]


TRITON36 = ROOT / ".triton-3.6"   # pip install --no-deps --target .triton-3.6 triton==3.6.0
TRITON36_TARGETS = (80, 86, 90)   # the GPU machine's H200; Blackwell wants a newer Triton


def run_triton36(out):
    """run() under the Triton in TRITON36, in a subprocess (this one has imported its own)."""
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(TRITON36), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, __file__, "--json", str(out), "--targets",
                           ",".join(map(str, TRITON36_TARGETS))], env=env,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"the Triton 3.6 run failed:\n{proc.stderr[-5000:]}"
    return json.loads(Path(out).read_text())


def table(results, cuda=None):
    """The resource table as markdown: per kernel and specialisation, per Triton version, the
    registers, spilled bytes and shared memory on each target; then cost_table's section."""
    targets = sorted(SHARED_LIMIT)
    cells = {}
    for r in results:
        cell = "error" if r["error"] else f"{r['regs']} / {r['stack']} / {r['shared']}"
        if r.get("error") is None and (r["shared"] > SHARED_LIMIT[r["target"]]
                                       or r["stack"]):
            cell = f"**{cell}**"
        cells.setdefault((r["kernel"], r["label"], r["triton"]), {})[r["target"]] = cell
    lines = [
        "# Triton kernel resources, compiled ahead of time",
        "",
        "Generated by `python tests/test_triton_aot.py --table benchmarks/kernel_resources.md`",
        "(Triton 3.6 too, on " + ", ".join(f"sm_{t}" for t in TRITON36_TARGETS) + ", when"
        " `.triton-3.6/` holds it: `pip install --no-deps --target .triton-3.6 triton==3.6.0`).",
        "",
        "Each cell: registers / spilled bytes (stack frame) / shared memory bytes per block;"
        " **bold** where the test fails it. Block limits: "
        + ", ".join(f"sm_{t} {n} B" for t, n in SHARED_LIMIT.items())
        + ". No kernel may spill.",
        "",
        f"{len(results)} compiles, {len(problems(results))} failing.",
        "",
        "| kernel | specialisation | Triton | " + " | ".join(f"sm_{t}" for t in targets) + " |",
        "|---|---|---|" + "---|" * len(targets),
    ]
    for (kernel, label, version), row in sorted(cells.items()):
        lines.append(f"| {kernel} | {label} | {version} | "
                     + " | ".join(row.get(t, "") for t in targets) + " |")
    return "\n".join(lines + cost_table(results, cuda)) + "\n"


def cost_table(results, cuda=None):
    """The static cost section: per row of COST, compiler and target, the main loop's figures
    per element, against the budgets (**bold** where missed) and the H200's ceiling; `cuda`:
    the CUDA kernels' rows ({row: (kernel, summary)}, tests/test_csrc_compile.py) beside them."""
    def fmt(x, budget, missed, digits):
        cell = f"{x:.{digits}f}" + (f" ({budget:g})" if budget is not None else "")
        return f"**{cell}**" if missed else cell

    def widths(w):
        return " ".join(f"{c:.4g}x{bits}" for bits, c in w.items()) or "-"

    lines = [
        "",
        "## Static cost per element of the main loop",
        "",
        "Generated with the table above (COST in tests/test_triton_aot.py; docs/design.md, "
        "\"Static cost\"): the SASS (`cuobjdump -sass`) of each row's compile, its main loop's "
        "longest path (nested loops times their trip counts), per element a thread handles in "
        "an iteration (fused linear: per logit). bf16, V = 128256, k = 64, H = 4096. nvcc rows: "
        "the CUDA kernels' device code with their run-time options fixed "
        "(tests/test_csrc_compile.py, COST_HARNESS). Budgets in parentheses, **bold** where "
        "missed; loads and stores per iteration as count x bits; BAR and SHFL per iteration; "
        "MMA and atomic bytes per element. The ceiling is the fraction of the H200's copy "
        "bandwidth that the instruction and MUFU counts allow ("
        + "; ".join(f"{b} B an element: {ci:.1f} instructions, {cm:.2f} MUFU"
                    for b, (ci, cm) in ((b, sass_cost.ceilings(b)) for b in (2, 4, 6, 8)))
        + ").",
        "",
        "| row | kernel | compiler | sm | elements | instructions | MUFU.EX2 | MUFU, all | loads "
        "| stores | BAR / SHFL | MMA | atomics, B | ceiling |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [(name, r["kernel"], f"Triton {r['triton']}", r["target"], s)
            for name, r, s in cost_rows(results)]
    rows += [(name, kernel, "nvcc", 90, s) for name, (kernel, s) in (cuda or {}).items()]
    order = list(COST)
    for name, kernel, compiler, target, s in sorted(rows, key=lambda x: (order.index(x[0]),
                                                                         x[2], x[3])):
        row = COST[name]
        head = f"| {name} | {kernel} | {compiler} | {target} | "
        if "error" in s:
            lines.append(head + f"**{s['error']}** |" + " |" * 9)
            continue
        over = over_budget(name, s)
        ceiling = "-"
        if row.read:
            ci, cm = sass_cost.ceilings(row.read + row.write)
            ceiling = f"{min(1.0, ci / s['instructions'], cm / s['mufu']):.0%}"
        loads = widths(s["loads"])
        lines.append(head + " | ".join([
            f"{s['elements']:g}",
            fmt(s["instructions"], row.instructions, "instructions" in over, 1),
            fmt(s["ex2"], row.ex2, "ex2" in over, 2), f"{s['mufu']:.2f}",
            f"**{loads}**" if "loads" in over else loads, widths(s["stores"]),
            f"{s['bar']:g} / {s['shfl']:g}", f"{s['mma']:.3g}", f"{s['atomic_bytes']:.4g}",
            ceiling]) + " |")
    return lines


def _assert_fine(results):
    bad = problems(results)
    assert not bad, f"{len(bad)} of {len(results)} compiles fail:\n" + "\n".join(bad)


@pytest.fixture(scope="module")
def aot_results():
    """Every case on every target under the installed Triton (compiled once per module)."""
    return run()


@pytest.fixture(scope="module")
def aot_results_36(tmp_path_factory):
    """The same under Triton 3.6.0, what the GPU machine runs (with torch 2.11)."""
    if not (TRITON36 / "triton").is_dir():
        pytest.skip(f"no Triton 3.6 in {TRITON36}: pip install --no-deps --target .triton-3.6 "
                    "triton==3.6.0 (the README's test command does)")
    results = run_triton36(tmp_path_factory.mktemp("triton36") / "results.json")
    assert {r["triton"] for r in results} == {"3.6.0"}
    return results


def test_triton_aot_kernels_compile_fit_and_do_not_spill(aot_results):
    """Under the installed Triton: every case on every target."""
    _assert_fine(aot_results)


def test_triton_aot_under_triton_3_6(aot_results_36):
    _assert_fine(aot_results_36)


# The Tritons and targets of the static cost check: the installed one on COST_TARGETS, and 3.6
# on the H200 (sm_90; it does not compile for Blackwell here).
COST_RUNS = (("installed", 90), ("installed", 100), ("3.6", 90))


def _cost_checks():
    for name, row in COST.items():
        budgets = [b for b, v in (("instructions", row.instructions), ("ex2", row.ex2),
                                  ("loads", row.read or None)) if v is not None]
        for budget, (version, target) in itertools.product(budgets, COST_RUNS):
            why = row.over.get(budget) or row.over.get((budget, version))
            marks = [pytest.mark.xfail(strict=True, reason=why)] if why else []
            yield pytest.param(name, budget, version, target, marks=marks,
                               id=f"{name}-{budget}-{version}-sm{target}")


def _cost_of(request, name, version, target):
    results = request.getfixturevalue("aot_results" if version == "installed" else
                                      "aot_results_36")
    found = [s for n, r, s in cost_rows(results) if n == name and r["target"] == target]
    assert len(found) == 1, f"{name}: {len(found)} compiles on sm_{target} (a label changed?)"
    assert "error" not in found[0], f"{name} on sm_{target}: {found[0]['error']}"
    return found[0]


@pytest.mark.parametrize("name, budget, version, target", _cost_checks())
def test_hrm_loss_static_cost(request, name, budget, version, target):
    """Each main loop within its budgets per element (COST; docs/design.md, "Static cost")."""
    why = over_budget(name, _cost_of(request, name, version, target)).get(budget)
    assert why is None, f"{name} (Triton {version}, sm_{target}): {why}"


@pytest.mark.parametrize("version, target", COST_RUNS)
def test_hrm_loss_static_cost_rows_counted(request, version, target):
    """Every row of COST is found and counted, also those without budgets (fused linear, whose
    dot loops must hold tensor-core instructions)."""
    for name, row in COST.items():
        s = _cost_of(request, name, version, target)
        assert s["instructions"] > 0 and s["mufu"] > 0, (name, s)
        if row.kernel.startswith(LINEAR):
            assert s["mma"] > 0, (name, s)

if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="write this Triton's results here (JSON)")
    parser.add_argument("--targets", default=",".join(map(str, SHARED_LIMIT)),
                        help="with --json: compute capabilities, comma-separated")
    parser.add_argument("--table", help="write the resource table here (markdown), this "
                                        "Triton's results and Triton 3.6's")
    args = parser.parse_args()
    if args.worker:
        _worker()
    elif args.json:
        Path(args.json).write_text(json.dumps(run(tuple(map(int, args.targets.split(","))))))
    elif args.table:
        import test_csrc_compile   # this script's folder, tests/, is on sys.path
        results = run()
        with tempfile.TemporaryDirectory() as tmp:
            if (TRITON36 / "triton").is_dir():
                results += run_triton36(Path(tmp) / "results.json")
            cuda = test_csrc_compile.cuda_cost(tmp)   # or why not (no nvcc)
        if isinstance(cuda, str):
            print(f"no CUDA rows: {cuda}")
            cuda = {}
        cuda = {name: (test_csrc_compile.CUDA_COST[name][0], s) for name, s in cuda.items()}
        Path(args.table).write_text(table(results, cuda))
        print("\n".join(problems(results)) or f"{len(results)} compiles, all fine")
