"""Autograd Functions of the fused linear HRM loss: stage 1 (chunked) and stage 2 (fused Triton).

Both take the heads as 2-D tensors: student hidden xs (N, Hs), weight ws (V, Hs), bias bs (V,)
or None; teacher xt (N, Ht), wt (V, Ht), bt (V,) or None, or instead precomputed teacher
logits u (N, V) (then xt = wt = bt = None); labels (N,). `options` is the tuple
(hrm, temperature, label_smoothing, ignore_index, beta, with_kl): beta chooses the divergence
(kernels/__init__.py); with_kl asks for it even at hrm == 0, where the teacher is otherwise
never computed. `transforms` is ((scale, softcap), (scale, softcap)) for the student and the
teacher head, in TRL's order (softcap None: no tanh), before / T:

    logits = c tanh(s x / c)     d logits / d x = s (1 - (logits / c)^2)
    logits = s x                 d logits / d x = s                      (no softcap)

with x = hidden @ W^T + b; CE sees these logits. Precomputed teacher logits are used as given,
and so is a sparse teacher (top-k ids and log-probabilities, N x k): then only the student's
chunk logits exist, and the backends' top-k launchers (kernels/triton/topk.py) run on them.

Stage 1 (ChunkedLinearHRMFunction). Token chunks of `rows` rows: logits = x @ W^T (+ b) with
torch's GEMM, the existing loss launchers (backends.py) on the chunk, and the head gradients

    d x = dz W,    d W += dz^T x,    d b += sum_rows dz

with dz written by the backward launcher over the chunk's own logits (in place). Precision:
the chunk logits are fp32, the GEMM's fp32 accumulator unrounded, and so is the transform.
Rounding the bf16 GEMM output to bf16 first costs 4-23% of gradient error (Liger #1432, fixed in
Liger 0.8.5 the same way: an fp32-output GEMM on CUDA; a logit of 20 in bf16 is off by up to
0.06, its probability by 6%). The price is 4 bytes instead of 2 per chunk logit, which
chunk_rows counts. On CUDA the fp32-output GEMM is torch.mm(..., out_dtype=), where the
dispatcher has it; a torch without it falls back to bf16-rounded logits, with a warning. dz is
rounded once to the weight's dtype for the two gradient GEMMs (as autograd through a bf16
lm_head would), and d W accumulates across chunks in fp32 (Liger #512/#827: bf16 accumulation
diverges), rounded to the weight's dtype at the end.

For reduction "mean"/"sum" the per-row gradient is known in the forward (1 / denominator, a
device tensor: no host sync), so the gradients are formed there and the backward only scales
them by grad_output (Liger's scheme: one GEMM fewer than recomputing). For "none" it is not:
the forward computes the per-row losses only and the backward recomputes the chunk logits.
"""
import functools
import warnings

import torch


@functools.cache
def _fp32_out_gemm(device_type, dtype):
    """Whether torch.mm and torch.addmm(out=) take out_dtype=float32 for `dtype` (bf16, fp16)
    operands on `device_type`: read from the dispatcher, which registers aten::mm.dtype and
    aten::addmm.dtype_out for CUDA (torch >= 2.8 CUDA builds), never by running a product."""
    if device_type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return False
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return has("aten::mm.dtype", "CUDA") and has("aten::addmm.dtype_out", "CUDA")


@functools.cache
def _warn_rounded_logits(dtype):
    warnings.warn(f"hrmkernels: this torch has no {dtype} GEMM with float32 output on CUDA "
                  "(torch.mm(..., out_dtype=torch.float32), torch >= 2.8): fused_linear_hrm_loss "
                  f"rounds its chunk logits to {dtype} before the loss, which cost Liger's "
                  "fused-linear loss 4-23% of gradient error (Liger #1432). Upgrade torch, or "
                  "pass float32 heads.", stacklevel=2)


def acc_dtype(dtype):
    """The dtype chunk logits and accumulators use: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _logits(x, w, b):
    """x @ w^T (+ b) as an acc_dtype tensor: the GEMM's fp32 accumulator, never rounded to bf16."""
    acc = acc_dtype(x.dtype)
    if x.dtype == acc:
        z = x @ w.T
    elif _fp32_out_gemm(x.device.type, x.dtype):
        z = torch.mm(x, w.T, out_dtype=acc)
    elif x.device.type == "cpu":   # no mixed-dtype GEMM: fp32 copies (w's per chunk; CPU is tests)
        z = x.to(acc) @ w.to(acc).T
    else:   # a torch without out_dtype GEMMs: logits rounded once to bf16 (Liger #1432's error)
        _warn_rounded_logits(x.dtype)
        z = (x @ w.T).to(acc)
    return z.add_(b) if b is not None else z


def _add_weight_grad(gw, d, x):
    """gw += d^T @ x into the fp32 (acc_dtype) accumulator gw; d and x in the weight's dtype."""
    if d.dtype == gw.dtype:
        gw.addmm_(d.T, x)
    elif _fp32_out_gemm(d.device.type, d.dtype):
        torch.addmm(gw, d.T, x, out_dtype=gw.dtype, out=gw)
    elif d.device.type == "cpu":
        gw.addmm_(d.T.to(gw.dtype), x.to(gw.dtype))
    else:   # no out_dtype GEMM: each chunk's share is rounded once; the sum stays in fp32
        gw.add_(d.T @ x)


def chunk_rows(n, v, budget, xs, ws, xt, u, teacher_grad, softcap_grad=False):
    """Rows per chunk so that the chunk temporaries stay under `budget` bytes, chunks balanced.

    Per row: the student logits (V in acc dtype, overwritten by dz), dz rounded to the weight's
    dtype, the teacher logits when computed here, du when the teacher wants a gradient, and
    the student softcap's derivative (V in acc dtype) when `softcap_grad` (the teacher's is
    formed in place of its logits, which du no longer needs). Not
    counted: the outputs (d hidden, the fp32 d W accumulator of V x H x 4 bytes) and the loss
    launchers' own bounded temporaries (the torch backend works in 8 MB pieces).
    """
    row = v * acc_dtype(xs.dtype).itemsize * (2 if softcap_grad else 1)
    row += v * ws.element_size() if ws.dtype != acc_dtype(ws.dtype) else 0
    if u is None and xt is not None:   # teacher logits computed here (none without a teacher)
        t = acc_dtype(xt.dtype).itemsize
        row += v * t * (2 if teacher_grad else 1) + (v * xt.element_size() if teacher_grad else 0)
    rows = max(1, min(n, budget // row))
    chunks = -(-n // rows) if n else 1
    return max(1, -(-n // chunks))


def _transform(z, scale, cap):
    """z (acc dtype) in place: cap tanh(scale z / cap) with a softcap, else scale z."""
    if cap is not None:
        return z.mul_(scale / cap).tanh_().mul_(cap)
    return z.mul_(scale) if scale != 1.0 else z


def _softcap_grad(logits, scale, cap, inplace=False):
    """d logits / d x of a softcapped _transform, from its output: scale (1 - (logits / cap)^2);
    a new tensor, or `logits` itself overwritten when `inplace`."""
    t = logits.div_(cap) if inplace else logits.div(cap)
    return t.square_().neg_().add_(1.0).mul_(scale)


def _chain(d, scale, cap, softcap_grad):
    """d *= d logits / d x in place (softcap_grad: _softcap_grad's tensor, or None if no cap)."""
    if cap is not None:
        return d.mul_(softcap_grad)
    return d.mul_(scale) if scale != 1.0 else d


def _head_grads(d, x, w, gx, gw, gb):
    """Chunk gradients of one head from its logit gradient d (acc dtype): gx = d w (written),
    gw += d^T x (fp32), gb += sum_rows d. Any of gx, gw, gb may be None (not wanted)."""
    d_w = d.to(w.dtype)   # the GEMMs run in the weight's dtype, as autograd's would
    if gx is not None:
        torch.mm(d_w, w, out=gx)
    if gw is not None:
        _add_weight_grad(gw, d_w, x)
    if gb is not None:
        gb += d.sum(0)


def _sweep(heads, u, labels, options, transforms, impl, rows, stats=None, grad=None,
           want=(False,) * 7, topk=None):
    """One pass over the token chunks.

    topk: None (the teacher is xt, wt, bt or u), or a sparse teacher (idx, lp, renormalize):
    ids and log-probabilities (N, k) for the top-k launchers of `impl` (xt = wt = bt = u = None).

    stats None: run the forward launcher; returns per-row loss, ce, kl, entropy and the launcher's
    per-row statistics for its backward (opaque here). Else stats holds those, from the
    forward. grad (N,) not None: also run the backward launcher with the per-row
    gradient grad and return the wanted gradients (d xs, d ws, d bs, d xt, d wt, d bt, d u):
    d hidden in its dtype, weight and bias gradients as fp32 (acc dtype) accumulators.
    """
    xs, ws, bs, xt, wt, bt = heads
    hrm, temperature, eps, ignore_index, beta, with_kl = options
    (s_scale, s_cap), (t_scale, t_cap) = transforms
    n = labels.numel()
    like = (xs, ws, bs, xt, wt, bt, u)
    grads = [None] * 7
    if grad is not None:
        for i, t in enumerate(like):
            if want[i]:
                zeros = i in (1, 2, 4, 5)   # weights and biases accumulate, in fp32
                grads[i] = (torch.zeros(t.shape, dtype=acc_dtype(t.dtype), device=t.device) if zeros
                            else torch.empty_like(t, memory_format=torch.contiguous_format))
    teacher_grad = hrm > 0 and any(want[3:])
    need_teacher = (hrm > 0 or (with_kl and stats is None))
    if topk is None:
        def fwd(z, t, y):
            return impl.hrm_loss_fwd(z, t, y, hrm, temperature, eps, ignore_index, beta)

        def bwd(z, t, y, st, g, du):   # dz overwrites z
            impl.hrm_loss_bwd(z, t, y, st, g, hrm, temperature, eps, ignore_index, beta, z, du)
    else:
        def fwd(z, t, y):
            return impl.hrm_loss_topk_fwd(z, *t, y, hrm, temperature, eps, ignore_index, beta,
                                          topk[2])

        def bwd(z, t, y, st, g, du):
            impl.hrm_loss_topk_bwd(z, *t, y, st, g, hrm, temperature, eps, ignore_index, beta,
                                   topk[2], z)
    outs = []
    for r0 in range(0, n, rows):
        # Release the previous chunk's logits before forming this chunk's: rebinding alone
        # would hold three chunk buffers at once (old z and u, new z), not two.
        z = uc = du = None
        r1 = min(n, r0 + rows)
        y = labels[r0:r1]
        z = _transform(_logits(xs[r0:r1], ws, bs), s_scale, s_cap)
        if topk is not None:   # (B, S, k) row views, as the launchers take them
            uc = None
            teacher = (topk[0][None, r0:r1], topk[1][None, r0:r1])
        elif not need_teacher:
            uc = z   # hrm == 0: the launchers never read the teacher's gradient terms
        elif u is not None:
            uc = u[r0:r1]
        else:
            uc = _transform(_logits(xt[r0:r1], wt, bt), t_scale, t_cap)
        if topk is None:
            teacher = uc[None]
        if stats is None:
            out = fwd(z[None], teacher, y)
            outs.append(out)
            st = out[4]
        else:
            st = stats[r0:r1]
        if grad is None:
            continue
        du = None
        if teacher_grad:
            du = grads[6][r0:r1] if u is not None else torch.empty_like(uc)
        student_grad = any(want[:3])
        # The softcap's derivative needs the logits that dz is about to overwrite: a buffer.
        dcap_s = _softcap_grad(z, s_scale, s_cap) if s_cap is not None and student_grad else None
        # dz overwrites z in place (the launchers' contract allows it): no second chunk buffer.
        bwd(z[None], teacher, y, st, grad[r0:r1], du[None] if du is not None else None)
        if student_grad:
            _head_grads(_chain(z, s_scale, s_cap, dcap_s), xs[r0:r1], ws,
                        grads[0] if grads[0] is None else grads[0][r0:r1], grads[1], grads[2])
        if du is not None and u is None:   # uc, read by the launcher, becomes the derivative
            dcap_t = _softcap_grad(uc, t_scale, t_cap, inplace=True) if t_cap is not None else None
            _head_grads(_chain(du, t_scale, t_cap, dcap_t), xt[r0:r1], wt,
                        grads[3] if grads[3] is None else grads[3][r0:r1], grads[4], grads[5])
    if hrm == 0:   # the teacher's gradient is exactly 0
        grads[3:] = [g.zero_() if g is not None else None for g in grads[3:]]
    if stats is not None:
        return grads
    if not outs:   # no tokens: the launchers' outputs for an empty chunk
        empty = xs.new_zeros(1, 0, 1)
        outs = [fwd(empty, empty if topk is None else
                    (topk[0].new_zeros(1, 0, 1), topk[1].new_zeros(1, 0, 1)), labels)]
    loss, ce, kl, ent, st = (torch.cat(t) for t in zip(*outs))
    return loss, ce, kl, ent, st, grads


def _wanted(ctx, grad_enabled):
    return tuple(bool(grad_enabled and r) for r in ctx.needs_input_grad[:7])


def _cast(grads, like):
    """fp32 accumulators -> the dtypes of the tensors they are gradients of."""
    return [g.to(t.dtype) if g is not None else None for g, t in zip(grads, like)]


def _no_autocast(t):
    """The GEMMs here choose their own dtypes: autocast, if on, would round the logits to bf16."""
    return torch.autocast(t.device.type, enabled=False)


class ChunkedLinearHRMFunction(torch.autograd.Function):
    """Stage 1. Returns (loss, ce, kl, entropy): summed and divided by `denom` (a 0-d device
    tensor) for reduction "mean"/"sum", per token (N,) when denom is None ("none"). Only the loss
    has a gradient. A sparse teacher comes as idx, lp (N, k) and renormalize (xt, wt, bt, u
    None; `impl` then has the top-k launchers); its log-probabilities get no gradient."""

    @staticmethod
    def forward(ctx, xs, ws, bs, xt, wt, bt, u, labels, denom, options, transforms, impl,
                budget, grad_enabled, idx=None, lp=None, renormalize=False):
        with _no_autocast(xs):
            return ChunkedLinearHRMFunction._forward(ctx, xs, ws, bs, xt, wt, bt, u, labels, denom,
                                                     options, transforms, impl, budget,
                                                     grad_enabled, idx, lp, renormalize)

    @staticmethod
    def _forward(ctx, xs, ws, bs, xt, wt, bt, u, labels, denom, options, transforms, impl, budget,
                 grad_enabled, idx, lp, renormalize):
        like = (xs, ws, bs, xt, wt, bt, u)
        topk = None if idx is None else (idx, lp, renormalize)
        want = _wanted(ctx, grad_enabled)
        rows = chunk_rows(labels.numel(), ws.shape[0], budget, xs, ws, xt, u, any(want[3:]),
                          transforms[0][1] is not None and any(want[:3]))
        ctx.options, ctx.transforms, ctx.impl = options, transforms, impl
        ctx.rows, ctx.deferred, ctx.renormalize = rows, denom is None, renormalize
        if denom is None:   # "none": gradients wait for grad_output, recomputed in backward
            loss, ce, kl, ent, stats, _ = _sweep(like[:6], u, labels, options, transforms, impl,
                                                 rows, topk=topk)
            ctx.save_for_backward(*like, labels, stats, idx, lp)
        else:
            n = labels.numel()
            inv = torch.ones((), dtype=acc_dtype(xs.dtype), device=xs.device) / denom
            loss, ce, kl, ent, _, grads = _sweep(like[:6], u, labels, options, transforms, impl,
                                                 rows, grad=inv.expand(n) if any(want) else None,
                                                 want=want, topk=topk)
            ctx.save_for_backward(*_cast(grads, like))   # d W rounded once, after the fp32 sum
            loss, ce, kl, ent = (t.sum() / denom for t in (loss, ce, kl, ent))
        ctx.mark_non_differentiable(ce, kl, ent)
        return loss, ce, kl, ent

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kl, _grad_ent):
        if not ctx.deferred:
            # A 0-d device tensor times each gradient: no host sync (Liger tests grad_output == 1
            # with torch.equal, a sync; multiplying by 1 costs one pass and is exact).
            grads = [g * grad_loss if g is not None else None for g in ctx.saved_tensors]
            return (*grads, *(None,) * 10)
        *like, labels, stats, idx, lp = ctx.saved_tensors
        with _no_autocast(labels):
            grads = _sweep(like[:6], like[6], labels, ctx.options, ctx.transforms, ctx.impl,
                           ctx.rows, stats=stats, grad=grad_loss.reshape(-1),
                           want=ctx.needs_input_grad[:7],
                           topk=None if idx is None else (idx, lp, ctx.renormalize))
        return (*_cast(grads, like), *(None,) * 10)


class FusedLinearHRMFunction(torch.autograd.Function):
    """Stage 2: the Triton kernels of kernels/triton/linear.py (passed in as `kernels`, so that
    this module imports without Triton). Returns per-token (loss, ce, kl, entropy) (N,) fp32;
    the caller reduces, and the backward recomputes the logit tiles for any grad_output."""

    @staticmethod
    def forward(ctx, xs, ws, bs, xt, wt, bt, u, labels, options, transforms, kernels):
        hrm, temperature, eps, ignore_index, beta, with_kl = options
        loss, ce, kl, ent, stats = kernels.linear_hrm_loss_fwd(
            xs, ws, bs, xt, wt, bt, u, labels, hrm, temperature, eps, ignore_index, beta,
            transforms, with_kl=with_kl)
        ctx.save_for_backward(xs, ws, bs, xt, wt, bt, u, labels, stats)
        ctx.options, ctx.transforms, ctx.kernels = options, transforms, kernels
        ctx.mark_non_differentiable(ce, kl, ent)
        return loss, ce, kl, ent

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kl, _grad_ent):
        *heads, labels, stats = ctx.saved_tensors
        hrm, temperature, eps, ignore_index, beta, _ = ctx.options
        grads = ctx.kernels.linear_hrm_loss_bwd(*heads, labels, stats, grad_loss.reshape(-1),
                                                hrm, temperature, eps, ignore_index, beta,
                                                ctx.transforms, ctx.needs_input_grad[:7])
        return (*grads, *(None,) * 4)
