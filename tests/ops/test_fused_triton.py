"""The Triton backend of the fused pass (`fused_token_statistics(..., backend="triton")`, `ops.fused_triton`).

Triton fixes at import time whether `@triton.jit` kernels compile for the GPU or run in its CPU interpreter
(TRITON_INTERPRET=1), and another test may already have imported `ops.fused_triton` in this process. So the parity
cases (`triton_kernel_cases.py`: against full logits and against backend="torch", fp32 and bf16, both directions,
temperature, ragged tiles, N = 0, partial gradients, the trainer end to end) run in a fresh pytest subprocess: in the
interpreter on CPU (needs only `pip install triton`), and compiled on CUDA when there is a GPU. The interpreter checks
the kernels' arithmetic, masking and tiling, not their speed, and not GPU-only failures (register spills, shared
memory limits, bf16 tensor-core code paths).

This module itself checks the refusals (unsupported transforms and dtypes, no CUDA, no triton) and, on CUDA, the two
backends at a realistic shape.
"""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from trl_tokenlevel.ops.fused import fused_token_statistics

from .test_chunked import CASES, make_heads
from .test_chunked_fused import _reference, _targets

REPO = Path(__file__).resolve().parents[2]
CASES_FILE = Path(__file__).with_name("triton_kernel_cases.py")


def _run_cases(mode: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRL_TOKENLEVEL_TRITON_MODE=mode, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    if mode == "interpreter":
        env["TRITON_INTERPRET"] = "1"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES_FILE)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-4000:]
    # Every case ran: a skip here would mean the mode was not the one asked for.
    assert re.fullmatch(r"\d+ passed in .*", summary), summary


def test_triton_kernels_in_the_cpu_interpreter():
    pytest.importorskip("triton")
    _run_cases("interpreter")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_kernels_compiled_on_cuda():
    pytest.importorskip("triton")
    _run_cases("cuda")


def _heads(case=CASES["odd_141x123"], dtype=torch.float32):
    student, teacher, _ = make_heads(case, dtype)
    return (student["hidden"], student["weight"], None, _targets(case), teacher["hidden"], teacher["weight"], None)


@pytest.mark.parametrize(
    ("change", "option"),
    [
        ({"logit_scale": 0.5}, "`logit_scale`=0.5"),
        ({"softcap": 30.0}, "`softcap`=30.0"),
        ({"teacher_logit_scale": 2.0}, "`teacher_logit_scale`=2.0"),
        ({"teacher_softcap": 5.0}, "`teacher_softcap`=5.0"),
        ({"bias": True}, "`bias`"),
        ({"teacher_bias": True}, "`teacher_bias`"),
    ],
)
def test_triton_refuses_unsupported_transforms(change, option):
    """Checked before anything needs triton or CUDA; the message names the option and the fix."""
    args = list(_heads())
    if change.pop("bias", False):
        args[2] = torch.zeros(args[1].shape[0])
    if change.pop("teacher_bias", False):
        args[6] = torch.zeros(args[5].shape[0])
    with pytest.raises(ValueError, match=re.escape(option)) as error:
        fused_token_statistics(*args, backend="triton", **change)
    assert "backend='torch'" in str(error.value)


def test_triton_refuses_other_dtypes():
    with pytest.raises(ValueError, match=r"`hidden` in torch.float64.*backend='torch'"):
        fused_token_statistics(*_heads(dtype=torch.float64), backend="triton")


def test_triton_without_cuda_or_interpreter_says_what_to_do():
    """CPU tensors and compiled kernels (the normal CPU test run): a clear error, not a Triton crash."""
    triton_kernels = sys.modules.get("trl_tokenlevel.ops.fused_triton")
    if triton_kernels is not None and triton_kernels.INTERPRETED:
        pytest.skip("this process runs Triton's interpreter (TRITON_INTERPRET=1 was set)")
    pytest.importorskip("triton")
    with pytest.raises(ValueError, match=r"needs CUDA.*TRITON_INTERPRET=1.*backend='torch'"):
        fused_token_statistics(*_heads(), backend="triton")


def test_triton_not_installed_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    monkeypatch.delitem(sys.modules, "trl_tokenlevel.ops.fused_triton", raising=False)
    with pytest.raises(ValueError, match=r"needs the `triton` package.*trl-tokenlevel\[triton\].*backend='torch'"):
        fused_token_statistics(*_heads(), backend="triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of a CPU-only run")
def test_trainer_token_kernel_triton_is_checked_before_training(tiny_model_path, tiny_tokenizer, tmp_path):
    """token_kernel="triton" on a CPU run (no interpreter) fails at construction, naming the fix; "auto" never picks
    the Triton backend."""
    from trl_tokenlevel import TokenDPOConfig, TokenDPOTrainer
    from trl_tokenlevel.data.builtin import load_tiny_preference_dataset

    from ..trainers.dpo_utils import base_args

    triton_kernels = sys.modules.get("trl_tokenlevel.ops.fused_triton")
    if triton_kernels is not None and triton_kernels.INTERPRETED:
        pytest.skip("this process runs Triton's interpreter (TRITON_INTERPRET=1 was set)")
    pairs = load_tiny_preference_dataset().select(range(4))

    def trainer(kernel):
        args = TokenDPOConfig(**base_args(tmp_path / kernel, beta=0.5, token_loss_type="tdpo2", token_kernel=kernel))
        return TokenDPOTrainer(model=tiny_model_path, args=args, train_dataset=pairs, processing_class=tiny_tokenizer)

    with pytest.raises(ValueError, match=r"backend='triton'.*backend='torch'"):
        trainer("triton")
    auto = trainer("auto")
    assert auto.fused_distribution and auto.fused_backend == "torch"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_triton_matches_torch_backend_at_qwen_shape_cuda(direction):
    """N = 2048 tokens, H = 896, V = 151936 (Qwen2.5-0.5B's head) in bf16: both backends against each other and the
    full-logits reference. Prints both backends' forward+backward time (informational: bench/ measures speed)."""
    pytest.importorskip("triton")
    case = dict(n=2048, v=151936, hs=896, ht=896, bias=False, kw={"temperature": 0.9}, token_chunk=1024,
                vocab_chunk=8192)  # fmt: skip
    student, teacher, upstream = make_heads(case, torch.bfloat16)
    student = {k: None if v is None else v.detach().cuda().requires_grad_() for k, v in student.items()}
    teacher = {k: None if v is None else v.detach().cuda() for k, v in teacher.items()}
    upstream, targets = upstream.cuda(), _targets(case).cuda()
    params = [student["hidden"], student["weight"]]
    results = {}
    for backend in ("torch", "triton", "triton"):  # triton twice: the first call compiles
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = fused_token_statistics(student["hidden"], student["weight"], None, targets, teacher["hidden"],
                                     teacher["weight"], None, direction=direction, temperature=0.9,
                                     backend=backend)  # fmt: skip
        grads = torch.autograd.grad((upstream * out.log_probs + upstream.flip(0) * out.kl).sum(), params)
        torch.cuda.synchronize()
        results[backend] = out, grads, time.perf_counter() - start
    print(f"\n{direction}: torch {results['torch'][2]:.3f} s, triton {results['triton'][2]:.3f} s (fwd+bwd)")
    values, ref_grads = _reference(case, direction, (student, teacher, upstream, upstream.flip(0), targets, params))
    out, grads, _ = results["triton"]
    torch_out, torch_grads, _ = results["torch"]
    for name in ("log_probs", "kl", "ref_log_probs", "entropy", "mean_logits"):
        torch.testing.assert_close(getattr(out, name), values[name].detach(), rtol=1e-4, atol=1e-4, msg=name)
        torch.testing.assert_close(getattr(out, name), getattr(torch_out, name), rtol=1e-4, atol=1e-4, msg=name)
    assert (out.is_top1 == torch_out.is_top1).float().mean() > 0.999  # near-ties may flip with the summation order
    for got, want, torch_grad in zip(grads, ref_grads, torch_grads):
        assert (got.float() - want).norm() / want.norm() < 2e-2
        assert (got.float() - torch_grad.float()).norm() / torch_grad.float().norm() < 2e-2
