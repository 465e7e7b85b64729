"""Distillation with the student's output layer split over the vocabulary (tensor parallel).

    torchrun --nproc-per-node 2 examples/train_distill_tp.py                  # CPU processes, gloo
    torchrun --nproc-per-node 2 examples/train_distill_tp.py --device cuda    # one GPU each, NCCL

Rank r keeps rows [start, end) of the student's lm_head, so it only ever holds the logits of its
slice of the vocabulary, as Megatron, NeMo and torchtitan do for large vocabularies. The loss is
fused_hrm_loss(..., process_group=...): each rank runs the fused kernel on its slice and two
all-reduces of O(N) floats merge the statistics; no N x V tensor crosses ranks. The transformer
body is replicated: its gradient is the sum over ranks of what each slice sends back, so the
hidden states enter the sharded head through `_ReplicatedInput` (identity forward, all-reduce
backward: Megatron's "copy to tensor-parallel region"). The teacher runs whole on every rank
(weights broadcast from rank 0) and each rank passes the view teacher_logits[..., start:end].

At the first step the script also gathers the whole student head once and checks that the
sharded loss equals the single-device loss: the sharding changes where the work happens, not
the result. Model, data and schedule come from train_distill.py.
"""
import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_distill import GPT, GPTConfig, get_batch, get_lr, load_tokens  # noqa: E402

from hrmkernels import FusedHRMLoss, fused_hrm_loss  # noqa: E402


class _ReplicatedInput(torch.autograd.Function):
    """Identity forward; backward all-reduces the gradient (each rank saw one vocabulary slice)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class ShardedHead(nn.Module):
    """Rows [start, end) of an lm_head: hidden (B, T, C) -> this rank's logits (B, T, V / world)."""

    def __init__(self, weight_shard, group):
        super().__init__()
        self.weight, self.group = nn.Parameter(weight_shard), group

    def forward(self, h):
        return F.linear(_ReplicatedInput.apply(h, self.group), self.weight)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per rank)")
    p.add_argument("--hrm", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--iters", type=int, default=60)
    p.add_argument("--teacher-iters", type=int, default=100)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--corpus-mb", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--out", type=Path, default=Path("out/distill_tp"))
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda
              else torch.device("cpu"))
    if cuda:
        torch.cuda.set_device(device)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    if rank == 0:                                    # one rank trains and caches the tokenizer
        load_tokens(args.out, args.vocab_size, args.corpus_mb)
    dist.barrier()
    _, ids = load_tokens(args.out, args.vocab_size, args.corpus_mb)
    train = ids[: int(0.9 * len(ids))]
    vocab = -(-args.vocab_size // (64 * world)) * 64 * world    # divisible by 64 * world
    start, end = rank * vocab // world, (rank + 1) * vocab // world
    gen = torch.Generator().manual_seed(0)                       # the same batches on every rank

    # Teacher: trained with plain CE (the same on every rank), then broadcast from rank 0.
    torch.manual_seed(0)
    teacher = GPT(GPTConfig(vocab, args.block_size, 2, 4, 128)).to(device)
    opt = torch.optim.AdamW(teacher.parameters(), lr=args.lr)
    for it in range(args.teacher_iters):
        x, y = get_batch(train, args.batch_size, args.block_size, gen, device)
        loss = F.cross_entropy(teacher(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for p in teacher.parameters():
        dist.broadcast(p.data, 0)
    teacher.eval().requires_grad_(False)

    # Student: replicated body, lm_head rows [start, end) on this rank.
    torch.manual_seed(1)
    student = GPT(GPTConfig(vocab, args.block_size, 1, 2, 64)).to(device)
    student.lm_head = ShardedHead(student.wte.weight.detach()[start:end].clone(), dist.group.WORLD)
    loss_fn = FusedHRMLoss(args.hrm, temperature=args.temperature, return_components=True,
                           process_group=dist.group.WORLD)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr)
    for it in range(args.iters):
        for group in opt.param_groups:
            group["lr"] = get_lr(it, args.iters, args.lr)
        x, y = get_batch(train, args.batch_size, args.block_size, gen, device)
        with torch.no_grad():
            teacher_logits = teacher(x)                          # (B, T, V) on every rank
        student_logits = student(x)                              # (B, T, V / world): this slice
        loss, ce, kl = loss_fn(student_logits, teacher_logits[..., start:end], y)
        if it == 0:
            check_against_single_device(student_logits, teacher_logits, y, loss, args, world)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if rank == 0 and (it % 10 == 0 or it == args.iters - 1):
            print(f"iter {it:4d}  loss {loss.item():.4f}  CE {ce.item():.4f}  KL {kl.item():.4f}")
    dist.destroy_process_group()


def check_against_single_device(student_logits, teacher_logits, y, loss, args, world):
    """Gather the slices once and compare with the unsharded loss (a check, not the training)."""
    slices = [torch.empty_like(student_logits) for _ in range(world)]
    dist.all_gather(slices, student_logits.detach().contiguous())
    full = fused_hrm_loss(torch.cat(slices, -1), teacher_logits, y, args.hrm,
                          temperature=args.temperature)
    if dist.get_rank() == 0:
        print(f"check: sharded loss {loss.item():.6f} = single-device loss {full.item():.6f} "
              f"({world} ranks, V = {teacher_logits.shape[-1]})")
    torch.testing.assert_close(loss.detach(), full, rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
    main()
