"""Full-distribution token losses (TDPO, SparsePO, MaPO, AlignDistil) inside TokenDPOTrainer: chunked hidden-state
path vs a plain full-logits reference, no logits on the training path, mask training and checkpointing."""

from __future__ import annotations

import os

import pytest
import torch

from trl_tokenlevel import TokenDPOConfig, TokenDPOTrainer
from trl_tokenlevel.ops.preference import aligndistil_loss_from_logits, per_token_kl_from_logits, tdpo_loss
from trl_tokenlevel.tiny import build_tiny_model

from .dpo_utils import assert_params_equal, base_args, load


@pytest.fixture(scope="module")
def pairs(tiny_preference_dataset):
    return tiny_preference_dataset.select(range(8))


def _perturbed(path, seed):
    model = load(path)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model


def _logits(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()


def _grads(model):
    return {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}


def _trainer(tiny_model_path, tiny_tokenizer, pairs, tmp_path, **config):
    policy = _perturbed(tiny_model_path, seed=3)
    teachers = config.pop("aligndistil_teachers", None)
    args = TokenDPOConfig(**base_args(tmp_path, beta=0.5, **config))
    kwargs = {"aligndistil_teachers": teachers} if teachers else {}
    trainer = TokenDPOTrainer(model=policy, ref_model=load(tiny_model_path), args=args, train_dataset=pairs,
                              processing_class=tiny_tokenizer, **kwargs)  # fmt: skip
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    return trainer, policy, batch


@pytest.mark.parametrize("variant", ["tdpo1", "tdpo2"])
@pytest.mark.parametrize("kernel", ["torch", "trl"])
def test_tdpo_matches_full_logits_reference(variant, kernel, tiny_model_path, tiny_tokenizer, pairs, tmp_path):
    trainer, policy, batch = _trainer(tiny_model_path, tiny_tokenizer, pairs, tmp_path, token_loss_type=variant,
                                      token_kernel=kernel, tdpo_alpha=0.7)  # fmt: skip
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    ours = _grads(trainer.model)

    naive = _perturbed(tiny_model_path, seed=3).train()
    ref = load(tiny_model_path)
    mask = batch["completion_mask"][:, 1:].float()
    logits = _logits(naive, batch)
    with torch.no_grad():
        ref_logits = _logits(ref, batch)
    targets = batch["input_ids"][:, 1:, None]
    delta = (logits.log_softmax(-1).gather(-1, targets) - ref_logits.log_softmax(-1).gather(-1, targets)).squeeze(-1)
    kl = per_token_kl_from_logits(logits, ref_logits)
    expected, _ = tdpo_loss(*(delta * mask).chunk(2), *kl.chunk(2), *mask.chunk(2), 0.5, alpha=0.7, variant=variant)
    expected = expected.mean()
    expected.backward()
    assert trainer._metrics["train"]["seq_kl/chosen"][-1] > 1e-4  # the KL term is really there
    torch.testing.assert_close(loss.detach(), expected.detach(), atol=1e-5, rtol=1e-5)
    for name, param in naive.named_parameters():
        torch.testing.assert_close(ours[name], param.grad, atol=2e-5, rtol=1e-4, msg=f"gradient of {name}")


@pytest.mark.parametrize("token_loss_type", ["tdpo2", "mapo", "sparsepo"])
def test_no_full_logits_on_training_path(token_loss_type, tiny_model_path, tiny_tokenizer, pairs, tmp_path):
    """The LM head module is never called: every per-token quantity comes from hidden states in tiles."""
    trainer, policy, batch = _trainer(tiny_model_path, tiny_tokenizer, pairs, tmp_path, token_loss_type=token_loss_type)

    def forbidden(*args, **kwargs):
        raise AssertionError("lm_head called: full logits were materialised on the training path")

    for model in (trainer.model, trainer.ref_model):
        model.get_output_embeddings().forward = forbidden
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    assert torch.isfinite(loss)


@pytest.mark.parametrize("hooks", ["all", "resid"])
def test_mapo_trains_with_masks_in_unit_interval(hooks, tiny_model_path, tiny_tokenizer, pairs, tmp_path):
    args = TokenDPOConfig(**base_args(tmp_path, token_loss_type="mapo", mapo_hooks=hooks))
    trainer = TokenDPOTrainer(model=tiny_model_path, args=args, train_dataset=pairs, processing_class=tiny_tokenizer)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all(0.0 <= entry["mask/min"] <= entry["mask/max"] <= 1.0 for entry in logs)
    assert all(0.0 < entry["mask/chosen_mean"] < 1.0 for entry in logs)


def test_mapo_resid_mask_matches_hidden_state_reference(tiny_model_path, tiny_tokenizer, pairs, tmp_path):
    """MaPO 'resid' mask = mean of zn_rescale over decoder-layer outputs and the final norm, at predicting positions."""
    from trl_tokenlevel.ops.preference import mapo_zn_rescale

    trainer, policy, batch = _trainer(tiny_model_path, tiny_tokenizer, pairs, tmp_path, token_loss_type="mapo",
                                      mapo_hooks="resid")  # fmt: skip
    captured = {}
    original = trainer._token_masks

    def spy(*args, **kwargs):
        captured.update(original(*args, **kwargs))
        return captured

    trainer._token_masks = spy
    trainer.compute_loss(trainer.model, batch)
    ref = load(tiny_model_path)
    layer_outputs = []
    hooks = [layer.register_forward_hook(lambda m, a, o: layer_outputs.append(o[0] if isinstance(o, tuple) else o))
             for layer in ref.model.layers]  # fmt: skip
    with torch.no_grad():
        final = ref.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    for hook in hooks:
        hook.remove()
    valid = batch["completion_mask"][:, 1:].bool()
    masks = [mapo_zn_rescale(h[:, :-1].float().mean(-1), valid) for h in [*layer_outputs, final]]
    torch.testing.assert_close(captured["reward_mask"], torch.stack(masks).mean(0), atol=1e-5, rtol=0)


def test_sparsepo_masks_train_checkpoint_and_resume(tiny_model_path, tiny_tokenizer, pairs, tmp_path):
    def trainer():
        args = TokenDPOConfig(**base_args(tmp_path / "run", token_loss_type="sparsepo", sparsepo_independent_masks=True,
                                          sparsepo_l1_reward=1e-3, save_strategy="steps", save_steps=2, max_steps=4,
                                          sparsepo_mask_dropout=0.0))  # fmt: skip
        return TokenDPOTrainer(model=tiny_model_path, args=args, train_dataset=pairs, processing_class=tiny_tokenizer)

    straight = trainer()
    initial = [p.clone() for mask in straight.sparsepo_masks for p in mask.parameters()]
    straight.train()
    trained = [p for mask in straight.sparsepo_masks for p in mask.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(initial, trained)), "mask parameters must be trained"
    groups = [g for g in straight.optimizer.param_groups if g.get("sparsepo_mask")]
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.01
    assert os.path.exists(tmp_path / "run" / "checkpoint-2" / "sparsepo_mask.pt")
    logs = [entry for entry in straight.state.log_history if "loss" in entry]
    assert "mask/chosen_sparsity" in logs[0] and "seq_kl/margin" in logs[0]

    resumed = trainer()
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert_params_equal(straight.model, resumed.model)
    for a, b in zip(straight.sparsepo_masks, resumed.sparsepo_masks):
        assert_params_equal(a, b)


@pytest.mark.parametrize(
    "mode,official",
    [
        ("aligndistil", False),
        ("aligndistil", True),
        ("theorem1", False),
        ("theorem1_contrast", False),
        ("theorem1_adaptive", False),
    ],
)
def test_aligndistil_matches_full_logits_reference(mode, official, tiny_model_path, tiny_tokenizer, pairs, tmp_path):
    dpo_teacher = build_tiny_model(tiny_tokenizer, seed=11).eval()
    reverse_teacher = build_tiny_model(tiny_tokenizer, seed=12).eval()
    trainer, policy, batch = _trainer(
        tiny_model_path, tiny_tokenizer, pairs, tmp_path, token_loss_type="aligndistil", aligndistil_mode=mode,
        aligndistil_official_positions=official, aligndistil_temperature=0.8,
        aligndistil_teachers=(dpo_teacher, reverse_teacher),
    )  # fmt: skip
    assert (trainer.ref_model is None) == (mode != "theorem1")
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    ours = _grads(trainer.model)

    naive = _perturbed(tiny_model_path, seed=3).train()
    chosen = {k: v[: v.shape[0] // 2] for k, v in batch.items()}
    mask = (chosen["completion_mask"][:, :-1] if official else chosen["completion_mask"][:, 1:]).float()
    with torch.no_grad():
        teacher_logits = [_logits(m, chosen) for m in (dpo_teacher, reverse_teacher, load(tiny_model_path))]
    expected, _ = aligndistil_loss_from_logits(
        _logits(naive, chosen), teacher_logits[0], teacher_logits[1], mask, beta=0.5, beta2=10.0, temperature=0.8,
        mode=mode, ref_logits=teacher_logits[2],
    )  # fmt: skip
    expected = expected.mean()
    expected.backward()
    torch.testing.assert_close(loss.detach(), expected.detach(), atol=1e-5, rtol=1e-5)
    for name, param in naive.named_parameters():
        torch.testing.assert_close(ours[name], param.grad, atol=2e-5, rtol=1e-4, msg=f"gradient of {name}")


def test_aligndistil_trains_and_logs(tiny_model_path, tiny_tokenizer, pairs, tmp_path):
    teachers = (build_tiny_model(tiny_tokenizer, seed=11), build_tiny_model(tiny_tokenizer, seed=12))
    args = TokenDPOConfig(**base_args(tmp_path, token_loss_type="aligndistil"))
    trainer = TokenDPOTrainer(model=tiny_model_path, args=args, train_dataset=pairs, processing_class=tiny_tokenizer,
                              aligndistil_teachers=teachers)  # fmt: skip
    trainer.train()
    log = trainer.state.log_history[0]
    assert log["aligndistil/omega_mean"] > 1e-3 and log["aligndistil/kl_mean"] > 0


def test_full_distribution_refuses_precompute(tmp_path):
    with pytest.raises(ValueError, match="cannot be cached"):
        TokenDPOConfig(**base_args(tmp_path, token_loss_type="tdpo2", precompute_ref_log_probs=True))


@pytest.mark.parametrize("mode,official", [("aligndistil", False), ("aligndistil", True), ("theorem1_adaptive", False)])
def test_aligndistil_on_policy_matches_full_logits_reference(mode, official, tiny_model_path, tiny_tokenizer, pairs,
                                                             tmp_path):  # fmt: skip
    """On-policy: the chosen response is replaced by one policy sample per prompt (temperature 1), which the teachers
    score; the chunked loss equals the full-logits reference on that sample (value and gradients). Official positions:
    the causal shift without the position predicting the first response token."""
    dpo_teacher = build_tiny_model(tiny_tokenizer, seed=11).eval()
    reverse_teacher = build_tiny_model(tiny_tokenizer, seed=12).eval()
    trainer, policy, batch = _trainer(
        tiny_model_path, tiny_tokenizer, pairs, tmp_path, token_loss_type="aligndistil", aligndistil_mode=mode,
        aligndistil_on_policy=True, aligndistil_max_new_tokens=6, aligndistil_official_positions=official,
        aligndistil_teachers=(dpo_teacher, reverse_teacher),
    )  # fmt: skip
    samples = []
    sample = trainer._aligndistil_policy_samples

    def spy(*args):
        samples.append(sample(*args))
        return samples[-1]

    trainer._aligndistil_policy_samples = spy
    trainer.model.train()
    torch.manual_seed(0)
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    ours = _grads(trainer.model)

    input_ids, attention_mask, completion_mask = samples[0]
    half = batch["input_ids"].shape[0] // 2
    chosen_prompt = batch["attention_mask"][:half].bool() & ~batch["completion_mask"][:half].bool()
    for i in range(half):  # same prompt, a fresh response of 1..6 tokens
        prompt = batch["input_ids"][i][chosen_prompt[i]]
        assert torch.equal(input_ids[i, : len(prompt)], prompt)
        assert completion_mask[i, : len(prompt)].sum() == 0 and 1 <= completion_mask[i].sum() <= 6
        assert attention_mask[i].sum() == len(prompt) + completion_mask[i].sum()
    sampled = {"input_ids": input_ids, "attention_mask": attention_mask}
    mask = completion_mask[:, 1:].float()
    if official:
        first = (completion_mask.cumsum(1) == 1) & completion_mask.bool()
        mask = mask * ~first[:, 1:]
        assert mask.sum() == completion_mask.sum() - half
    naive = _perturbed(tiny_model_path, seed=3).train()
    with torch.no_grad():
        teacher_logits = [_logits(m, sampled) for m in (dpo_teacher, reverse_teacher)]
    expected, _ = aligndistil_loss_from_logits(_logits(naive, sampled), *teacher_logits, mask, beta=0.5, beta2=10.0,
                                               mode=mode)  # fmt: skip
    expected = expected.mean()
    expected.backward()
    torch.testing.assert_close(loss.detach(), expected.detach(), atol=1e-5, rtol=1e-5)
    for name, param in naive.named_parameters():
        torch.testing.assert_close(ours[name], param.grad, atol=2e-5, rtol=1e-4, msg=f"gradient of {name}")


def test_aligndistil_on_policy_trains(tiny_model_path, tiny_tokenizer, pairs, tmp_path):
    teachers = (build_tiny_model(tiny_tokenizer, seed=11), build_tiny_model(tiny_tokenizer, seed=12))
    args = TokenDPOConfig(**base_args(tmp_path, token_loss_type="aligndistil", aligndistil_on_policy=True,
                                      aligndistil_max_new_tokens=4, aligndistil_beta2=15.0))  # fmt: skip
    trainer = TokenDPOTrainer(model=tiny_model_path, args=args, train_dataset=pairs, processing_class=tiny_tokenizer,
                              aligndistil_teachers=teachers)  # fmt: skip
    trainer.train()
    log = trainer.state.log_history[0]
    assert log["aligndistil/omega_mean"] > 1e-3 and log["aligndistil/kl_mean"] > 0


# ---------------------------------------------------------------------------------------------------------------------
# The fused full-distribution pass (token_kernel="torch"; "auto" on CPU) against the two-pass path it replaces
# (token_kernel="trl": TRL's fused log-prob head, then TRL's chunked divergence)
# ---------------------------------------------------------------------------------------------------------------------

FUSED_CASES = {
    "tdpo1": dict(token_loss_type="tdpo1"),
    "tdpo2": dict(token_loss_type="tdpo2", tdpo_alpha=0.7),
    "tdpo2_checkpointing": dict(token_loss_type="tdpo2", gradient_checkpointing=True),
    "sparsepo": dict(token_loss_type="sparsepo", sparsepo_independent_masks=True, sparsepo_mask_dropout=0.0),
    "mapo": dict(token_loss_type="mapo", mapo_hooks="all"),
    "aligndistil": dict(token_loss_type="aligndistil", aligndistil_temperature=0.8),
    "aligndistil_official": dict(token_loss_type="aligndistil", aligndistil_official_positions=True),
    "theorem1": dict(token_loss_type="aligndistil", aligndistil_mode="theorem1"),
    "theorem1_adaptive": dict(token_loss_type="aligndistil", aligndistil_mode="theorem1_adaptive"),
}


def _loss_grads_metrics(tiny_model_path, tiny_tokenizer, pairs, tmp_path, kernel, config):
    config = dict(config)
    if config["token_loss_type"] == "aligndistil":
        config["aligndistil_teachers"] = (build_tiny_model(tiny_tokenizer, seed=11).eval(),
                                          build_tiny_model(tiny_tokenizer, seed=12).eval())  # fmt: skip
    torch.manual_seed(0)  # the same SparsePO mask initialisation for both kernels
    trainer, policy, batch = _trainer(tiny_model_path, tiny_tokenizer, pairs, tmp_path / kernel, token_kernel=kernel,
                                      **config)  # fmt: skip
    assert trainer.fused_distribution == (kernel == "torch")
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = _grads(trainer.model)
    if trainer.sparsepo_masks is not None:
        grads.update({f"mask{i}.{n}": p.grad.clone() for i, m in enumerate(trainer.sparsepo_masks)
                      for n, p in m.named_parameters()})  # fmt: skip
    metrics = {key: values[-1] for key, values in trainer._metrics["train"].items()}
    return loss.detach(), grads, metrics


@pytest.mark.parametrize("case", list(FUSED_CASES))
def test_fused_pass_matches_two_pass_path(case, tiny_model_path, tiny_tokenizer, pairs, tmp_path):
    """Loss, every gradient and every logged metric (entropy, logits/*, mean_token_accuracy, logps/*, rewards/*,
    seq_kl/*, mask/*, aligndistil/*) agree with the two-pass path to fp32 precision."""
    two_pass = _loss_grads_metrics(tiny_model_path, tiny_tokenizer, pairs, tmp_path, "trl", FUSED_CASES[case])
    fused = _loss_grads_metrics(tiny_model_path, tiny_tokenizer, pairs, tmp_path, "torch", FUSED_CASES[case])
    torch.testing.assert_close(fused[0], two_pass[0], atol=1e-5, rtol=1e-5)
    assert fused[1].keys() == two_pass[1].keys()
    for name, grad in two_pass[1].items():
        torch.testing.assert_close(fused[1][name], grad, atol=2e-5, rtol=1e-4, msg=f"gradient of {name}")
    assert fused[2].keys() == two_pass[2].keys()
    for key, value in two_pass[2].items():
        assert fused[2][key] == pytest.approx(value, abs=1e-5, rel=1e-5), key


@pytest.mark.parametrize("case", ["tdpo2", "sparsepo", "mapo", "aligndistil", "theorem1"])
def test_fused_pass_replaces_trl_logprob_head(case, tiny_model_path, tiny_tokenizer, pairs, tmp_path, monkeypatch):
    """With the fused pass, neither TRL's log-prob kernel nor the LM-head module runs: each head is read by the one
    tiled pass only."""
    import trl.trainer.utils

    config = dict(FUSED_CASES[case])
    if config["token_loss_type"] == "aligndistil":
        config["aligndistil_teachers"] = (
            build_tiny_model(tiny_tokenizer, seed=11),
            build_tiny_model(tiny_tokenizer, seed=12),
        )
    trainer, policy, batch = _trainer(tiny_model_path, tiny_tokenizer, pairs, tmp_path, token_kernel="torch", **config)

    def forbidden(*args, **kwargs):
        raise AssertionError("a separate log-prob pass or the LM-head module ran")

    monkeypatch.setattr(trl.trainer.utils._ChunkedLogProbFunction, "apply", forbidden)
    for model in (trainer.model, trainer.ref_model, *(trainer.aligndistil_teachers or ())):
        if model is not None:
            model.get_output_embeddings().forward = forbidden
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    assert torch.isfinite(loss)


def test_fused_pass_all_masked_batch_gives_zero_loss_gradient(tiny_model_path, tiny_tokenizer, pairs, tmp_path):
    trainer, policy, batch = _trainer(tiny_model_path, tiny_tokenizer, pairs, tmp_path, token_loss_type="tdpo2")
    batch["completion_mask"] = torch.zeros_like(batch["completion_mask"])
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    assert loss.item() == pytest.approx(torch.nn.functional.softplus(torch.tensor(0.0)).item())  # -log σ(0)
    assert all(torch.isfinite(g).all() for g in _grads(trainer.model).values())


@pytest.mark.slow  # ~25 s: three processes each import TRL
def test_fused_tdpo2_two_process_ddp_matches_single_process(tiny_model_path, tmp_path):
    """The backbone-only forward goes through DDP: two processes with batch 1 train like one with batch 2."""
    from .test_token_dpo_ddp import _run

    single = _run(1, 2, tiny_model_path, tmp_path / "single", token_loss_type="tdpo2")
    ddp = _run(2, 1, tiny_model_path, tmp_path / "ddp", token_loss_type="tdpo2")
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    assert ddp["losses"] == pytest.approx(single["losses"], abs=1e-5)
    assert ddp["param_norm"] == pytest.approx(single["param_norm"], abs=1e-5)
    assert ddp["param_sum"] == pytest.approx(single["param_sum"], abs=1e-4)


def test_fused_pass_with_lora_reference_matches_two_pass(tiny_model_path, tiny_tokenizer, pairs, tmp_path):
    """PEFT: the reference is the policy with its adapter disabled; the backbone-only forward keeps that working."""
    from peft import LoraConfig

    results = []
    for kernel in ("trl", "torch"):
        torch.manual_seed(0)
        args = TokenDPOConfig(**base_args(tmp_path / kernel, beta=0.5, token_loss_type="tdpo2", token_kernel=kernel))
        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                 init_lora_weights=False)  # fmt: skip
        trainer = TokenDPOTrainer(model=tiny_model_path, args=args, train_dataset=pairs, processing_class=tiny_tokenizer,
                                  peft_config=peft_config)  # fmt: skip
        assert trainer.ref_model is None and trainer.fused_distribution == (kernel == "torch")
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        assert trainer._metrics["train"]["seq_kl/chosen"][-1] > 1e-6  # the adapter moved the policy off the reference
        results.append((loss.detach(), _grads(trainer.model)))
    (two_pass, two_pass_grads), (fused, fused_grads) = results
    torch.testing.assert_close(fused, two_pass, atol=1e-5, rtol=1e-5)
    assert fused_grads.keys() == two_pass_grads.keys() and fused_grads
    for name, grad in two_pass_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, atol=2e-5, rtol=1e-4, msg=name)


def test_fused_pass_keeps_the_moe_load_balancing_loss(tiny_tokenizer, pairs, tmp_path):
    """A Mixtral-style MoE policy: the backbone-only forward adds the router loss as TRL's head does, so loss,
    gradients (router weights included) and the logged aux_loss equal the two-pass path's."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           output_router_logits=True, router_aux_loss_coef=0.3, pad_token_id=tiny_tokenizer.pad_token_id,
                           tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    path = str(tmp_path / "moe")
    MixtralForCausalLM(config).save_pretrained(path)
    results = []
    for kernel in ("trl", "torch"):
        args = TokenDPOConfig(**base_args(tmp_path / kernel, beta=0.5, token_loss_type="tdpo2", token_kernel=kernel))
        trainer = TokenDPOTrainer(model=_perturbed(path, seed=3), ref_model=load(path), args=args, train_dataset=pairs,
                                  processing_class=tiny_tokenizer)  # fmt: skip
        assert trainer.aux_loss_enabled and trainer.fused_distribution == (kernel == "torch")
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        results.append((loss.detach(), _grads(trainer.model), trainer._metrics["train"]["aux_loss"][-1]))
    (two_pass, two_pass_grads, two_pass_aux), (fused, fused_grads, fused_aux) = results
    assert fused_aux == pytest.approx(two_pass_aux, rel=1e-6) and fused_aux > 0
    torch.testing.assert_close(fused, two_pass, atol=1e-5, rtol=1e-5)
    assert fused_grads.keys() == two_pass_grads.keys() and any("gate" in name for name in fused_grads)
    for name, grad in two_pass_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, atol=2e-5, rtol=1e-4, msg=name)
