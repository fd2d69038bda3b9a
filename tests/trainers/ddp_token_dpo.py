"""Worker for the 2-process DDP tests: `torchrun --nproc_per_node N ddp_token_dpo.py MODEL_PATH OUT PER_DEVICE_BS
[TOKEN_LOSS_TYPE]` (default cdpo)."""

import json
import sys

import torch
from transformers import PreTrainedTokenizerFast

from trl_tokenlevel import TokenDPOConfig, TokenDPOTrainer
from trl_tokenlevel.data import tokenize_preference_dataset
from trl_tokenlevel.data.builtin import load_tiny_preference_dataset
from trl_tokenlevel.scripts.common import leave_distributed_run

model_path, out, per_device = sys.argv[1], sys.argv[2], int(sys.argv[3])
token_loss_type = sys.argv[4] if len(sys.argv) > 4 else "cdpo"
torch.set_num_threads(1)
tokenizer = PreTrainedTokenizerFast.from_pretrained(model_path)
dataset = load_tiny_preference_dataset().select(range(16))
tokenized = tokenize_preference_dataset(dataset, tokenizer)
if token_loss_type == "cdpo":
    dataset = dataset.add_column(
        "rejected_token_weights", [[0.5 + (i % 2) for i in range(len(ids))] for ids in tokenized["rejected_ids"]]
    )
args = TokenDPOConfig(
    output_dir=out,
    per_device_train_batch_size=per_device,
    max_steps=3,
    learning_rate=1e-3,
    logging_steps=1,
    save_strategy="no",
    report_to="none",
    bf16=False,
    gradient_checkpointing=False,
    seed=7,
    max_length=64,
    disable_tqdm=True,
    dataloader_pin_memory=False,
    token_loss_type=token_loss_type,
    use_cpu=True,
    ddp_find_unused_parameters=False,
)
trainer = TokenDPOTrainer(model=model_path, args=args, train_dataset=dataset, processing_class=tokenizer)
trainer.train()
if trainer.accelerator.is_main_process:
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    params = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    with open(f"{out}/result.json", "w") as handle:
        json.dump(
            {
                "losses": losses,
                "param_sum": params.double().sum().item(),
                "param_norm": params.double().norm().item(),
                "world_size": trainer.accelerator.num_processes,
            },
            handle,
        )


leave_distributed_run()  # a final barrier, then os._exit(0): gloo's teardown at exit aborted finished runs under load
