"""Parity cases of the Triton fused pass (`ops.fused_triton`), run by `test_fused_triton.py` in a subprocess.

Not collected on its own (the name does not start with `test_`): Triton decides when `ops.fused_triton` is imported
whether its kernels compile for the GPU or run in the CPU interpreter (TRITON_INTERPRET=1), so these cases need a
fresh process with the variable set (or unset) before that import. In the interpreter they run on CPU tensors; with
compiled kernels, on CUDA.

Every case compares `backend="triton"` with a plain full-logits reference (`test_chunked_fused._reference`) AND with
`backend="torch"`: forward values (fp32 1e-5), is_top1 exactly, and the gradients of sum(u1·log_probs + u2·kl)
with respect to the policy's hidden states and weight (fp32 1e-5; bf16 2e-2 relative), with tiles small enough that
rows, vocabulary and hidden width all have ragged last tiles and the vocabulary is split across programs.
"""

import os

import pytest
import torch

pytest.importorskip("triton")

from trl_tokenlevel.ops import fused_triton  # noqa: E402
from trl_tokenlevel.ops.fused import fused_token_statistics  # noqa: E402

from .test_chunked import CASES, FP32, make_heads  # noqa: E402
from .test_chunked_fused import _kw, _reference, _targets  # noqa: E402

DEVICE = "cpu" if fused_triton.INTERPRETED else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("compiled Triton kernels need CUDA (set TRITON_INTERPRET=1 for the CPU interpreter)", allow_module_level=True)  # fmt: skip

# The parent test says which mode it meant to start, so a mode mix-up fails instead of testing the wrong thing.
EXPECTED_MODE = os.environ.get("TRL_TOKENLEVEL_TRITON_MODE")

TRITON_CASES = {
    # 141 rows, V = 123: ragged row and vocabulary tiles; two vocabulary splits of two 32-wide tiles each; backward
    # chunks of 48 rows x 64 columns (3 x 2 chunks, the last of each ragged).
    "odd_141x123": dict(
        CASES["odd_141x123"],
        blocks=dict(block_n=16, block_v=32, block_k=16, vocab_splits=2, grad_rows=48, grad_cols=64),
    ),
    # Different hidden widths (24, 40: ragged 16-wide hidden tiles), temperature 0.7, one split of seven tiles, backward
    # chunks of 16 rows (one row block each) x 96 columns.
    "t07_37x203": dict(
        n=37,
        v=203,
        hs=24,
        ht=40,
        bias=False,
        kw=dict(temperature=0.7),
        token_chunk=16,
        vocab_chunk=64,
        blocks=dict(block_n=16, block_v=32, block_k=16, vocab_splits=1, grad_rows=16, grad_cols=96),
    ),
}
BF16_GRAD_RTOL = 2e-2


def _on_device(heads: dict) -> dict:
    return {k: None if v is None else v.detach().to(DEVICE).requires_grad_(v.requires_grad) for k, v in heads.items()}


def _run(case, direction, dtype, backend, monkeypatch=None):
    """Outputs and gradients of sum(u1·log_probs + u2·kl) for one backend; the inputs for the reference."""
    if monkeypatch is not None and "blocks" in case:
        for key, value in case["blocks"].items():
            monkeypatch.setitem(fused_triton.BLOCKS, key, value)
    student, teacher, upstream = make_heads(case, dtype)
    student, teacher, upstream = _on_device(student), _on_device(teacher), upstream.to(DEVICE)
    targets = _targets(case).to(DEVICE)
    out = fused_token_statistics(
        student["hidden"], student["weight"], None, targets, teacher["hidden"], teacher["weight"], None,
        direction=direction, backend=backend, **_kw(case),
    )  # fmt: skip
    params = [student["hidden"], student["weight"]]
    second = upstream.flip(0)
    grads = torch.autograd.grad((upstream * out.log_probs + second * out.kl).sum(), params)
    return out, grads, (student, teacher, upstream, second, targets, params)


def _close_fp32_gradients(got, want, msg=None):
    """fp32 gradients of two summation orders: 1e-5 relative, and an absolute 1e-5 of the gradient's largest entry
    (round-off in the KL's cancellations scales with the largest entries, not with each entry: up to ~2e-6 of
    max|g| against fp64 on these shapes, for either backend)."""
    torch.testing.assert_close(got, want, rtol=FP32["rtol"], atol=FP32["atol"] * max(1.0, want.abs().max().item()),
                               msg=msg)  # fmt: skip


def _close_gradients(got, want, dtype):
    if dtype == torch.float32:
        _close_fp32_gradients(got, want)
    else:
        assert got.dtype == torch.bfloat16
        error = (got.float() - want.float()).norm() / want.float().norm()
        assert error < BF16_GRAD_RTOL, f"relative gradient error {error:.2e}"


def test_mode_is_the_one_the_parent_asked_for():
    assert EXPECTED_MODE in ("interpreter", "cuda"), "run through tests/ops/test_fused_triton.py"
    assert fused_triton.INTERPRETED == (EXPECTED_MODE == "interpreter")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("case_name", list(TRITON_CASES))
def test_triton_matches_full_logits_and_torch_backend(case_name, direction, dtype, monkeypatch):
    case = TRITON_CASES[case_name]
    out, grads, inputs = _run(case, direction, dtype, "triton", monkeypatch)
    values, ref_grads = _reference(case, direction, inputs, compute_dtype=torch.float32)
    torch_out, torch_grads, _ = _run(case, direction, dtype, "torch")
    for name, expected in values.items():
        actual = getattr(out, name)
        if expected.dtype == torch.bool:
            assert torch.equal(actual, expected), name
            assert torch.equal(actual, getattr(torch_out, name)), name
        else:
            assert actual.dtype == torch.float32, name
            torch.testing.assert_close(actual, expected.detach(), **FP32, msg=name)
            torch.testing.assert_close(actual, getattr(torch_out, name), **FP32, msg=name)
    for got, want, torch_grad, param in zip(grads, ref_grads, torch_grads, inputs[-1]):
        assert got.dtype == param.dtype
        _close_gradients(got, want, dtype)
        _close_gradients(got, torch_grad.float(), dtype)
    assert not any(getattr(out, name).requires_grad for name in ("ref_log_probs", "entropy", "mean_logits", "is_top1"))


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_triton_shipped_tile_shape(direction):
    """The GPU tile shape as shipped (`BLOCKS`: one tile wider than V = 123, hidden 16 < block_k)."""
    case = CASES["odd_141x123"]
    out, grads, inputs = _run(case, direction, torch.float32, "triton")
    values, ref_grads = _reference(case, direction, inputs)
    torch.testing.assert_close(out.log_probs, values["log_probs"].detach(), **FP32)
    torch.testing.assert_close(out.kl, values["kl"].detach(), **FP32)
    for got, want in zip(grads, ref_grads):
        _close_fp32_gradients(got, want)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_triton_partial_gradients(direction, monkeypatch):
    """Gradient through log_probs only (no teacher tile in the backward), through the KL of the last rows only (row
    blocks without a KL gradient skip the teacher), a frozen weight (no weight gradient), strided hidden states and
    targets."""
    case = TRITON_CASES["t07_37x203"]
    for key, value in case["blocks"].items():
        monkeypatch.setitem(fused_triton.BLOCKS, key, value)
    student, teacher, _ = make_heads(case)
    student, teacher = _on_device(student), _on_device(teacher)
    targets = _targets(case).to(DEVICE)
    wide = torch.randn(case["n"], 2 * case["hs"], generator=torch.Generator().manual_seed(3)).to(DEVICE)
    strided = wide[:, ::2].requires_grad_()  # stride (2H, 2): not contiguous
    late_rows = torch.arange(case["n"], device=DEVICE) >= 20  # rows 0-15 form a block without KL gradient
    losses = {
        "log_probs only": lambda out: out.log_probs.sum(),
        # Negative weights: a block is skipped only when all its KL gradients are 0, not when none is positive.
        "kl of late rows": lambda out: -torch.where(late_rows, out.kl, 0.0).sum(),
        "both": lambda out: (out.log_probs + out.kl).sum(),
    }
    frozen = student["weight"].detach()
    strided_targets = torch.stack([targets, targets], dim=1)[:, 0]
    runs = [(name, student["hidden"], student["weight"], targets, [student["hidden"], student["weight"]], loss)
            for name, loss in losses.items()]  # fmt: skip
    runs.append(("strided hidden and targets, frozen weight", strided, frozen, strided_targets, [strided],
                 losses["both"]))  # fmt: skip
    for name, hidden, weight, y, params, loss in runs:
        grads = {}
        for backend in ("triton", "torch"):
            out = fused_token_statistics(hidden, weight, None, y, teacher["hidden"], teacher["weight"], None,
                                         direction=direction, temperature=0.7, backend=backend)  # fmt: skip
            grads[backend] = torch.autograd.grad(loss(out), params)
        for got, want in zip(grads["triton"], grads["torch"]):
            _close_fp32_gradients(got, want, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_backward_is_deterministic(dtype, monkeypatch):
    """The backward has no atomics (a logit-gradient buffer per chunk, then products): the same inputs give the same
    gradient bit for bit, over several row and vocabulary chunks. (In the interpreter this is trivially true; compiled
    on CUDA it is the check that matters.)"""
    case = TRITON_CASES["odd_141x123"]
    runs = [_run(case, "forward", dtype, "triton", monkeypatch)[1] for _ in range(2)]
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_triton_empty_rows():
    """N = 0 (an all-masked batch): empty outputs, no launch, zero gradients rather than NaN."""
    case = CASES["odd_141x123"]
    student, teacher, _ = make_heads(case)
    student, teacher = _on_device(student), _on_device(teacher)
    out = fused_token_statistics(student["hidden"][:0], student["weight"], None, _targets(case)[:0].to(DEVICE),
                                 teacher["hidden"][:0], teacher["weight"], None, backend="triton")  # fmt: skip
    assert all(t.shape == (0,) for t in out)
    assert out.is_top1.dtype == torch.bool
    (grad,) = torch.autograd.grad(out.kl.sum() + out.log_probs.sum(), [student["weight"]])
    assert grad.shape == student["weight"].shape and torch.count_nonzero(grad) == 0


def test_trainer_tdpo2_triton_matches_torch_kernel(tiny_model_path, tiny_tokenizer, tiny_preference_dataset, tmp_path):
    """End to end: TokenDPOTrainer's TDPO2 loss and gradients with token_kernel="triton" equal those of "torch"."""
    from ..trainers.test_token_dpo_full_distribution import _grads, _trainer

    pairs = tiny_preference_dataset.select(range(8))
    results = {}
    for kernel in ("torch", "triton"):
        trainer, _, batch = _trainer(tiny_model_path, tiny_tokenizer, pairs, tmp_path / kernel, token_loss_type="tdpo2",
                                     token_kernel=kernel)  # fmt: skip
        assert trainer.fused_distribution and trainer.fused_backend == kernel
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        results[kernel] = loss.detach(), _grads(trainer.model), trainer._metrics["train"]["seq_kl/chosen"][-1]
    (loss, grads, kl), (t_loss, t_grads, t_kl) = results["torch"], results["triton"]
    torch.testing.assert_close(t_loss, loss, **FP32)
    assert t_kl == pytest.approx(kl, rel=1e-5, abs=1e-6) and kl > 0
    assert t_grads.keys() == grads.keys()
    for name in grads:
        _close_fp32_gradients(t_grads[name], grads[name], msg=name)
