"""TokenGRPOTrainer end to end: every method trains a tiny model a few steps with generation on CPU; the user hook,
stages, forward budget and validation. The hidden-state statistics (UCAS, TW-GRPO) are ops, tested in
`tests/ops/test_chunked.py` against full-logits references."""

from __future__ import annotations

import math

import pytest
import torch

from tests.ports import free_port
from trl_tokenlevel.data.builtin.grpo import load_tiny_grpo_dataset
from trl_tokenlevel.ops.advantages import TokenAdvantageInputs
from trl_tokenlevel.trainers.token_grpo_config import TokenGRPOConfig
from trl_tokenlevel.trainers.token_grpo_trainer import TokenGRPOBatch, TokenGRPOTrainer, _ExpertBatches

from .test_token_grpo_parity import assert_logs_equal, assert_params_changed, assert_params_equal, grpo_args, train


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(tiny_model_path)


@pytest.fixture(scope="module")
def dpo_model_path(tokenizer, tmp_path_factory):
    """A second tiny model (other seed) standing in for a DPO-trained model in the RTO token-reward tests."""
    from trl_tokenlevel.tiny import build_tiny_model, save_tiny_pair

    return save_tiny_pair(build_tiny_model(tokenizer, seed=1), tokenizer, str(tmp_path_factory.mktemp("tiny_dpo")))


def _last_metrics(trainer) -> dict:
    merged = {}
    for entry in trainer.state.log_history:
        if "loss" in entry:
            merged.update(entry)
    return merged


# (config overrides, metrics that must be logged). The random tiny model has near-uniform next-token distributions
# (H ≈ 5.9 nats), so GTPO's entropy filter (0.7) would zero every advantage: the test raises it.
METHODS = {
    "entropy_quantile": ({"token_selection": "entropy_quantile"}, ["token/selected_frac", "token/entropy_selected"]),
    "entropy_quantile_topk_selected": (
        {
            "token_selection": "entropy_quantile",
            "entropy_selection": "topk",
            "entropy_scope": "local",
            "entropy_normalize": "selected",
        },
        ["token/selected_frac"],
    ),
    "entropy_band": ({"token_selection": "entropy_band", "band_high": 5.0}, ["token/band_penalty"]),
    "ucas": ({"token_advantage": "ucas"}, ["token/adv_after/mean"]),
    "hapo": ({"token_advantage": "hapo"}, ["token/hapo/eps_low/mean", "token/hapo/sampling_temperature"]),
    "gtpo": (
        {
            "token_advantage": "gtpo",
            "gtpo_entropy_threshold": 10.0,
            "loss_type": "grpo",
            "entropy_normalize": "selected",
        },
        ["token/adv_after/mean"],
    ),  # fmt: skip
    "d3s": ({"token_advantage": "d3s"}, ["token/d3s/kept_tokens_frac", "token/d3s/sample_keep_ratio"]),
    "tw_grpo": ({"token_advantage": "tw_grpo"}, ["token/tw_weight/max"]),
    "tempo": ({"token_advantage": "tempo"}, ["token/adv_after/max"]),
    "rmt": (
        {
            "rmt_budget_init": 8,
            "rmt_budget_min": 2,
            "token_selection": "entropy_quantile",
            "rmt_ntp_coef": 0.1,
            "rmt_ntp_source": "unselected",
        },
        ["token/rmt_ntp_loss", "rewards/rmt_length/mean", "rmt/budget"],
    ),  # fmt: skip
    "hapo_rollout_stage_ga2": (
        {"token_advantage": "hapo", "gradient_accumulation_steps": 2, "max_steps": 2},
        ["token/hapo/eps_high/mean"],
    ),  # fmt: skip
}


@pytest.mark.parametrize("method", list(METHODS))
def test_method_trains_end_to_end(method, tiny_model_path, tokenizer, tmp_path):
    overrides, metrics = METHODS[method]
    trainer = train(TokenGRPOTrainer, grpo_args(tmp_path, **overrides), tiny_model_path, tokenizer)
    assert trainer.state.log_history[-1]["train_loss"] is not None
    logged = _last_metrics(trainer)
    for name in metrics + ["token/adv_before/mean", "token/adv_after/std"]:
        assert name in logged, f"{name} not logged; got {sorted(logged)}"
        assert math.isfinite(logged[name])
    assert_params_changed(trainer, tiny_model_path)


def test_rto_token_rewards_from_a_dpo_model(tiny_model_path, dpo_model_path, tokenizer, tmp_path):
    args = grpo_args(tmp_path, token_reward_source="rto", token_reward_clip=0.0)
    trainer = train(TokenGRPOTrainer, args, tiny_model_path, tokenizer, token_reward_model=dpo_model_path)
    logged = _last_metrics(trainer)
    assert logged["token/token_reward/mean"] != 0.0  # the two models differ, so the DPO log-ratio is not 0
    # Dense rewards shift token advantages within a completion: the shaped ones differ from the stock ones.
    assert logged["token/adv_after/std"] != pytest.approx(logged["token/adv_before/std"], abs=1e-6)
    assert_params_changed(trainer, tiny_model_path)


def test_chord_mixes_expert_sft_loss(tiny_model_path, tokenizer, tmp_path):
    expert = load_tiny_grpo_dataset().select(range(8)).rename_column("solution", "completion")
    args = grpo_args(tmp_path, chord=True, chord_mu_warmup_steps=0, chord_mu_decay_steps=0, chord_mu_peak=0.5,
                     chord_mu_valley=0.5)  # fmt: skip
    trainer = train(TokenGRPOTrainer, args, tiny_model_path, tokenizer, expert_dataset=expert)
    logged = _last_metrics(trainer)
    assert logged["chord/mu"] == pytest.approx(0.5)
    assert logged["chord/sft_loss"] > 0
    assert_params_changed(trainer, tiny_model_path)


def test_expert_batches_layout(tokenizer):
    from datasets import Dataset

    rows = Dataset.from_list([{"prompt": "Q: What is 1 plus 2?\nA:", "completion": " 3."},
                              {"prompt": "Q: Hi\nA:", "completion": " 1 plus 2 is 3."}])  # fmt: skip
    batches = _ExpertBatches(rows, tokenizer, rows_per_batch=2, max_completion_length=16, seed=0)
    input_ids, attention_mask, completion_mask = batches.next("cpu")
    width = completion_mask.shape[1]
    served = set()
    for i in range(2):
        completion = input_ids[i, -width:][completion_mask[i].bool()].tolist()
        prompt = input_ids[i, :-width][attention_mask[i, :-width].bool()].tolist()
        assert attention_mask[i, -width:].tolist() == completion_mask[i].tolist()
        assert completion[-1] == tokenizer.eos_token_id  # EOS appended to plain-text completions
        assert (prompt, completion) in [
            (list(p), list(c)) for p, c in batches.rows
        ]  # left-padded prompt, right-padded completion
        served.add(tuple(completion))
    assert len(served) == 2  # one epoch of the shuffled rows before any repeat


def test_loss_and_rollout_stages_agree(tiny_model_path, tokenizer, tmp_path):
    """With one micro-step per generation and one iteration, the rollout forward and the training forward see the same
    policy: shaping at either stage gives the same training."""
    runs = []
    for stage in ("loss", "rollout"):
        args = grpo_args(tmp_path / stage, token_selection="entropy_quantile", token_advantage="tempo",
                         token_shaping_stage=stage)  # fmt: skip
        runs.append(train(TokenGRPOTrainer, args, tiny_model_path, tokenizer))
    assert_logs_equal(runs[0].state.log_history, runs[1].state.log_history, atol=1e-5)
    assert_params_equal(runs[0].model, runs[1].model, atol=1e-5)


def test_token_advantage_fn_receives_the_rollout_batch(tiny_model_path, tokenizer, tmp_path):
    seen = []

    def doubled(batch: TokenAdvantageInputs) -> torch.Tensor:
        seen.append(batch)
        return 2.0 * batch.advantages[:, None] * batch.completion_mask

    trainer = train(TokenGRPOTrainer, grpo_args(tmp_path), tiny_model_path, tokenizer, token_advantage_fn=doubled)
    batch = seen[0]
    assert isinstance(batch, TokenGRPOBatch)
    rows, width = batch.completion_ids.shape
    assert rows == 4 and width == 8
    for name in ("per_token_logps", "per_token_entropy", "completion_mask"):
        assert getattr(batch, name).shape == (rows, width)
    assert batch.rewards.shape == batch.advantages.shape == batch.group_ids.shape == (rows,)
    assert torch.bincount(batch.group_index).tolist() == [2, 2]  # whole groups of num_generations
    assert (batch.per_token_entropy[batch.completion_mask.bool()] > 0).all()
    logged = _last_metrics(trainer)
    assert logged["token/adv_after/max"] == pytest.approx(2 * logged["token/adv_before/max"], rel=1e-5)


def test_weights_output_and_subclass_hook(tiny_model_path, tokenizer, tmp_path):
    def halve(batch):
        return torch.full(batch.completion_ids.shape, 0.5)

    trainer = train(TokenGRPOTrainer, grpo_args(tmp_path / "fn", token_fn_output="weights"), tiny_model_path,
                    tokenizer, token_advantage_fn=halve)  # fmt: skip
    logged = _last_metrics(trainer)
    assert logged["token/adv_after/max"] == pytest.approx(0.5 * logged["token/adv_before/max"], rel=1e-5)

    class LastTokenOnly(TokenGRPOTrainer):
        def compute_token_advantages(self, batch):
            advantages = super().compute_token_advantages(batch)  # tempo, from the registry
            last = batch.completion_mask.cumsum(1) == batch.completion_mask.sum(1, keepdim=True)
            return advantages * last

    trainer = train(LastTokenOnly, grpo_args(tmp_path / "sub", token_advantage="tempo"), tiny_model_path, tokenizer)
    assert _last_metrics(trainer)["token/adv_after/mean"] != 0.0


def test_hapo_processor_drives_rollout_temperature(tiny_model_path, tokenizer, tmp_path):
    trainer = train(TokenGRPOTrainer, grpo_args(tmp_path, token_advantage="hapo", max_steps=3), tiny_model_path,
                    tokenizer)  # fmt: skip
    temperatures = [e["token/hapo/sampling_temperature"] for e in trainer.state.log_history
                    if "token/hapo/sampling_temperature" in e]  # fmt: skip
    assert temperatures[0] == pytest.approx(1.0)  # no statistics before the first training step: plain T
    assert any(t != pytest.approx(1.0, abs=1e-7) for t in temperatures[1:])  # then T·(1 + τ·ĥ)
    assert all(0.95 - 1e-6 <= t <= 1.05 + 1e-6 for t in temperatures)  # |τ·ĥ| ≤ τ = 0.05
    assert trainer._hapo_processor.stats is not None
    assert trainer.generation_config.temperature == 1.0 == trainer.temperature  # restored after each rollout
    assert "generate" not in trainer.accelerator.unwrap_model(trainer.model).__dict__  # the bound partial is gone


# --------------------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"token_selection": "entropy_quantile", "entropy_selection": "topk"}, "entropy_scope='local'"),
        (
            {"token_selection": "entropy_quantile", "loss_type": "dr_grpo", "entropy_normalize": "selected"},
            "entropy_normalize='selected'",
        ),
        (
            {"token_selection": "entropy_quantile", "loss_type": "luspo", "entropy_normalize": "selected"},
            "no token count",
        ),
        ({"token_selection": "entropy_quantile", "top_entropy_quantile": 0.2}, "top_entropy_quantile"),
        (
            {"token_advantage": "tempo", "token_shaping_stage": "loss", "gradient_accumulation_steps": 2},
            "steps_per_generation=1",
        ),
        ({"token_advantage": "hapo", "loss_type": "cispo"}, "not a clipped loss"),
        ({"token_advantage": "gtpo", "gtpo_entropy_filter": "readme"}, "initial policy"),
        ({"rmt_ntp_coef": 0.5, "rmt_ntp_source": "unselected"}, "token_selection"),
        ({"rmt_ntp_source": "documents"}, "rmt_ntp_source"),
        ({"token_advantage": "nope"}, "token_advantage='nope'"),
        ({"token_selection": "entropy_quantile", "entropy_top_ratio": 1.5}, "entropy_top_ratio"),
    ],
)
def test_config_rejects_contradictions(overrides, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        grpo_args(tmp_path, **overrides)


def test_trainer_rejects_misplaced_arguments(tiny_model_path, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="either `token_advantage_fn`"):
        TokenGRPOTrainer(model=tiny_model_path, reward_funcs=lambda completion_ids, **k: [0.0] * len(completion_ids),
                         args=grpo_args(tmp_path, token_advantage="tempo"), processing_class=tokenizer,
                         train_dataset=load_tiny_grpo_dataset().select(range(4)),
                         token_advantage_fn=lambda batch: batch.advantages)  # fmt: skip
    with pytest.raises(ValueError, match="chord=True"):
        TokenGRPOTrainer(model=tiny_model_path, reward_funcs=lambda completion_ids, **k: [0.0] * len(completion_ids),
                         args=grpo_args(tmp_path), processing_class=tokenizer,
                         train_dataset=load_tiny_grpo_dataset().select(range(4)),
                         expert_dataset=load_tiny_grpo_dataset())  # fmt: skip


def test_bad_token_advantage_fn_output_is_reported(tiny_model_path, tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        train(TokenGRPOTrainer, grpo_args(tmp_path), tiny_model_path, tokenizer,
              token_advantage_fn=lambda batch: batch.advantages)  # fmt: skip


# --------------------------------------------------------------------------------------------------------------------
# Forward budget and evaluation
# --------------------------------------------------------------------------------------------------------------------


def _count_backbone_calls(trainer) -> list:
    calls = []
    trainer.model.model.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls


@pytest.mark.parametrize(
    "setting",
    [
        {},  # loss stage: shaping reads the training forward
        # Rollout stage where TRL runs its old-log-prob forward (GA not a multiple of spg x iterations): we reuse it.
        {"gradient_accumulation_steps": 2, "num_iterations": 2, "max_steps": 2},
    ],
    ids=["loss_stage", "rollout_stage_reuses_trl_forward"],
)
def test_entropy_methods_add_no_forward(setting, tiny_model_path, tokenizer, tmp_path):
    from trl import GRPOConfig, GRPOTrainer

    from .test_token_grpo_parity import id_reward

    counts = []
    for trainer_cls, overrides in ((GRPOTrainer, {}), (TokenGRPOTrainer, {"token_selection": "entropy_quantile",
                                                                          "token_advantage": "gtpo"})):  # fmt: skip
        config_cls = GRPOConfig if trainer_cls is GRPOTrainer else TokenGRPOConfig
        args = grpo_args(tmp_path / trainer_cls.__name__, config_cls, **setting, **overrides)
        trainer = trainer_cls(model=tiny_model_path, reward_funcs=id_reward, args=args, processing_class=tokenizer,
                              train_dataset=load_tiny_grpo_dataset().select(range(16)))  # fmt: skip
        calls = _count_backbone_calls(trainer)
        trainer.train()
        counts.append(len(calls))
    assert counts[0] == counts[1]  # generation steps + TRL's forwards, and not one more


def test_evaluation_runs_token_shaping(tiny_model_path, tokenizer, tmp_path):
    args = grpo_args(tmp_path, token_selection="entropy_quantile", token_advantage="hapo", eval_strategy="steps",
                     eval_steps=1, per_device_eval_batch_size=4)  # fmt: skip
    trainer = TokenGRPOTrainer(model=tiny_model_path, reward_funcs=lambda completion_ids, **k: [len(c) / 8 for c in
                               completion_ids], args=args, processing_class=tokenizer,
                               train_dataset=load_tiny_grpo_dataset().select(range(16)),
                               eval_dataset=load_tiny_grpo_dataset().select(range(16, 20)))  # fmt: skip
    trainer.train()
    evals = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert evals and all(math.isfinite(entry["eval_loss"]) for entry in evals)
    assert "eval_token/selected_frac" in evals[-1]


def test_peft_lora_with_hidden_state_methods(tiny_model_path, tokenizer, tmp_path):
    """LoRA: the hidden-state hook sits on the adapted backbone (UCAS), and the reference is the disabled adapter."""
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    args = grpo_args(tmp_path, token_advantage="ucas", token_selection="entropy_quantile", beta=0.05)
    trainer = train(TokenGRPOTrainer, args, tiny_model_path, tokenizer, peft_config=lora)
    logged = _last_metrics(trainer)
    assert math.isfinite(logged["kl"]) and math.isfinite(logged["token/adv_after/mean"])
    changed = [
        n for n, p in trainer.model.named_parameters() if p.requires_grad and "lora_B" in n and p.abs().sum() > 0
    ]
    assert changed  # lora_B starts at zero: the adapters were trained


# --------------------------------------------------------------------------------------------------------------------
# HAPO dual clip (spec §4 Loss, official c = 10)
# --------------------------------------------------------------------------------------------------------------------


def test_hapo_dual_clip_in_the_loss(tiny_model_path, tokenizer, tmp_path, monkeypatch):
    """`_compute_loss` with hapo_dual_clip=10 equals the reference `hapo_dual_clip_loss` (dapo aggregation) on the
    advantages and per-token clip ranges TRL's loss receives: value and every parameter gradient. Old log-probs are
    shifted so that some ratios are 20 (beyond c) and some 0.5; the config's `delta` is restored afterwards."""
    from trl import GRPOTrainer

    from trl_tokenlevel.ops.advantages import hapo_dual_clip_loss

    from .test_token_grpo_parity import id_reward

    args = grpo_args(tmp_path, token_advantage="hapo", hapo_adaptive_temperature=False)
    trainer = TokenGRPOTrainer(model=tiny_model_path, reward_funcs=id_reward, args=args, processing_class=tokenizer,
                               train_dataset=load_tiny_grpo_dataset().select(range(16)))  # fmt: skip
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    torch.manual_seed(0)
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    width = inputs["completion_ids"].shape[1]

    def policy_logps():
        return GRPOTrainer._get_per_token_logps_and_entropies(trainer, trainer.model, input_ids, attention_mask,
                                                               width)[0]  # fmt: skip

    with torch.no_grad():
        logps = policy_logps()
    shift = torch.zeros_like(logps)
    shift[:, 0::3], shift[:, 1::3] = math.log(20.0), -math.log(2.0)  # ratios 20, 0.5, 1
    inputs["old_per_token_logps"] = logps - shift

    seen = {}
    stock_loss = GRPOTrainer._compute_loss

    def spy(self, model, batch):
        seen.update(advantages=batch["advantages"].clone(), eps_low=self.epsilon_low, eps_high=self.epsilon_high,
                    delta=self.args.delta, num_items=batch["num_items_in_batch"])  # fmt: skip
        return stock_loss(self, model, batch)

    monkeypatch.setattr(GRPOTrainer, "_compute_loss", spy)
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, dict(inputs))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
    assert seen["delta"] == 10.0 and trainer.args.delta is None
    assert isinstance(seen["eps_low"], torch.Tensor)  # per-token HAPO clip ranges reached TRL's clamp

    trainer.model.zero_grad()
    mask = inputs["completion_mask"].float()
    ratio = torch.exp(policy_logps() - inputs["old_per_token_logps"])
    per_token = hapo_dual_clip_loss(ratio, seen["advantages"], seen["eps_low"], seen["eps_high"], dual_clip=10.0)
    reference = (per_token * mask).sum() / seen["num_items"]
    reference.backward()
    torch.testing.assert_close(loss, reference, atol=1e-6, rtol=0)
    for name, param in trainer.model.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, atol=1e-6, rtol=1e-5, msg=f"gradient of {name} differs")
    capped = (seen["advantages"] < 0) & (ratio.detach() > 10.0) & mask.bool()
    assert capped.any()  # the dual clip changed the loss: without it these tokens would contribute |A|·20
    plain = (hapo_dual_clip_loss(ratio.detach(), seen["advantages"], seen["eps_low"], seen["eps_high"],
                                 dual_clip=None) * mask).sum() / seen["num_items"]  # fmt: skip
    assert plain.item() > reference.item() + 1e-3


def test_hapo_dual_clip_config_checks(tmp_path):
    with pytest.raises(ValueError, match="delta"):
        grpo_args(tmp_path, token_advantage="hapo", delta=4.0)
    with pytest.raises(ValueError, match="widest upper clip bound"):
        grpo_args(tmp_path, token_advantage="hapo", hapo_dual_clip=1.3)
    assert grpo_args(tmp_path, token_advantage="hapo", hapo_dual_clip=None, delta=4.0).delta == 4.0


# --------------------------------------------------------------------------------------------------------------------
# Several optimisation steps per generation batch
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "setting",
    [
        {"gradient_accumulation_steps": 2},  # 2 micro-steps per generation batch (rollout shaping stage)
        {"gradient_accumulation_steps": 2, "num_iterations": 2, "beta": 0.05},  # each batch trained twice
        {"steps_per_generation": 2},  # one generation batch serves 2 optimizer steps
    ],
    ids=["ga2", "ga2_iterations2_beta", "spg2"],
)
def test_selection_is_made_per_optimisation_step(setting, tiny_model_path, tokenizer, tmp_path):
    """With several optimisation steps per generation batch, the 80/20 selection is recomputed in every update step
    from the training forward's entropies over its micro-batch (the paper's rule, and TRL's `top_entropy_quantile`),
    not once per rollout batch: losses, metrics and parameters equal TRL's own 80/20 run."""
    from trl import GRPOConfig, GRPOTrainer

    stock = train(GRPOTrainer, grpo_args(tmp_path / "a", GRPOConfig, top_entropy_quantile=0.2, max_steps=3,
                                         **setting), tiny_model_path, tokenizer)  # fmt: skip
    ours = train(TokenGRPOTrainer, grpo_args(tmp_path / "b", token_selection="entropy_quantile", max_steps=3,
                                             **setting), tiny_model_path, tokenizer)  # fmt: skip
    assert ours._stage == "rollout" and not ours._shapes_rollout  # nothing per rollout batch: no extra forward
    assert_logs_equal(stock.state.log_history, ours.state.log_history, ignore_prefixes=("token/",))
    assert_params_equal(stock.model, ours.model)


def test_group_methods_keep_rollout_advantages_and_select_per_step(tiny_model_path, tokenizer, tmp_path):
    """A group method (TEMPO) with several micro-steps: advantages are shaped once per rollout batch (whole groups, by
    design), the selection in every update step: `tl_selected` is absent from the buffered rollout batch and made
    from the training forward."""
    seen = []

    class Spy(TokenGRPOTrainer):
        def _select_tokens(self, batch, entropy, mode):
            seen.append(("per_token_advantages" if batch["advantages"].dim() == 2 else "row", entropy.shape[0]))
            return super()._select_tokens(batch, entropy, mode)

    args = grpo_args(tmp_path, token_selection="entropy_quantile", token_advantage="tempo",
                     gradient_accumulation_steps=2, max_steps=2)  # fmt: skip
    trainer = train(Spy, args, tiny_model_path, tokenizer)
    assert trainer._shapes_rollout
    # One call per update step (2 optimizer steps x 2 micro-steps), each on its micro-batch of 4 rows whose (B, T)
    # advantages came from the rollout stage; none at the rollout stage itself.
    assert seen == [("per_token_advantages", 4)] * 4
    logged = _last_metrics(trainer)
    assert 0.0 < logged["token/selected_frac"] < 1.0


# --------------------------------------------------------------------------------------------------------------------
# CHORD: the expert SFT term averages over the optimisation step's global expert batch
# --------------------------------------------------------------------------------------------------------------------


def chord_expert_rows():
    return load_tiny_grpo_dataset().select(range(8)).rename_column("solution", "completion")


def chord_layout_args(output_dir, **overrides):
    """μ = 1 (constant): (1 − μ)·L_GRPO is exactly 0, so only the expert SFT term moves the weights and the run does
    not depend on the sampled rollouts; SGD, so parameter differences are gradient differences. 4 expert rows per step
    (ratio 0.5 of 4 rollouts), of different lengths."""
    from .test_token_grpo_parity import grpo_args

    settings = dict(chord=True, chord_mu_warmup_steps=0, chord_mu_decay_steps=0, chord_mu_peak=1.0, chord_mu_valley=1.0,
                    chord_expert_data_ratio=0.5, optim="sgd", learning_rate=0.5, max_steps=3)  # fmt: skip
    return grpo_args(output_dir, **{**settings, **overrides})


@pytest.mark.parametrize("token_level", [True, False])
def test_chord_sft_term_is_layout_invariant(token_level, tiny_model_path, tokenizer, tmp_path):
    """One batch of 4 rollouts vs 2 micro-steps of 2: the expert rows of a step are the same, and L_SFT is their
    token-mean (or row-mean) over the whole step, so the updates agree; a per-micro-batch mean would not (the two
    micro-batches hold different numbers of expert tokens)."""
    runs = []
    for layout in ({}, {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2}):
        args = chord_layout_args(tmp_path / str(len(runs)), chord_token_level_loss=token_level, **layout)
        runs.append(train(TokenGRPOTrainer, args, tiny_model_path, tokenizer, expert_dataset=chord_expert_rows()))
    assert_params_changed(runs[0], tiny_model_path)
    assert_params_equal(runs[0].model, runs[1].model, atol=2e-7)
    sft = [[e["chord/sft_loss"] for e in run.state.log_history if "chord/sft_loss" in e] for run in runs]
    assert sft[0] == pytest.approx(sft[1], abs=1e-6)


def test_chord_window_deals_the_step_rows(tiny_model_path, tokenizer, tmp_path):
    """The step's rows are dealt over (micro-step, rank) slots; the normaliser is the step's expert token count."""
    args = chord_layout_args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    trainer = TokenGRPOTrainer(model=tiny_model_path, reward_funcs=lambda completion_ids, **k: [0.0] * len(
                               completion_ids), args=args, processing_class=tokenizer,
                               train_dataset=load_tiny_grpo_dataset().select(range(16)),
                               expert_dataset=chord_expert_rows())  # fmt: skip
    trainer.current_gradient_accumulation_steps = 2
    shares = trainer._chord_window_shares()
    rows = [row for share, _ in shares for row in share]
    assert [len(share) for share, _ in shares] == [2, 2] and len({tuple(c) for _, c in rows}) == 4
    assert {normalizer for _, normalizer in shares} == {float(sum(len(c) for _, c in rows))}


@pytest.mark.slow  # ~45 s: two torchrun processes each import TRL and train
def test_chord_two_processes_equal_one_batch(tiny_model_path, tokenizer, tmp_path):
    """2 CPU processes (torchrun, gloo) with 2 rollouts each equal one process with 4: the ranks draw the same expert
    rows, train their share, and the SFT sum is divided by the step's global count (times the world size, which DDP's
    gradient averaging divides out)."""
    import os
    import shutil
    import subprocess
    import sys

    one = train(TokenGRPOTrainer, chord_layout_args(tmp_path / "one"), tiny_model_path, tokenizer,
                expert_dataset=chord_expert_rows())  # fmt: skip
    out = tmp_path / "ddp"
    out.mkdir()
    worker = os.path.join(os.path.dirname(__file__), "ddp_chord.py")
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    result = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), worker, tiny_model_path,
                             str(out)], env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    params = torch.load(out / "params.pt")
    for name, param in one.model.named_parameters():
        torch.testing.assert_close(param.detach(), params[name], atol=2e-7, rtol=0, msg=f"parameter {name} differs")


# --------------------------------------------------------------------------------------------------------------------
# RMT on a corpus: curriculum-sampled next-token prompts, NTP on the other corpus tokens
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rmt_rows(tiny_model_path, tokenizer):
    from transformers import AutoModelForCausalLM

    from trl_tokenlevel.data.builtin import load_tiny_preference_dataset
    from trl_tokenlevel.data.rmt import build_rmt_dataset

    documents = [row["prompt"] + row["chosen"] for row in load_tiny_preference_dataset().select(range(4))]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    return documents, model, build_rmt_dataset(documents, tokenizer, model, num_prompts=8, min_context=4,
                                               curriculum_temperature=1e-4)  # fmt: skip


def test_rmt_dataset_targets_follow_the_entropy_curriculum(rmt_rows, tokenizer):
    """Prompt i of N is the document prefix before a target drawn at progress i/N from the base model's entropies:
    with a sharp curriculum, the easiest candidate first and the hardest last (the tiny model's entropies differ by
    ~1e-3 nats, hence τ = 1e-4)."""
    import torch.nn.functional as F

    from trl_tokenlevel.data.rmt import RMT_INSTRUCTION

    documents, model, rows = rmt_rows
    assert len(rows) == 8
    for index, row in enumerate(rows):
        ids = tokenizer(documents[index % 4], add_special_tokens=False)["input_ids"]
        position = row["rmt_target_position"]
        assert row["rmt_document_ids"] == ids and 4 <= position < len(ids)
        assert row["prompt"] == tokenizer.decode(ids[:position]) + RMT_INSTRUCTION
        assert row["rmt_target"] == tokenizer.decode(ids[position : position + 1])
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
        entropy = -(F.softmax(logits, -1) * F.log_softmax(logits, -1)).sum(-1)  # entropy[j] predicts token j + 1
        candidates = entropy[3:]  # positions 4..L-1
        assert row["rmt_target_entropy"] == pytest.approx(entropy[position - 1].item(), abs=1e-5)
        if index == 0:
            assert position - 1 == 3 + int(candidates.argmin())
        if index == 7:
            assert position - 1 == 3 + int(candidates.argmax())


def test_rmt_next_token_reward():
    from trl_tokenlevel.rewards.grpo_rewards import RMTNextTokenReward

    reward = RMTNextTokenReward()
    assert reward(completions=["so <answer> cat</answer>", "<answer>dog</answer>", "cat"],
                  rmt_target=[" cat", " cat", "cat"]) == [1.0, 0.0, 0.0]  # fmt: skip
    with pytest.raises(ValueError, match="rmt_target"):
        reward(completions=["x"])


def test_rmt_corpus_ntp_term_matches_full_logits(rmt_rows, tiny_model_path, tokenizer, tmp_path):
    """`rmt_ntp_source="corpus"`: the loss gains λ·mean(−log π(x_t|x_<t)) over the tokens of the micro-batch's distinct
    documents other than their targets, here recomputed from the model's full logits."""
    import torch.nn.functional as F

    _, _, rows = rmt_rows
    args = grpo_args(tmp_path, rmt_ntp_coef=0.5, shuffle_dataset=False)
    trainer = TokenGRPOTrainer(model=tiny_model_path, reward_funcs=lambda completion_ids, **k: [0.0] * len(
                               completion_ids), args=args, processing_class=tokenizer, train_dataset=rows)  # fmt: skip
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    torch.manual_seed(0)
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    with torch.no_grad():
        with_ntp = trainer.compute_loss(trainer.model, dict(inputs)).item()
        trainer.args.rmt_ntp_coef = 0.0
        without = trainer.compute_loss(trainer.model, dict(inputs)).item()
    logged = trainer._metrics["train"]["token/rmt_ntp_loss"][-1]

    documents = {
        (tuple(r), int(p)) for r, p in zip(inputs["tl_rmt_doc_ids"].tolist(), inputs["tl_rmt_target"].tolist())
    }
    total, count = 0.0, 0
    for padded, target in documents:
        length = int(inputs["tl_rmt_doc_mask"][inputs["tl_rmt_doc_ids"].tolist().index(list(padded))].sum())
        ids = torch.tensor([padded[:length]])
        with torch.no_grad():
            logps = F.log_softmax(trainer.model(input_ids=ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
        keep = torch.arange(1, length) != target
        total, count = total + (-logps[keep]).sum().item(), count + int(keep.sum())
    assert len(documents) == 2  # 4 rollouts = 2 prompts x 2 generations; each document scored once
    assert logged == pytest.approx(0.5 * total / count, rel=1e-5)
    assert with_ntp - without == pytest.approx(0.5 * total / count, rel=1e-4)


def test_rmt_corpus_training_end_to_end(rmt_rows, tiny_model_path, tokenizer, tmp_path):
    from trl_tokenlevel.rewards.grpo_rewards import RMTNextTokenReward

    _, _, rows = rmt_rows
    args = grpo_args(tmp_path, rmt_ntp_coef=0.1, rmt_budget_init=8, rmt_budget_min=2, shuffle_dataset=False)
    trainer = TokenGRPOTrainer(model=tiny_model_path, reward_funcs=RMTNextTokenReward(), args=args,
                               processing_class=tokenizer, train_dataset=rows)  # fmt: skip
    trainer.train()
    logged = _last_metrics(trainer)
    assert logged["token/rmt_ntp_loss"] > 0 and "rewards/rmt_next_token/mean" in logged and "rmt/budget" in logged
    assert_params_changed(trainer, tiny_model_path)
    with pytest.raises(ValueError, match="rmt_document_ids"):
        TokenGRPOTrainer(model=tiny_model_path, reward_funcs=RMTNextTokenReward(), args=args,
                         processing_class=tokenizer, train_dataset=load_tiny_grpo_dataset().select(range(4)))  # fmt: skip
