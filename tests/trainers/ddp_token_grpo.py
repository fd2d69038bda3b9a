"""Worker for the 2-process GRPO test: `torchrun --nproc_per_node 2 ddp_token_grpo.py MODEL_PATH OUT`.

Each rank trains TokenGRPOTrainer (80/20 entropy selection, global scope, plus TEMPO token advantages) with prompt
groups split across the two ranks, and records what every shaping call saw and produced, so the test can recompute the
selection and the advantages in a single process over the same tokens. It also checks the entropy quantile on ranks
holding different numbers of valid tokens.
"""

import json
import sys

import torch
import torch.distributed as dist
from transformers import PreTrainedTokenizerFast

from trl_tokenlevel.data.builtin.grpo import load_tiny_grpo_dataset
from trl_tokenlevel.ops.selection import all_gather_variable_length, high_entropy_token_mask
from trl_tokenlevel.scripts.common import leave_distributed_run
from trl_tokenlevel.trainers.token_grpo_config import TokenGRPOConfig
from trl_tokenlevel.trainers.token_grpo_trainer import TokenGRPOTrainer

model_path, out = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
RHO = 0.3


class RecordingTrainer(TokenGRPOTrainer):
    records: list = []

    def _shape_token_batch(self, batch, per_token_logps, entropies, hidden, old_per_token_logps, select=True):
        record = {
            "entropy": entropies.detach().double().tolist(),
            "valid": batch["completion_mask"].tolist(),
            "completion_ids": batch["completion_ids"].tolist(),
            "group_ids": batch["tl_group_ids"].tolist(),
            "stock_advantages": batch["advantages"].double().tolist(),
        }
        super()._shape_token_batch(batch, per_token_logps, entropies, hidden, old_per_token_logps, select)
        record["selected"] = batch["tl_selected"].int().tolist()
        record["advantages"] = batch["advantages"].double().tolist()
        record["num_items_in_batch"] = float(batch["num_items_in_batch"])
        self.records.append(record)


def reward(completion_ids, **kwargs):
    return [(sum(ids) % 10) / 10 for ids in completion_ids]


tokenizer = PreTrainedTokenizerFast.from_pretrained(model_path)
args = TokenGRPOConfig(
    output_dir=out,
    per_device_train_batch_size=2,
    num_generations=4,
    max_completion_length=8,
    max_steps=2,
    learning_rate=1e-3,
    logging_steps=1,
    save_strategy="no",
    report_to="none",
    bf16=False,
    gradient_checkpointing=False,
    dataloader_pin_memory=False,
    disable_tqdm=True,
    seed=7,
    use_cpu=True,
    ddp_find_unused_parameters=False,
    token_selection="entropy_quantile",
    entropy_top_ratio=RHO,
    token_advantage="tempo",
)
trainer = RecordingTrainer(
    model=model_path,
    reward_funcs=reward,
    args=args,
    train_dataset=load_tiny_grpo_dataset().select(range(16)),
    processing_class=tokenizer,
)
trainer.train()

# The op itself on ranks with different numbers of valid tokens (7 and 12), as all_gather_variable_length must handle.
rank, world = dist.get_rank(), dist.get_world_size()
generator = torch.Generator().manual_seed(100 + rank)
sizes = (7, 12)
entropy = torch.rand(3, 6, generator=generator, dtype=torch.float64)
valid = torch.zeros(3, 6, dtype=torch.bool)
valid.view(-1)[: sizes[rank]] = True
mask = high_entropy_token_mask(entropy, valid, rho=RHO, gather_fn=all_gather_variable_length)

with open(f"{out}/rank{rank}.json", "w") as handle:
    json.dump(
        {
            "world_size": world,
            "records": trainer.records,
            "op_entropy": entropy.tolist(),
            "op_valid": valid.int().tolist(),
            "op_mask": mask.int().tolist(),
        },
        handle,
    )


leave_distributed_run()  # a final barrier, then os._exit(0): gloo's teardown at exit aborted finished runs under load
