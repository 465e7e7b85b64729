"""teacher_topk and teacher_sample: a teacher's sparse distribution per token, the teacher_topk
(indices, logprobs) that fused_hrm_loss and fused_linear_hrm_loss take, from its final hidden
states and output embedding (or from its logits), never holding more than one tile of logits.

Per token, with a = transform(hidden @ W.T + b) / T the teacher's logits at temperature T
(transform: TRL's order, ``softcap * tanh(scale * x / softcap)``, or ``scale * x``):

    teacher_topk:    the k largest log p_v = a_v - lse(a), sorted, with their ids: exactly
                     ``torch.log_softmax(a, -1).topk(k, -1)``, the logits of a token chunk formed
                     one vocabulary tile at a time. Per tile: lse <- logaddexp(lse, lse(tile))
                     (an online log-sum-exp) and the running top-k <- top-k of (running top-k,
                     top-k of the tile); log p = value - lse at the end. A tile's top-k is all a
                     merge needs: an entry outside it has k larger ones in its own tile.
    teacher_sample:  Sparse Logit Sampling (Anshumann et al., ACL 2025, arXiv 2503.16870): n ids
                     drawn with replacement from p = softmax(a), returned as the distinct ids
                     with their empirical log-frequencies log(c_v / n). As a teacher it is the
                     unbiased sparse target (E[c_v / n] = p_v) of topk_mode="rest", whose tail
                     mass is 0 here (the frequencies add up to 1). Each of the n draws is a
                     weighted reservoir over the tiles: it moves to a draw from the current
                     tile with probability p(tile) / p(tiles so far) = exp(lse(tile) - lse),
                     so after the last tile it is distributed as p, in one pass.

Both are producers, not losses: they run under no_grad and may take their time, but never form
the N x V logits (the full-logits recipe holds two fp32 N x V tensors, logits and log-softmax).
"""
import math
from numbers import Integral

import torch

from hrmkernels._checks import FLOAT_DTYPES, rows_view
from hrmkernels.api.linear_hrm_loss import _positive
from hrmkernels.autograd.linear_hrm_loss import _logits, _transform, acc_dtype

CHUNK_ROWS = 1024     # tokens per chunk
VOCAB_TILE = 16384    # vocabulary entries per tile: a tile is 64 MiB of fp32 logits


def _int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def _tiles(hidden, weight, logits, temperature, bias, logit_scale, softcap, chunk_rows,
           vocab_tile, what):
    """Validate the arguments; return (lead shape, V, the chunks: (r0, r1, b, s0, s1) for rows
    r0:r1 = [b, s0:s1] of the (B, S, .) row view, the vocabulary tile, and a function
    tile(b, s0, s1, v0, v1) -> those rows' logits v0:v1 at temperature T, a fresh acc_dtype
    tensor). Strided views (``logits[:, :-1]``) are read in place, not copied."""
    t = _positive("temperature", temperature, False)
    scale, cap = _positive("logit_scale", logit_scale, False), _positive("softcap", softcap, True)
    chunk_rows, vocab_tile = _int("chunk_rows", chunk_rows, 1), _int("vocab_tile", vocab_tile, 1)
    if logits is not None:
        given = [n for n, x in (("hidden", hidden), ("weight", weight), ("bias", bias))
                 if x is not None]
        if given:
            raise ValueError(f"{what}: pass hidden and weight, or logits=, not both (got logits "
                             f"and {', '.join(given)})")
        if (scale, cap) != (1.0, None):
            raise ValueError(f"{what}: logit_scale and softcap transform a head's logits; "
                             "logits= are used as given")
        _float_tensor("logits", logits)
        if logits.dim() < 1 or logits.shape[-1] == 0:
            raise ValueError(f"logits must have shape (..., V) with V >= 1, got "
                             f"{tuple(logits.shape)}")
        lead, v = logits.shape[:-1], logits.shape[-1]
        u = rows_view(logits)

        def tile(b, s0, s1, v0, v1):
            return u[b, s0:s1, v0:v1].to(acc_dtype(u.dtype)) / t
    else:
        if hidden is None or weight is None:
            raise TypeError(f"{what} needs hidden and weight (the teacher's final hidden states "
                            "and output embedding), or logits=")
        _float_tensor("hidden", hidden)
        _float_tensor("weight", weight)
        if hidden.dim() < 1 or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or \
                weight.shape[0] == 0:
            raise ValueError(f"hidden (..., H) and weight (V, H) must share H, got "
                             f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
        if weight.dtype != hidden.dtype or weight.device != hidden.device:
            raise ValueError(f"weight ({weight.dtype}, {weight.device}) must have hidden's dtype "
                             f"and device ({hidden.dtype}, {hidden.device})")
        if bias is not None:
            _float_tensor("bias", bias)
            if bias.shape != weight.shape[:1] or bias.dtype != weight.dtype or \
                    bias.device != weight.device:
                raise ValueError(f"bias must be ({weight.shape[0]},) {weight.dtype} on "
                                 f"{weight.device}, got {tuple(bias.shape)} {bias.dtype} on "
                                 f"{bias.device}")
        lead, v = hidden.shape[:-1], weight.shape[0]
        u = rows_view(hidden)

        def tile(b, s0, s1, v0, v1):
            c = bias[v0:v1] if bias is not None else None
            return _transform(_logits(u[b, s0:s1], weight[v0:v1], c), scale, cap).div_(t)
    chunks = [(b * u.shape[1] + s0, b * u.shape[1] + min(s0 + chunk_rows, u.shape[1]), b, s0,
               min(s0 + chunk_rows, u.shape[1]))
              for b in range(u.shape[0]) for s0 in range(0, u.shape[1], chunk_rows)]
    return lead, v, chunks, vocab_tile, tile


def _float_tensor(name, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {x.dtype}")


@torch.no_grad()
def teacher_topk(hidden=None, weight=None, k=None, *, logits=None, temperature=1.0, bias=None,
                 logit_scale=1.0, softcap=None, chunk_rows=CHUNK_ROWS, vocab_tile=VOCAB_TILE):
    """The teacher's top-k ids and log-probabilities at temperature T, per token.

    ``teacher_topk(hidden, weight, k, ...)`` is exactly ``torch.log_softmax(transform(hidden @
    weight.T + bias) / temperature, -1).topk(k, -1)`` (the same ids up to ties, the
    log-probabilities to fp32 rounding), computed over chunks of ``chunk_rows`` tokens and tiles
    of ``vocab_tile`` vocabulary entries: at most one tile of fp32 logits exists at a time.
    ``teacher_topk(logits=u, k=k, temperature=T)`` is the same from logits (used as given).

    Args:
        hidden: (..., H) float, the teacher's final hidden states; weight: (V, H), its output
            embedding (same dtype and device); bias: (V,) or None.
        k: how many entries per token, 1 <= k <= V.
        logits: instead of hidden and weight, the teacher's logits (..., V).
        temperature: T > 0; the log-probabilities are those of softmax(logits / T), as the loss's
            ``teacher_topk`` takes them (stored at the loss's T).
        logit_scale, softcap: the model's transforms of its logits before / T (TRL's order;
            ``integrations.hf.logit_transforms`` reads them from a config).
        chunk_rows, vocab_tile: the chunk and tile sizes (memory: chunk_rows * vocab_tile * 4
            bytes of logits, plus the running top-k).

    Returns:
        ``(indices, logprobs)``, each (..., k): int64 ids sorted by decreasing log-probability
        and their float32 log-probabilities (float64 for float64 inputs). Runs under no_grad.
    """
    lead, v, chunks, tile_v, tile = _tiles(hidden, weight, logits, temperature, bias,
                                           logit_scale, softcap, chunk_rows, vocab_tile,
                                           "teacher_topk")
    k = _int("k", k, 1)
    if k > v:
        raise ValueError(f"k={k} is larger than the vocabulary (V={v})")
    n = math.prod(lead)
    device = (logits if logits is not None else hidden).device
    dtype = acc_dtype((logits if logits is not None else hidden).dtype)
    out_v = torch.empty(n, k, dtype=dtype, device=device)
    out_i = torch.empty(n, k, dtype=torch.int64, device=device)
    for r0, r1, b, s0, s1 in chunks:
        lse = torch.full((r1 - r0,), float("-inf"), dtype=dtype, device=device)
        top_v = top_i = None
        for v0 in range(0, v, tile_v):
            a = tile(b, s0, s1, v0, min(v, v0 + tile_v))
            lse = torch.logaddexp(lse, a.logsumexp(-1))
            tv, ti = a.topk(min(k, a.shape[-1]), -1)
            ti += v0
            if top_v is not None:    # merge: the top-k of the running top-k and this tile's
                tv, ti = torch.cat([top_v, tv], -1), torch.cat([top_i, ti], -1)
                tv, j = tv.topk(min(k, tv.shape[-1]), -1)
                ti = ti.gather(-1, j)
            top_v, top_i = tv, ti
            del a
        out_v[r0:r1] = top_v - lse[:, None]
        out_i[r0:r1] = top_i
    return out_i.view(*lead, k), out_v.view(*lead, k)


@torch.no_grad()
def teacher_sample(hidden=None, weight=None, n=None, *, generator=None, logits=None,
                   temperature=1.0, bias=None, logit_scale=1.0, softcap=None,
                   chunk_rows=CHUNK_ROWS, vocab_tile=VOCAB_TILE):
    """Sparse Logit Sampling's teacher: n draws from softmax(logits / T) per token, returned as
    distinct ids with their empirical log-frequencies (arXiv 2503.16870).

    Arguments as in :func:`teacher_topk`, with n (>= 1) draws instead of k and ``generator``
    (a ``torch.Generator`` on the tensors' device, or None for torch's default) for
    reproducible draws. Streams over the same chunks and tiles (see the module docstring).

    Returns:
        ``(indices, logprobs)``, each (..., min(n, V)). The distinct ids drawn come first, by
        decreasing count, with ``log(count / n)``; a token with fewer distinct ids is padded
        with ids it did not draw (valid, never repeated) and log-probability -inf, which the
        loss treats as absent (probability 0). With ``topk_mode="rest"`` the tail mass is 0:
        the forward KL and the JSD are those of the sampled distribution (the reverse KL is
        infinite wherever the student puts mass outside the draws, its true value). Under
        "renormalize" a padded id would join the student's normaliser: use "rest".
    """
    lead, v, chunks, tile_v, tile = _tiles(hidden, weight, logits, temperature, bias,
                                           logit_scale, softcap, chunk_rows, vocab_tile,
                                           "teacher_sample")
    n_draws = _int("n", n, 1)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got "
                        f"{type(generator).__name__}")
    count = math.prod(lead)
    ref = logits if logits is not None else hidden
    device, dtype = ref.device, acc_dtype(ref.dtype)
    width = min(n_draws, v)
    out_i = torch.empty(count, width, dtype=torch.int64, device=device)
    out_lp = torch.empty(count, width, dtype=torch.float32 if dtype != torch.float64 else dtype,
                         device=device)
    for r0, r1, b, s0, s1 in chunks:
        lse = torch.full((r1 - r0,), float("-inf"), dtype=dtype, device=device)
        draws = torch.zeros(r1 - r0, n_draws, dtype=torch.int64, device=device)
        for v0 in range(0, v, tile_v):
            a = tile(b, s0, s1, v0, min(v, v0 + tile_v))
            lse_t = a.logsumexp(-1)
            lse_new = torch.logaddexp(lse, lse_t)
            move = torch.where(lse_t > float("-inf"), (lse_t - lse_new).exp(), 0.0)
            # a tile without mass gets uniform weights, so multinomial never sees a zero row
            p = torch.where(lse_t[:, None] > float("-inf"), (a - lse_t[:, None]).exp(), 1.0)
            pick = torch.multinomial(p, n_draws, replacement=True, generator=generator)
            u = torch.rand(draws.shape, dtype=dtype, device=device, generator=generator)
            draws = torch.where(u < move[:, None], pick + v0, draws)
            lse = lse_new
            del a, p
        out_i[r0:r1], out_lp[r0:r1] = _distinct(draws, width)
    return out_i.view(*lead, width), out_lp.view(*lead, width)


def _distinct(draws, width):
    """(ids, log-frequencies) (R, width) of R rows of n draws: the distinct ids by decreasing
    count, then padding with ids not drawn (the smallest free ones) and -inf."""
    r, n = draws.shape
    s = draws.sort(-1).values
    first = torch.ones_like(s, dtype=torch.bool)
    first[:, 1:] = s[:, 1:] != s[:, :-1]
    group = first.cumsum(-1) - 1                           # the run of equal ids of each draw
    counts = torch.zeros(r, n, device=s.device).scatter_add_(
        -1, group, torch.ones(r, n, device=s.device))
    ids = torch.zeros_like(s).scatter_(-1, group, s)       # every member writes the run's id
    counts, order = counts.sort(dim=-1, descending=True, stable=True)
    ids, counts = ids.gather(-1, order)[:, :width], counts[:, :width]
    distinct = first.sum(-1, keepdim=True)                 # d <= width
    j = torch.arange(width, device=s.device)
    drawn = j < distinct
    # Free ids: [0, width) minus the drawn ones, ascending; at least width - d of them.
    taken = torch.zeros(r, width + 1, dtype=torch.bool, device=s.device).scatter_(
        -1, torch.where(drawn & (ids < width), ids, width), True)[:, :width]
    free = torch.where(taken, j + width, j).sort(-1).values
    pad = free.gather(-1, (j - distinct).clamp_min(0))
    logfreq = torch.where(drawn, counts.log() - math.log(n), float("-inf"))
    return torch.where(drawn, ids, pad), logfreq
