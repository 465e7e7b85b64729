"""benchmarks/distill_step_cpu.py at tiny sizes: every provider computes the loss of the logits
path (CE + hrm * KL; torchtune's soft cross-entropy adds hrm * H(p)) with the same gradients,
so that the benchmark compares equal work. The peers are skipped where not installed."""
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # benchmarks/ is not installed
from benchmarks import distill_step_cpu as bench  # noqa: E402

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=2)
V, V_TEACHER = 256, 272
PEER = {"liger": "liger_kernel.chunked_loss", "torchtune": "torchtune.modules.loss"}


def _run(name, chunk_rows=8):
    student, teacher, batch = bench.build(48, 2, V, V_TEACHER, TINY, {**TINY, "hidden_size": 48})
    loss = bench.step_fn(name, student, teacher, batch, chunk_rows)()
    loss = loss if torch.is_tensor(loss) else loss[0]
    loss.backward()
    grads = {n: p.grad for n, p in student.named_parameters()}
    return float(loss.detach()), grads, teacher, batch


@pytest.mark.parametrize("name", [p for p in bench.PROVIDERS if p != "hrmkernels-logits"])
def test_each_provider_computes_the_logits_paths_loss_and_gradients(name):
    if name in PEER:
        pytest.importorskip(PEER[name])
    loss, grads, teacher, batch = _run(name)
    ref_loss, ref_grads, _, _ = _run("hrmkernels-logits")
    if name == "torchtune":   # its "forward KL" is -sum p log q = KL + H(p)
        loss -= bench.HRM * bench.teacher_entropy(teacher, batch, V)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for n, g in ref_grads.items():
        assert ((grads[n] - g).norm() / g.norm()).item() <= 1e-5, n


def test_the_topk_fused_linear_step_equals_the_topk_logits_step():
    loss, grads, _, _ = _run("hrmkernels-topk-fused-linear")
    ref_loss, ref_grads, _, _ = _run("hrmkernels-topk-logits")
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for n, g in ref_grads.items():
        assert ((grads[n] - g).norm() / g.norm()).item() <= 1e-5, n


def test_table_marks_a_failed_provider_and_ratios():
    rows = [{"provider": "hrmkernels-logits", "peak_extra_bytes": 2 ** 31, "step_s": 2.0,
             "loss": 1.0, "grads": {"head": {"norm": 1.0, "dot": 2.0}}},
            {"provider": "hrmkernels-fused-linear", "peak_extra_bytes": 2 ** 29, "step_s": 1.0,
             "loss": 1.0, "grads": {"head": {"norm": 1.0, "dot": 2.0}}},
            {"provider": "liger", "status": "error", "reason": "MemoryError"}]
    for r in rows:
        r["n_tokens"] = 64
    bench._compare(rows)
    text = bench.table({"results": rows})
    assert "| hrmkernels-fused-linear | 64 | 0.50 GiB | 0.25x | 1 s |" in text
    assert "| liger | 64 | error: MemoryError |" in text
