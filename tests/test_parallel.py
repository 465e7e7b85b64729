"""Vocabulary-parallel loss over torch.distributed (gloo, CPU processes) against the float64
reference on the gathered logits: loss, CE, KL and both gradients, on every rank."""
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import CPU_KERNELS_WHY, DEVICE

CASES = [   # (name, options); shards are equal unless "uneven"
    ("base", dict()),
    ("reverse T=1", dict(kl_direction="reverse", temperature=1.0)),
    ("smoothing", dict(label_smoothing=0.1)),
    ("smoothing reverse none", dict(label_smoothing=0.2, kl_direction="reverse", reduction="none")),
    ("all ignored", dict(ignore="all")),
    ("hrm 0 sum", dict(hrm=0.0, reduction="sum")),
    ("uneven", dict(uneven=True, label_smoothing=0.1)),
    ("masked vocabulary", dict(masked=True)),
]


def _global_inputs(world, case):
    g = torch.Generator().manual_seed(7)
    v = 37 * world + (5 if case.get("uneven") else 0)
    z = torch.randn(2, 6, v, generator=g) * 3
    u = torch.randn(2, 6, v, generator=g) * 3
    if case.get("masked"):
        z[..., 1::7] = u[..., 1::7] = float("-inf")
    y = torch.randint(0, v, (2, 6), generator=g)
    y[0, :world] = torch.arange(world) * (v // world)          # first column of each shard
    y[1, :world] = torch.arange(1, world + 1) * (v // world) - 1  # last column of each shard
    if case.get("masked"):
        y = torch.where(y % 7 == 1, y - 1, y)
    y[1, -1] = -100
    if case.get("ignore") == "all":
        y.fill_(-100)
    return z, u, y


def _bounds(world, rank, v, uneven):
    if not uneven:
        return rank * (v // world), (rank + 1) * (v // world)
    cuts = [0] + [v // world * r + r for r in range(1, world)] + [v]  # shard sizes differ by 1..
    return cuts[rank], cuts[rank + 1]


def _worker(rank, world, port, backend, results):
    """Checks every case on this rank, writes "ok" or the traceback to results/<rank>, then
    leaves with os._exit: gloo's teardown (destroy_process_group, the store's threads at exit)
    has aborted a finished rank under load ("terminate called without an active exception"),
    and that teardown is not what this test is about."""
    import pathlib

    from hrmkernels import fused_hrm_loss
    from hrmkernels.reference import hrm_loss_reference

    verdict = "ok"
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)
        for name, case in CASES:
            z, u, y = _global_inputs(world, case)
            lo, hi = _bounds(world, rank, z.shape[-1], case.get("uneven"))
            kw = {k: v for k, v in case.items() if k not in ("uneven", "masked", "ignore", "hrm")}
            hrm = case.get("hrm", 0.5)
            zl = z[..., lo:hi].clone().requires_grad_()
            ul = u[..., lo:hi].clone().requires_grad_()
            out = fused_hrm_loss(zl, ul, y, hrm, backend=backend, return_components=True,
                                 process_group=dist.group.WORLD,
                                 vocab_start_index=lo if case.get("uneven") else None, **kw)
            gout = torch.linspace(0.5, 1.5, out.loss.numel()).view(out.loss.shape)
            (out.loss * gout).sum().backward()
            zr, ur = z.double().requires_grad_(), u.double().requires_grad_()
            ref = hrm_loss_reference(zr, ur, y, hrm, return_components=True, **kw)
            (ref[0] * gout.double()).sum().backward()
            for what, a, b in [("loss", out.loss, ref[0]), ("ce", out.ce, ref[1]),
                               ("kl", out.kl, ref[2]), ("entropy", out.entropy, ref.entropy),
                               ("dz", zl.grad, zr.grad[..., lo:hi]),
                               ("du", ul.grad, ur.grad[..., lo:hi] if ur.grad is not None
                                else torch.zeros_like(ul, dtype=torch.float64))]:
                torch.testing.assert_close(a.double(), b, rtol=2e-5, atol=2e-6,
                                           msg=lambda m: f"{backend} {name} {what}: {m}")
        _check_dtensor(world, backend)
        _check_uneven_layout_is_read_once(world, backend)
        dist.barrier()   # no rank leaves while another still needs it
    except BaseException:
        verdict = traceback.format_exc()
    pathlib.Path(results, str(rank)).write_text(verdict)
    os._exit(0 if verdict == "ok" else 1)   # a failed rank ends the others (mp.spawn)


def _check_uneven_layout_is_read_once(world, backend):
    """The global V of an uneven layout (vocab_start_index) is all-reduced and read on the host
    once per layout, not in every step: later steps make only the loss's two collectives."""
    from hrmkernels import fused_hrm_loss
    z, u, y = _global_inputs(world, dict(uneven=True))
    lo, hi = _bounds(world, dist.get_rank(), z.shape[-1], True)
    calls, all_reduce = [], dist.all_reduce

    def counting(*args, **kwargs):
        calls.append(1)
        return all_reduce(*args, **kwargs)
    dist.all_reduce = counting
    try:
        for _ in range(3):
            fused_hrm_loss(z[..., lo:hi], u[..., lo:hi], y, 0.5, backend=backend,
                           process_group=dist.group.WORLD, vocab_start_index=lo)
    finally:
        dist.all_reduce = all_reduce
    assert len(calls) == 3 * 2, calls     # the cases above met this layout first


def _check_dtensor(world, backend):
    """DTensor logits sharded on the vocabulary (torch.chunk sizes: uneven here) give the same."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from hrmkernels import fused_hrm_loss
    from hrmkernels.reference import hrm_loss_reference

    z, u, y = _global_inputs(world, dict(uneven=True))
    mesh = init_device_mesh("cpu", (world,))
    zd = distribute_tensor(z, mesh, [Shard(2)]).requires_grad_()
    ud = distribute_tensor(u, mesh, [Shard(2)])
    loss = fused_hrm_loss(zd, ud, y, 0.5, temperature=2.0, backend=backend)
    loss.backward()
    zr = z.double().requires_grad_()
    ref = hrm_loss_reference(zr, u.double(), y, 0.5, temperature=2.0)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(zd.grad.full_tensor().double(), zr.grad, rtol=2e-5, atol=2e-6)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(DEVICE.type != "cpu", reason="gloo on CPU processes")
@pytest.mark.parametrize("world,backend", [(2, "torch"), (4, "torch"), (2, "triton"), (2, "cpu")])
def test_hrm_loss_vocab_parallel_matches_reference(world, backend, tmp_path):
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU needs the interpreter")
    if backend == "cpu" and CPU_KERNELS_WHY is not None:
        pytest.skip(f"backend='cpu' is not available: {CPU_KERNELS_WHY}")
    try:
        mp.spawn(_worker, args=(world, _free_port(), backend, str(tmp_path)), nprocs=world)
    finally:
        for rank in range(world):
            verdict = (tmp_path / str(rank)).read_text() if (tmp_path / str(rank)).exists() \
                else "no result (the rank died before its checks ended)"
            assert verdict == "ok", f"rank {rank}:\n{verdict}"


def _ddp_worker(rank, world, port, backend, results):
    """One rank of a DDP step whose ranks hold different token counts (9 and 3): each passes
    num_items_in_batch = global count / world size, as TRL does, and DDP averages the gradients.
    The averaged gradient must be the single-process gradient of the concatenated batch."""
    import pathlib

    from torch.nn.parallel import DistributedDataParallel

    from hrmkernels import fused_hrm_loss

    verdict = "ok"
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)
        g = torch.Generator().manual_seed(3)
        head = torch.nn.Linear(8, 29, bias=False, dtype=torch.float64)
        with torch.no_grad():
            head.weight.copy_(torch.randn(29, 8, generator=g, dtype=torch.float64))
        h = torch.randn(world, 12, 8, generator=g, dtype=torch.float64)
        u = torch.randn(world, 12, 29, generator=g, dtype=torch.float64)
        y = torch.randint(0, 29, (world, 12), generator=g)
        y[1, 3:] = -100                                   # rank 1 holds 3 tokens, rank 0 all 12
        y[0, 9:] = -100                                   # rank 0: 9
        local = torch.tensor(float((y[rank] != -100).sum()), dtype=torch.float64)
        count = local.clone()
        dist.all_reduce(count)                            # the global count: 12
        ddp = DistributedDataParallel(head)
        loss = fused_hrm_loss(ddp(h[rank]), u[rank], y[rank], 0.5, temperature=2.0,
                              backend=backend, num_items_in_batch=count / world)
        loss.backward()
        ref_head = torch.nn.Linear(8, 29, bias=False, dtype=torch.float64)
        with torch.no_grad():
            ref_head.weight.copy_(head.weight)
        ref = fused_hrm_loss(ref_head(h.reshape(-1, 8)), u.reshape(-1, 29), y.reshape(-1), 0.5,
                             temperature=2.0, backend=backend)
        ref.backward()
        torch.testing.assert_close(head.weight.grad, ref_head.weight.grad, rtol=1e-10,
                                   atol=1e-12)
        del ddp
        dist.barrier()
    except BaseException:
        verdict = traceback.format_exc()
    pathlib.Path(results, str(rank)).write_text(verdict)
    os._exit(0 if verdict == "ok" else 1)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="gloo on CPU processes")
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_hrm_loss_num_items_in_batch_under_ddp_equals_one_big_batch(backend, tmp_path):
    if backend == "cpu" and CPU_KERNELS_WHY is not None:
        pytest.skip(f"backend='cpu' is not available: {CPU_KERNELS_WHY}")
    try:
        mp.spawn(_ddp_worker, args=(2, _free_port(), backend, str(tmp_path)), nprocs=2)
    finally:
        for rank in range(2):
            verdict = (tmp_path / str(rank)).read_text() if (tmp_path / str(rank)).exists() \
                else "no result (the rank died before its checks ended)"
            assert verdict == "ok", f"rank {rank}:\n{verdict}"
