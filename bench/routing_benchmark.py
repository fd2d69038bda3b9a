"""Honest small/large token-routing benchmark: held-out prompts, one budget for every method, compute counted.

Pair. Large: the demo model (SmolLM2-135M-Instruct, `trl_tokenlevel.models`), used as is. Small: a Llama with the SAME
tokenizer, 2 layers and width 64 (41x fewer parameters, mostly its tied embedding table), trained here on the task's
train split until it answers 20% of 16 calibration prompts (about 40 steps): clearly weaker than the large model on
purpose. Task: copy 4 digits (`tasks.make_problems("copy")`), one solved example then the question, plain text (no
chat template, so prompts are short):

    Repeat: 4 7 3 2              <- the fixed solved example (train split)
    Answer: 4 7 3 2
    Repeat: 4 6 9 4              <- the question
    Answer:                      -> " 4 6 9 4\n"  (the newline ends the answer; verifier: exact match)

Splits (hash-disjoint, `tasks.split_of`): the small model trains on train-split problems; router labels come from
other train-split problems (never seen in training); calibration from the valid split; test prompts from the test
split, a different set per seed. Neither model nor any router or threshold ever sees a test prompt.

Methods, all greedy, each calibrated on the same calibration prompts to the same large-token shares s (5/10/15/20/30%):

    small / large   one model alone
    r2r             R2R router (scaled to the small model: width 40, 6 blocks, ~93k parameters, 2.8% of the small
                    model) trained on divergence labels: the large model's greedy answer is followed by both models;
                    at every mismatch the large model continues both branches and the verifier (exact match) decides
                    whether the small token is harmful (label 1) or a harmless mismatch (label 0).
                    θ = the (1 − s)-quantile of the router's probabilities on the small model's calibration answers
                    (plus R2R's own operating point: θ for recall 0.95 of harmful tokens on held-out labels)
    confidence      route when the small model's top probability is below the s-quantile of its calibration values
    ead             entropy-adaptive switching (w = d_min = 1: answers are 11 tokens), τ = the (1 − s)-quantile of the
                    small model's entropies
    random          route each token with probability s
    cascade         the small model answers; the post-hoc deferral model (logistic regression on token log-prob
                    quantiles, fitted on the label prompts to "the large answer is right and the small one is wrong")
                    defers the share s of the calibration answers with the lowest scores to the large model

Cost. FLOPs per prompt = 2·params·tokens processed, per request (batch-1 accounting): the small model processes the
prompt and every answer token; the large model, when it produced a token of the row, the prompt and the answer up to
its last produced token (its KV cache catches up on the rest), or the whole answer (large-only, deferred cascade rows:
the cascade also pays the discarded small answer); the router its MLP per token (the shared embedding lookup is free).
Attention-score FLOPs are left out (prompts are ~30 tokens). Wall time of each run (batched, on this CPU) is reported as
measured; it is not a speed claim (on a CPU the per-call overhead of two models dominates tiny batches).

Seeds (≥ 5) vary the test prompts, the router's initialisation and its label subset (80% of the label prompts), and
the random baseline; the two language models are trained/loaded once. Reported: mean and 95% t-interval over seeds of
accuracy, achieved large-token share and FLOPs per method and target share, and the paired per-seed accuracy
difference R2R − confidence at each share.

    python bench/routing_benchmark.py                    # full run (7-11 min on 2 busy CPU cores, one thread)
    python bench/routing_benchmark.py --quick            # smoke run (numbers meaningless)
    python bench/routing_benchmark.py --plot-only bench/results/routing_benchmark.json
    python bench/routing_benchmark.py --device cuda      # GPU: same numbers, wall times meaningful per device
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import struct
import sys
import time
import zlib
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

METHODS = ("r2r", "confidence", "ead", "random", "cascade")

# --------------------------------------------------------------------------------------------------------------------
# Task and model pair
# --------------------------------------------------------------------------------------------------------------------


def prompt_text(problem, shot) -> str:
    return f"{shot.question}\nAnswer: {shot.answer}\n{problem.question}\nAnswer:"


def answer_tokens(tokenizer, problem) -> list[int]:
    return tokenizer(" " + problem.answer + "\n", add_special_tokens=False)["input_ids"]


def exact_match(prompts, completions, answer, **kwargs) -> list[float]:
    """Verifier of the final answer (TRL reward signature): 1 iff the completion is exactly the answer."""
    from trl_tokenlevel.data.builtin.tasks import normalize

    return [float(normalize(c) == a) for c, a in zip(completions, answer)]


def load_problems(args):
    from trl_tokenlevel.data.builtin.tasks import make_problems, shots_for

    shot = shots_for("copy", 1, length=args.copy_length)[0]
    kw = {"length": args.copy_length}
    train = make_problems("copy", args.small_train_problems + args.label_prompts, split="train", seed=1, **kw)
    train = [p for p in train if p.key != shot.key]
    small_train, label = train[: args.small_train_problems], train[args.small_train_problems :][: args.label_prompts]
    calibration = make_problems("copy", args.calibration_prompts, split="valid", seed=2, **kw)
    test = make_problems("copy", args.test_prompts * args.seeds, split="test", seed=3, **kw)
    return shot, small_train, label, calibration, test


def answer_tokenizer(tokenizer):
    """The demo tokenizer with the newline as end of sequence (the answer format's stop token); pad stays."""
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    if len(newline) != 1:
        raise RuntimeError("The newline is not a single token of this tokenizer.")
    tok = copy.deepcopy(tokenizer)
    tok.eos_token = tok.convert_ids_to_tokens(newline[0])  # the vocabulary's string for it ("Ċ"), not "\n"
    tok.padding_side = "left"
    if tok.eos_token_id != newline[0]:
        raise RuntimeError(f"Could not make the newline ({newline[0]}) the end of sequence (got {tok.eos_token_id}).")
    return tok


def build_small_model(tokenizer, vocab_size: int, hidden: int, layers: int, seed: int):
    """A narrow Llama over the large model's vocabulary (tied embeddings, standard init), except that attention starts
    as a pass-through of the token identities (value and output projections = identity): every head's output is then
    an average of the attended tokens' embeddings, so the gradient can sharpen attention onto the digit to copy from
    the first step. With random projections the model sat on a plateau (constant digits) for 300+ steps."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         tie_word_embeddings=True, max_position_embeddings=1024,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=None)  # fmt: skip
    small = LlamaForCausalLM(config)
    for layer in small.model.layers:
        layer.self_attn.v_proj.weight.data.copy_(torch.eye(hidden))
        layer.self_attn.o_proj.weight.data.copy_(torch.eye(hidden))
    return small


@torch.no_grad()
def small_accuracy(model, tokenizer, problems, shot) -> float:
    from trl_tokenlevel.data.builtin.tasks import is_correct
    from trl_tokenlevel.generation.kv import cached_generate

    model.eval()
    ids, mask = encode(tokenizer, problems, shot, next(model.parameters()).device)
    out = cached_generate(
        model, ids, mask, tokenizer=tokenizer, max_new_tokens=len(answer_tokens(tokenizer, problems[0]))
    )
    return sum(is_correct(p, t) for p, t in zip(problems, out.texts)) / len(problems)


def train_small(
    small,
    tokenizer,
    problems,
    shot,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    log,
    eval_problems=None,
    eval_every: int = 5,
    target_accuracy: float | None = None,
) -> tuple[float, dict]:
    """Next-token loss on the answer tokens only (the LM head is applied to those positions: the 49k-wide head is the
    small model's main cost); AdamW, 5 warm-up steps then a constant learning rate.

    With `target_accuracy`, greedy accuracy on `eval_problems` (calibration prompts) is measured every `eval_every`
    steps and training stops once it reaches the target: the small model is made *clearly weaker* than the large one
    on purpose, the regime token routing is for. Returns the training time and `{"steps", "eval_accuracy"}`."""
    rows = [tokenizer(prompt_text(p, shot), add_special_tokens=False)["input_ids"] + answer_tokens(tokenizer, p)
            for p in problems]  # fmt: skip
    prompt_len = len(tokenizer(prompt_text(problems[0], shot), add_special_tokens=False)["input_ids"])
    if len({len(r) for r in rows}) != 1:
        raise RuntimeError("Copy prompts should all have the same token length.")
    data = torch.tensor(rows)
    optimizer = torch.optim.AdamW(small.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 5))
    generator = torch.Generator().manual_seed(seed)
    head = small.get_output_embeddings()
    small.train()
    start = time.perf_counter()
    info = {"steps": steps, "eval_accuracy": None}
    for step in range(steps):
        ids = data[torch.randint(0, len(data), (batch,), generator=generator)]
        hidden = small.model(input_ids=ids).last_hidden_state[:, prompt_len - 1 : -1]
        logits = head(hidden).float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, prompt_len:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(small.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 25 == 0 or step == steps - 1:
            log(f"    small step {step:4d}  loss {loss.item():.4f}  {time.perf_counter() - start:6.1f}s")
        if eval_problems and (step + 1) % eval_every == 0:
            accuracy = small_accuracy(small, tokenizer, eval_problems, shot)
            small.train()
            log(
                f"    small step {step + 1}: greedy accuracy {accuracy:.3f} on {len(eval_problems)} calibration prompts"
            )
            info.update(steps=step + 1, eval_accuracy=accuracy)
            if target_accuracy is not None and accuracy >= target_accuracy:
                break
    small.eval()
    return time.perf_counter() - start, info


def prepare_small_model(args, large, tokenizer, small_train, eval_problems, shot, device, log):
    """Train the small model, or load the one a previous run saved in `--small-model` (training is then not repeated;
    its recorded time is reported). Returns the model and the training time in seconds."""
    from transformers import LlamaForCausalLM

    folder = Path(args.small_model) if args.small_model else None
    if folder is not None and (folder / "config.json").exists():
        info = json.loads((folder / "train_info.json").read_text())
        if info["args"] != small_model_args(args):
            raise ValueError(f"{folder} holds a small model trained with {info['args']}, not {small_model_args(args)}; "
                             "use another --small-model folder.")  # fmt: skip
        log(f"small model loaded from {folder} (trained in {info['train_s']:.0f}s, {info['training']})")
        return LlamaForCausalLM.from_pretrained(folder).to(device).eval(), info["train_s"], info["training"]
    vocab_size = large.get_input_embeddings().weight.shape[0]
    small = build_small_model(tokenizer, vocab_size, args.small_hidden, args.small_layers, args.seed).to(device)
    log(f"small {num_parameters(small):,} parameters ({num_parameters(large) / num_parameters(small):.1f}x fewer than "
        f"large); training {args.small_steps} steps on {len(small_train)} train-split problems")  # fmt: skip
    seconds, training = train_small(small, tokenizer, small_train, shot, args.small_steps, args.small_batch,
                                    args.small_lr, args.seed, log, eval_problems=eval_problems[:16],
                                    eval_every=args.small_eval_every, target_accuracy=args.small_target_accuracy)  # fmt: skip
    if folder is not None:
        small.save_pretrained(folder)
        info = {"args": small_model_args(args), "train_s": seconds, "training": training}
        (folder / "train_info.json").write_text(json.dumps(info))
    return small, seconds, training


def small_model_args(args) -> dict:
    keys = ("copy_length", "small_hidden", "small_layers", "small_steps", "small_batch", "small_lr",
            "small_target_accuracy", "small_eval_every",
            "small_train_problems", "seed")  # fmt: skip
    return {key: getattr(args, key) for key in keys}


def encode(tokenizer, problems, shot, device):
    enc = tokenizer([prompt_text(p, shot) for p in problems], padding=True, padding_side="left", return_tensors="pt",
                    add_special_tokens=False)  # fmt: skip
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def num_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------------------------------
# Scoring one run
# --------------------------------------------------------------------------------------------------------------------


def score(out, rows, problems, prompt_lengths, cost, *, small_runs=True, router_flops_per_token=0, wall=0.0) -> dict:
    """Accuracy, large-token share and per-request FLOPs (module docstring) of the `rows` of a `TokenRoutingOutput`.
    `wall` is the time of the whole batched run (all seeds)."""
    from trl_tokenlevel.data.builtin.tasks import is_correct

    problems, prompt_lengths, texts = problems[rows], prompt_lengths[rows], out.texts[rows]
    mask = out.completion_mask.bool().cpu()[rows]
    large = out.large_mask.bool().cpu()[rows] & mask
    lengths = mask.sum(dim=1)
    positions = torch.arange(mask.shape[1]).expand_as(mask)
    last_large = torch.where(large, positions, torch.full_like(positions, -1)).max(dim=1).values
    large_tokens = torch.where(last_large >= 0, prompt_lengths + last_large + 1, torch.zeros_like(last_large))
    small_tokens = prompt_lengths + lengths if small_runs else torch.zeros_like(lengths)
    flops = (2 * cost["small"] * small_tokens + 2 * cost["large"] * large_tokens
             + router_flops_per_token * lengths).double()  # fmt: skip
    correct = [is_correct(p, t) for p, t in zip(problems, texts)]
    return {
        "accuracy": sum(correct) / len(correct),
        "large_share": large.sum().item() / max(mask.sum().item(), 1),
        "flops_per_prompt": flops.mean().item(),
        "router_flops_per_prompt": float((router_flops_per_token * lengths).double().mean()),
        "wall_s": wall,
        "correct": correct,
    }


def cascade_score(small_out, large_out, defer, rows, problems, prompt_lengths, cost) -> dict:
    """The cascade's outputs without running it again: greedy decoding is deterministic, so a deferred row's answer
    is the large-only answer and a kept row's the small-only answer. Deferred rows pay both."""
    from trl_tokenlevel.data.builtin.tasks import is_correct

    defer, problems, prompt_lengths = defer[rows], problems[rows], prompt_lengths[rows]
    small_len = small_out.completion_mask.sum(dim=1).cpu()[rows]
    large_len = large_out.completion_mask.sum(dim=1).cpu()[rows]
    texts = [lt if d else st for st, lt, d in zip(small_out.texts[rows], large_out.texts[rows], defer.tolist())]
    correct = [is_correct(p, t) for p, t in zip(problems, texts)]
    final_len = torch.where(defer, large_len, small_len)
    flops = (2 * cost["small"] * (prompt_lengths + small_len)
             + defer * 2 * cost["large"] * (prompt_lengths + large_len)).double()  # fmt: skip
    return {
        "accuracy": sum(correct) / len(correct),
        "large_share": (final_len * defer).sum().item() / max(final_len.sum().item(), 1),
        "flops_per_prompt": flops.mean().item(),
        "router_flops_per_prompt": 0.0,
        "wall_s": 0.0,
        "deferral_rate": defer.float().mean().item(),
        "correct": correct,
    }


def timed(fn, *args, **kwargs):
    begin = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - begin


def confidence_score(x) -> torch.Tensor:
    """The zero-parameter rule: 1 − the small model's top probability (route iff ≥ θ, i.e. top probability ≤ 1 − θ)."""
    return 1.0 - torch.softmax(x.logits.float(), -1).max(-1).values


def coin_flips(seed: int):
    """The random baseline: a uniform number per proposal (route iff ≥ 1 − s, i.e. with probability s)."""
    generator = torch.Generator().manual_seed(seed)
    return lambda x: torch.rand(len(x.token_ids), generator=generator)


class PerRowRouter:
    """Routing callable for a batch holding several seeds' prompts: row i uses router `routers[row_seed[i]]` with its
    threshold, and returns 1.0 (route) or 0.0 (use with `threshold=0.5`)."""

    def __init__(self, routers, thresholds, row_seed):
        self.routers, self.thresholds, self.row_seed = routers, thresholds, row_seed

    def __call__(self, x):
        decision = torch.zeros(len(x.token_ids))
        for index, (router, theta) in enumerate(zip(self.routers, self.thresholds)):
            rows = (self.row_seed == index).nonzero().flatten()
            probs = router.probability(x.hidden[rows], x.token_ids[rows], x.logits[rows])
            decision[rows] = (probs >= theta).float().cpu()
        return decision


class Recorder:
    """A routing callable that never routes and records, for every active row's proposal, each router's probability,
    the top probability and the entropy (bits) of the small model: the calibration statistics of the token-level
    methods on the small model's own answers (the large model is never run)."""

    def __init__(self, routers):
        self.routers = routers
        self.values = {"r2r": [[] for _ in routers], "top_prob": [], "entropy": []}

    def __call__(self, x):
        from trl_tokenlevel.ops.decoding import next_token_entropy

        active = x.active
        for values, router in zip(self.values["r2r"], self.routers):
            values.append(router.probability(x.hidden, x.token_ids, x.logits)[active].cpu())
        self.values["top_prob"].append(torch.softmax(x.logits.float(), -1).max(-1).values[active].cpu())
        self.values["entropy"].append(next_token_entropy(x.logits, "bits")[active].cpu())
        return torch.zeros(len(x.token_ids))

    def tensors(self) -> dict:
        return {
            "r2r": [torch.cat(values).double() for values in self.values["r2r"]],
            "top_prob": torch.cat(self.values["top_prob"]).double(),
            "entropy": torch.cat(self.values["entropy"]).double(),
        }


# --------------------------------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------------------------------


def run_benchmark(args) -> dict:
    from datasets import Dataset

    from trl_tokenlevel.generation.cascade import PostHocDeferral, cascade_scores
    from trl_tokenlevel.generation.ead import ead_generate
    from trl_tokenlevel.generation.kv import PromptCache, cached_generate
    from trl_tokenlevel.generation.routing import (
        RouterTrainingConfig,
        TokenRouter,
        build_routing_dataset,
        routed_generate,
        routing_tensors,
        train_router,
    )
    from trl_tokenlevel.models import load_demo_model
    from trl_tokenlevel.ops.decoding import deferral_threshold

    torch.set_num_threads(args.threads)
    start_all = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - start_all:7.1f}s] {message}", flush=True)

    device = torch.device(args.device)
    large, base_tokenizer = load_demo_model(use_hub=False)
    large = large.to(device).eval()
    tokenizer = answer_tokenizer(base_tokenizer)
    shot, small_train, label_problems, calibration_problems, test_problems = load_problems(args)
    max_new = len(answer_tokens(tokenizer, test_problems[0])) + 1
    timings = {}

    small, timings["small_training_s"], small_training = prepare_small_model(
        args, large, tokenizer, small_train, calibration_problems, shot, device, log
    )
    cost = {"small": num_parameters(small), "large": num_parameters(large)}
    if args.train_small_only:
        return {}

    # ---- Router labels (train split, problems the small model never saw): R2R's divergence labelling
    start = time.perf_counter()
    label_data = Dataset.from_dict({"prompt": [prompt_text(p, shot) for p in label_problems],
                                    "answer": [p.answer for p in label_problems]})  # fmt: skip
    labelled = build_routing_dataset(small, large, tokenizer, label_data, reward_fn=exact_match,
                                     max_new_tokens=max_new, top_k=100, batch_size=args.batch,
                                     continuation_max_new_tokens=max_new, progress=False)  # fmt: skip
    timings["labelling_s"] = time.perf_counter() - start
    mismatch = sum(sum(m) for m in labelled["mismatch"])
    harmful = sum(sum(lab) for lab in labelled["labels"])
    label_stats = {
        "prompts": len(labelled),
        "tokens": sum(len(lab) for lab in labelled["labels"]),
        "mismatches": mismatch,
        "harmful_mismatches": harmful,
        "harmless_mismatches": mismatch - harmful,
        "large_reference_accuracy": sum(exact_match(None, labelled["completion"], labelled["answer"])) / len(labelled),
    }
    log(f"labels: {label_stats} ({timings['labelling_s']:.0f}s)")

    # ---- Cascade deferral model (fitted on the label prompts: small answers vs the large references)
    label_ids, label_mask = encode(tokenizer, label_problems, shot, device)
    small_on_labels = cached_generate(small, label_ids, label_mask, tokenizer=tokenizer, max_new_tokens=max_new)
    small_right = torch.tensor(exact_match(None, small_on_labels.texts, labelled["answer"]))
    large_right = torch.tensor(exact_match(None, labelled["completion"], labelled["answer"]))
    defer_helps = (large_right > small_right).long()
    if 0 < defer_helps.sum() < len(defer_helps):
        deferral = PostHocDeferral().fit(small_on_labels.token_logprobs.cpu(), small_on_labels.completion_mask.cpu(),
                                         defer_helps)  # fmt: skip
        cascade_rule, cascade_rule_name = deferral, "post-hoc (learned)"
    else:  # no contrast to learn from: the minimum token log-prob (Chow-Quantile α = 0)
        cascade_rule, cascade_rule_name = "chow_quantile", "min token log-prob (no label contrast)"
    log(f"cascade rule: {cascade_rule_name}; defer helps on {int(defer_helps.sum())}/{len(defer_helps)} label prompts")

    # ---- Calibration prompts (valid split): the small model's own answers, never the large model
    cal_ids, cal_mask = encode(tokenizer, calibration_problems, shot, device)
    small_on_cal = cached_generate(small, cal_ids, cal_mask, tokenizer=tokenizer, max_new_tokens=max_new)
    cal_cascade_scores = cascade_scores(small_on_cal.token_logprobs.cpu(), small_on_cal.completion_mask.cpu(),
                                        cascade_rule, 0.0)  # fmt: skip

    # ---- One router per seed: its own initialisation and an 80% subset of the label prompts; early stopping and
    # R2R's recall-0.95 threshold on the other 20%.
    tensors = routing_tensors(labelled)
    row_lengths = [len(lab) for lab in labelled["labels"]]
    offsets = torch.tensor([0, *row_lengths]).cumsum(0).tolist()

    def token_rows(rows):
        index = torch.cat([torch.arange(offsets[r], offsets[r + 1]) for r in rows])
        return {key: value[index] for key, value in tensors.items()}

    seeds = [args.seed + i for i in range(args.seeds)]
    routers, router_info = [], []
    for seed in seeds:
        order = torch.randperm(len(row_lengths), generator=torch.Generator().manual_seed(seed)).tolist()
        if len(order) < 2:
            raise ValueError(f"Need at least 2 labelled prompts to train and stop a router, got {len(order)}.")
        cut = min(max(1, int(0.8 * len(order))), len(order) - 1)
        torch.manual_seed(seed)
        router = TokenRouter.from_small_model(small)
        config = RouterTrainingConfig(learning_rate=args.router_lr, batch_size=256, num_epochs=args.router_epochs,
                                      patience=10, target_recall=0.95, seed=seed)  # fmt: skip
        trained, train_s = timed(train_router, router, token_rows(order[:cut]), token_rows(order[cut:]), config,
                                 progress=False)  # fmt: skip
        routers.append(router)
        router_info.append({"seed": seed, "parameters": router.num_parameters(), "width": router.config.width,
                            "train_s": train_s, "epochs": len(trained.history), "recall_threshold": trained.threshold,
                            "heldout_label_metrics": trained.validation})  # fmt: skip
    log(f"routers: {router_info[0]['parameters']:,} parameters each, trained in "
        f"{sum(r['train_s'] for r in router_info):.1f}s for {len(seeds)} seeds")  # fmt: skip

    # ---- Calibration statistics on the small model's own calibration answers (the large model never runs)
    recorder = Recorder(routers)
    routed_generate(small, large, recorder, cal_ids, cal_mask, threshold=2.0, tokenizer=tokenizer,
                    max_new_tokens=max_new)  # fmt: skip
    stats = recorder.tensors()

    # ---- Test: every seed's prompts in one batch (each seed's rows use that seed's router); scored per seed
    per_seed = args.test_prompts
    ids, mask = encode(tokenizer, test_problems, shot, device)
    row_seed = torch.arange(len(test_problems)) // per_seed
    prompt_lengths = mask.sum(dim=1).cpu()
    start = time.perf_counter()
    small_cache = PromptCache.build(small, ids, mask, capture_hidden=True)
    large_cache = PromptCache.build(large, ids, mask)
    timings["test_prompt_encoding_s"] = time.perf_counter() - start
    common = {"tokenizer": tokenizer, "max_new_tokens": max_new}
    pair = {"small_prompt_cache": small_cache, "large_prompt_cache": large_cache, **common}
    router_flops = torch.tensor([r.flops_per_token() for r in routers])[row_seed]
    runs = [{"seed": seed, "router": info, "shares": {}} for seed, info in zip(seeds, router_info)]

    def record(name, out, wall, share=None, router_flops_per_token=None, **extra):
        for index, run in enumerate(runs):
            rows = slice(index * per_seed, (index + 1) * per_seed)
            flops = 0 if router_flops_per_token is None else router_flops_per_token[rows]
            result = {**score(out, rows, test_problems, prompt_lengths, cost, small_runs=name != "large",
                              router_flops_per_token=flops, wall=wall), **extra}  # fmt: skip
            if share is None:
                run[name] = result
            else:
                run["shares"].setdefault(str(share), {})[name] = result

    small_out, wall = timed(cached_generate, small, ids, mask, prompt_cache=small_cache, **common)
    record("small", small_out, wall)
    large_out, wall = timed(cached_generate, large, ids, mask, prompt_cache=large_cache, is_large=True, **common)
    record("large", large_out, wall)
    log(f"test: small acc {sum(r['small']['accuracy'] for r in runs) / len(runs):.3f}, large acc "
        f"{sum(r['large']['accuracy'] for r in runs) / len(runs):.3f} ({len(test_problems)} prompts)")  # fmt: skip
    native = PerRowRouter(routers, [info["recall_threshold"] for info in router_info], row_seed)
    out, wall = timed(routed_generate, small, large, native, ids, mask, threshold=0.5, **pair)
    record("r2r_recall95", out, wall, router_flops_per_token=router_flops)
    test_cascade_scores = cascade_scores(small_out.token_logprobs.cpu(), small_out.completion_mask.cpu(),
                                         cascade_rule, 0.0)  # fmt: skip
    for share in args.shares:
        thetas = [torch.quantile(stats["r2r"][i], 1 - share).item() for i in range(len(routers))]
        out, wall = timed(routed_generate, small, large, PerRowRouter(routers, thetas, row_seed), ids, mask,
                          threshold=0.5, **pair)  # fmt: skip
        record("r2r", out, wall, share, router_flops_per_token=router_flops)
        q = torch.quantile(stats["top_prob"], share).item()
        out, wall = timed(routed_generate, small, large, confidence_score, ids, mask, threshold=1.0 - q, **pair)
        record("confidence", out, wall, share, threshold=q)
        tau = torch.quantile(stats["entropy"], 1 - share).item()
        out, wall = timed(ead_generate, small, large, ids, mask, threshold=tau, window=1, min_dwell=1, **pair)
        record("ead", out, wall, share, threshold=tau)
        out, wall = timed(routed_generate, small, large, coin_flips(1000 + args.seed), ids, mask,
                          threshold=1.0 - share, **pair)  # fmt: skip
        record("random", out, wall, share)
        defer = test_cascade_scores < deferral_threshold(cal_cascade_scores, share)
        for index, run in enumerate(runs):
            rows = slice(index * per_seed, (index + 1) * per_seed)
            run["shares"][str(share)]["cascade"] = cascade_score(small_out, large_out, defer, rows, test_problems,
                                                                 prompt_lengths, cost)  # fmt: skip
        summary = {m: sum(r["shares"][str(share)][m]["accuracy"] for r in runs) / len(runs) for m in METHODS}
        shares = {m: sum(r["shares"][str(share)][m]["large_share"] for r in runs) / len(runs) for m in METHODS}
        log(f"share {share:.2f}: " + ", ".join(f"{m} acc {summary[m]:.3f} @ {shares[m]:.3f}" for m in METHODS))
    timings["total_s"] = time.perf_counter() - start_all
    return {
        "task": {
            "name": "copy",
            "copy_length": args.copy_length,
            "answer_tokens": max_new - 1,
            "prompt_tokens": int(prompt_lengths.max()),
            "small_train_problems": len(small_train),
            "label_prompts": len(label_problems),
            "calibration_prompts": len(calibration_problems),
            "test_prompts_per_seed": args.test_prompts,
        },
        "models": {
            "small": {
                "parameters": cost["small"],
                "hidden": args.small_hidden,
                "layers": args.small_layers,
                "train_steps": small_training["steps"],
                "calibration_accuracy_at_stop": small_training["eval_accuracy"],
            },
            "large": {"parameters": cost["large"], "name": "SmolLM2-135M-Instruct (demo model)"},
            "router": {
                "parameters": runs[0]["router"]["parameters"],
                "width": runs[0]["router"]["width"],
                "share_of_small": runs[0]["router"]["parameters"] / cost["small"],
            },
        },
        "label_stats": label_stats,
        "cascade_rule": cascade_rule_name,
        "args": vars(args),
        "timings_s": timings,
        "runs": runs,
    }


# --------------------------------------------------------------------------------------------------------------------
# Summary (from the JSON only): mean and 95% CI over seeds, paired R2R − confidence differences
# --------------------------------------------------------------------------------------------------------------------


def summarise(results: dict) -> dict:
    from bench.claims.common import mean_ci, paired_difference, verdict

    runs = results["runs"]
    large_flops = [r["large"]["flops_per_prompt"] for r in runs]

    def stats(rows):
        return {
            "accuracy": mean_ci([r["accuracy"] for r in rows]),
            "large_share": mean_ci([r["large_share"] for r in rows]),
            "flops_per_prompt": mean_ci([r["flops_per_prompt"] for r in rows]),
            "flops_vs_large": mean_ci([r["flops_per_prompt"] / f for r, f in zip(rows, large_flops)]),
            "router_flops_per_prompt": mean_ci([r["router_flops_per_prompt"] for r in rows]),
            "wall_s": mean_ci([r["wall_s"] for r in rows]),
        }

    lines = [
        {"method": "small", "target_share": 0.0, **stats([r["small"] for r in runs])},
        {"method": "large", "target_share": 1.0, **stats([r["large"] for r in runs])},
        {"method": "r2r (recall 0.95 θ)", "target_share": None, **stats([r["r2r_recall95"] for r in runs])},
    ]
    comparisons = []
    for share in results["args"]["shares"]:
        key = str(share)
        for method in METHODS:
            lines.append({"method": method, "target_share": share, **stats([r["shares"][key][method] for r in runs])})
        difference = paired_difference([r["shares"][key]["r2r"]["accuracy"] for r in runs],
                                       [r["shares"][key]["confidence"]["accuracy"] for r in runs])  # fmt: skip
        comparisons.append({"target_share": share, "r2r_minus_confidence_accuracy": difference,
                            "verdict_r2r_beats_confidence": verdict(difference, +1)})  # fmt: skip
    return {"lines": lines, "r2r_vs_confidence": comparisons}


def _fmt(stat, digits=3, scale=1.0) -> str:
    if stat["ci95"] is None:
        return f"{stat['mean'] * scale:.{digits}f}"
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['ci95'] * scale:.{digits}f}"


def markdown(results: dict) -> str:
    summary = results["summary"]
    models, labels, task = results["models"], results["label_stats"], results["task"]
    seeds = len(results["runs"])
    pair = (
        f"Task: copy {task['copy_length']} digits ({task['answer_tokens']} answer tokens, {task['prompt_tokens']} prompt "
        f"tokens). Large: {models['large']['name']}, {models['large']['parameters']:,} parameters. Small: "
        f"{models['small']['layers']} layers × {models['small']['hidden']}, {models['small']['parameters']:,} parameters "
        f"({models['large']['parameters'] / models['small']['parameters']:.0f}x fewer), {models['small']['train_steps']} "
        f"training steps. Router: width {models['router']['width']}, {models['router']['parameters']:,} parameters "
        f"({100 * models['router']['share_of_small']:.1f}% of the small model)."
    )
    label_line = (
        f"Labels ({labels['prompts']} train-split prompts, {labels['tokens']} tokens): {labels['mismatches']} "
        f"small/large mismatches, {labels['harmful_mismatches']} harmful (the verifier says the large branch is right "
        f"and the small one is not), {labels['harmless_mismatches']} harmless. Large reference accuracy on them "
        f"{labels['large_reference_accuracy']:.3f}. Cascade rule: {results['cascade_rule']}."
    )
    seeds_line = (
        f"{seeds} seeds × {task['test_prompts_per_seed']} held-out test prompts; mean ± 95% CI over seeds. FLOPs per "
        "prompt include the router; wall time is one batched run of all seeds' prompts on this machine, not a speed "
        "claim."
    )
    header = (
        "| method | target large share | large-token share | accuracy | GFLOPs / prompt (with router) | vs large | "
        "router GFLOPs | wall s |"
    )
    out = [pair, "", label_line, "", seeds_line, "", header, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for line in summary["lines"]:
        target = "-" if line["target_share"] is None else f"{line['target_share']:.2f}"
        out.append(f"| {line['method']} | {target} | {_fmt(line['large_share'])} | {_fmt(line['accuracy'])} | "
                   f"{_fmt(line['flops_per_prompt'], 2, 1e-9)} | {_fmt(line['flops_vs_large'])} | "
                   f"{line['router_flops_per_prompt']['mean'] * 1e-9:.4f} | {line['wall_s']['mean']:.1f} |")  # fmt: skip
    out += [
        "",
        "R2R − confidence rule, paired per seed (same test prompts, same target share):",
        "",
        "| target share | accuracy difference | verdict (does R2R beat the confidence rule?) |",
        "|---:|---:|---|",
    ]
    for c in summary["r2r_vs_confidence"]:
        out.append(f"| {c['target_share']:.2f} | {_fmt(c['r2r_minus_confidence_accuracy'])} | "
                   f"{c['verdict_r2r_beats_confidence']} |")  # fmt: skip
    return "\n".join(out)


# 5x7 glyphs, one string of 7 five-pixel rows per character ('#' = ink).
_GLYPHS = {
    "0": ".###.#...##..###.#.###..##...#.###.",
    "1": "..#...##....#....#....#....#...###.",
    "2": ".###.#...#....#...#...#...#...#####",
    "3": "####.....#...#....#.....##...#.###.",
    "4": "...#...##..#.#.#..#.#####...#....#.",
    "5": "######....####.....#....##...#.###.",
    "6": "..##..#...#....####.#...##...#.###.",
    "7": "#####....#...#...#...#....#....#...",
    "8": ".###.#...##...#.###.#...##...#.###.",
    "9": ".###.#...##...#.####....#...#..##..",
    "A": ".###.#...##...#######...##...##...#",
    "B": "####.#...##...#####.#...##...#####.",
    "C": ".###.#...##....#....#....#...#.###.",
    "D": "###..#..#.#...##...##...##..#.###..",
    "E": "######....#....####.#....#....#####",
    "F": "######....#....####.#....#....#....",
    "G": ".###.#...##....#.####...##...#.####",
    "H": "#...##...##...#######...##...##...#",
    "I": ".###...#....#....#....#....#...###.",
    "K": "#...##..#.#.#..##...#.#..#..#.#...#",
    "L": "#....#....#....#....#....#....#####",
    "M": "#...###.###.#.##.#.##...##...##...#",
    "N": "#...###..##.#.##..###...##...##...#",
    "O": ".###.#...##...##...##...##...#.###.",
    "P": "####.#...##...#####.#....#....#....",
    "Q": ".###.#...##...##...##.#.##..#..##.#",
    "R": "####.#...##...#####.#.#..#..#.#...#",
    "S": ".####.....#.....###.....#....#####.",
    "T": "#####..#....#....#....#....#....#..",
    "U": "#...##...##...##...##...##...#.###.",
    "V": "#...##...##...##...##...#.#.#...#..",
    ":": ".......#..............#............",
    "W": "#...##...##...##.#.##.#.##.#..#.#..",
    "Y": "#...##...#.#.#...#....#....#....#..",
    "=": "..........#####.....#####..........",
    ".": "..............................##...",
    "-": "................###................",
    " ": "." * 35,
    "%": "##...##..#...#...#...#...#..##...##",
    "/": "....#....#...#...#...#...#....#....",
    "<": "...#...#...#...#.....#.....#.....#.",
}
_COLORS = {"small": (214, 39, 40), "large": (31, 119, 180), "r2r": (44, 160, 44), "ead w=1": (255, 127, 14),
           "ead w=5": (188, 189, 34), "cascade": (148, 103, 189)}  # fmt: skip


class Canvas:
    def __init__(self, width: int, height: int):
        self.width, self.height = width, height
        self.pixels = bytearray([255] * (width * height * 3))

    def dot(self, x: int, y: int, color) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            i = 3 * (y * self.width + x)
            self.pixels[i : i + 3] = bytes(color)

    def line(self, x0, y0, x1, y1, color, thickness: int = 1) -> None:
        steps = max(abs(x1 - x0), abs(y1 - y0), 1)
        for s in range(steps + 1):
            x = round(x0 + (x1 - x0) * s / steps)
            y = round(y0 + (y1 - y0) * s / steps)
            for dx in range(thickness):
                for dy in range(thickness):
                    self.dot(x + dx - thickness // 2, y + dy - thickness // 2, color)

    def disc(self, cx: int, cy: int, radius: int, color) -> None:
        for y in range(cy - radius, cy + radius + 1):
            for x in range(cx - radius, cx + radius + 1):
                if (x - cx) ** 2 + (y - cy) ** 2 <= radius**2:
                    self.dot(x, y, color)

    def text(self, x: int, y: int, string: str, color=(0, 0, 0), scale: int = 2) -> None:
        for char in string.upper():
            glyph = _GLYPHS.get(char, _GLYPHS[" "])
            for row in range(7):
                for col in range(5):
                    if glyph[row * 5 + col] == "#":
                        for dx in range(scale):
                            for dy in range(scale):
                                self.dot(x + col * scale + dx, y + row * scale + dy, color)
            x += 6 * scale

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(self.pixels[3 * y * self.width : 3 * (y + 1) * self.width])
                       for y in range(self.height))  # fmt: skip

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
        return b"\x89PNG\r\n\x1a\n" + body


_COLORS = {"small": (214, 39, 40), "large": (31, 119, 180), "r2r": (44, 160, 44), "confidence": (255, 127, 14),
           "ead": (188, 189, 34), "random": (127, 127, 127), "cascade": (148, 103, 189),
           "r2r (recall 0.95 θ)": (0, 80, 0)}  # fmt: skip


def _panel(canvas, lines, x_key, x_max, left, top, width, height, title, x_label):
    low = max(0.0, math.floor(min(g["accuracy"]["mean"] for g in lines) * 10) / 10 - 0.1)
    high = min(1.0, math.ceil(max(g["accuracy"]["mean"] for g in lines) * 10) / 10 + 0.05)

    def x_of(value):
        return round(left + value / x_max * width)

    def y_of(accuracy):
        return round(top + height - (accuracy - low) / (high - low) * height)

    grid = (225, 225, 225)
    for i in range(6):
        v = x_max * i / 5
        canvas.line(x_of(v), top, x_of(v), top + height, grid)
        canvas.text(x_of(v) - 12, top + height + 8, f"{v:.2f}", scale=1)
    steps = int(round((high - low) / 0.1))
    for i in range(steps + 1):
        a = low + i * 0.1
        canvas.line(left, y_of(a), left + width, y_of(a), grid)
        canvas.text(left - 40, y_of(a) - 4, f"{a:.1f}", scale=1)
    canvas.line(left, top, left, top + height, (0, 0, 0), 2)
    canvas.line(left, top + height, left + width, top + height, (0, 0, 0), 2)
    canvas.text(left, top - 25, title, scale=2)
    canvas.text(left + width // 3, top + height + 25, x_label, scale=1)
    by_method = {}
    for line in lines:
        by_method.setdefault(line["method"], []).append(line)
    for method, group in by_method.items():
        color = _COLORS.get(method, (0, 0, 0))
        points = sorted(((x_of(min(g[x_key]["mean"], x_max)), y_of(g["accuracy"]["mean"]), g) for g in group),
                        key=lambda point: point[:2])  # fmt: skip
        for (x0, y0, _), (x1, y1, _) in zip(points, points[1:]):  # noqa: RUF007
            canvas.line(x0, y0, x1, y1, color, 2)
        for x, y, line in points:
            ci = line["accuracy"]["ci95"] or 0.0
            bottom, top_ = max(low, line["accuracy"]["mean"] - ci), min(high, line["accuracy"]["mean"] + ci)
            canvas.line(x, y_of(bottom), x, y_of(top_), color)
            canvas.disc(x, y, 4, color)


def plot(results: dict, path: Path) -> None:
    """Two panels: accuracy vs achieved large-token share, accuracy vs FLOPs per prompt relative to large-only
    (router included); mean over seeds with 95% CI bars."""
    lines = results["summary"]["lines"]
    canvas = Canvas(1320, 560)
    _panel(canvas, lines, "large_share", 1.0, 70, 60, 480, 420, "ACCURACY VS LARGE-TOKEN SHARE", "LARGE-TOKEN SHARE")
    _panel(canvas, lines, "flops_vs_large", 1.2, 640, 60, 480, 420, "ACCURACY VS FLOPS", "FLOPS / LARGE-ONLY FLOPS")
    y = 70
    for method, color in _COLORS.items():
        canvas.disc(1160, y + 4, 5, color)
        canvas.text(1172, y, method.replace("θ", "").replace("(", "").replace(")", ""), scale=1)
        y += 22
    path.write_bytes(canvas.png())


# --------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copy-length", type=int, default=4)
    parser.add_argument("--small-hidden", type=int, default=64)
    parser.add_argument("--small-layers", type=int, default=2)
    parser.add_argument("--small-steps", type=int, default=300, help="At most this many training steps.")
    parser.add_argument(
        "--small-target-accuracy",
        type=float,
        default=0.2,
        help="Stop training once greedy accuracy on 16 calibration prompts reaches this (None: never).",
    )
    parser.add_argument("--small-batch", type=int, default=16)
    parser.add_argument("--small-lr", type=float, default=3e-3)
    parser.add_argument("--small-train-problems", type=int, default=2000)
    parser.add_argument(
        "--small-model",
        metavar="DIR",
        help="Save the trained small model here, or load it from here if a previous run saved it.",
    )
    parser.add_argument("--small-eval-every", type=int, default=1)
    parser.add_argument("--train-small-only", action="store_true", help="Train (and save) the small model, then stop.")
    parser.add_argument("--label-prompts", type=int, default=48)
    parser.add_argument("--calibration-prompts", type=int, default=32)
    parser.add_argument("--test-prompts", type=int, default=24, help="Per seed (disjoint across seeds).")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--shares", type=float, nargs="*", default=[0.05, 0.1, 0.15, 0.2, 0.3])
    parser.add_argument("--router-lr", type=float, default=1e-3)
    parser.add_argument("--router-epochs", type=int, default=40)
    parser.add_argument("--batch", type=int, default=16, help="Prompts per labelling batch.")
    parser.add_argument("--threads", type=int, default=1, help="Two threads thrash on a loaded 2-core machine.")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot-only", metavar="JSON", help="Rebuild the table and PNG of an existing result file.")
    parser.add_argument("--quick", action="store_true", help="Smoke run (tiny sizes, numbers meaningless).")
    parser.add_argument("--out", default=str(BENCH_DIR / "results" / "routing_benchmark.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.copy_length, args.small_steps, args.small_train_problems = 2, 5, 32
        args.label_prompts, args.calibration_prompts, args.test_prompts, args.seeds = 3, 4, 2, 2
        args.shares, args.router_epochs = [0.1, 0.3], 2
    return args


def write_outputs(results: dict, out: Path) -> None:
    results["summary"] = summarise(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    out.with_suffix(".md").write_text(markdown(results) + "\n")
    plot(results, out.with_suffix(".png"))


def main(argv=None) -> dict:
    from bench.common import machine_info

    args = parse_args(argv)
    if args.plot_only:
        path = Path(args.plot_only)
        results = json.loads(path.read_text())
        write_outputs(results, path)
        return results
    results = run_benchmark(args)
    if args.train_small_only:
        return results
    results["machine"] = machine_info(args.device if args.device == "cpu" else "cuda")
    results["machine"]["loadavg_at_end"] = os.getloadavg()
    out = Path(args.out)
    write_outputs(results, out)
    print("\n" + markdown(results))
    print(f"\nWrote {out}, {out.with_suffix('.md')} and {out.with_suffix('.png')}")
    return results


if __name__ == "__main__":
    main()
