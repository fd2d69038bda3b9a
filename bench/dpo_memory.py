"""Peak memory and step time of the full-distribution token losses against stock DPO and a naive full-logits TDPO2.

Configurations (same model init, same data and data order, same optimizer and schedule):

    stock        trl.DPOTrainer                                           sequence log-probs (fused LM head)
    naive_tdpo2  NaiveTDPO2Trainer (below, a DPOTrainer subclass)         [2B, L, V] logits of policy and reference
    tdpo2        TokenDPOTrainer(token_loss_type="tdpo2")                 chunked KL(pi_ref||pi_theta) from hidden states
    sparsepo     TokenDPOTrainer(token_loss_type="sparsepo")              the same plus the learned token-mask network
    aligndistil  TokenDPOTrainer(token_loss_type="aligndistil",           chunked TVD + reverse KL to the extrapolated
                 aligndistil_teachers=(dpo_teacher, reverse_teacher))     teacher; chosen responses only, no reference

`naive_tdpo2` is what the official TDPO code does (and the reference the chunked path must beat): the policy and the
reference run their ordinary forward (`model(input_ids, attention_mask).logits`, i.e. TRL's patched forward with
`fused_lm_head=False`), returning `[2B, L, V]` logits; per-token log-ratios come from them (gather - logsumexp), the
per-token KL from `ops.preference.per_token_kl_from_logits`, and the loss from `ops.preference.tdpo_loss`, in fp32.

The parent builds a Qwen2-shaped model with random weights from a config (and, for AlignDistil, two teachers of the
same shape with other seeds; they play the DPO and reverse-DPO models), a byte-level BPE tokenizer trained in memory on
pseudo-words, and synthetic preference rows of `--seq-len` tokens, all saved once to a temporary directory. Every
configuration then runs in its own fresh subprocess, in alternating order over `--rounds` rounds, training `--warmup` +
`--steps` optimizer steps and reporting the measured steps only.

Measured per configuration:
  * step time: wall time between consecutive optimizer-step ends after warmup (batch fetch + collation + forward/
    backward + optimizer + the previous step's logging), and the same interval in process CPU time;
  * memory: CPU, the peak RSS while training (kernel high-water mark, reset after model+trainer construction) minus the
    RSS after construction, and the absolute peak; CUDA, `torch.cuda.max_memory_allocated()` after a reset, minus the
    allocation after construction, and absolute;
  * breakdown, after training and outside the timed loop: `compute_loss` and `backward` of one batch (CPU time on CPU,
    synchronized wall on CUDA) with their parts timed (reference forward, chunked KL / TVD kernels, teacher forwards,
    naive logits and KL), and the memory peak of that forward and of forward+backward above the memory before it.
Ratios are to stock DPO (pooled medians over all measured steps of all rounds, plus per-round paired ratios) and, for
memory, to the naive TDPO2 too. Targets (issue, GPU): TDPO2 peak memory <= 1.15x stock DPO and step time <= 1.25x.

    python bench/dpo_memory.py                      # CPU defaults: 256 x 4 layers, vocab 32000, 2 pairs x 512 tokens
    python bench/dpo_memory.py --device cuda        # Qwen2.5-0.5B shape, 4 pairs x 1024 tokens, bf16, grad ckpt
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    RESULTS_DIR,
    build_word_tokenizer,
    format_table,
    machine_info,
    peak_rss_bytes,
    pseudo_words,
    reset_peak_rss,
    round_orders,
    rss_bytes,
    run_worker,
    summarize,
    worker_env,
    write_json,
)
from dpo_bench import (  # noqa: E402
    make_parser,
    measured_training,
    prepare_worker,
    resolve_args,
    save_random_qwen2,
    synthetic_preference_data,
    training_kwargs,
)

# Issue targets for TDPO2 against stock DPO (GPU); reported for every configuration and on CPU too.
TARGET_MEMORY_RATIO = 1.15
TARGET_TIME_RATIO = 1.25

# Configuration -> how the worker builds it.
CONFIGS = {
    "stock": {"trainer": "stock"},
    "naive_tdpo2": {"trainer": "naive_tdpo2"},
    "tdpo2": {"trainer": "token", "token_loss_type": "tdpo2"},
    "sparsepo": {"trainer": "token", "token_loss_type": "sparsepo"},
    "aligndistil": {"trainer": "token", "token_loss_type": "aligndistil"},
}
DEFAULT_CONFIGS = list(CONFIGS)
TEACHER_SEEDS = (1, 2)  # offsets from --seed of the AlignDistil DPO / reverse-DPO teachers

# Shape presets. CPU: a few minutes on 2 cores, with a vocabulary large enough that [2B, L, V] fp32 logits matter
# (2 pairs x 512 tokens x 32000 x 4 bytes = 262 MB per logits tensor). CUDA: Qwen2.5-0.5B's shape (random weights)
# at 1024 tokens, 4 pairs, bf16, gradient checkpointing (8 x 1024 x 151936 logits: 2.5 GB in bf16, 5 GB in fp32).
PRESETS = {
    "cpu": dict(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=1024, vocab=32000, tokenizer_vocab=8192,
                seq_len=512, batch=2, warmup=1, steps=3, rounds=2, dtype="float32", gradient_checkpointing=False,
                threads=1),
    "cuda": dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936, tokenizer_vocab=16384,
                 seq_len=1024, batch=4, warmup=3, steps=10, rounds=2, dtype="bfloat16", gradient_checkpointing=True,
                 threads=4),
}  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    parser, run = make_parser(__doc__, CONFIGS, DEFAULT_CONFIGS,
                              "preference pairs per step (2x sequences; AlignDistil: chosen only)",
                              "JSON path (default bench/results/dpo_memory_<device>.json)")  # fmt: skip
    run.add_argument("--token-kernel", default="auto",
                     help="TokenDPOConfig.token_kernel (auto: trl on CUDA, torch on CPU)")
    run.add_argument("--breakdown", type=int, default=1,
                     help="after training, time compute_loss/backward and their parts this many times per run (0: off)")
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
# Parent: build models and data once, run the workers, aggregate
# ---------------------------------------------------------------------------------------------------------------------


def build_model_and_data(args, workdir: Path) -> dict:
    """Save the model + tokenizer (and the AlignDistil teachers) and the dataset under `workdir`."""
    words = pseudo_words(max(2048, args.tokenizer_vocab // 2), args.seed)
    tokenizer = build_word_tokenizer(words, args.tokenizer_vocab, args.seed)
    if len(tokenizer) > args.vocab:
        raise SystemExit(f"tokenizer has {len(tokenizer)} tokens but --vocab is {args.vocab}")
    seeds = {"model": args.seed}
    if "aligndistil" in args.configs:
        seeds["dpo_teacher"] = args.seed + TEACHER_SEEDS[0]
        seeds["reverse_teacher"] = args.seed + TEACHER_SEEDS[1]
    paths = {name: workdir / name for name in seeds}
    num_params = [save_random_qwen2(args, tokenizer, paths[name], seed) for name, seed in seeds.items()][0]

    base, _, stats = synthetic_preference_data(args, tokenizer, words)
    base.save_to_disk(str(workdir / "data"))
    return {
        "paths": {name: str(path) for name, path in paths.items()},
        "num_params": num_params,
        **stats,
        "logits_bytes_per_tensor_fp32": 2 * args.batch * args.seq_len * args.vocab * 4,
    }


def aggregate(args, runs: dict[str, list[dict]]) -> dict:
    """Per-configuration summaries and ratios to stock (and, for memory, to the naive TDPO2)."""
    cuda = args.device == "cuda"
    per_config = {}
    for name, results in runs.items():
        entry = {
            **CONFIGS[name],
            "step_s": summarize([s for r in results for s in r["step_s"]]),
            "cpu_step_s": summarize([s for r in results for s in r["cpu_step_s"]]),
            "compute_s": summarize([s for r in results for s in r["compute_s"]]),
            "step_s_round_medians": [statistics.median(r["step_s"]) for r in results],
            "cpu_step_s_round_medians": [statistics.median(r["cpu_step_s"]) for r in results],
            "construct_s": statistics.median(r["construct_s"] for r in results),
            "sequences_per_step": results[0]["sequences_per_step"],
            "final_loss": [r["losses"][-1] if r["losses"] else None for r in results],
            "load_avg_1m": [r["load_avg_before"] for r in results],
        }
        for key in results[0].get("breakdown", {}):
            entry.setdefault("breakdown", {})[key] = statistics.median(r["breakdown"][key] for r in results)
        if cuda:
            entry["mem_peak_delta_mb"] = statistics.median(r["cuda_peak_delta_bytes"] / 2**20 for r in results)
            entry["mem_peak_abs_mb"] = statistics.median(r["cuda_peak_abs_bytes"] / 2**20 for r in results)
            entry["mem_after_construct_mb"] = statistics.median(
                r["cuda_after_construct_bytes"] / 2**20 for r in results
            )
            entry["cuda_reserved_peak_mb"] = statistics.median(r["cuda_reserved_peak_bytes"] / 2**20 for r in results)
        else:
            entry["mem_peak_delta_mb"] = statistics.median(r["rss_peak_delta_bytes"] / 2**20 for r in results)
            entry["mem_peak_abs_mb"] = statistics.median(r["rss_peak_train_bytes"] / 2**20 for r in results)
            entry["mem_after_construct_mb"] = statistics.median(r["rss_after_construct_bytes"] / 2**20 for r in results)
            entry["rss_peak_construct_mb"] = statistics.median(r["rss_peak_construct_bytes"] / 2**20 for r in results)
            entry["peak_reset_ok"] = all(r["peak_reset_ok"] for r in results)
        entry["mem_peak_delta_mb_runs"] = [
            (r["cuda_peak_delta_bytes"] if cuda else r["rss_peak_delta_bytes"]) / 2**20 for r in results
        ]
        per_config[name] = entry

    stock, naive = per_config["stock"], per_config.get("naive_tdpo2")

    def ratio(a, b):
        return a / b if b else None

    for name, entry in per_config.items():
        paired = [a / b for a, b in zip(entry["step_s_round_medians"], stock["step_s_round_medians"])]
        cpu_paired = [a / b for a, b in zip(entry["cpu_step_s_round_medians"], stock["cpu_step_s_round_medians"])]
        entry["ratios"] = {
            "step_time": ratio(entry["step_s"]["median"], stock["step_s"]["median"]),
            "step_time_paired_rounds": paired,
            "step_time_paired_median": statistics.median(paired),
            "step_cpu_time": ratio(entry["cpu_step_s"]["median"], stock["cpu_step_s"]["median"]),
            "step_cpu_time_paired_rounds": cpu_paired,
            "mem_peak_delta": ratio(entry["mem_peak_delta_mb"], stock["mem_peak_delta_mb"]),
            "mem_peak_abs": ratio(entry["mem_peak_abs_mb"], stock["mem_peak_abs_mb"]),
            "mem_peak_delta_vs_naive": ratio(entry["mem_peak_delta_mb"], naive["mem_peak_delta_mb"]) if naive else None,
            "mem_peak_abs_vs_naive": ratio(entry["mem_peak_abs_mb"], naive["mem_peak_abs_mb"]) if naive else None,
            "step_time_vs_naive": ratio(entry["step_s"]["median"], naive["step_s"]["median"]) if naive else None,
        }
        r = entry["ratios"]
        # On CUDA the memory number is max_memory_allocated (absolute); the delta (training memory above the
        # weights) is the stricter reading and the one that matters on CPU, where the absolute RSS holds the libraries.
        entry["within_target"] = {
            "step_time": r["step_time"] <= TARGET_TIME_RATIO,
            "step_cpu_time": r["step_cpu_time"] <= TARGET_TIME_RATIO,
            "mem_peak_abs": r["mem_peak_abs"] <= TARGET_MEMORY_RATIO,
            "mem_peak_delta": r["mem_peak_delta"] is not None and r["mem_peak_delta"] <= TARGET_MEMORY_RATIO,
        }
    return per_config


def print_table(args, per_config: dict) -> str:
    mem = "GPU alloc" if args.device == "cuda" else "RSS"
    headers = ["config", "step ms", "IQR ms", "x stock", "paired x (min-max)", "CPU step ms", "CPU x",
               f"peak {mem} Δ MB", "x stock", "x naive", f"peak {mem} MB", "x stock", "x naive",
               f"<={TARGET_TIME_RATIO}x wall/cpu, <={TARGET_MEMORY_RATIO}x mem abs/Δ"]  # fmt: skip
    rows = []

    def fmt(value, spec=".3f"):
        return "-" if value is None else format(value, spec)

    for name, e in per_config.items():
        r, ok = e["ratios"], e["within_target"]
        paired = r["step_time_paired_rounds"]
        rows.append([
            name,
            f"{1e3 * e['step_s']['median']:.1f}",
            f"{1e3 * (e['step_s']['p75'] - e['step_s']['p25']):.1f}",
            fmt(r["step_time"]),
            f"{r['step_time_paired_median']:.3f} ({min(paired):.3f}-{max(paired):.3f})",
            f"{1e3 * e['cpu_step_s']['median']:.1f}",
            fmt(r["step_cpu_time"]),
            f"{e['mem_peak_delta_mb']:.1f}",
            fmt(r["mem_peak_delta"]),
            fmt(r["mem_peak_delta_vs_naive"]),
            f"{e['mem_peak_abs_mb']:.1f}",
            fmt(r["mem_peak_abs"]),
            fmt(r["mem_peak_abs_vs_naive"]),
            "/".join("y" if ok[k] else "N" for k in ("step_time", "step_cpu_time"))
            + ", " + "/".join("y" if ok[k] else "N" for k in ("mem_peak_abs", "mem_peak_delta")),
        ])  # fmt: skip
    table = format_table(headers, rows)

    clock = "CUDA-synced wall" if args.device == "cuda" else "CPU time"
    parts = [key for key in BREAKDOWN_LABELS if any(key in e.get("breakdown", {}) for e in per_config.values())]
    if parts:
        headers = ["config", *(BREAKDOWN_LABELS[key] for key in parts)]
        rows = [[name, *(f"{e['breakdown'][k]:.1f}" if k in e.get("breakdown", {}) else "-" for k in parts)]
                for name, e in per_config.items()]  # fmt: skip
        table += (
            f"\n\nOne batch outside the measured loop ({clock} ms; parts are inside 'loss fwd'; 'saved for bwd' = "
            f"distinct storages autograd keeps for the backward, parameters excluded; 'mem' = peak {mem} above the "
            "memory before compute_loss):\n" + format_table(headers, rows)
        )
    print(table)
    return table


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        return worker(args.worker)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("dpo_memory: --device cuda requested but CUDA is not available; skipping.", file=sys.stderr)
        return 0
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()

    out = args.out or RESULTS_DIR / f"dpo_memory_{args.device}.json"
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="dpo_memory_"))
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "runs").mkdir(exist_ok=True)
    shape_keys = (*PRESETS["cpu"], "prompt_frac", "logging_steps", "seed", "token_kernel")
    shape = {key: getattr(args, key) for key in shape_keys}
    print(f"dpo_memory: device={args.device} shape={shape} configs={args.configs} workdir={workdir}", file=sys.stderr)
    try:
        started = time.time()
        data_info = build_model_and_data(args, workdir)
        print(f"  model {data_info['num_params'] / 1e6:.1f}M params, {data_info['num_rows']} rows of "
              f"~{data_info['mean_sequence_tokens']:.0f} tokens per sequence", file=sys.stderr)  # fmt: skip
        env = worker_env(args.threads)
        script = Path(__file__).resolve()
        runs: dict[str, list[dict]] = {name: [] for name in args.configs}
        orders = round_orders(args.configs, args.rounds)
        for round_index, order in enumerate(orders):
            for name in order:
                payload = {
                    "config": name,
                    **CONFIGS[name],
                    "round": round_index,
                    "paths": data_info["paths"],
                    "data_path": str(workdir / "data"),
                    "output_dir": str(workdir / "runs" / f"{name}_{round_index}"),
                    "result_path": str(workdir / "runs" / f"{name}_{round_index}.json"),
                    "device": args.device,
                    "dtype": args.dtype,
                    "seq_len": args.seq_len,
                    "batch": args.batch,
                    "warmup": args.warmup,
                    "steps": args.steps,
                    "seed": args.seed,
                    "threads": args.threads,
                    "gradient_checkpointing": args.gradient_checkpointing,
                    "logging_steps": args.logging_steps,
                    "token_kernel": args.token_kernel,
                    "breakdown": args.breakdown,
                }
                result = run_worker(script, payload, env, timeout=args.worker_timeout)
                runs[name].append(result)
                peak = result["cuda_peak_abs_bytes"] if args.device == "cuda" else result["rss_peak_train_bytes"]
                step_ms = 1e3 * statistics.median(result["step_s"])
                print(f"  round {round_index} {name:11s} step {step_ms:8.1f} ms  peak {peak / 2**20:8.1f} MB  "
                      f"load {result['load_avg_before']:.2f}", file=sys.stderr)  # fmt: skip
        per_config = aggregate(args, runs)
        table = print_table(args, per_config)
        report = {
            "benchmark": "dpo_memory",
            "description": (
                "Full-distribution token losses (TokenDPOTrainer tdpo2, sparsepo, aligndistil) and a naive full-logits "
                "TDPO2 (DPOTrainer subclass: ordinary forwards returning [2B, L, V] logits, per_token_kl_from_logits, "
                "tdpo_loss) vs stock trl.DPOTrainer: same model init, data, order and optimizer; each configuration "
                "in a fresh subprocess, alternating order over rounds. Step time = interval between optimizer-step ends "
                "after warmup. Memory = peak during training minus after construction (delta) and absolute (CPU: RSS "
                "high-water mark; CUDA: max_memory_allocated). AlignDistil trains on chosen responses only, against "
                "two frozen teachers of the policy's shape (random weights, other seeds), without a reference model."
            ),
            "targets": {"tdpo2_mem_peak_vs_stock": TARGET_MEMORY_RATIO, "tdpo2_step_time_vs_stock": TARGET_TIME_RATIO},
            "machine": machine_info(args.device),
            "shape": {**shape, "device": args.device, "configs": args.configs, "model": "Qwen2ForCausalLM (random)",
                      "attn_implementation": "sdpa", "optimizer": "adamw_torch",
                      **{k: v for k, v in data_info.items() if k != "paths"}},  # fmt: skip
            "orders": orders,
            "wall_s": time.time() - started,
            "table": table,
            "configs": per_config,
            "runs": runs,
        }
        path = write_json(out, report)
        print(f"wrote {path}", file=sys.stderr)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# Worker: one configuration, one fresh process
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


def release_free_heap() -> None:
    """Return glibc's free heap pages to the OS (`malloc_trim(0)`), so that a following RSS peak counts new memory."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


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
    "_distribution_signals": "chunked KL (+masks)",
    "backbone_hidden_states": "teacher fwd",
    "chunked_total_variation": "chunked TVD",
    "chunked_token_kl": "chunked KL kernel",
    "saved_for_backward_mb": "saved for bwd MB",
    "mem_fwd_mb": "mem fwd MB",
    "mem_fwd_bwd_mb": "mem fwd+bwd MB",
}
TRAINER_PARTS = ("_reference_forward", "_reference_logits", "_policy_logits", "_token_terms", "_distribution_signals")
KERNEL_PARTS = ("backbone_hidden_states", "chunked_total_variation", "chunked_token_kl")


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

            def pack(tensor):
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
            samples.setdefault("mem_fwd_mb", []).append((fwd_peak - before) / 2**20)
            params = {param.untyped_storage().data_ptr() for param in model.parameters()}
            saved_bytes = sum(nbytes for ptr, nbytes in saved.items() if ptr not in params)
            samples.setdefault("saved_for_backward_mb", []).append(saved_bytes / 2**20)
            samples.setdefault("mem_fwd_bwd_mb", []).append((fwd_bwd_peak - before) / 2**20)
    finally:
        for name in TRAINER_PARTS:
            trainer.__dict__.pop(name, None)
        for name, function in originals.items():
            setattr(token_dpo_trainer, name, function)
    return {key: statistics.median(values) for key, values in samples.items()}


if __name__ == "__main__":
    sys.exit(main())
