"""backend="torch": the fused HRM loss in pure PyTorch, memory-frugal, for any device.

Same contract as the Triton launchers (hrm_loss_fwd / hrm_loss_bwd): rows are processed in
chunks of about CHUNK_ELEMENTS logits, so the fp32 temporaries never exceed a few chunk-sized
tensors whatever N is; the forward saves per-row log-sum-exps and the backward is written by
hand from DESIGN.md section 1 instead of keeping an autograd graph over N x V tensors.
Math runs in float32, or float64 when an input is float64.
"""
import torch

CHUNK_ELEMENTS = 1 << 21   # ~8 MB per fp32 temporary


def _chunks(z, u):
    """Yield (r0, r1, z_chunk, u_chunk, b, s0, s1): row ranges of the (B, S, V) views, no copies."""
    _, s_len, v = z.shape
    step = max(1, CHUNK_ELEMENTS // v)
    for b in range(z.shape[0]):
        for s0 in range(0, s_len, step):
            s1 = min(s0 + step, s_len)
            yield b * s_len + s0, b * s_len + s1, z[b, s0:s1], u[b, s0:s1], b, s0, s1


def _compute_dtype(z, u):
    return torch.promote_types(torch.promote_types(z.dtype, u.dtype), torch.float32)


def _check_labels(labels, ignore_index, v):
    # On CPU the labels are host memory: checking them costs no device synchronisation. On a GPU
    # (and while tracing) an out-of-range label gives a NaN loss instead, like the kernels.
    if labels.device.type != "cpu" or torch.compiler.is_compiling():
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= v))
    if bad.any():  # sync-ok: CPU tensor
        first = bad.nonzero()[0, 0]
        raise ValueError(f"labels must lie in [0, {v}) or equal ignore_index={ignore_index}; "
                         f"found {labels[first]} at flat position {first}")


def hrm_loss_fwd(z, u, labels, hrm, temperature, label_smoothing, ignore_index, reverse):
    """As triton_kernels.hrm_loss_fwd; outputs are float64 when an input is float64."""
    v = z.shape[-1]
    _check_labels(labels, ignore_index, v)
    dtype, eps = _compute_dtype(z, u), float(label_smoothing)
    n = labels.numel()
    ce, kl = (torch.empty(n, dtype=dtype, device=z.device) for _ in range(2))
    stats = torch.empty(n, 4, dtype=dtype, device=z.device)
    for r0, r1, zc, uc, *_ in _chunks(z, u):
        y = labels[r0:r1].long()
        valid = (y >= 0) & (y < v)
        zc, uc = zc.to(dtype), uc.to(dtype)
        a, b = zc / temperature, uc / temperature
        lse_z, lse_a, lse_b = (torch.logsumexp(x, -1) for x in (zc, a, b))
        # mu = E_p[b - a] (reverse: E_q[a - b]); KL = mu + lse_a - lse_b (see triton_kernels.py)
        w, d, lse_d = ((a - lse_a[:, None]).exp(), a - b, lse_b - lse_a) if reverse else \
            ((b - lse_b[:, None]).exp(), b - a, lse_a - lse_b)
        mu = (w * torch.where(w > 0, d, 0.0)).sum(-1)
        kl_c = (mu + lse_d).clamp_min(0)
        z_y = zc.gather(1, torch.where(valid, y, 0)[:, None]).squeeze(1)
        z_y = torch.where(valid, z_y, torch.nan)
        ce_c = lse_z - z_y if eps == 0 else lse_z - (1 - eps) * z_y - eps * zc.mean(-1)
        keep = y != ignore_index
        ce[r0:r1] = torch.where(keep, ce_c, 0.0)
        kl[r0:r1] = torch.where(keep, kl_c, 0.0)
        stats[r0:r1] = torch.stack((lse_z, lse_a, lse_b, mu), 1)
    loss = ce + hrm * kl if hrm > 0 else ce.clone()
    return loss, ce, kl, stats


def hrm_loss_bwd(z, u, labels, stats, grad, hrm, temperature, label_smoothing, ignore_index,
                 reverse, dz, du):
    """Write d(sum_r grad_r * loss_r)/dz into dz and, when du is not None, d/du into du."""
    v = z.shape[-1]
    dtype, eps, c = _compute_dtype(z, u), float(label_smoothing), hrm / temperature
    for r0, r1, zc, uc, b_idx, s0, s1 in _chunks(z, u):
        y = labels[r0:r1].long()
        g = torch.where(y != ignore_index, grad[r0:r1].to(dtype), 0.0)[:, None]
        lse_z, lse_a, lse_b, mu = (stats[r0:r1, i, None].to(dtype) for i in range(4))
        zc = zc.to(dtype)
        d_z = (zc - lse_z).exp_().sub_(eps / v)
        valid = ((y >= 0) & (y < v)).to(dtype)[:, None]
        d_z.scatter_add_(1, y.clamp(0, v - 1)[:, None], valid * (eps - 1))   # -(1 - eps) at y
        if hrm > 0:
            a, b = zc / temperature, uc.to(dtype) / temperature
            q, p = (a - lse_a).exp(), (b - lse_b).exp()
            if reverse:
                d_z += c * torch.where(q > 0, q * ((a - b) - mu), 0.0)
                d_u = c * (p - q)
            else:
                d_z += c * (q - p)
                d_u = c * torch.where(p > 0, p * ((b - a) - mu), 0.0)
            if du is not None:
                du[b_idx, s0:s1] = d_u * g
        elif du is not None:
            du[b_idx, s0:s1] = 0
        dz[b_idx, s0:s1] = d_z * g
