"""Worker for the FSDP2 op tests: `torchrun --nproc_per_node N fsdp2_ops_worker.py OUT [tied|untied] [resharded]`.

Builds the same tiny Llama policy and reference on every rank, shards both with FSDP2 (`fully_shard` on each decoder
layer and on the root, gloo on CPU), runs the backbone forward through the root module (as the trainers' hooks do),
then computes the full-distribution statistics with the tiled ops from the (sharded, DTensor) LM head and backpropagates
a loss normalised by the global token count. Rank 0 writes the loss and every parameter's full gradient. With N=1 the
same code runs unsharded: the test compares the two.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from trl_tokenlevel.ops.chunked import chunked_token_kl, chunked_token_logprobs, lm_head_params
from trl_tokenlevel.ops.fused import fused_token_statistics
from trl_tokenlevel.scripts.common import leave_distributed_run

out, tying = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "tied")
# "resharded": the LM head is sharded again before the ops read it (a DTensor they must gather themselves).
resharded = len(sys.argv) > 3 and sys.argv[3] == "resharded"  # else "after_forward"
torch.set_num_threads(1)
sharded = "WORLD_SIZE" in os.environ
if sharded:
    dist.init_process_group("gloo")
rank, world = (dist.get_rank(), dist.get_world_size()) if sharded else (0, 1)


def build(seed):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tying == "tied")  # fmt: skip
    return LlamaForCausalLM(config).float()


policy, reference = build(0), build(1)
reference.requires_grad_(False)
if sharded:
    from torch.distributed.fsdp import fully_shard

    for model in (policy, reference):
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)

torch.manual_seed(123)
batch, length = 4, 9
input_ids = torch.randint(0, 96, (batch, length))
lengths = torch.tensor([9, 6, 8, 4])
attention_mask = (torch.arange(length)[None] < lengths[:, None]).long()
rows = slice(rank * batch // world, (rank + 1) * batch // world)  # each rank takes its share of the batch
global_tokens = int((attention_mask[:, 1:]).sum())


def hidden_of(model, ids, mask):
    # Through the root module, so that FSDP2 unshards the root group (embeddings, final norm, LM head) as in training.
    output = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1)
    return output.hidden_states[-1]


ids, mask = input_ids[rows], attention_mask[rows]
hidden = hidden_of(policy, ids, mask)[:, :-1]
with torch.no_grad():
    ref_hidden = hidden_of(reference, ids, mask)[:, :-1]
valid = mask[:, 1:].bool()
targets = ids[:, 1:][valid]
h, rh = hidden[valid], ref_hidden[valid]
if sharded and resharded:
    policy.reshard()
    reference.reshard()
head, ref_head = lm_head_params(policy), lm_head_params(reference)
stats = fused_token_statistics(h, head["weight"], head["bias"], targets, rh, ref_head["weight"], ref_head["bias"],
                               token_chunk=5, vocab_chunk=40)  # fmt: skip
kl = chunked_token_kl(h, head["weight"], head["bias"], rh, ref_head["weight"], ref_head["bias"], backend="torch",
                      token_chunk=5, vocab_chunk=40, direction="reverse")  # fmt: skip
logprobs = chunked_token_logprobs(h, head["weight"], head["bias"], targets, backend="torch", token_chunk=5,
                                  vocab_chunk=40)  # fmt: skip
loss = (stats.kl.sum() - stats.log_probs.sum() + 0.5 * kl.sum() - 0.25 * logprobs.sum()) / global_tokens
loss.backward()

total = loss.detach().clone()
if sharded:
    dist.all_reduce(total)
    # FSDP2 reduce-scatters gradients as means over ranks; the loss is a sum of per-rank shares, so undo the mean.
grads = {}
for name, param in policy.named_parameters():
    grad = param.grad
    if sharded:
        grad = grad.full_tensor() * world
    grads[name] = grad.double().sum().item(), grad.double().norm().item()
if rank == 0:
    with open(out, "w") as handle:
        json.dump({"loss": total.item(), "grads": grads, "world": world,
                   "dtensor": sharded and type(head["weight"]).__name__ == "DTensor"}, handle)  # fmt: skip


leave_distributed_run()  # a final barrier, then os._exit(0): gloo's teardown at exit aborted finished runs under load
