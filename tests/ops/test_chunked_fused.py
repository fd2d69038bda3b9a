"""Parity tests for `trl_tokenlevel.ops.fused.fused_token_statistics`, the one-pass full-distribution statistics.

Compared with (a) a plain full-logits reference that materialises `[N, V]` logits, (b) the separate chunked ops it
replaces (`chunked_token_logprobs` + `chunked_token_kl`) and TRL's own fused log-prob head: forward values and
gradients of `sum(u1 * log_probs + u2 * kl)` with respect to the policy's hidden states, weight and bias, on shapes
with ragged token and vocabulary tiles, with bias, logit scale, softcap and temperature, in fp32, fp64 and bf16.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from trl_tokenlevel.ops.chunked import chunked_token_kl, chunked_token_logprobs
from trl_tokenlevel.ops.fused import fused_token_statistics

from .test_chunked import CASES, FP32, make_heads, ref_kl, ref_logits

FP64 = {"rtol": 1e-10, "atol": 1e-12}


def _kw(case):
    """The fused op's keyword names for a `CASES` entry (`student_*` -> policy, `teacher_*` -> teacher)."""
    kw = case["kw"]
    return dict(
        temperature=kw.get("temperature", 1.0),
        logit_scale=kw.get("student_logit_scale", 1.0),
        softcap=kw.get("student_softcap"),
        teacher_logit_scale=kw.get("teacher_logit_scale", 1.0),
        teacher_softcap=kw.get("teacher_softcap"),
        token_chunk=case["token_chunk"],
        vocab_chunk=case["vocab_chunk"],
    )


def _targets(case, seed=1):
    return torch.randint(0, case["v"], (case["n"],), generator=torch.Generator().manual_seed(seed))


def _fused(case, direction, dtype=torch.float32, backend="torch"):
    """Fused outputs, gradients of sum(u1·log_probs + u2·kl), and everything the references need."""
    student, teacher, upstream = make_heads(case, dtype)
    targets = _targets(case)
    out = fused_token_statistics(
        student["hidden"], student["weight"], student["bias"], targets,
        teacher["hidden"], teacher["weight"], teacher["bias"], direction=direction, backend=backend, **_kw(case),
    )  # fmt: skip
    params = [t for t in student.values() if t is not None]
    second = upstream.flip(0)
    grads = torch.autograd.grad((upstream * out.log_probs + second * out.kl).sum(), params)
    return out, grads, (student, teacher, upstream, second, targets, params)


def _reference(case, direction, inputs, compute_dtype=torch.float32):
    """Full-logits values and gradients, in `compute_dtype`, from the same (possibly bf16) inputs."""
    student, teacher, upstream, second, targets, params = inputs
    kw, kw_fused = case["kw"], _kw(case)
    up = lambda t: None if t is None else t.to(compute_dtype)  # noqa: E731
    z = ref_logits(up(student["hidden"]), up(student["weight"]), up(student["bias"]), kw_fused["logit_scale"],
                   kw_fused["softcap"])  # fmt: skip
    with torch.no_grad():
        z_t = ref_logits(up(teacher["hidden"]), up(teacher["weight"]), up(teacher["bias"]),
                         kw.get("teacher_logit_scale", 1.0), kw.get("teacher_softcap"), kw_fused["temperature"])  # fmt: skip
    log_p = F.log_softmax(z, -1)
    values = {
        "log_probs": log_p.gather(1, targets[:, None]).squeeze(1),
        "kl": ref_kl(z / kw_fused["temperature"], z_t, direction),
        "ref_log_probs": F.log_softmax(z_t, -1).gather(1, targets[:, None]).squeeze(1),
        "entropy": -(log_p.exp() * log_p).sum(-1),
        "mean_logits": z.mean(-1),
        "is_top1": z.argmax(-1) == targets,
    }
    loss = (upstream.to(compute_dtype) * values["log_probs"] + second.to(compute_dtype) * values["kl"]).sum()
    return values, torch.autograd.grad(loss, params)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("case_name", list(CASES))
def test_fused_matches_full_logits(case_name, direction):
    case = CASES[case_name]
    out, grads, inputs = _fused(case, direction)
    values, ref_grads = _reference(case, direction, inputs)
    for name, expected in values.items():
        actual = getattr(out, name)
        if expected.dtype == torch.bool:
            assert torch.equal(actual, expected), name
        else:
            torch.testing.assert_close(actual, expected.detach(), **FP32, msg=name)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, **FP32)
    # The teacher is a constant and the metric outputs carry no gradient.
    assert not any(getattr(out, name).requires_grad for name in ("ref_log_probs", "entropy", "mean_logits", "is_top1"))


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("case_name", list(CASES))
def test_fused_matches_separate_chunked_ops_and_trl_head(case_name, direction):
    """The path it replaces: a log-prob pass (ours, and TRL's fused-head kernel) plus a separate chunked KL."""
    from trl.kernels import ChunkedLogProbFunction

    case = CASES[case_name]
    out, grads, (student, teacher, upstream, second, targets, params) = _fused(case, direction)
    kw = _kw(case)
    head = dict(logit_scale=kw["logit_scale"], softcap=kw["softcap"], token_chunk=7, vocab_chunk=40)
    log_probs = chunked_token_logprobs(student["hidden"], student["weight"], student["bias"], targets, backend="torch",
                                       **head)  # fmt: skip
    kl = chunked_token_kl(
        student["hidden"], student["weight"], student["bias"], teacher["hidden"], teacher["weight"], teacher["bias"],
        direction=direction, backend="torch", **case["kw"],
    )  # fmt: skip
    trl_log_probs, trl_entropy, _, trl_mean, trl_top1 = ChunkedLogProbFunction.apply(
        student["hidden"], student["weight"], student["bias"], targets, 1.0, 64, kw["softcap"], kw["logit_scale"],
        ("entropy", "mean_logits", "is_top1"),
    )  # fmt: skip
    separate = torch.autograd.grad((upstream * log_probs + second * kl).sum(), params)
    torch.testing.assert_close(out.log_probs, log_probs, **FP32)
    torch.testing.assert_close(out.kl, kl, **FP32)
    torch.testing.assert_close(out.log_probs, trl_log_probs, **FP32)
    torch.testing.assert_close(out.entropy, trl_entropy.detach(), **FP32)
    torch.testing.assert_close(out.mean_logits, trl_mean, **FP32)
    assert torch.equal(out.is_top1, trl_top1)
    for got, want in zip(grads, separate):
        torch.testing.assert_close(got, want, **FP32)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_fused_float64_and_gradcheck(direction):
    case = CASES["softcap_scale_t07"]
    out, grads, inputs = _fused(case, direction, dtype=torch.float64)
    values, ref_grads = _reference(case, direction, inputs, compute_dtype=torch.float64)
    torch.testing.assert_close(out.kl, values["kl"].detach(), **FP64)
    torch.testing.assert_close(out.log_probs, values["log_probs"].detach(), **FP64)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, **FP64)

    small = dict(case, n=3, v=11, token_chunk=2, vocab_chunk=4)
    student, teacher, _ = make_heads(small, torch.float64)
    targets = _targets(small)

    def both(hidden, weight, bias):
        out = fused_token_statistics(hidden, weight, bias, targets, teacher["hidden"], teacher["weight"],
                                     teacher["bias"], direction=direction, **_kw(small))  # fmt: skip
        return out.log_probs, out.kl

    assert torch.autograd.gradcheck(both, (student["hidden"], student["weight"], student["bias"]))


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("case_name", ["odd_141x123", "softcap_scale_t07"])
def test_fused_bf16_inputs(case_name, direction):
    """bf16 inputs, fp32 accumulation: values match an fp32 reference on the same bf16-rounded inputs to fp32 level,
    gradients (returned in bf16) to 2e-2 relative."""
    case = CASES[case_name]
    out, grads, inputs = _fused(case, direction, dtype=torch.bfloat16)
    assert out.log_probs.dtype == out.kl.dtype == torch.float32
    values, ref_grads = _reference(case, direction, inputs, compute_dtype=torch.float32)
    torch.testing.assert_close(out.log_probs, values["log_probs"].detach(), **FP32)
    torch.testing.assert_close(out.kl, values["kl"].detach(), **FP32)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == torch.bfloat16
        error = (got.float() - want).norm() / want.norm()
        assert error < 2e-2, f"relative gradient error {error:.2e}"


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_fused_bf16_products_round_the_logit_gradient_only(direction):
    """The precision contract of bf16 heads (`ops.chunked` module docstring), which CUDA runs on tensor cores: the
    logits are the exact fp32 sums of bf16 products, and the backward's two products take the logit gradient rounded
    to bf16. So the hidden and weight gradients equal the fp32 full-logits products of bf16(dL/dz) to fp32 rounding,
    and differ from the unrounded products by bf16 rounding."""
    case = CASES["odd_141x123"]
    out, grads, inputs = _fused(case, direction, dtype=torch.bfloat16)
    student, teacher, upstream, second, targets, params = inputs
    hidden, weight = (t.detach().float() for t in (student["hidden"], student["weight"]))
    z = (hidden @ weight.t()).requires_grad_()
    with torch.no_grad():
        z_t = teacher["hidden"].float() @ teacher["weight"].float().t()
    log_p = F.log_softmax(z, -1)
    loss = upstream.float() * log_p.gather(1, targets[:, None]).squeeze(1) + second.float() * ref_kl(z, z_t, direction)
    (grad_z,) = torch.autograd.grad(loss.sum(), z)
    rounded = grad_z.bfloat16().float()
    for got, want_rounded, want_exact in zip(
        [g.float() for g in grads], [rounded @ weight, rounded.t() @ hidden], [grad_z @ weight, grad_z.t() @ hidden]
    ):
        # `got` is returned in bf16 (the parameters' dtype): compare after the same final rounding. (Unrounded products
        # give about 2.5e-3 here; the rounded ones 0 to 2e-5, from fp32 summation order and rare bf16 ties.)
        assert (got - want_rounded.bfloat16().float()).norm() / want_rounded.norm() < 1e-4
        rounding_gap = (want_rounded - want_exact).norm() / want_exact.norm()
        assert 1e-5 < rounding_gap < 1e-2  # the two contracts are distinguishable, and both are within bf16 tolerance
        assert (got - want_rounded).norm() < (got - want_exact).norm()


def test_fused_masked_vocabulary_and_empty_rows():
    case = CASES["tiled_5x1000_bias"]
    student, teacher, upstream = make_heads(case)
    with torch.no_grad():
        student["bias"][:300] = -math.inf  # whole vocabulary tiles masked out in the policy...
        teacher["bias"][:300] = -math.inf  # ...and the teacher: p = 0 slots must contribute 0, not NaN
    targets = _targets(case) % 700 + 300
    for direction in ("forward", "reverse"):
        out = fused_token_statistics(student["hidden"], student["weight"], student["bias"], targets, teacher["hidden"],
                                     teacher["weight"], teacher["bias"], direction=direction, vocab_chunk=256)  # fmt: skip
        grads = torch.autograd.grad((out.log_probs + out.kl).sum(), [student["hidden"], student["weight"]])
        assert all(torch.isfinite(t).all() for t in (*out[:4], *grads))  # mean_logits is -inf here, as it should be
    empty = fused_token_statistics(student["hidden"][:0], student["weight"], None, targets[:0], teacher["hidden"][:0],
                                   teacher["weight"], None)  # fmt: skip
    assert empty.kl.shape == (0,)
    (grad,) = torch.autograd.grad(empty.kl.sum() + empty.log_probs.sum(), [student["weight"]])
    assert torch.count_nonzero(grad) == 0


def test_fused_reads_each_head_tile_once_per_pass(monkeypatch):
    """Forward: one tile of each head per (token chunk, vocabulary chunk); backward: one more of each."""
    from trl_tokenlevel.ops import chunked

    case = CASES["odd_141x123"]
    student, teacher, upstream = make_heads(case)
    calls = []
    original = chunked._Head.tile
    monkeypatch.setattr(
        chunked._Head, "tile", lambda self, h, v0, v1: calls.append(id(self)) or original(self, h, v0, v1)
    )
    out = fused_token_statistics(student["hidden"], student["weight"], None, _targets(case), teacher["hidden"],
                                 teacher["weight"], None, token_chunk=50, vocab_chunk=32)  # fmt: skip
    tiles = math.ceil(141 / 50) * math.ceil(123 / 32)
    assert len(calls) == 2 * tiles  # policy + teacher, once each
    calls.clear()
    (out.log_probs + out.kl).sum().backward()
    assert len(calls) == 2 * tiles
    # Token chunks whose KL gets no gradient (TDPO2's chosen rows, sg(D_w)) skip the teacher's tiles in the backward.
    out = fused_token_statistics(student["hidden"], student["weight"], None, _targets(case), teacher["hidden"],
                                 teacher["weight"], None, token_chunk=50, vocab_chunk=32)  # fmt: skip
    calls.clear()
    (out.log_probs + torch.where(torch.arange(141) >= 100, out.kl, 0.0)).sum().backward()
    assert len(calls) == tiles + math.ceil(123 / 32)  # policy everywhere, teacher for the last token chunk only


def test_fused_validation_errors():
    case = CASES["odd_141x123"]
    student, teacher, _ = make_heads(case)
    args = (student["hidden"], student["weight"], None, _targets(case), teacher["hidden"], teacher["weight"], None)
    with pytest.raises(ValueError, match="direction"):
        fused_token_statistics(*args, direction="sideways")
    with pytest.raises(ValueError, match="backend"):
        fused_token_statistics(*args, backend="cuda")
    with pytest.raises(ValueError, match="targets"):
        fused_token_statistics(*args[:3], args[3][:-1], *args[4:])
    with pytest.raises(ValueError, match="same number of rows"):
        fused_token_statistics(*args[:4], teacher["hidden"][:-1], *args[5:])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_fused_bf16_cuda_matches_full_logits(direction):
    """The torch tiling on CUDA with bf16 inputs, at a Qwen-like vocabulary width with ragged tiles."""
    case = dict(n=300, v=20000, hs=64, ht=64, bias=False, kw={}, token_chunk=128, vocab_chunk=8192)
    student, teacher, upstream = make_heads(case, torch.bfloat16)
    student = {k: None if v is None else v.detach().cuda().requires_grad_() for k, v in student.items()}
    teacher = {k: None if v is None else v.detach().cuda() for k, v in teacher.items()}
    upstream = upstream.cuda()
    targets = _targets(case).cuda()
    out = fused_token_statistics(student["hidden"], student["weight"], None, targets, teacher["hidden"],
                                 teacher["weight"], None, direction=direction, token_chunk=128, vocab_chunk=8192)  # fmt: skip
    params = [student["hidden"], student["weight"]]
    grads = torch.autograd.grad((upstream * out.log_probs + upstream.flip(0) * out.kl).sum(), params)
    values, ref_grads = _reference(case, direction, (student, teacher, upstream, upstream.flip(0), targets, params))
    torch.testing.assert_close(out.log_probs, values["log_probs"].detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.kl, values["kl"].detach(), rtol=1e-4, atol=1e-4)
    for got, want in zip(grads, ref_grads):
        assert (got.float() - want).norm() / want.norm() < 2e-2
    # The bf16 tiles ran on tensor cores with fp32 results (`torch.mm(..., out_dtype=float32)`), not as fp32 products:
    # the products were not refused by this PyTorch, and the same op on CPU (bf16 operands upcast: the same products)
    # agrees to fp32 summation order.
    from trl_tokenlevel.ops import chunked

    assert chunked._HALF_MM_FP32_OUT
    cpu = {k: v.detach().cpu().requires_grad_() for k, v in student.items() if v is not None}
    out_cpu = fused_token_statistics(cpu["hidden"], cpu["weight"], None, targets.cpu(), teacher["hidden"].cpu(),
                                     teacher["weight"].cpu(), None, direction=direction, token_chunk=128,
                                     vocab_chunk=8192)  # fmt: skip
    torch.testing.assert_close(out.log_probs.cpu(), out_cpu.log_probs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.kl.cpu(), out_cpu.kl, rtol=1e-5, atol=1e-5)
