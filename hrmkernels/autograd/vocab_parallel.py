"""Vocabulary-parallel HRM loss: each rank holds the logits of its slice of V (tensor parallel).

Rank r runs the fused forward kernel on its shard and gets per-row statistics of that shard
alone: lse_z^r, lse_a^r, lse_b^r and mu^r (a = z/T, b = u/T; mu^r = E_{p^r}[b - a], the mean
under the teacher distribution restricted and renormalised to the shard; E_{q^r}[a - b] for the
reverse KL). They merge exactly:

    lse_x = log sum_r exp(lse_x^r)                              x in {z, a, b}
    mu    = sum_r exp(lse_b^r - lse_b) mu^r                     (reverse: weights from lse_a)
    KL    = mu + lse_a - lse_b  (reverse: mu + lse_b - lse_a)
    CE    = lse_z - (1 - eps) z_y - eps / V * sum_v z_v         z_y from the rank that owns y

Two collectives of O(N) floats: a MAX of the three lse (for a stable merge), then one SUM of
[exp(lse^r - max) x3, weighted mu^r, owned z_y, sum z]. Nothing of size N x V crosses ranks.
The backward is local: with the merged statistics, the per-element gradient formula of the
single-device kernel holds on every shard as is; the label term only appears on its owner.
"""
import torch
import torch.distributed as dist

from hrmkernels._checks import rows_view


def shard_layout(student_logits, teacher_logits, process_group, vocab_start_index):
    """(local student, local teacher, group, start of this shard, global V).

    DTensor logits sharded on the last dimension become their local shards (the gradient flows
    back as a DTensor) on their mesh's group. Plain tensors: equal shards in rank order, unless
    `vocab_start_index` is given; then the global V is the sum of the shards' sizes, all-reduced
    once per (group, local size, start) and cached (no host sync in later steps).
    """
    if hasattr(student_logits, "to_local"):   # DTensor
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
        _, offset = compute_local_shape_and_global_offset(
            student_logits.shape, student_logits.device_mesh, student_logits.placements)
        group = student_logits.device_mesh.get_group()
        local = student_logits.to_local()
        return local, teacher_logits.to_local(), group, int(offset[-1]), student_logits.shape[-1]
    v_local = student_logits.shape[-1]
    if vocab_start_index is None:
        rank, world = dist.get_rank(process_group), dist.get_world_size(process_group)
        return student_logits, teacher_logits, process_group, rank * v_local, world * v_local
    start = int(vocab_start_index)
    key = (process_group, v_local, start)
    if key not in _GLOBAL_V:   # every rank meets its first step with a layout here: collective
        on_cpu = dist.get_backend(process_group) == "gloo"
        total = torch.tensor([v_local], device="cpu" if on_cpu else student_logits.device)
        dist.all_reduce(total, group=process_group)
        _GLOBAL_V[key] = int(total.cpu()[0])  # sync-ok: once per shard layout
    return student_logits, teacher_logits, process_group, start, _GLOBAL_V[key]


_GLOBAL_V = {}   # (group, local V, start) -> global V of an uneven shard layout


def _to_local(labels, start, v_local, ignore_index):
    """Global labels -> the shard's: owned labels get their local index, others a column past
    the shard, which no gradient term ever matches (ignored rows stay ignored)."""
    outside = v_local if v_local != ignore_index else v_local + 1
    local = labels - start
    owned = (local >= 0) & (local < v_local) & (labels != ignore_index)
    return torch.where(labels == ignore_index, labels, torch.where(owned, local, outside)), owned


class VocabParallelHRMLossFunction(torch.autograd.Function):
    """HRMLossFunction over vocabulary shards; same per-row outputs (loss, ce, kl), all ranks."""

    @staticmethod
    def forward(ctx, z_local, u_local, labels, hrm, temperature, label_smoothing, ignore_index,
                beta, impl, inplace_backward, group, start, v_total):
        z, u = rows_view(z_local), rows_view(u_local)
        v_local = z.shape[-1]
        labels = labels.reshape(-1).contiguous()
        local, owned = _to_local(labels, start, v_local, ignore_index)
        # The shard's statistics. The kernel's own CE is not used (it needs the owner's z_y and,
        # with label smoothing, the whole row): it runs without smoothing, on in-shard labels.
        in_shard = torch.where(labels == ignore_index, labels, torch.where(owned, local, 0))
        _, _, _, h_part, stats = impl.hrm_loss_fwd(z, u, in_shard, hrm, temperature, 0.0,
                                                   ignore_index, beta)
        reverse = beta == 1.0      # the functional layer sends no JSD here
        lse = stats[:, :3]
        m = lse.clone()
        dist.all_reduce(m, dist.ReduceOp.MAX, group=group)
        m = torch.where(torch.isinf(m), 0.0, m)               # a row masked on every shard
        e = torch.exp(lse - m)                                # this shard's share of each sum
        w = e[:, 1 if reverse else 2]
        mu_part = torch.where(w > 0, w * stats[:, 3], 0.0)    # 0 * NaN: an empty shard adds 0
        rows = torch.arange(labels.numel(), device=labels.device)
        z_y = z[rows // z.shape[1], rows % z.shape[1], torch.where(owned, local, 0)].float()
        z_y = torch.where(owned, z_y, 0.0)
        sum_z = torch.zeros_like(mu_part)
        if label_smoothing > 0:   # one more read of the shard, only with label smoothing
            sum_z = torch.sum(z, dim=-1, dtype=torch.float32).reshape(-1)
        # Entropy: with the shards' shares w_i = exp(lse_a_i - lse_a) of q's mass,
        # H = sum_i w_i (H_i - log w_i) = sum_i e_i (H_i - (lse_a_i - m_a)) / S_a + log S_a,
        # e_i = exp(lse_a_i - m_a), S_a = sum_i e_i.
        h_part = torch.where(e[:, 1] > 0, e[:, 1] * (h_part - (lse[:, 1] - m[:, 1])), 0.0)
        parts = torch.stack((e[:, 0], e[:, 1], e[:, 2], mu_part, z_y, sum_z, h_part), 1)
        dist.all_reduce(parts, group=group)

        lse = m + torch.log(parts[:, :3])
        mu = parts[:, 3] / parts[:, 1 if reverse else 2]
        kl = mu + (lse[:, 2] - lse[:, 1] if reverse else lse[:, 1] - lse[:, 2])
        mu = torch.where(kl.isnan(), kl, mu)   # a NaN divergence gives a NaN gradient
        kl = torch.where(kl < 0, 0.0, kl)
        valid = (labels >= 0) & (labels < v_total)
        z_y = torch.where(valid, parts[:, 4], torch.nan)
        eps = label_smoothing
        ce = (lse[:, 0] - (1 - eps) * z_y - eps / v_total * parts[:, 5] if eps > 0
              else lse[:, 0] - z_y)
        entropy = parts[:, 6] / parts[:, 1] + torch.log(parts[:, 1])
        keep = labels != ignore_index
        ce, kl, entropy = (torch.where(keep, t, 0.0) for t in (ce, kl, entropy))
        loss = ce + hrm * kl if hrm > 0 else ce.clone()

        stats = torch.cat((lse, mu[:, None], torch.zeros_like(mu)[:, None]), 1)
        ctx.save_for_backward(z_local, u_local, local, stats, owned)
        ctx.options = (hrm, temperature, label_smoothing, ignore_index, beta, v_total)
        ctx.impl, ctx.inplace_backward = impl, inplace_backward
        ctx.mark_non_differentiable(ce, kl, entropy)
        return loss, ce, kl, entropy

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kl, _grad_entropy):
        z_local, u_local, local, stats, owned = ctx.saved_tensors
        hrm, temperature, eps, ignore_index, beta, v_total = ctx.options
        z, u = rows_view(z_local), rows_view(u_local)
        v_local = z.shape[-1]
        dz = z if ctx.inplace_backward else torch.empty(z.shape, dtype=z.dtype, device=z.device)
        du = (torch.empty(u.shape, dtype=u.dtype, device=u.device) if ctx.needs_input_grad[1]
              else None)
        grad = grad_loss.reshape(-1)
        # The kernel subtracts eps_k / V_local everywhere and (1 - eps_k) at the label: eps_k =
        # eps * V_local / V gives the global eps / V, and the label column is corrected below.
        eps_k = eps * v_local / v_total
        ctx.impl.hrm_loss_bwd(z, u, local, stats, grad, hrm, temperature, eps_k, ignore_index,
                              beta, dz, du)
        if eps > 0:   # (rounds that one element twice in half precision)
            rows = torch.arange(local.numel(), device=local.device)
            fix = torch.where(owned, grad.float() * (eps - eps_k), 0.0)
            r_b, r_s = rows // dz.shape[1], rows % dz.shape[1]
            dz[r_b, r_s, torch.where(owned, local, 0)] += fix.to(dz.dtype)
        du = du.reshape(u_local.shape) if du is not None else None
        return dz.reshape(z_local.shape), du, *(None,) * 11
