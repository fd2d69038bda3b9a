"""Worker for the 2-process CHORD test: `torchrun --nproc_per_node 2 ddp_chord.py MODEL_PATH OUT`.

Trains TokenGRPOTrainer with CHORD at μ = 1 (only the expert SFT term moves the weights) on 2 ranks, 2 rollouts per
rank and step, and saves the final parameters from rank 0."""

import sys

import torch
import torch.distributed as dist
from transformers import PreTrainedTokenizerFast

sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])
from tests.trainers.test_token_grpo_methods import chord_expert_rows, chord_layout_args  # noqa: E402
from tests.trainers.test_token_grpo_parity import id_reward  # noqa: E402
from trl_tokenlevel.data.builtin.grpo import load_tiny_grpo_dataset  # noqa: E402
from trl_tokenlevel.scripts.common import leave_distributed_run
from trl_tokenlevel.trainers.token_grpo_trainer import TokenGRPOTrainer  # noqa: E402

model_path, out = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
tokenizer = PreTrainedTokenizerFast.from_pretrained(model_path)
args = chord_layout_args(out, per_device_train_batch_size=2, use_cpu=True, ddp_find_unused_parameters=False)
trainer = TokenGRPOTrainer(model=model_path, reward_funcs=id_reward, args=args, processing_class=tokenizer,
                           train_dataset=load_tiny_grpo_dataset().select(range(16)),
                           expert_dataset=chord_expert_rows())  # fmt: skip
trainer.train()
if dist.get_rank() == 0:
    model = trainer.accelerator.unwrap_model(trainer.model)
    torch.save({name: param.detach().cpu() for name, param in model.named_parameters()}, f"{out}/params.pt")


leave_distributed_run()  # a final barrier, then os._exit(0): gloo's teardown at exit aborted finished runs under load
