"""What the Triton kernel files share: the online log-sum-exp, the JSD's log-mixture,
the per-element divergence gradients and the row epilogues (jit functions), and the launch
helpers (vocabulary blocks, the launch target, custom-op registration). The math they implement
is derived in hrm_loss.py."""
import contextlib
import math
import os

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Widest vocabulary block a program loads at once. On a GPU, MAX_BLOCK_V 2-byte logits: 32 bytes
# of each input per thread of 8 warps (wider fp32 blocks spill on sm_86), so half as many
# fp32 and a quarter as many fp64 logits. The interpreter pays per operation, not per
# element, so it runs fastest with wide blocks (16384 still splits V=32003 into several).
MAX_BLOCK_V = 4096
INTERPRETER_BLOCK_V = 16384
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)
FLT_MAX: tl.constexpr = tl.constexpr(3.4028234663852886e38)
# On a GPU exp2 is one MUFU.EX2 and log2 one MUFU.LG2 (ex2/lg2.approx.ftz: no denormal fix-up,
# as in csrc); the interpreter runs no PTX and takes tl.exp2, tl.log2.
NATIVE_EXP2: tl.constexpr = tl.constexpr(not INTERPRETED)


@triton.jit
def exp2(x):
    """2^x in one MUFU.EX2; results below 2^-126 flush to 0."""
    if NATIVE_EXP2:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.exp2(x)


@triton.jit
def log2(x):
    """log2(x) in one MUFU.LG2 (denormal x flushes to 0: -inf)."""
    if NATIVE_EXP2:
        return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=f,f", [x],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.log2(x)


@triton.jit
def online_lse(m, s, x):
    """Fold block x into the running (max m, sum s = sum exp(x - m)).

    Returns the new m and s, exp(x - m_new) for the block, and the factor exp(m - m_new) that
    rescales any other sum carried against the same max.
    """
    m_new = tl.maximum(m, tl.max(x, axis=0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - m_safe)
    e = tl.exp(x - m_safe)
    return m_new, s * alpha + tl.sum(e, axis=0), e, alpha


@triton.jit
def online_lse_h(m, s, h, x):
    """online_lse that also carries h = sum exp(x - m) (x - m), for the entropy log s - h / s.

    On a new max, h relative to m_old becomes alpha (h + s (m_old - m_new)) relative to m_new;
    the relative form keeps H accurate where lse(x) - E[x] would cancel (|x| ~ 1e4).
    """
    m_new = tl.maximum(m, tl.max(x, axis=0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - m_safe)
    e = tl.exp(x - m_safe)
    shift = tl.where(s > 0.0, s * (m - m_safe), 0.0)     # s == 0 while m is -inf
    h = alpha * (h + shift) + tl.sum(tl.where(x == float("-inf"), 0.0, e * (x - m_safe)), axis=0)
    return m_new, s * alpha + tl.sum(e, axis=0), h, e, alpha


@triton.jit
def log_mix(lp, lq, log_beta, log_1m_beta):
    """lm = log(beta e^lp + (1 - beta) e^lq) = hi + log(1 + e^(lo - hi)), hi, lo the larger and
    smaller of lp + log beta and lq + log(1 - beta): finite wherever lp or lq is (also below
    -104, where p and q underflow), -inf where both are -inf (hi replaced by 0 in the exp)."""
    x = lp + log_beta
    w = lq + log_1m_beta
    hi = tl.maximum(x, w, propagate_nan=tl.PropagateNan.ALL)   # a NaN makes m NaN
    lo = tl.minimum(x, w, propagate_nan=tl.PropagateNan.ALL)
    return hi + LN2 * log2(1.0 + exp2((lo - tl.where(hi == float("-inf"), 0.0, hi)) * LOG2E))


@triton.jit
def divergence_grads(a, b, q, p, lse_a, lse_b, s3, s4, beta, log_beta, log_1m_beta,
                      REVERSE: tl.constexpr, JSD: tl.constexpr):
    """(G_z, G_u): T / hrm times the divergence's gradient in z and u, element by element, from
    a = z/T, b = u/T, q, p and the row's statistics (s3 = mu or KL(q || m), s4 = KL(p || m)).
    A masked entry (logit -inf) contributes 0, never 0 * inf: the guards test the logits, since
    `p > 0` would also drop a NaN, even where p merely underflows."""
    if JSD:       # (1 - beta) q (lq - lm - KL(q || m)), beta p (lp - lm - KL(p || m))
        lq = a - lse_a
        lp = b - lse_b
        lm = log_mix(lp, lq, log_beta, log_1m_beta)
        g_z = (1.0 - beta) * tl.where(a == float("-inf"), 0.0, q * (lq - lm - s3))
        g_u = beta * tl.where(b == float("-inf"), 0.0, p * (lp - lm - s4))
    elif REVERSE:   # log q - log p - KL = (a - b) - mu, s3 = mu = E_q[a - b]
        g_z = tl.where(a == float("-inf"), 0.0, q * ((a - b) - s3))
        g_u = p - q
    else:           # log p - log q - KL = (b - a) - mu, s3 = mu = E_p[b - a]
        g_z = q - p
        g_u = tl.where(b == float("-inf"), 0.0, p * ((b - a) - s3))
    return g_z, g_u


@triton.jit
def store_ignored_row(row, loss_ptr, ce_ptr, kl_ptr, ent_ptr, stats_ptr, N_STATS: tl.constexpr):
    """An ignored token: loss, CE, KL, entropy and the saved statistics of its row are zeros."""
    tl.store(loss_ptr + row, 0.0)
    tl.store(ce_ptr + row, 0.0)
    tl.store(kl_ptr + row, 0.0)
    tl.store(ent_ptr + row, 0.0)
    for i in tl.static_range(N_STATS):
        tl.store(stats_ptr + N_STATS * row + i, 0.0)


@triton.jit
def store_ce_loss(z_row, y, V, lse_z, sum_z, kl, eps, hrm, loss_ptr, ce_ptr, kl_ptr,
                   SMOOTH: tl.constexpr):
    """CE = lse_z - (1 - eps) z_y - eps * sum_z / V; store CE + hrm * KL, CE and KL of one row."""
    # A label outside [0, V) is never dereferenced: its CE is NaN instead.
    valid = (y >= 0) & (y < V)
    z_y = tl.where(valid, tl.load(z_row + tl.where(valid, y, 0)).to(tl.float32), float("nan"))
    ce = lse_z - z_y
    if SMOOTH:
        ce = lse_z - (1.0 - eps) * z_y - eps * sum_z / V
    loss = ce
    if hrm > 0.0:   # hrm == 0 drops the KL term exactly, even where KL is infinite
        loss = ce + hrm * kl
    tl.store(loss_ptr, loss)
    tl.store(ce_ptr, ce)
    tl.store(kl_ptr, kl)


# ptxas, left to itself under `.reqntid 256`, aims at an occupancy that it reaches by parking a
# few values in local memory: 8-24 B of spills in the forward kernels, depending on the flags,
# the target and the Triton version (tests/test_triton_aot.py). `maxnreg` lifts its register
# target; 128 keeps two blocks of 8 warps per SM, ample for a kernel that streams rows.
MAXNREG_8_WARPS = 128


def block_v(v, device, itemsize):
    """Vocabulary block for rows of V logits of `itemsize` bytes (the widest input) on device."""
    cap = INTERPRETER_BLOCK_V if launch_target(device) is None else MAX_BLOCK_V * 2 // itemsize
    # int(): under torch.compile's dynamic shapes V is a SymInt; the block size specialises on it
    return min(triton.next_power_of_2(int(v)), max(cap, 1))


def launch_target(device):
    """The GPU the launchers choose tiles for: its compute capability as Triton names targets
    (80, 86, 90, ...), or None under the interpreter. tests/test_triton_aot.py answers it with
    each target it compiles for."""
    if INTERPRETED or device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def device_of(x):
    # Triton launches on the current CUDA device: make it x's (multi-GPU processes).
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


# Custom ops. On a GPU they are torch.library.triton_op: torch.compile sees through them to the
# kernels (Inductor launches them itself, also inside CUDA graphs), and FakeTensor tracing runs
# their bodies with fake tensors, which is why a body only allocates and launches. Python
# numbers are schema arguments (float/int/bool). The backward writes dz (and du) in place, as
# the CUDA op's schema "Tensor(a!) dz, Tensor(b!)? du" does.

def custom_triton_op(name, mutates_args, fake):
    """Register fn as the op `name`: a triton_op, or under TRITON_INTERPRET=1 an opaque custom_op.

    The interpreter's kernels are plain Python that FakeTensor tracing cannot see through
    (wrap_triton returns them unwrapped), so there the op is opaque and `fake` gives its shapes.
    """
    def register(fn):
        if not INTERPRETED:
            return torch.library.triton_op(name, fn, mutates_args=mutates_args)
        op = torch.library.custom_op(name, fn, mutates_args=mutates_args)
        op.register_fake(fake)
        return op
    return register


def no_output(*args):
    return None


def divergence_args(beta, used=True):
    """The kernels' JSD scalars (beta, log beta, log(1 - beta)) and flags REVERSE, JSD: beta = 0
    and 1 take the one-pass KL kernels (the scalars are then unused). A launch without the
    divergence term (used False: hrm == 0 in a backward) gets the forward KL's flags, whatever
    beta: one compiled specialisation instead of three identical ones."""
    jsd = used and 0.0 < beta < 1.0
    logs = (math.log(beta), math.log1p(-beta)) if jsd else (0.0, 0.0)
    return (beta, *logs), dict(REVERSE=used and beta == 1.0, JSD=jsd)
