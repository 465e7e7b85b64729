"""teacher_topk and teacher_sample against float64 references: the top-k of the full log-softmax,
and the sampled teacher's frequencies, structure and meaning to the loss."""
import math

import pytest
import torch

from hrmkernels import available_backends, fused_hrm_loss, teacher_sample, teacher_topk
from hrmkernels.api import teacher_topk as producer
from hrmkernels.reference import hrm_loss_reference, hrm_loss_topk_reference

from conftest import DEVICE

BASE = dict(lead=(3, 7), h=16, v=1271, k=17, dtype=torch.float64, bias=True, t=2.0, scale=1.0,
            cap=None, rows=4, tile=100, source="hidden", masked=False, view=None)
CASES = {
    "base": {},
    "fp32": dict(dtype=torch.float32),
    "bf16": dict(dtype=torch.bfloat16),
    "no-bias-t1": dict(bias=False, t=1.0),
    "scale-softcap": dict(scale=1.7, cap=3.0),
    "tiles-smaller-than-k": dict(tile=5),
    "one-tile-one-chunk": dict(tile=1 << 20, rows=1 << 20),
    "k=1": dict(k=1),
    "k=V": dict(v=37, k=37, tile=8),
    "one-row": dict(lead=(1,), rows=1),
    "1d": dict(lead=()),
    "masked-vocab": dict(masked=True),           # -inf logits: never among the top-k
    "strided-hidden": dict(view="shifted"),      # hidden[:, :-1], as a causal LM predicts
    "logits": dict(source="logits", dtype=torch.float32),
    "logits-bf16-padded-view": dict(source="logits", dtype=torch.bfloat16, view="padded"),
    "logits-shifted-view": dict(source="logits", view="shifted"),
}


def _transformed(x, scale, cap):
    return cap * torch.tanh(scale * x / cap) if cap is not None else scale * x


def _case(c):
    """The producer's arguments and the float64 log-softmax they must reproduce."""
    v, dt = c["v"], c["dtype"]
    lead = (*c["lead"][:-1], c["lead"][-1] + 1) if c["view"] == "shifted" else c["lead"]
    cut = (lambda x: x[..., :-1, :]) if c["view"] == "shifted" else (lambda x: x)
    h = (torch.randn(*lead, c["h"], device=DEVICE) * 2).to(dt)
    w = torch.randn(v, c["h"], device=DEVICE).to(dt)
    b = torch.randn(v, device=DEVICE).to(dt) if c["bias"] else None
    if c["masked"]:
        b[::3] = float("-inf")
    if c["source"] == "logits":
        u = (torch.randn(*lead, v + (9 if c["view"] == "padded" else 0), device=DEVICE) * 4)
        u = u.to(dt)
        args = dict(logits=cut(u[..., :v]))
        ref = cut(u[..., :v]).double() / c["t"]
    else:
        args = dict(hidden=cut(h), weight=w, bias=b, logit_scale=c["scale"], softcap=c["cap"])
        z = cut(h).double() @ w.double().T + (b.double() if b is not None else 0)
        ref = _transformed(z, c["scale"], c["cap"]) / c["t"]
    return args, torch.log_softmax(ref, -1)


@pytest.mark.parametrize("case", list(CASES))
def test_teacher_topk_is_the_top_k_of_the_log_softmax(case):
    c = {**BASE, **CASES[case]}
    args, ref = _case(c)
    idx, lp = teacher_topk(k=c["k"], temperature=c["t"], chunk_rows=c["rows"],
                           vocab_tile=c["tile"], **args)
    assert idx.shape == lp.shape == (*ref.shape[:-1], c["k"]) and idx.dtype == torch.int64
    assert lp.dtype == (torch.float64 if c["dtype"] == torch.float64 else torch.float32)
    tol = 1e-12 if c["dtype"] == torch.float64 else 2e-6 * max(1.0, ref.abs().max().item())
    want, want_idx = ref.topk(c["k"], -1)
    # the same set of ids up to ties: the values at our ids are the k largest, in order
    torch.testing.assert_close(lp.double(), want, rtol=0, atol=tol)
    torch.testing.assert_close(ref.gather(-1, idx), want, rtol=0, atol=tol)
    assert (idx.sort(-1).values.diff(dim=-1) > 0).all()     # distinct
    gap = want[..., :-1] - want[..., 1:]
    if c["dtype"] == torch.float64 and (gap > 1e-9).all():   # no near-ties: the very same ids
        assert torch.equal(idx, want_idx)


def test_teacher_topk_holds_one_tile_of_logits(monkeypatch):
    shapes = []
    logits = producer._logits
    monkeypatch.setattr(producer, "_logits", lambda x, w, b: shapes.append(
        (x.shape[0], w.shape[0])) or logits(x, w, b))
    h, w = torch.randn(10, 8, device=DEVICE), torch.randn(50, 8, device=DEVICE)
    idx, _ = teacher_topk(h, w, 6, chunk_rows=4, vocab_tile=16)
    assert max(shapes) == (4, 16) and len(shapes) == 3 * 4
    assert torch.equal(idx, (h @ w.T).topk(6, -1).indices)


def _sample_case(v=7, tile=3, n=4000, rows=5, source="hidden", t=1.5, seed=0):
    data = torch.Generator().manual_seed(seed)
    h, w = (torch.randn(s, generator=data).to(DEVICE) for s in ((rows, 4), (v, 4)))
    gen = torch.Generator(DEVICE).manual_seed(seed)
    if source == "hidden":
        out = teacher_sample(h, w, n, generator=gen, temperature=t, vocab_tile=tile, chunk_rows=2)
    else:
        out = teacher_sample(logits=h @ w.T, n=n, generator=gen, temperature=t, vocab_tile=tile,
                             chunk_rows=2)
    return out, torch.softmax((h.double() @ w.double().T) / t, -1)


@pytest.mark.parametrize("source", ["hidden", "logits"])
def test_teacher_sample_draws_from_the_teacher(source):
    """Frequencies of n draws per token agree with p within 5 standard errors, across tiles
    (the reservoir); the structure is the loss's: distinct valid ids, -inf padding, sum 1."""
    (idx, lp), p = _sample_case(source=source)
    assert idx.shape == lp.shape == (5, 7) and lp.dtype == torch.float32
    freq = torch.zeros_like(p).scatter_(-1, idx, lp.double().exp())
    n = 4000
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-12).all(), (freq - p).abs().max()
    torch.testing.assert_close(freq.sum(-1), torch.ones(5, dtype=torch.float64, device=DEVICE),
                               rtol=0, atol=2e-6)          # fp32 log-frequencies
    counts = lp.double().exp() * n
    torch.testing.assert_close(counts, counts.round(), rtol=1e-5, atol=0)   # log(count / n)
    assert (lp[:, :-1] >= lp[:, 1:]).all()                   # by decreasing count
    again, _ = _sample_case(source=source)
    assert torch.equal(again[0], idx) and torch.equal(again[1], lp)   # the generator decides


def test_teacher_sample_pads_rows_with_few_distinct_ids():
    u = torch.randn(4, 50, device=DEVICE)
    u[0, 17] = 60.0             # one id takes all 9 draws
    u[1, 3:5] = 60.0            # two ids share them
    idx, lp = teacher_sample(logits=u, n=9, generator=torch.Generator(DEVICE).manual_seed(3),
                             vocab_tile=7)
    assert idx.shape == (4, 9)
    assert idx[0, 0] == 17 and lp[0, 0] == 0.0 and (lp[0, 1:] == float("-inf")).all()
    assert set(idx[1, :2].tolist()) == {3, 4} and (lp[1, 2:] == float("-inf")).all()
    for row in idx.tolist():
        assert len(set(row)) == len(row) and all(0 <= i < 50 for i in row)   # valid, distinct
    assert torch.isfinite(lp).sum(-1)[:2].tolist() == [1, 2]
    one, lp1 = teacher_sample(logits=u[:, :3], n=9, vocab_tile=2)    # width min(n, V) = 3
    assert one.shape == lp1.shape == (4, 3) and (one.sort(-1).values == torch.arange(3)).all()


@pytest.mark.parametrize("backend", [b for b in ("torch", "triton")
                                     if b in available_backends(DEVICE)])
@pytest.mark.parametrize("divergence", [dict(kl_direction="forward"), dict(jsd_beta=0.4)])
def test_the_loss_treats_the_sample_as_the_sparse_target(backend, divergence):
    """topk_mode="rest" on a sample is the dense loss against p^ = counts / n (padding absent,
    tail mass 0): the teacher logits T log p^, -inf where nothing was drawn."""
    t = 2.0
    z = torch.randn(2, 6, 40, device=DEVICE) * 3
    u = torch.randn(2, 6, 40, device=DEVICE) * 3
    u[0, 0, 5] = 80.0                                          # a row with one distinct id
    idx, lp = teacher_sample(logits=u, n=16, temperature=t, vocab_tile=9,
                             generator=torch.Generator(DEVICE).manual_seed(0))
    assert (lp == float("-inf")).any()                         # padding is exercised
    dense = torch.full_like(u, float("-inf")).scatter_(-1, idx, lp) * t
    y = torch.randint(0, 40, (2, 6), device=DEVICE)
    y[1, ::2] = -100
    g = torch.rand(2, 6, device=DEVICE) + 0.5
    opts = dict(temperature=t, reduction="none", return_components=True, **divergence)
    zs = z.clone().requires_grad_()
    out = fused_hrm_loss(zs, labels=y, hrm=0.7, teacher_topk=(idx, lp), backend=backend, **opts)
    (dz,) = torch.autograd.grad((out.loss * g).sum(), zs)
    zd = z.double().requires_grad_()
    ref = hrm_loss_reference(zd, dense.double(), y, 0.7, **opts)
    (dz_ref,) = torch.autograd.grad((ref.loss * g.double()).sum(), zd)
    topk_ref = hrm_loss_topk_reference(z.double(), (idx, lp.double()), y, 0.7, **opts)
    torch.testing.assert_close(topk_ref.kl, ref.kl)
    torch.testing.assert_close(out.kl.double(), ref.kl, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss.double(), ref.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dz.double(), dz_ref, rtol=1e-4, atol=1e-5)


BAD = [
    (dict(k=0), ValueError, "k must be >= 1"),
    (dict(k=51), ValueError, "larger than the vocabulary"),
    (dict(k=2.0), TypeError, "k must be an int"),
    (dict(logits=torch.zeros(3, 50)), ValueError, "not both"),
    (dict(weight=None), TypeError, "needs hidden and weight"),
    (dict(weight=torch.zeros(50, 8, dtype=torch.float64)), ValueError, "hidden's dtype"),
    (dict(weight=torch.zeros(50, 7)), ValueError, "must share H"),
    (dict(bias=torch.zeros(49)), ValueError, "bias must be (50,)"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(vocab_tile=0), ValueError, "vocab_tile must be >= 1"),
    (dict(hidden=torch.zeros(3, 8, dtype=torch.int64)), TypeError, "hidden must be float32"),
]


@pytest.mark.parametrize("change,error,words", BAD, ids=[b[2] for b in BAD])
def test_teacher_topk_bad_input_names_the_argument(change, error, words):
    kw = {"hidden": torch.zeros(3, 8), "weight": torch.zeros(50, 8), "k": 4, **change}
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        teacher_topk(**kw)


def test_teacher_sample_bad_input():
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        teacher_sample(logits=torch.zeros(2, 5), n=3, generator=0)
    with pytest.raises(ValueError, match="n must be >= 1"):
        teacher_sample(logits=torch.zeros(2, 5), n=0)
    with pytest.raises(ValueError, match="logits= are used as given"):
        teacher_sample(logits=torch.zeros(2, 5), n=3, logit_scale=2.0)
    assert math.isinf(teacher_sample(logits=torch.zeros(1, 5), n=1)[1][0, 0].item()) is False
