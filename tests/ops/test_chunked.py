"""Parity tests for `trl_tokenlevel.ops.chunked` against plain full-logits references.

The references below materialise `[N, V]` logits on purpose: that is what the chunked ops must reproduce without
doing it. Forward values and gradients (student hidden, weight, bias) are compared for every backend, on shapes
chosen so that both the token and the vocabulary tiling have ragged last tiles.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from trl_tokenlevel.ops import chunked
from trl_tokenlevel.ops.chunked import (
    backbone_hidden_states,
    chunked_contrastive_logprobs,
    chunked_token_kl,
    chunked_token_logprobs,
    chunked_total_variation,
    lm_head_params,
    resolve_backend,
)

# fp32 tolerances: forward values are O(1) and the tiles are fp32, so only the summation order differs.
FP32 = {"rtol": 1e-5, "atol": 1e-5}
FP64 = {"rtol": 1e-10, "atol": 1e-12}


# ---------------------------------------------------------------------------------------------------------------------
# Full-logits references
# ---------------------------------------------------------------------------------------------------------------------


def ref_logits(hidden, weight, bias=None, logit_scale=1.0, softcap=None, temperature=1.0):
    z = hidden @ weight.t()
    if bias is not None:
        z = z + bias
    z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def ref_kl(z_student, z_teacher, direction):
    log_ps, log_pt = F.log_softmax(z_student, -1), F.log_softmax(z_teacher, -1)
    if direction == "forward":
        return (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    return (log_ps.exp() * (log_ps - log_pt)).sum(-1)


# ---------------------------------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------------------------------

# name -> (N, V, H_student, H_teacher, bias, transform kwargs, token_chunk, vocab_chunk)
CASES = {
    # 3 * 47 rows, a vocabulary that is no multiple of the tile: ragged last tiles on both axes.
    "odd_141x123": dict(n=141, v=123, hs=16, ht=16, bias=False, kw={}, token_chunk=50, vocab_chunk=32),
    # Two-row token tiles and 256-wide vocabulary tiles over V=1000, with biases.
    "tiled_5x1000_bias": dict(n=5, v=1000, hs=16, ht=16, bias=True, kw={}, token_chunk=2, vocab_chunk=256),
    # Different hidden widths, logit scales, softcaps and temperature 0.7 on both heads.
    "softcap_scale_t07": dict(
        n=9,
        v=300,
        hs=24,
        ht=16,
        bias=True,
        kw=dict(
            temperature=0.7,
            student_logit_scale=0.5,
            teacher_logit_scale=1.5,
            student_softcap=4.0,
            teacher_softcap=3.0,
        ),
        token_chunk=4,
        vocab_chunk=64,
    ),
}


def make_heads(case, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    n, v, hs, ht = case["n"], case["v"], case["hs"], case["ht"]
    # Weights scaled by 1/sqrt(H) * 2 keep the logits O(2): peaked but not degenerate distributions.
    student = dict(
        hidden=randn(n, hs).requires_grad_(),
        weight=randn(v, hs, scale=2 / math.sqrt(hs)).requires_grad_(),
        bias=randn(v, scale=0.5).requires_grad_() if case["bias"] else None,
    )
    teacher = dict(
        hidden=randn(n, ht).requires_grad_(),
        weight=randn(v, ht, scale=2 / math.sqrt(ht)).requires_grad_(),
        bias=randn(v, scale=0.5).requires_grad_() if case["bias"] else None,
    )
    upstream = randn(n)  # per-token weights on the loss, so per-token gradients are checked, not only their sum
    return student, teacher, upstream


def run_kl(case, direction, backend, dtype=torch.float32):
    """Chunked and reference KL, and the gradients of sum(upstream * KL) for both."""
    student, teacher, upstream = make_heads(case, dtype)
    kw = case["kw"]
    out = chunked_token_kl(
        student["hidden"], student["weight"], student["bias"],
        teacher["hidden"], teacher["weight"], teacher["bias"],
        direction=direction, backend=backend,
        token_chunk=case["token_chunk"], vocab_chunk=case["vocab_chunk"], **kw,
    )  # fmt: skip
    params = [t for t in student.values() if t is not None]
    grads = torch.autograd.grad((out * upstream).sum(), params)

    temperature = kw.get("temperature", 1.0)
    z_s = ref_logits(
        student["hidden"], student["weight"], student["bias"],
        kw.get("student_logit_scale", 1.0), kw.get("student_softcap"), temperature,
    )  # fmt: skip
    with torch.no_grad():
        z_t = ref_logits(
            teacher["hidden"], teacher["weight"], teacher["bias"],
            kw.get("teacher_logit_scale", 1.0), kw.get("teacher_softcap"), temperature,
        )  # fmt: skip
    ref = ref_kl(z_s, z_t, direction)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), params)
    return out, ref, grads, ref_grads, teacher


# ---------------------------------------------------------------------------------------------------------------------
# chunked_token_kl
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "trl"])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("case_name", list(CASES))
def test_kl_matches_full_logits(case_name, direction, backend):
    out, ref, grads, ref_grads, teacher = run_kl(CASES[case_name], direction, backend)
    assert out.shape == ref.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, **FP32)
    for name, g, rg in zip(["hidden", "weight", "bias"], grads, ref_grads):
        torch.testing.assert_close(g, rg, **FP32, msg=lambda m, name=name: f"grad {name}: {m}")
    # The teacher is a constant: nothing may flow back to it even though its tensors require grad.
    assert all(t is None or t.grad is None for t in teacher.values())


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("case_name", list(CASES))
def test_kl_torch_backend_float64(case_name, direction):
    out, ref, grads, ref_grads, _ = run_kl(CASES[case_name], direction, "torch", dtype=torch.float64)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, **FP64)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, **FP64)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_kl_torch_backend_gradcheck(direction):
    # Finite differences on every student input, with bias, softcap, scale, temperature and ragged tiles.
    g = torch.Generator().manual_seed(1)
    s_h, s_w, s_b = (torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
                     for shape in [(3, 4), (11, 4), (11,)])  # fmt: skip
    t_h, t_w = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(11, 5, generator=g, dtype=torch.float64)

    def fn(h, w, b):
        return chunked_token_kl(
            h, w, b, t_h, t_w, None, direction=direction, temperature=0.7, student_logit_scale=1.3,
            student_softcap=2.5, backend="torch", token_chunk=2, vocab_chunk=4,
        )  # fmt: skip

    assert torch.autograd.gradcheck(fn, (s_h, s_w, s_b))


def test_kl_never_builds_tiles_larger_than_requested(monkeypatch):
    seen = []
    original = chunked._Head.tile

    def recording_tile(self, h, start, end):
        z, th = original(self, h, start, end)
        seen.append(tuple(z.shape))
        return z, th

    monkeypatch.setattr(chunked._Head, "tile", recording_tile)
    case = CASES["tiled_5x1000_bias"]
    out, *_ = run_kl(case, "forward", "torch")
    # Every tile the op built (forward and backward) is at most [token_chunk, vocab_chunk]; the reference's full
    # [5, 1000] logits do not go through `_Head.tile`.
    assert seen and max(r for r, _ in seen) <= 2 and max(c for _, c in seen) <= 256
    # forward: 2 passes x 2 heads, backward: 1 pass x 2 heads, each over 3 token tiles x 4 vocabulary tiles
    assert len(seen) == 6 * 3 * 4


def test_kl_spec_toy_batch():
    """preference.md §0.2: KL_t(ref || theta) on the toy batch, as identity-head hidden states."""
    policy = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.2, 0.3], [0.0, 1.0, 0.0], [0.3, -0.2, 0.1]], dtype=torch.float64)
    ref = torch.tensor([[0, 0, 0], [0.2, 0.2, 0.6], [0.5, 0.5, 0], [0, 0, 0]], dtype=torch.float64)
    eye = torch.eye(3, dtype=torch.float64)
    kl = chunked_token_kl(policy, eye, None, ref, eye, None, direction="forward", vocab_chunk=2, token_chunk=3)
    expected = torch.tensor([0.308994, 0.0316617, 0.0934246, 0.0206604], dtype=torch.float64)
    assert torch.allclose(kl, expected, rtol=0, atol=5e-7)


def test_kl_aligndistil_worked_example_with_concatenated_teacher():
    """preference.md §6: TVD -> omega -> reverse KL to the extrapolated teacher, with the teacher logits
    z* = (1 + omega) z_d - omega z_r built as one head over concatenated hidden states and weights."""
    dt = torch.float64
    student = torch.tensor([[0, 0, 0], [1, 0, 0]], dtype=dt)
    z_d = torch.tensor([[1, 0, -1], [0, 1, 0]], dtype=dt)
    z_r = torch.tensor([[0, 0.5, 0], [0, 1, 0.2]], dtype=dt)
    eye = torch.eye(3, dtype=dt)
    tvd = chunked_total_variation(z_d, eye, z_r, eye, vocab_chunk=2)
    assert torch.allclose(tvd, torch.tensor([0.782345, 0.0706435], dtype=dt), rtol=0, atol=5e-7)
    omega = (10 * tvd + 1e-3).unsqueeze(-1)
    teacher_hidden = torch.cat([(1 + omega) * z_d, -omega * z_r], dim=1)
    teacher_weight = torch.cat([eye, eye], dim=1)
    kl = chunked_token_kl(student, eye, None, teacher_hidden, teacher_weight, None, direction="reverse", vocab_chunk=2)
    assert torch.allclose(kl, torch.tensor([9.029912, 0.365802], dtype=dt), rtol=0, atol=5e-7)


def test_kl_masked_vocabulary_slots_give_no_nan():
    # A -inf bias (e.g. padded vocabulary slots masked out) must give 0 * inf = 0 contributions, not NaN.
    g = torch.Generator().manual_seed(2)
    h = torch.randn(4, 8, generator=g, requires_grad=True)
    w = torch.randn(20, 8, generator=g)
    bias = torch.zeros(20)
    bias[:6] = -math.inf  # the whole first vocabulary tile of every row
    t_h = torch.randn(4, 8, generator=g)
    for direction in ("forward", "reverse"):
        out = chunked_token_kl(h, w, bias, t_h, w, bias, direction=direction, backend="torch", vocab_chunk=6)
        ref = ref_kl(ref_logits(h, w, bias)[:, 6:], ref_logits(t_h, w, bias)[:, 6:], direction)
        torch.testing.assert_close(out, ref, **FP32)
        (grad,) = torch.autograd.grad(out.sum(), h)
        (ref_grad,) = torch.autograd.grad(ref.sum(), h)
        torch.testing.assert_close(grad, ref_grad, **FP32)


def test_kl_torch_backend_ignores_ambient_autocast():
    # Under bf16 autocast the tile matmuls would otherwise run in bf16 (errors ~1e-2); the op keeps fp32 tiles.
    case = CASES["tiled_5x1000_bias"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref, grads, ref_grads, _ = run_kl(case, "reverse", "torch")
    _, ref, _, ref_grads, _ = run_kl(case, "reverse", "torch")  # reference outside autocast
    torch.testing.assert_close(out, ref, **FP32)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, **FP32)


def test_kl_validation_errors():
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match=r"\(10, 8\).*\(12, 8\)"):
        chunked_token_kl(h, w, None, h, torch.randn(12, 8), None)
    with pytest.raises(ValueError, match=r"\(4, 8\).*\(5, 8\)"):
        chunked_token_kl(h, w, None, torch.randn(5, 8), w, None)
    with pytest.raises(ValueError, match="weight shape"):
        chunked_token_kl(h, torch.randn(10, 6), None, h, w, None)
    with pytest.raises(ValueError, match="bias"):
        chunked_token_kl(h, w, torch.zeros(9), h, w, None)
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="temperature"):
            chunked_token_kl(h, w, None, h, w, None, temperature=bad)
    with pytest.raises(ValueError, match="direction"):
        chunked_token_kl(h, w, None, h, w, None, direction="jsd")
    with pytest.raises(ValueError, match="softcap"):
        chunked_token_kl(h, w, None, h, w, None, student_softcap=0.0)
    with pytest.raises(ValueError, match="token_chunk"):
        chunked_token_kl(h, w, None, h, w, None, token_chunk=0)
    with pytest.raises(ValueError, match="Liger"):
        chunked_token_kl(h, w, None, h, w, None, backend="liger")
    with pytest.raises(ValueError, match="backend"):
        chunked_token_kl(h, w, None, h, w, None, backend="triton")


def test_auto_backend_rule():
    assert resolve_backend("auto", torch.zeros(2, 2)) == "torch"  # CPU
    assert resolve_backend("auto", torch.zeros(2, 2, dtype=torch.float64)) == "torch"
    assert resolve_backend("auto", torch.zeros(2, 2, device="meta")) == "torch"
    assert resolve_backend("trl", torch.zeros(2, 2)) == "trl"


# ---------------------------------------------------------------------------------------------------------------------
# chunked_token_logprobs
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "trl"])
@pytest.mark.parametrize("case_name", list(CASES))
def test_logprobs_match_full_logits(case_name, backend):
    case = CASES[case_name]
    student, _, upstream = make_heads(case)
    targets = torch.randint(0, case["v"], (case["n"],), generator=torch.Generator().manual_seed(3))
    kw = case["kw"]
    transform = dict(
        temperature=kw.get("temperature", 1.0),
        logit_scale=kw.get("student_logit_scale", 1.0),
        softcap=kw.get("student_softcap"),
    )
    out = chunked_token_logprobs(
        student["hidden"], student["weight"], student["bias"], targets, backend=backend,
        token_chunk=case["token_chunk"], vocab_chunk=case["vocab_chunk"], **transform,
    )  # fmt: skip
    z = ref_logits(
        student["hidden"], student["weight"], student["bias"],
        transform["logit_scale"], transform["softcap"], transform["temperature"],
    )  # fmt: skip
    ref = F.log_softmax(z, -1).gather(1, targets.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(out, ref, **FP32)
    params = [t for t in student.values() if t is not None]
    grads = torch.autograd.grad((out * upstream).sum(), params)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), params)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, **FP32)


def test_logprobs_torch_backend_gradcheck_and_validation():
    g = torch.Generator().manual_seed(4)
    h, w, b = (torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
               for shape in [(5, 3), (9, 3), (9,)])  # fmt: skip
    y = torch.tensor([0, 8, 4, 3, 8])

    def fn(h, w, b):
        return chunked_token_logprobs(
            h, w, b, y, temperature=0.7, logit_scale=0.8, softcap=2.0, backend="torch", vocab_chunk=4, token_chunk=2
        )

    assert torch.autograd.gradcheck(fn, (h, w, b))
    with pytest.raises(ValueError, match=r"\[0, 9\)"):
        chunked_token_logprobs(h, w, b, torch.tensor([0, 1, -100, 2, 3]))
    with pytest.raises(ValueError, match="targets"):
        chunked_token_logprobs(h, w, b, y[:4])


# ---------------------------------------------------------------------------------------------------------------------
# chunked_contrastive_logprobs and chunked_total_variation (no grad)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [1.0, 0.5])
@pytest.mark.parametrize("case_name", ["odd_141x123", "tiled_5x1000_bias"])
def test_contrastive_logprobs_match_full_logits(case_name, gamma):
    case = CASES[case_name]
    pos, neg, _ = make_heads(case)
    targets = torch.randint(0, case["v"], (case["n"],), generator=torch.Generator().manual_seed(5))
    out = chunked_contrastive_logprobs(
        pos["hidden"], pos["weight"], neg["hidden"], neg["weight"], targets, gamma=gamma,
        vocab_chunk=case["vocab_chunk"], token_chunk=case["token_chunk"], pos_bias=pos["bias"], neg_bias=neg["bias"],
    )  # fmt: skip
    z = (1 + gamma) * ref_logits(pos["hidden"], pos["weight"], pos["bias"]) - gamma * ref_logits(
        neg["hidden"], neg["weight"], neg["bias"]
    )
    ref = F.log_softmax(z, -1).gather(1, targets.unsqueeze(1)).squeeze(1)
    assert not out.requires_grad
    torch.testing.assert_close(out, ref.detach(), **FP32)


def test_contrastive_logprobs_spec_worked_example():
    """preference.md §5: p_ce for the toy chosen and rejected completions (gamma = 1)."""
    dt = torch.float64
    eye = torch.eye(3, dtype=dt)
    pos = torch.tensor([[1, 0, 0], [0, 0, 1], [0, 0.2, 0], [1, 0, 0]], dtype=dt)
    neg = torch.tensor([[0, 0, 0], [0, 0.5, 0.5], [0, 1.5, 0], [0.5, 0, 0]], dtype=dt)
    targets = torch.tensor([0, 2, 1, 0])  # y_w = [0, 2], y_l = [1, 0]
    p_ce = chunked_contrastive_logprobs(pos, eye, neg, eye, targets, vocab_chunk=2, token_chunk=3).exp()
    expected = torch.tensor([0.786986, 0.736125, 0.142687, 0.691438], dtype=dt)
    assert torch.allclose(p_ce, expected, rtol=0, atol=5e-7)


@pytest.mark.parametrize("case_name", list(CASES))
def test_total_variation_matches_full_logits(case_name):
    case = CASES[case_name]
    a, b, _ = make_heads(case)
    kw = case["kw"]
    temperature = kw.get("temperature", 1.0)
    out = chunked_total_variation(
        a["hidden"], a["weight"], b["hidden"], b["weight"], temperature,
        bias_a=a["bias"], bias_b=b["bias"],
        logit_scale_a=kw.get("student_logit_scale", 1.0), logit_scale_b=kw.get("teacher_logit_scale", 1.0),
        softcap_a=kw.get("student_softcap"), softcap_b=kw.get("teacher_softcap"),
        vocab_chunk=case["vocab_chunk"], token_chunk=case["token_chunk"],
    )  # fmt: skip
    p_a = F.softmax(
        ref_logits(a["hidden"], a["weight"], a["bias"], kw.get("student_logit_scale", 1.0),
                   kw.get("student_softcap"), temperature), -1)  # fmt: skip
    p_b = F.softmax(
        ref_logits(b["hidden"], b["weight"], b["bias"], kw.get("teacher_logit_scale", 1.0),
                   kw.get("teacher_softcap"), temperature), -1)  # fmt: skip
    ref = (p_a - p_b).abs().sum(-1)
    assert not out.requires_grad
    torch.testing.assert_close(out, ref.detach(), **FP32)
    assert bool(((out >= 0) & (out <= 2)).all())


# ---------------------------------------------------------------------------------------------------------------------
# Real tiny transformers models
# ---------------------------------------------------------------------------------------------------------------------


def _tiny_llama(seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def llama_pair():
    return _tiny_llama(0), _tiny_llama(1)


@pytest.fixture(scope="module")
def llama_batch():
    g = torch.Generator().manual_seed(6)
    input_ids = torch.randint(0, 300, (2, 9), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0  # right padding on the second row
    return input_ids, attention_mask


@pytest.mark.parametrize("backend", ["torch", "trl"])
def test_tiny_llama_kl_ref_policy_matches_naive(llama_pair, llama_batch, backend):
    """Per-token KL(ref || policy) from backbone hidden states + the chunked op equals the naive one computed from
    `model(...).logits`, values and the gradients of every policy parameter."""
    policy, ref = llama_pair
    input_ids, attention_mask = llama_batch
    mask = attention_mask[:, 1:].bool()  # positions that predict a real next token

    policy.zero_grad()
    head, ref_head = lm_head_params(policy), lm_head_params(ref)
    hidden = backbone_hidden_states(policy, input_ids, attention_mask)[:, :-1][mask]
    with torch.no_grad():
        ref_hidden = backbone_hidden_states(ref, input_ids, attention_mask)[:, :-1][mask]
    kl = chunked_token_kl(
        hidden, head["weight"], head["bias"], ref_hidden, ref_head["weight"], ref_head["bias"],
        direction="forward", backend=backend, vocab_chunk=64, token_chunk=5,
        student_logit_scale=head["logit_scale"], student_softcap=head["softcap"],
        teacher_logit_scale=ref_head["logit_scale"], teacher_softcap=ref_head["softcap"],
    )  # fmt: skip
    kl.sum().backward()
    grads = {name: p.grad.clone() for name, p in policy.named_parameters()}

    policy.zero_grad()
    logits = policy(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1][mask]
    with torch.no_grad():
        ref_logits_ = ref(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1][mask]
    naive = ref_kl(logits, ref_logits_, "forward")
    naive.sum().backward()

    assert kl.shape == (int(mask.sum()),)
    torch.testing.assert_close(kl, naive.detach(), **FP32)
    for name, p in policy.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, **FP32, msg=lambda m, name=name: f"grad {name}: {m}")
    assert all(p.grad is None for p in ref.parameters())


def test_backbone_hidden_states_through_peft(llama_pair, llama_batch):
    peft = pytest.importorskip("peft")
    import copy

    # A non-zero adapter, so the check fails if the adapter were bypassed.
    model = peft.get_peft_model(
        copy.deepcopy(llama_pair[0]),
        peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    input_ids, attention_mask = llama_batch
    head = lm_head_params(model)
    assert head["weight"] is model.get_base_model().lm_head.weight
    with torch.no_grad():
        hidden = backbone_hidden_states(model, input_ids, attention_mask)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        targets = input_ids[:, 1:].reshape(-1)
        out = chunked_token_logprobs(hidden[:, :-1].reshape(-1, 32), head["weight"], head["bias"], targets)
        with model.disable_adapter():
            base_logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    ref = F.log_softmax(logits[:, :-1].reshape(-1, 300), -1).gather(1, targets.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(out, ref, **FP32)
    assert not torch.allclose(logits, base_logits)


def test_lm_head_params_follows_trl_config_rules():
    model = _tiny_llama(2)
    head = lm_head_params(model)
    assert head["weight"] is model.lm_head.weight and head["bias"] is None
    assert head["logit_scale"] == 1.0 and head["softcap"] is None

    config = model.config
    config.final_logit_softcapping = 30.0
    config.logits_scaling = 4.0  # Granite / MiniCPM3 divide by it
    assert lm_head_params(model)["softcap"] == 30.0
    assert lm_head_params(model)["logit_scale"] == 0.25
    config.lm_head_multiplier = 2.0  # Falcon-H1; read before `logits_scaling`
    assert lm_head_params(model)["logit_scale"] == 2.0
    config.output_multiplier = 3.0
    assert lm_head_params(model)["logit_scale"] == 3.0
    config.logit_scale = 0.5  # first in TRL's lookup order
    assert lm_head_params(model)["logit_scale"] == 0.5


# ---------------------------------------------------------------------------------------------------------------------
# bf16 on CUDA
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["torch", "trl"])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_kl_bf16_cuda(direction, backend):
    """bf16 inputs, fp32 tiles. The reference is the fp32 full-logits KL of the *same* bf16 values upcast, so the
    only differences are summation order (forward: rtol 1e-4, atol 1e-4) and the final rounding of the gradients to
    bf16 (8 mantissa bits: rtol 2e-2, atol 2e-2 * max |grad|)."""
    case = dict(n=64, v=5000, hs=64, ht=32, bias=True, kw=dict(temperature=0.7), token_chunk=16, vocab_chunk=1024)
    student, teacher, upstream = make_heads(case)
    to_cuda = {k: None if t is None else t.detach().to("cuda", torch.bfloat16).requires_grad_()
               for k, t in student.items()}  # fmt: skip
    t_cuda = {k: None if t is None else t.detach().to("cuda", torch.bfloat16) for k, t in teacher.items()}
    upstream = upstream.cuda()
    out = chunked_token_kl(
        to_cuda["hidden"], to_cuda["weight"], to_cuda["bias"], t_cuda["hidden"], t_cuda["weight"], t_cuda["bias"],
        direction=direction, temperature=0.7, backend=backend, token_chunk=16, vocab_chunk=1024,
    )  # fmt: skip
    params = [to_cuda["hidden"], to_cuda["weight"], to_cuda["bias"]]
    grads = torch.autograd.grad((out * upstream).sum(), params)

    ref_params = [p.detach().float().requires_grad_() for p in params]
    z_s = ref_logits(*ref_params, temperature=0.7)
    z_t = ref_logits(*(t_cuda[k].float() for k in ("hidden", "weight", "bias")), temperature=0.7)
    ref = ref_kl(z_s, z_t, direction)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), ref_params)
    torch.testing.assert_close(out.float(), ref.detach(), rtol=1e-4, atol=1e-4)
    for g, rg in zip(grads, ref_grads):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), rg, rtol=2e-2, atol=2e-2 * rg.abs().max().item())


# ---------------------------------------------------------------------------------------------------------------------
# Token-level RL statistics: UCAS self-certainty and TW-GRPO divergence from hidden states
# ---------------------------------------------------------------------------------------------------------------------

from trl_tokenlevel.ops.advantages import (  # noqa: E402
    TOKEN_ADVANTAGE_METHODS,
    TokenAdvantageInputs,
    tw_grpo_position_divergence,
    tw_grpo_token_weights,
    ucas_self_certainty,
    ucas_self_certainty_from_logprobs,
)
from trl_tokenlevel.ops.chunked import (  # noqa: E402
    chunked_mean_logits,
    chunked_sampled_logits,
    chunked_tw_grpo_divergence,
    chunked_tw_grpo_weights,
    chunked_ucas_statistics,
)


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_ucas_statistics_match_full_logits(softcap):
    """`s = z_y/T − log p_T(y) − mean(z)/T` equals `lse(z/T) − mean(z/T)`; the sampled logit is the raw `z_y`."""
    gen = torch.Generator().manual_seed(0)
    n, v, h = 12, 29, 8
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64)
    bias = torch.randn(v, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, v, (n,), generator=gen)
    temperature, scale = 0.8, 1.5
    z = ref_logits(hidden, weight, bias, logit_scale=scale, softcap=softcap)  # before temperature
    logps = torch.log_softmax(z / temperature, -1).gather(-1, targets[:, None]).squeeze(-1)
    kw = dict(logit_scale=scale, softcap=softcap)
    torch.testing.assert_close(chunked_mean_logits(hidden, weight, bias, vocab_chunk=7, token_chunk=5, **kw),
                               z.mean(-1), **FP64)  # fmt: skip
    z_y = z.gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(chunked_sampled_logits(hidden, weight, bias, targets, **kw), z_y, **FP64)
    certainty, sampled = chunked_ucas_statistics(hidden, weight, bias, targets, logps, temperature=temperature,
                                                 vocab_chunk=7, token_chunk=5, **kw)  # fmt: skip
    expected = ucas_self_certainty(z / temperature)
    torch.testing.assert_close(certainty, expected, **FP64)
    torch.testing.assert_close(sampled, z_y, **FP64)
    torch.testing.assert_close(ucas_self_certainty_from_logprobs(z_y, logps, z.mean(-1), temperature), expected,
                               **FP64)  # fmt: skip


def test_ucas_statistics_fp32_and_validation():
    gen = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(4, 8, generator=gen), torch.randn(11, 8, generator=gen)
    targets = torch.tensor([0, 3, 10, 5])
    z = hidden @ weight.t()
    logps = torch.log_softmax(z, -1).gather(-1, targets[:, None]).squeeze(-1)
    certainty, _ = chunked_ucas_statistics(hidden, weight, None, targets, logps)
    assert certainty.dtype == torch.float32
    torch.testing.assert_close(certainty, ucas_self_certainty(z), **FP32)
    with pytest.raises(ValueError, match="target_logps"):
        chunked_ucas_statistics(hidden, weight, None, targets, logps[:3])
    with pytest.raises(ValueError, match="targets"):
        chunked_sampled_logits(hidden, weight, None, torch.tensor([0, 1, 2, 11]))


def _tw_case(softcap):
    gen = torch.Generator().manual_seed(0)
    rows, width, h, v = 6, 5, 8, 37
    hidden = torch.randn(rows, width, h, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64)
    bias = torch.randn(v, generator=gen, dtype=torch.float64)
    mask = torch.ones(rows, width, dtype=torch.long)
    mask[1, 3:] = 0
    mask[4, 1:] = 0
    group_ids = torch.tensor([7, 7, 7, 3, 3, 3])  # any labels; group 3 sorts first
    kw = dict(temperature=0.7, logit_scale=1.3, softcap=softcap)
    full_logps = torch.log_softmax(ref_logits(hidden, weight, bias, **kw), -1)
    return hidden, weight, bias, mask, group_ids, kw, full_logps


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_tw_grpo_divergence_and_weights_match_full_logits(softcap):
    hidden, weight, bias, mask, group_ids, kw, full_logps = _tw_case(softcap)
    group_index = torch.unique(group_ids, return_inverse=True)[1]
    expected_divergence = tw_grpo_position_divergence(full_logps, mask, group_index)[group_index]
    divergence = chunked_tw_grpo_divergence(hidden, weight, bias, mask, group_ids, vocab_chunk=10, token_chunk=2, **kw)
    torch.testing.assert_close(divergence, expected_divergence, **FP64)
    expected = tw_grpo_token_weights(full_logps, mask, group_index, tw_alpha=1.7)
    weights = chunked_tw_grpo_weights(hidden, weight, bias, mask, group_ids, tw_alpha=1.7, vocab_chunk=10,
                                      token_chunk=2, **kw)  # fmt: skip
    torch.testing.assert_close(weights, expected, **FP64)
    # fp32 inputs compute in fp32.
    weights32 = chunked_tw_grpo_weights(hidden.float(), weight.float(), bias.float(), mask, group_ids, tw_alpha=1.7,
                                        vocab_chunk=16, **kw)  # fmt: skip
    assert weights32.dtype == torch.float32
    torch.testing.assert_close(weights32.double(), expected, atol=1e-5, rtol=0)


def test_tw_grpo_registry_without_full_distributions():
    """The `tw_grpo` registry entry on the chunked divergence equals the entry on (B, T, V) log-probs, α applied by
    the entry; `tw_weight_grad=True` needs the full log-probabilities."""
    hidden, weight, bias, mask, group_ids, kw, full_logps = _tw_case(None)
    rows, width = mask.shape
    common = dict(
        completion_ids=torch.zeros(rows, width, dtype=torch.long),
        completion_mask=mask,
        per_token_logps=torch.zeros(rows, width, dtype=torch.float64),
        per_token_entropy=torch.zeros(rows, width, dtype=torch.float64),
        rewards=torch.zeros(rows, dtype=torch.float64),
        advantages=torch.tensor([1.0, -0.5, 0.2, 0.7, -1.0, 0.3], dtype=torch.float64),
        group_ids=group_ids,
    )
    divergence = chunked_tw_grpo_divergence(hidden, weight, bias, mask, group_ids, vocab_chunk=10, **kw)
    chunked = TokenAdvantageInputs(**common, tw_grpo_divergence=divergence)
    full = TokenAdvantageInputs(**common, full_logps=full_logps)
    for alpha in (1.7, 1.4):
        torch.testing.assert_close(TOKEN_ADVANTAGE_METHODS["tw_grpo"](chunked, tw_alpha=alpha),
                                   TOKEN_ADVANTAGE_METHODS["tw_grpo"](full, tw_alpha=alpha), **FP64)  # fmt: skip
    with pytest.raises(ValueError, match="full_logps"):
        TOKEN_ADVANTAGE_METHODS["tw_grpo"](chunked, tw_weight_grad=True)
    with pytest.raises(ValueError, match="tw_grpo_divergence"):
        TOKEN_ADVANTAGE_METHODS["tw_grpo"](TokenAdvantageInputs(**common))


def test_tw_grpo_spec_example_through_the_chunked_path():
    """Spec §8 worked example (G = 2, L = 3, V = 3): hidden states equal to the log-probabilities with an identity head
    reproduce the given distributions, so the chunked weights must be [1.7, 1.0, 1.074594] / [1.7, 1.0, 0]."""
    probs = torch.tensor([[[0.7, 0.2, 0.1], [0.5, 0.3, 0.2], [0.6, 0.2, 0.2]],
                          [[0.1, 0.2, 0.7], [0.5, 0.3, 0.2], [1 / 3, 1 / 3, 1 / 3]]], dtype=torch.float64)  # fmt: skip
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    divergence = chunked_tw_grpo_divergence(probs.log(), torch.eye(3, dtype=torch.float64), None, mask,
                                            torch.tensor([0, 0]), vocab_chunk=2)  # fmt: skip
    for row in divergence:
        for value, printed in zip(row.tolist(), (1.023716, 0.0, 0.109090)):
            assert abs(value - printed) <= 5e-7
    weights = chunked_tw_grpo_weights(probs.log(), torch.eye(3, dtype=torch.float64), None, mask,
                                      torch.tensor([0, 0]), tw_alpha=1.7, vocab_chunk=2)  # fmt: skip
    torch.testing.assert_close(weights, torch.tensor([[1.7, 1.0, 1.074594], [1.7, 1.0, 0.0]], dtype=torch.float64),
                               atol=5e-7, rtol=0)  # fmt: skip
