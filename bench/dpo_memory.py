"""Step time and peak memory of the full-distribution token losses against stock DPO and a naive full-logits TDPO2.

Configurations (same model init, same data and data order, same optimizer and schedule):

    stock                trl.DPOTrainer                                    sequence log-probs (TRL's fused LM head)
    tdpo2                TokenDPOTrainer(token_loss_type="tdpo2",          the fused pass (`ops.fused`): backbones only,
                                         token_kernel="torch")             one tiled pass over both heads
    tdpo2_twopass        ... token_kernel="trl"                            TRL's fused log-prob head (policy, reference)
                                                                           + TRL's chunked divergence for the KL
    tdpo2_triton         ... token_kernel="triton"                         the fused pass as Triton kernels (CUDA only)
    sparsepo[_twopass]   token_loss_type="sparsepo"                        the same plus the learned token-mask network
    aligndistil[_twopass] token_loss_type="aligndistil",                   chunked TVD + reverse KL to the extrapolated
                         aligndistil_teachers=(dpo, reverse)               teacher; chosen responses only, no reference
    naive_tdpo2          NaiveTDPO2Trainer (below, a DPOTrainer subclass)  [2B, L, V] logits of policy and reference

`naive_tdpo2` is what the official TDPO code does: ordinary forwards (`fused_lm_head=False`) returning `[2B, L, V]`
logits, fp32 log-ratios, `ops.preference.per_token_kl_from_logits` and `ops.preference.tdpo_loss`.

The parent builds a Qwen2-shaped model with random weights from a config (and, for AlignDistil, two teachers of the
same shape with other seeds), a byte-level BPE tokenizer trained in memory on pseudo-words, and synthetic preference
rows, saved once per shape (`--sweep BATCHxLEN,...`). Every configuration runs in worker processes of its own
(`--worker-scope`: a fresh one per run on CPU, one kept for all rounds and shapes on CUDA; `bench/common.py`), in
alternating order over `--rounds` (>= 3) rounds, training `--warmup` + `--steps` optimizer steps; only the measured
steps count.

Measured per configuration (`bench/common.py` rules):
  * in-loop component timings in every measured step (CPU default): `compute_loss` + `backward` ("loss fwd+bwd") and
    the LM-head/KL kernels alone (TRL's log-prob kernel, TRL's divergence, our chunked KL/TVD, the fused pass; forward
    and backward), in process CPU time: the token loss itself, insensitive to the rest of a shared machine;
  * step time: wall interval between optimizer-step ends, and the same interval in process CPU time;
  * memory: CPU, `VmHWM` of the worker (reset after construction), absolute and over construction; CUDA,
    `max_memory_allocated` (absolute and over construction) and `max_memory_reserved`;
  * breakdown (`--breakdown`), after training: one batch's `compute_loss`/`backward` with parts timed, the bytes
    autograd saves for the backward and the forward/backward memory peaks.
Ratios are to stock DPO: ratio of pooled medians, with the min-max of the per-round paired ratios.

Targets (issue 13): CPU, TDPO2 and SparsePO <= 1.3x CPU time and <= 1.1x peak memory; CUDA, <= 1.10x step time and
<= 1.05x peak memory (AlignDistil <= 1.25x / 1.2x).

    python bench/dpo_memory.py                          # CPU: 256 x 4 layers, vocab 16384, 2 pairs x 128 tokens
    python bench/dpo_memory.py --sweep 1x256,2x512      # batch x sequence sweep
    python bench/dpo_memory.py --device cuda            # Qwen2.5-0.5B shape, 4 pairs x 1024 tokens, bf16, grad ckpt
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    build_word_tokenizer,
    format_table,
    peak_rss_bytes,
    pseudo_words,
    release_free_heap,
    reset_peak_rss,
    rss_bytes,
    start_benchmark,
    worker_main,
)
from dpo_bench import (  # noqa: E402
    import_trainers,
    main_table,
    make_parser,
    measured_training,
    model_cache,
    prepare_worker,
    resolve_args,
    save_random_qwen2,
    sweep_and_write,
    synthetic_preference_data,
    training_kwargs,
)

# Configuration -> how the worker builds it.
CONFIGS = {
    "stock": {"trainer": "stock"},
    "tdpo2": {"trainer": "token", "token_loss_type": "tdpo2", "token_kernel": "torch"},
    "tdpo2_twopass": {"trainer": "token", "token_loss_type": "tdpo2", "token_kernel": "trl"},
    "tdpo2_triton": {"trainer": "token", "token_loss_type": "tdpo2", "token_kernel": "triton"},
    "sparsepo": {"trainer": "token", "token_loss_type": "sparsepo", "token_kernel": "torch"},
    "sparsepo_twopass": {"trainer": "token", "token_loss_type": "sparsepo", "token_kernel": "trl"},
    "aligndistil": {"trainer": "token", "token_loss_type": "aligndistil", "token_kernel": "torch"},
    "aligndistil_twopass": {"trainer": "token", "token_loss_type": "aligndistil", "token_kernel": "trl"},
    "aligndistil_triton": {"trainer": "token", "token_loss_type": "aligndistil", "token_kernel": "triton"},
    "naive_tdpo2": {"trainer": "naive_tdpo2"},
}
DEFAULT_CONFIGS = ["stock", "tdpo2", "tdpo2_twopass", "sparsepo", "aligndistil", "naive_tdpo2"]
TEACHER_SEEDS = (1, 2)  # offsets from --seed of the AlignDistil DPO / reverse-DPO teachers

# Issue 13 targets, as bounds on ratios to stock (keys of `common.aggregate_runs` ratios).
TARGETS = {
    "cpu": {name: {"fwd_bwd": 1.3, "cpu_step_s": 1.3, "rss_peak_bytes": 1.1} for name in ("tdpo2", "sparsepo")},
    "cuda": {
        **{name: {"step_s": 1.10, "cuda_alloc_peak_bytes": 1.05} for name in ("tdpo2", "sparsepo")},
        "aligndistil": {"step_s": 1.25, "cuda_alloc_peak_bytes": 1.2},
    },
}

# Shape presets. CPU: small enough for a loaded 2-core machine, with a vocabulary large enough that the LM head
# dominates as in real models (Qwen2.5-0.5B: vocab 151936 x hidden 896). CUDA: Qwen2.5-0.5B's shape (random weights) at 4 pairs x 1024
# tokens, bf16, gradient checkpointing.
PRESETS = {
    "cpu": dict(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=1024, vocab=16384, tokenizer_vocab=8192,
                seq_len=128, batch=2, warmup=1, steps=3, rounds=3, dtype="float32", gradient_checkpointing=False,
                threads=1),
    "cuda": dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936, tokenizer_vocab=16384,
                 seq_len=1024, batch=4, warmup=2, steps=6, rounds=3, dtype="bfloat16", gradient_checkpointing=True,
                 threads=4),
}  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    parser, run = make_parser(__doc__, CONFIGS, DEFAULT_CONFIGS,
                              "preference pairs per step (2x sequences; AlignDistil: chosen only)",
                              "JSON path (default bench/results/dpo_memory_<device>.json)")  # fmt: skip
    run.add_argument(
        "--breakdown",
        type=int,
        default=0,
        help="after training, time compute_loss/backward and their parts this many times per run (0: off)",
    )
    return resolve_args(parser, parser.parse_args(argv), PRESETS, CONFIGS)


# ---------------------------------------------------------------------------------------------------------------------
# The naive full-logits TDPO2 (what the official implementations do)
# ---------------------------------------------------------------------------------------------------------------------


def naive_tdpo2_trainer_class():
    """`NaiveTDPO2Trainer`: a `trl.DPOTrainer` whose loss is TDPO2 computed from `[2B, L, V]` logits.

    Built in a function so that the parent process does not import TRL just to parse its arguments.
    """
    import torch
    from trl import DPOTrainer
    from trl.models.utils import disable_gradient_checkpointing

    from trl_tokenlevel.ops.preference import per_token_kl_from_logits, tdpo_loss

    class NaiveTDPO2Trainer(DPOTrainer):
        """TDPO2 from full logits: ordinary forwards of policy and reference (no fused head, no chunking)."""

        def __init__(self, *args, tdpo_alpha: float = 0.5, **kwargs):
            super().__init__(*args, **kwargs)
            self.tdpo_alpha = tdpo_alpha
            if self.ref_model is None:
                raise ValueError("NaiveTDPO2Trainer needs a live reference model")

        def _policy_logits(self, model, input_ids, attention_mask):
            # `fused_lm_head=False` is TRL's patched forward falling through to the model's own: [2B, L, V] logits.
            out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, fused_lm_head=False)
            return out.logits[:, :-1].float()  # the official code casts the logits to fp32

        def _reference_logits(self, input_ids, attention_mask):
            with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
                out = self.ref_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                     fused_lm_head=False)  # fmt: skip
                return out.logits[:, :-1].float()

        @staticmethod
        def _token_terms(logits, ref_logits, targets, valid):
            """Per-token log-ratios `log pi_theta(y_t) - log pi_ref(y_t)` and KL(pi_ref || pi_theta), `(2B, L-1)`."""
            index = targets.unsqueeze(-1)
            logps = logits.gather(-1, index).squeeze(-1) - logits.logsumexp(-1)
            ref_logps = ref_logits.gather(-1, index).squeeze(-1) - ref_logits.logsumexp(-1)
            logratios = torch.where(valid, logps - ref_logps, 0.0)
            kl = per_token_kl_from_logits(logits, ref_logits)
            return logps, ref_logps, logratios, kl

        def _compute_loss(self, model, inputs, return_outputs):
            mode = "train" if self.model.training else "eval"
            input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
            shift_mask = inputs["completion_mask"][:, 1:]
            valid = shift_mask.bool()
            logits = self._policy_logits(model, input_ids, attention_mask)
            ref_logits = self._reference_logits(input_ids, attention_mask)
            logps, ref_logps, logratios, kl = self._token_terms(logits, ref_logits, input_ids[:, 1:], valid)
            chosen_mask, rejected_mask = shift_mask.chunk(2, dim=0)
            per_pair, parts = tdpo_loss(
                *logratios.chunk(2, dim=0), *kl.chunk(2, dim=0), chosen_mask, rejected_mask, self.beta,
                alpha=self.tdpo_alpha, variant="tdpo2",
            )  # fmt: skip
            loss = per_pair.mean()

            # Scalar metrics like the official TDPO trainer (rewards, sequential KL, log-probs).
            gather, metrics = self.accelerator.gather_for_metrics, self._metrics[mode]
            chosen_rewards, rejected_rewards = parts["chosen_rewards"], parts["rejected_rewards"]
            metrics["rewards/chosen"].append(gather(chosen_rewards).mean().item())
            metrics["rewards/rejected"].append(gather(rejected_rewards).mean().item())
            metrics["rewards/accuracies"].append(gather((chosen_rewards > rejected_rewards).float()).mean().item())
            metrics["rewards/margins"].append(gather(chosen_rewards - rejected_rewards).mean().item())
            metrics["seq_kl/chosen"].append(gather(parts["seq_kl_chosen"]).mean().item())
            metrics["seq_kl/rejected"].append(gather(parts["seq_kl_rejected"]).mean().item())
            seq_logps = torch.where(valid, logps.detach(), 0.0).sum(dim=1)
            metrics["logps/chosen"].append(gather(seq_logps.chunk(2)[0]).mean().item())
            metrics["logps/rejected"].append(gather(seq_logps.chunk(2)[1]).mean().item())
            if return_outputs:
                return loss, {"logits": logits}
            return loss

    return NaiveTDPO2Trainer


# ---------------------------------------------------------------------------------------------------------------------
# Parent: build models and data once per shape, run the workers, print the tables
# ---------------------------------------------------------------------------------------------------------------------


def build_model_and_data(args, workdir: Path) -> dict:
    """Save the model + tokenizer (and the AlignDistil teachers) and the dataset under `workdir`."""
    words = pseudo_words(max(2048, args.tokenizer_vocab // 2), args.seed)
    tokenizer = build_word_tokenizer(words, args.tokenizer_vocab, args.seed)
    if len(tokenizer) > args.vocab:
        raise SystemExit(f"tokenizer has {len(tokenizer)} tokens but --vocab is {args.vocab}")
    seeds = {"model": args.seed}
    if any(name.startswith("aligndistil") for name in args.configs):
        seeds["dpo_teacher"] = args.seed + TEACHER_SEEDS[0]
        seeds["reverse_teacher"] = args.seed + TEACHER_SEEDS[1]
    paths = {name: workdir / name for name in seeds}
    num_params = [save_random_qwen2(args, tokenizer, paths[name], seed, model_cache(workdir.parent))
                  for name, seed in seeds.items()][0]  # fmt: skip

    base, _, stats = synthetic_preference_data(args, tokenizer, words)
    base.save_to_disk(str(workdir / "data"))
    return {
        "paths": {name: str(path) for name, path in paths.items()},
        "num_params": num_params,
        **stats,
        "logits_bytes_per_tensor_fp32": 2 * args.batch * args.seq_len * args.vocab * 4,
    }


def print_tables(args, shape_result: dict) -> str:
    per_config = shape_result["configs"]
    shape = shape_result["shape"]
    table = f"batch {shape['batch']} x {shape['seq_len']} tokens:\n" + main_table(
        per_config, args.device == "cuda", TARGETS[args.device]
    )
    clock = "CUDA-synced wall" if args.device == "cuda" else "CPU time"
    parts = [key for key in BREAKDOWN_LABELS if any(key in e.get("breakdown", {}) for e in per_config.values())]
    if parts:
        headers = ["config", *(BREAKDOWN_LABELS[key] for key in parts)]
        rows = [[name, *(f"{e['breakdown'][k]:.1f}" if k in e.get("breakdown", {}) else "-" for k in parts)]
                for name, e in per_config.items()]  # fmt: skip
        table += (
            f"\n\nOne batch outside the measured loop ({clock} ms; parts are inside 'loss fwd'; 'saved for bwd' = "
            "distinct storages autograd keeps for the backward, parameters excluded; 'mem' = peak above the memory "
            "before compute_loss):\n" + format_table(headers, rows)
        )
    print(table)
    return table


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        return worker_main(args.worker, worker, import_trainers)
    started_paths = start_benchmark("dpo_memory", args)
    if started_paths is None:
        return 0
    out, workdir = started_paths
    settings = {key: getattr(args, key) for key in (*PRESETS["cpu"], "prompt_frac", "logging_steps", "seed", "sweep",
                                                     "components", "breakdown", "configs", "device",
                                                     "worker_scope")}  # fmt: skip
    print(f"dpo_memory: {settings} workdir={workdir}", file=sys.stderr)
    try:

        def payload_for(name, data_info, shape_dir):
            return {"paths": data_info["paths"], "data_path": str(shape_dir / "data")}

        sweep_and_write(
            args,
            Path(__file__).resolve(),
            workdir,
            CONFIGS,
            build_model_and_data,
            payload_for,
            out,
            benchmark="dpo_memory",
            description=(
                "Full-distribution token losses (TokenDPOTrainer tdpo2, sparsepo, aligndistil with the fused "
                "pass; *_twopass = TRL's log-prob head + TRL's chunked divergence) and a naive full-logits TDPO2 "
                "vs stock trl.DPOTrainer: same model init, data, order and optimizer; each configuration in "
                "worker processes of its own (settings.worker_scope), alternating order over rounds, warm-up "
                "steps excluded. Times per measured step; memory per run (CPU: VmHWM of the worker; CUDA: max "
                "allocated and reserved). AlignDistil trains on chosen responses only, against two frozen "
                "teachers of the policy's shape, without a reference model."
            ),
            targets=TARGETS[args.device],
            settings=settings,
            print_tables=print_tables,
        )
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# Worker: one run of one configuration (a kept worker measures run after run: `common.serve`)
# ---------------------------------------------------------------------------------------------------------------------


def build_trainer(p: dict):
    import datasets
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from trl_tokenlevel import TokenDPOConfig, TokenDPOTrainer

    model_path = p["paths"]["model"]
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    dataset = datasets.load_from_disk(p["data_path"])
    common = training_kwargs(p)
    if p["trainer"] == "stock":
        return DPOTrainer(model=model_path, args=DPOConfig(**common), train_dataset=dataset, processing_class=tokenizer)
    if p["trainer"] == "naive_tdpo2":
        trainer_class = naive_tdpo2_trainer_class()
        alpha = TokenDPOConfig.__dataclass_fields__["tdpo_alpha"].default  # the same alpha as token_loss_type="tdpo2"
        return trainer_class(model=model_path, args=DPOConfig(**common), train_dataset=dataset,
                             processing_class=tokenizer, tdpo_alpha=alpha)  # fmt: skip
    args = TokenDPOConfig(token_loss_type=p["token_loss_type"], token_kernel=p["token_kernel"], **common)
    kwargs = {}
    if p["token_loss_type"] == "aligndistil":
        kwargs["aligndistil_teachers"] = (p["paths"]["dpo_teacher"], p["paths"]["reverse_teacher"])
    return TokenDPOTrainer(model=model_path, args=args, train_dataset=dataset, processing_class=tokenizer, **kwargs)


def worker(payload_path: Path) -> int:
    p = json.loads(Path(payload_path).read_text())
    prepare_worker(p)
    trainer, result = measured_training(p, build_trainer)
    result["sequences_per_step"] = p["batch"] * (1 if p.get("token_loss_type") == "aligndistil" else 2)
    cuda = p["device"] == "cuda"
    if p["breakdown"] > 0:
        result["breakdown"] = breakdown(trainer, p, cuda)
    Path(p["result_path"]).write_text(json.dumps(result))
    return 0


# Breakdown keys -> table labels. Trainer methods and module-level kernels are wrapped on the instance / the module
# (in the worker process only, after training). Each is a part of `loss_fwd`; the chunked kernels' recomputation runs
# inside `backward`.
BREAKDOWN_LABELS = {
    "loss_fwd": "loss fwd",
    "backward": "backward",
    "_reference_forward": "ref fwd (fused)",
    "_reference_logits": "ref fwd (logits)",
    "_policy_logits": "policy fwd (logits)",
    "_token_terms": "naive KL+logratio",
    "_distribution_signals": "two-pass KL (+masks)",
    "_fused_distribution_forward": "fused pass (+backbones, masks)",
    "backbone_hidden_states": "teacher fwd",
    "chunked_total_variation": "chunked TVD",
    "chunked_token_kl": "chunked KL kernel",
    "fused_token_statistics": "fused kernel fwd",
    "saved_for_backward_mib": "saved for bwd MiB",
    "mem_fwd_mib": "mem fwd MiB",
    "mem_fwd_bwd_mib": "mem fwd+bwd MiB",
}
TRAINER_PARTS = ("_reference_forward", "_reference_logits", "_policy_logits", "_token_terms", "_distribution_signals",
                 "_fused_distribution_forward")  # fmt: skip
KERNEL_PARTS = ("backbone_hidden_states", "chunked_total_variation", "chunked_token_kl", "fused_token_statistics")


def breakdown(trainer, p: dict, cuda: bool) -> dict:
    """`compute_loss` + `backward` on the first batch, `--breakdown` times, with parts timed and the memory peaks.

    Clock: process CPU time on CPU (robust to other load), synchronized wall time on CUDA. Memory: the peak above the
    memory before `compute_loss` (CPU: RSS high-water mark after a reset; CUDA: max_memory_allocated after a reset), at
    the end of the forward and at the end of the backward.
    """
    import torch

    from trl_tokenlevel.trainers import token_dpo_trainer

    def now() -> float:
        if cuda:
            torch.cuda.synchronize()
            return time.perf_counter()
        return time.process_time()

    def mem_now() -> int:
        return torch.cuda.memory_allocated() if cuda else rss_bytes()

    def mem_reset() -> None:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            release_free_heap()  # else freed training buffers are reused without raising the RSS
            reset_peak_rss()

    def mem_peak() -> int:
        if cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return peak_rss_bytes()

    parts: dict[str, float] = {}

    def timed(function, name):
        def wrapper(*args, **kwargs):
            t0 = now()
            value = function(*args, **kwargs)
            parts[name] = parts.get(name, 0.0) + now() - t0
            return value

        return wrapper

    for name in TRAINER_PARTS:
        if hasattr(trainer, name):
            setattr(trainer, name, timed(getattr(trainer, name), name))
    originals = {name: getattr(token_dpo_trainer, name) for name in KERNEL_PARTS}
    for name, function in originals.items():
        setattr(token_dpo_trainer, name, timed(function, name))

    train_dataset = trainer._remove_unused_columns(trainer.train_dataset, description="training")
    model = trainer.model
    model.train()
    inputs = trainer._prepare_inputs(trainer.data_collator(train_dataset.__getitems__(list(range(p["batch"])))))
    samples: dict[str, list[float]] = {}
    try:
        for _ in range(p["breakdown"]):
            parts.clear()
            model.zero_grad(set_to_none=True)
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            before = mem_now()
            mem_reset()
            saved: dict[int, int] = {}

            def pack(tensor, saved=saved):
                if tensor.device.type != "meta":
                    storage = tensor.untyped_storage()
                    saved[storage.data_ptr()] = storage.nbytes()
                return tensor

            t0 = now()
            # autocast as in `training_step`; the hook counts the distinct storages autograd keeps for the backward
            with trainer.compute_loss_context_manager(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = trainer.compute_loss(model, inputs)
            t1 = now()
            fwd_peak = mem_peak()
            loss.backward()
            t2 = now()
            fwd_bwd_peak = max(mem_peak(), fwd_peak)
            del loss
            model.zero_grad(set_to_none=True)
            values = {"loss_fwd": t1 - t0, "backward": t2 - t1, **parts}
            for key, value in values.items():
                samples.setdefault(key, []).append(1e3 * value)
            samples.setdefault("mem_fwd_mib", []).append((fwd_peak - before) / 2**20)
            params = {param.untyped_storage().data_ptr() for param in model.parameters()}
            saved_bytes = sum(nbytes for ptr, nbytes in saved.items() if ptr not in params)
            samples.setdefault("saved_for_backward_mib", []).append(saved_bytes / 2**20)
            samples.setdefault("mem_fwd_bwd_mib", []).append((fwd_bwd_peak - before) / 2**20)
    finally:
        for name in TRAINER_PARTS:
            trainer.__dict__.pop(name, None)
        for name, function in originals.items():
            setattr(token_dpo_trainer, name, function)
    return {key: statistics.median(values) for key, values in samples.items()}


if __name__ == "__main__":
    sys.exit(main())
