"""Worker for the trainer-level FSDP2 tests:
`[torchrun --nproc_per_node 2] fsdp2_trainer_worker.py {dpo,grpo,sft} MODEL OUT GLOBAL_BATCH METHOD[,METHOD...]`.

One process trains plainly with the whole global batch; under torchrun every rank trains with its share under
accelerate's FSDP2 (`fully_shard` of each decoder layer and of the root, on gloo: `cpu_fsdp2.allow_fsdp_on_cpu`). Every
method trains 2 steps from the same weights, one trainer after another in this process; rank 0 writes, per method, the
losses, checksums of the gathered parameters and whether the model really was sharded.
"""

import hashlib
import json
import os
import random
import sys

import torch
import torch.distributed as dist
from transformers import PreTrainedTokenizerFast

sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])
from tests.distributed.cpu_fsdp2 import allow_fsdp_on_cpu  # noqa: E402
from trl_tokenlevel.scripts.common import leave_distributed_run  # noqa: E402

kind, model_path, out, global_batch, methods = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
world = int(os.environ.get("WORLD_SIZE", "1"))
torch.set_num_threads(1)
allow_fsdp_on_cpu()
tokenizer = PreTrainedTokenizerFast.from_pretrained(model_path)
COMMON = dict(
    per_device_train_batch_size=global_batch // world, max_steps=2, learning_rate=1e-3, logging_steps=1,
    save_strategy="no", report_to="none", bf16=False, gradient_checkpointing=False, dataloader_pin_memory=False,
    disable_tqdm=True, seed=7, use_cpu=True,
)  # fmt: skip
if world > 1:
    # Decoder layers and the root (embeddings, final norm, tied head) are sharded; the root's parameters are gathered
    # again for the backward, so the tiled ops meet the head both as a plain tensor and as a DTensor.
    COMMON |= dict(fsdp=True, fsdp_config={"version": 2, "reshard_after_forward": True})

DPO = {
    "stock": {},
    "weighted": {"token_loss_type": "weighted"},
    "tgdpo": {"token_loss_type": "tgdpo"},
    "treg": {"token_loss_type": "treg"},
    "cdpo": {"token_loss_type": "cdpo"},
    "tdpo1": {"token_loss_type": "tdpo1"},
    "tdpo2": {"token_loss_type": "tdpo2", "tdpo_alpha": 0.7},
    "sparsepo": {
        "token_loss_type": "sparsepo",
        "sparsepo_independent_masks": True,
        "sparsepo_mask_dropout": 0.0,
        "sparsepo_mask_init": "mean_mixer",
    },
    "mapo": {"token_loss_type": "mapo", "mapo_hooks": "all"},
    "aligndistil": {"token_loss_type": "aligndistil"},
}
GRPO = {
    "stock": {},
    "entropy_quantile": {"token_selection": "entropy_quantile", "entropy_top_ratio": 0.3},
    "entropy_band": {"token_selection": "entropy_band"},
    "ucas": {"token_advantage": "ucas"},
    "hapo": {"token_advantage": "hapo"},
    "gtpo": {
        "token_advantage": "gtpo",
        "gtpo_entropy_threshold": 10.0,
        "loss_type": "grpo",
        "entropy_normalize": "selected",
    },
    "d3s": {"token_advantage": "d3s"},
    "tw_grpo": {"token_advantage": "tw_grpo"},
    "tempo": {"token_advantage": "tempo"},
}
EAGER = {"model_init_kwargs": {"attn_implementation": "eager"}}
SFT = {
    "stock": {},
    "weighted": {"token_loss_type": "weighted"},
    "chord_phi": {"token_loss_type": "chord_phi"},
    # OTR's Monte-Carlo samples come from each rank's own generator; the expected estimator is deterministic.
    "otr_expected": {"token_loss_type": "otr", "otr_estimator": "expected"},
    "sstoken": {"token_selection": "sstoken", "sstoken_history_decay": 0.9, **EAGER},
}


def rows(n, length_seed, fill):
    """A per-token column: row i gets `length(i)` values from `fill(i, j)`."""
    return [[fill(i, j) for j in range(length)] for i, length in enumerate(length_seed[:n])]


def dpo_trainer(name, output_dir):
    from trl_tokenlevel import TokenDPOConfig, TokenDPOTrainer
    from trl_tokenlevel.data import tokenize_preference_dataset
    from trl_tokenlevel.data.builtin import load_tiny_preference_dataset

    dataset = load_tiny_preference_dataset().select(range(2 * global_batch))
    lengths = {side: [len(ids) for ids in tokenize_preference_dataset(dataset, tokenizer)[f"{side}_ids"]]
               for side in ("chosen", "rejected")}  # fmt: skip
    n = len(dataset)
    if name in ("weighted", "cdpo"):
        for side in ("chosen", "rejected") if name == "weighted" else ("rejected",):
            dataset = dataset.add_column(
                f"{side}_token_weights", rows(n, lengths[side], lambda i, j: 0.5 + (i + j) % 3 / 2)
            )
    if name in ("tgdpo", "treg"):
        for side in ("chosen", "rejected"):
            dataset = dataset.add_column(
                f"{side}_token_rewards", rows(n, lengths[side], lambda i, j: ((i * 7 + j) % 5 - 2) / 4)
            )
    extra = {}
    if name == "aligndistil":  # two teachers unlike the policy, the same on every rank
        from trl_tokenlevel.tiny import build_tiny_model

        extra["aligndistil_teachers"] = tuple(build_tiny_model(tokenizer, seed=seed).eval() for seed in (11, 12))
    args = TokenDPOConfig(output_dir=output_dir, max_length=64, **COMMON, **DPO[name])
    return TokenDPOTrainer(model=model_path, args=args, train_dataset=dataset, processing_class=tokenizer, **extra)


NUM_GENERATIONS = 4


def replayed_rollouts(prompts, trainer):
    """The k-th completion of a prompt depends only on the prompt and k (its place in the group, counted over the
    global batch), so every layout sees the same groups."""
    rank, local = trainer.accelerator.process_index, len(prompts)
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    completion_ids = []
    for index, prompt in enumerate(prompts):
        k = (rank * local + index) % NUM_GENERATIONS
        rng = random.Random(hashlib.sha256(f"{prompt}|{k}".encode()).hexdigest())
        completion_ids.append(
            [rng.randrange(4, len(tokenizer)) for _ in range(rng.randint(2, 7))] + [tokenizer.eos_token_id]
        )
    return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None}


def grpo_trainer(name, output_dir):
    from trl_tokenlevel.data.builtin.grpo import load_tiny_grpo_dataset
    from trl_tokenlevel.trainers.token_grpo_config import TokenGRPOConfig
    from trl_tokenlevel.trainers.token_grpo_trainer import TokenGRPOTrainer

    args = TokenGRPOConfig(output_dir=output_dir, num_generations=NUM_GENERATIONS, max_completion_length=8, **COMMON,
                           **GRPO[name])  # fmt: skip
    return TokenGRPOTrainer(
        model=model_path, args=args, rollout_func=replayed_rollouts, processing_class=tokenizer,
        reward_funcs=lambda completion_ids, **kwargs: [(sum(ids) % 10) / 10 for ids in completion_ids],
        train_dataset=load_tiny_grpo_dataset().select(range(4 * global_batch)),
    )  # fmt: skip


def sft_trainer(name, output_dir):
    from trl_tokenlevel.data.builtin.sft import load_tiny_sft_dataset
    from trl_tokenlevel.data.sft_columns import tokenize_sft_dataset
    from trl_tokenlevel.trainers.token_sft_config import TokenSFTConfig
    from trl_tokenlevel.trainers.token_sft_trainer import TokenSFTTrainer

    dataset = load_tiny_sft_dataset().select(range(2 * global_batch))
    if name == "weighted":
        lengths = [
            sum(label != -100 for label in labels) for labels in tokenize_sft_dataset(dataset, tokenizer)["labels"]
        ]
        dataset = dataset.add_column("token_weights", rows(len(dataset), lengths, lambda i, j: 0.5 + (j % 4) / 2))
    args = TokenSFTConfig(output_dir=output_dir, **COMMON, **SFT[name])
    return TokenSFTTrainer(model=model_path, args=args, train_dataset=dataset, processing_class=tokenizer)


def gathered(param):
    # A DTensor's `full_tensor()` is a collective: every rank calls it for every parameter, in the same order.
    return param.full_tensor() if hasattr(param, "full_tensor") else param


BUILD = {"dpo": dpo_trainer, "grpo": grpo_trainer, "sft": sft_trainer}
results = {}
for name in methods.split(","):
    trainer = BUILD[kind](name, f"{out}/{name}")
    trainer.train()
    params = torch.cat([gathered(p.detach()).flatten() for p in trainer.model.parameters()]).double()
    # Modules trained or updated beside the model (SparsePO's mask networks, ssToken's history model) must match too.
    besides = [*(getattr(trainer, "sparsepo_masks", None) or ()), getattr(trainer, "history_model", None)]
    beside = [gathered(p.detach()).flatten() for module in besides if module is not None for p in module.parameters()]
    ref = getattr(trainer, "ref_model", None)
    results[name] = {
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "param_sum": params.sum().item(),
        "param_norm": params.norm().item(),
        "beside_sum": torch.cat(beside).double().sum().item() if beside else None,
        "world_size": trainer.accelerator.num_processes,
        "fsdp_enabled": trainer.is_fsdp_enabled,
        "wrapped": type(trainer.model_wrapped).__name__,
        "sharded": all(type(p).__name__ == "DTensor" for p in trainer.model_wrapped.parameters()),
        "ref_sharded": None if ref is None else all(type(p).__name__ == "DTensor" for p in ref.parameters()),
    }
    trainer.accelerator.wait_for_everyone()
    del trainer
if not dist.is_initialized() or dist.get_rank() == 0:
    with open(f"{out}/result.json", "w") as handle:
        json.dump(results, handle, indent=1)


leave_distributed_run()  # a final barrier, then os._exit(0): gloo's teardown at exit aborted finished runs under load
