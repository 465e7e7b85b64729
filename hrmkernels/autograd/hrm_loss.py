"""HRMLossFunction, HRMLossFwdGradFunction and HRMTopKLossFunction: autograd Functions over a
backend's launchers.

`impl` is the backend's launcher module (backends.resolve); its launchers call custom ops
(torch.ops.hrmkernels.*), so torch.compile(fullgraph=True) traces these Functions without a
graph break: Dynamo inlines forward and backward, and the ops are registered with their fake
(meta) implementations.
"""
import torch

from hrmkernels._checks import rows_view


class HRMLossFunction(torch.autograd.Function):
    """Per-token loss (N,) = CE + hrm * D, with CE, D and the student's entropy (N,) as
    non-differentiable outputs (D: the KL or JSD that `beta` chooses, kernels/__init__.py).

    Reduction happens outside, in plain torch ops, so the backward receives the gradient of each
    token's loss as an (N,) tensor (a stride-0 expansion for "mean"/"sum"): the kernels read
    grad_output from device memory and nothing synchronises the host.
    """

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, labels, hrm, temperature, label_smoothing,
                ignore_index, beta, impl, inplace_backward):
        labels = labels.reshape(-1).contiguous()   # kernels read labels densely: (N,), stride 1
        loss, ce, div, entropy, stats = impl.hrm_loss_fwd(
            rows_view(student_logits), rows_view(teacher_logits), labels, hrm, temperature,
            label_smoothing, ignore_index, beta)
        ctx.save_for_backward(student_logits, teacher_logits, labels, stats)
        ctx.options = (hrm, temperature, label_smoothing, ignore_index, beta)
        ctx.impl, ctx.inplace_backward = impl, inplace_backward
        ctx.mark_non_differentiable(ce, div, entropy)
        return loss, ce, div, entropy

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_div, _grad_entropy):
        student_logits, teacher_logits, labels, stats = ctx.saved_tensors
        z, u = rows_view(student_logits), rows_view(teacher_logits)
        # inplace_backward: the gradient overwrites the logits it is computed from, element by
        # element in the same pass (the caller promised not to need them afterwards).
        dz = z if ctx.inplace_backward else torch.empty(z.shape, dtype=z.dtype, device=z.device)
        du = (torch.empty(u.shape, dtype=u.dtype, device=u.device) if ctx.needs_input_grad[1]
              else None)
        ctx.impl.hrm_loss_bwd(z, u, labels, stats, grad_loss.reshape(-1), *ctx.options, dz, du)
        du = du.reshape(teacher_logits.shape) if du is not None else None
        return dz.reshape(student_logits.shape), du, *(None,) * 8


class HRMLossFwdGradFunction(torch.autograd.Function):
    """HRMLossFunction with the reduction inside, for "mean" and "sum", where each row's gradient
    scale is known in the forward (1 / denom, or 1 when `denom` is None): the gradients are
    computed in the forward, in the same sweep over each row (impl.hrm_loss_fwd_bwd; the CPU
    kernels), and saved. Returns the reduced loss (differentiable) and the per-token loss, CE,
    D and entropy (N,) (not differentiable), which api/reduction.py reduces.

    The backward only scales the saved gradients by the incoming one, inside a C++ op that reads
    that scalar (a CPU tensor) and touches nothing when it is exactly 1. It scales them in
    place, so it runs once (a second backward through the same graph raises). With
    `inplace_backward` the student gradient overwrites the logits during this forward, after
    each row's loss has been computed from them.
    """

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, labels, denom, hrm, temperature,
                label_smoothing, ignore_index, beta, impl, inplace_backward):
        labels = labels.reshape(-1).contiguous()
        z, u = rows_view(student_logits), rows_view(teacher_logits)
        dz = z if inplace_backward else torch.empty(z.shape, dtype=z.dtype, device=z.device)
        du = (torch.empty(u.shape, dtype=u.dtype, device=u.device) if ctx.needs_input_grad[1]
              else None)
        # the rows' gradient: what autograd gives `loss.sum() / denom` for an incoming 1 (in the
        # loss's dtype: float64 for float64 inputs)
        wide = torch.float64 in (z.dtype, u.dtype)
        one = torch.ones((), dtype=torch.float64 if wide else torch.float32, device=z.device)
        scale = one if denom is None else one / denom
        loss, ce, div, entropy, _ = impl.hrm_loss_fwd_bwd(
            z, u, labels, scale.expand(labels.shape[0]), hrm, temperature,
            label_smoothing, ignore_index, beta, dz, du)
        total = loss.sum() if denom is None else loss.sum() / denom   # as reduce_outputs does
        ctx.save_for_backward(dz, du)
        ctx.shapes = (student_logits.shape, teacher_logits.shape)
        ctx.impl, ctx.done = impl, False
        ctx.mark_non_differentiable(loss, ce, div, entropy)
        return total, loss, ce, div, entropy

    @staticmethod
    def backward(ctx, grad_total, *_grad_rows):
        if ctx.done:
            raise RuntimeError("fused_hrm_loss computed its gradient in the forward and scales it "
                               "in place: backward through it runs once (retain_graph=True and a "
                               "second backward are not supported with reduction 'mean'/'sum' "
                               "on the cpu backend)")
        ctx.done = True
        dz, du = ctx.saved_tensors
        ctx.impl.hrm_loss_scale_grad(grad_total, dz, du)
        du = du.reshape(ctx.shapes[1]) if du is not None else None
        return dz.reshape(ctx.shapes[0]), du, *(None,) * 9


class HRMTopKLossFunction(torch.autograd.Function):
    """As HRMLossFunction, with a sparse teacher: top-k indices and log-probabilities (..., k).

    Only the student gets a gradient; the teacher's log-probabilities are data.
    """

    @staticmethod
    def forward(ctx, student_logits, indices, logprobs, labels, hrm, temperature, label_smoothing,
                ignore_index, beta, renormalize, impl, inplace_backward):
        labels = labels.reshape(-1).contiguous()
        idx, lp = rows_view(indices), rows_view(logprobs)
        loss, ce, div, entropy, stats = impl.hrm_loss_topk_fwd(
            rows_view(student_logits), idx, lp, labels, hrm, temperature, label_smoothing,
            ignore_index, beta, renormalize)
        ctx.save_for_backward(student_logits, idx, lp, labels, stats)
        ctx.options = (hrm, temperature, label_smoothing, ignore_index, beta, renormalize)
        ctx.impl, ctx.inplace_backward = impl, inplace_backward
        ctx.mark_non_differentiable(ce, div, entropy)
        return loss, ce, div, entropy

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_div, _grad_entropy):
        student_logits, idx, lp, labels, stats = ctx.saved_tensors
        z = rows_view(student_logits)
        dz = z if ctx.inplace_backward else torch.empty(z.shape, dtype=z.dtype, device=z.device)
        ctx.impl.hrm_loss_topk_bwd(z, idx, lp, labels, stats, grad_loss.reshape(-1), *ctx.options,
                                   dz)
        return dz.reshape(student_logits.shape), *(None,) * 11
