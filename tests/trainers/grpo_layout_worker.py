"""Worker for the GRPO layout-parity test:
`[torchrun --nproc_per_node N] grpo_layout_worker.py MODEL OUT PER_DEVICE METHOD[,METHOD...]`.

Rollouts are replayed rather than sampled: TRL's `rollout_func` returns, for the k-th generation of a prompt, a
completion that depends only on the prompt text and k (k is the completion's position in its group, counted over the
global batch). So one process with batch 2B and two processes with batch B see exactly the same groups, split across
ranks in the second case, and any difference in the trained weights comes from how a method reduces across ranks.
Every method trains 2 steps from the same weights; rank 0 writes losses and parameter checksums per method.
"""

import hashlib
import json
import random
import sys

import torch
from transformers import PreTrainedTokenizerFast

from trl_tokenlevel.data.builtin.grpo import load_tiny_grpo_dataset
from trl_tokenlevel.scripts.common import leave_distributed_run
from trl_tokenlevel.trainers.token_grpo_config import TokenGRPOConfig
from trl_tokenlevel.trainers.token_grpo_trainer import TokenGRPOTrainer

model_path, out, per_device, methods = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].split(",")
torch.set_num_threads(1)
NUM_GENERATIONS = 4
METHODS = {
    "stock": {},
    "entropy_quantile": {"token_selection": "entropy_quantile", "entropy_top_ratio": 0.3},
    "entropy_band": {"token_selection": "entropy_band"},
    "ucas": {"token_advantage": "ucas"},
    "hapo": {"token_advantage": "hapo"},
    "gtpo": {"token_advantage": "gtpo"},
    "d3s": {"token_advantage": "d3s"},
    "tw_grpo": {"token_advantage": "tw_grpo"},
    "tempo": {"token_advantage": "tempo"},
}
tokenizer = PreTrainedTokenizerFast.from_pretrained(model_path)


def replayed_rollouts(prompts, trainer):
    rank, local = trainer.accelerator.process_index, len(prompts)
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    completion_ids = []
    for index, prompt in enumerate(prompts):
        k = (rank * local + index) % NUM_GENERATIONS
        rng = random.Random(hashlib.sha256(f"{prompt}|{k}".encode()).hexdigest())
        body = [rng.randrange(4, len(tokenizer)) for _ in range(rng.randint(2, 7))]
        completion_ids.append(body + [tokenizer.eos_token_id])
    return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None}


def reward(completion_ids, **kwargs):
    return [(sum(ids) % 10) / 10 for ids in completion_ids]


results = {}
for name in methods:
    knobs = METHODS[name]
    args = TokenGRPOConfig(
        output_dir=f"{out}/{name}", per_device_train_batch_size=per_device, num_generations=NUM_GENERATIONS,
        max_completion_length=8, max_steps=2, learning_rate=1e-3, logging_steps=1, save_strategy="no",
        report_to="none", bf16=False, gradient_checkpointing=False, dataloader_pin_memory=False, disable_tqdm=True,
        seed=7, use_cpu=True, ddp_find_unused_parameters=False, **knobs,
    )  # fmt: skip
    trainer = TokenGRPOTrainer(model=model_path, reward_funcs=reward, args=args, rollout_func=replayed_rollouts,
                               train_dataset=load_tiny_grpo_dataset().select(range(16)), processing_class=tokenizer)  # fmt: skip
    trainer.train()
    params = torch.cat([p.detach().flatten() for p in trainer.model.parameters()]).double()
    results[name] = {
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "param_sum": params.sum().item(),
        "param_norm": params.norm().item(),
        "world_size": trainer.accelerator.num_processes,
    }
    trainer.accelerator.wait_for_everyone()
    del trainer
if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
    with open(f"{out}/result.json", "w") as handle:
        json.dump(results, handle)


leave_distributed_run()  # a final barrier, then os._exit(0): gloo's teardown at exit aborted finished runs under load
