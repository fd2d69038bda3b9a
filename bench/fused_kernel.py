"""Time and memory of the full-distribution LM-head pass alone, per kernel, at the Qwen2.5-0.5B head shape (issue 13).

    python bench/fused_kernel.py --device cuda      # N = 2048, 8192 tokens; H 896; V 151936; bf16
    python bench/fused_kernel.py                    # CPU smoke test: N 256, H 64, V 4096, fp32, no "triton"

("triton" runs by default on CUDA when the triton package is installed, as it is with CUDA builds of PyTorch.)

Every configuration computes TDPO's inputs from hidden states (policy log-probs and KL(ref || policy) with their
gradients to the policy's hidden states and LM head; reference log-probs without gradient), as the trainer's
`token_kernel` options do:

    torch     fused_token_statistics(backend="torch")       token_kernel="torch" (the CPU default of "auto")
    triton    fused_token_statistics(backend="triton")      token_kernel="triton" (CUDA only)
    twopass   TRL's chunked log-prob kernel for policy and   token_kernel="trl" (the CUDA default of "auto")
              reference + TRL's chunked divergence for the KL

Per configuration, in alternating order over `--rounds` rounds (`common.round_orders`) of `--reps` calls after
`--warmup` calls (which include Triton's compilation): forward and backward time (CUDA events on CUDA, wall time on
CPU; medians and spread), the peak memory allocated above the inputs (CUDA), and the largest deviation of log-probs and
KL from "torch" (a parity check at the measured shape). This is an in-process kernel benchmark; `dpo_memory.py`
(`tdpo2`, `tdpo2_twopass`, `tdpo2_triton`) measures whole training steps in workers of their own.

What decides `token_kernel="auto"` on CUDA: the forward+backward medians of "triton" and "torch" against "twopass" at
both token counts, together with the step times of `dpo_memory.py`.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS_DIR, apply_presets, format_table, machine_info, round_orders, summarize, write_json  # noqa: E402

PRESETS = {
    "cuda": dict(tokens=[2048, 8192], hidden=896, vocab=151936, dtype="bfloat16", rounds=3, reps=5, warmup=2),
    "cpu": dict(tokens=[256], hidden=64, vocab=4096, dtype="float32", rounds=3, reps=3, warmup=1),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--tokens", help="comma-separated token counts N (default: the device preset)")
    parser.add_argument("--configs", help="comma-separated subset of torch,triton,twopass (default: all that run)")
    for name in ("hidden", "vocab", "rounds", "reps", "warmup"):
        parser.add_argument(f"--{name}", type=int)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="JSON path (default: bench/results/fused_kernel_<device>.json)")
    args = parser.parse_args(argv)
    apply_presets(args, PRESETS)
    if isinstance(args.tokens, str):
        args.tokens = [int(n) for n in args.tokens.split(",")]
    with_triton = args.device == "cuda" and importlib.util.find_spec("triton") is not None
    default_configs = ["torch", "triton", "twopass"] if with_triton else ["torch", "twopass"]
    args.configs = args.configs.split(",") if args.configs else default_configs
    return args


def make_inputs(n: int, args, device: str):
    """Random policy and reference heads with O(1) logits (weights ~ N(0, 4/H)), targets and per-token weights."""
    g = torch.Generator().manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    scale = 2 / math.sqrt(args.hidden)
    hidden = randn(n, args.hidden).requires_grad_()
    weight = randn(args.vocab, args.hidden, scale=scale).requires_grad_()
    ref_hidden, ref_weight = randn(n, args.hidden), randn(args.vocab, args.hidden, scale=scale)
    targets = torch.randint(0, args.vocab, (n,), generator=g).to(device)
    upstream = torch.randn(n, generator=g).to(device)
    return hidden, weight, ref_hidden, ref_weight, targets, upstream


def forward(config: str, inputs):
    """(policy log-probs, KL(ref || policy)) with gradient, and the reference log-probs, for one configuration."""
    from trl_tokenlevel.ops.chunked import chunked_token_kl, chunked_token_logprobs
    from trl_tokenlevel.ops.fused import fused_token_statistics

    hidden, weight, ref_hidden, ref_weight, targets, _ = inputs
    if config in ("torch", "triton"):
        out = fused_token_statistics(hidden, weight, None, targets, ref_hidden, ref_weight, None, backend=config)
        return out.log_probs, out.kl, out.ref_log_probs
    log_probs = chunked_token_logprobs(hidden, weight, None, targets, backend="trl")
    with torch.no_grad():
        ref_log_probs = chunked_token_logprobs(ref_hidden, ref_weight, None, targets, backend="trl")
    kl = chunked_token_kl(hidden, weight, None, ref_hidden, ref_weight, None, direction="forward", backend="trl")
    return log_probs, kl, ref_log_probs


class Clock:
    """Seconds of GPU work between `start()` and `stop()` (CUDA events), or wall seconds on CPU."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def start(self):
        if self.cuda:
            self.begin = torch.cuda.Event(enable_timing=True)
            self.begin.record()
        else:
            self.begin = time.perf_counter()

    def stop(self) -> float:
        if not self.cuda:
            return time.perf_counter() - self.begin
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        end.synchronize()
        return self.begin.elapsed_time(end) / 1000


def measure(config: str, inputs, clock: Clock) -> tuple[float, float]:
    hidden, weight, *_, upstream = inputs
    clock.start()
    log_probs, kl, _ = forward(config, inputs)
    forward_s = clock.stop()
    clock.start()
    torch.autograd.grad((upstream * log_probs + upstream.flip(0) * kl).sum(), [hidden, weight])
    return forward_s, clock.stop()


def run_shape(n: int, args) -> dict:
    cuda = args.device == "cuda"
    inputs = make_inputs(n, args, args.device)
    clock = Clock(cuda)
    with torch.no_grad():
        reference = forward("torch", inputs)
    results = {config: {"forward_s": [], "backward_s": [], "forward_backward_s": []} for config in args.configs}
    for config in args.configs:
        for _ in range(args.warmup):
            measure(config, inputs, clock)
        with torch.no_grad():
            values = forward(config, inputs)
        results[config]["max_abs_dev_from_torch"] = {
            name: (got.float() - want.float()).abs().max().item()
            for name, got, want in zip(("log_probs", "kl", "ref_log_probs"), values, reference)
        }
        if cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            measure(config, inputs, clock)
            results[config]["cuda_alloc_peak_over_inputs_bytes"] = torch.cuda.max_memory_allocated() - base
    for order in round_orders(args.configs, args.rounds):
        for config in order:
            for _ in range(args.reps):
                forward_s, backward_s = measure(config, inputs, clock)
                results[config]["forward_s"].append(forward_s)
                results[config]["backward_s"].append(backward_s)
                results[config]["forward_backward_s"].append(forward_s + backward_s)
    for entry in results.values():
        for key in ("forward_s", "backward_s", "forward_backward_s"):
            entry[key] = summarize(entry[key])
    return {"tokens": n, "hidden": args.hidden, "vocab": args.vocab, "dtype": args.dtype, "configs": results}


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if "triton" in args.configs and args.device == "cpu":
        print("triton on CPU runs in Triton's interpreter (TRITON_INTERPRET=1): a parity check, its times mean nothing")
    out = args.out or RESULTS_DIR / f"fused_kernel_{args.device}.json"
    machine = machine_info(args.device)
    shapes = []
    for n in args.tokens:
        shape = run_shape(n, args)
        shapes.append(shape)
        # after every N, so that a run stopped by a time limit keeps the token counts it finished
        write_json(out, {"benchmark": "fused_kernel", "args": vars(args) | {"out": str(out)}, "machine": machine,
                         "complete": len(shapes) == len(args.tokens), "shapes": shapes})  # fmt: skip
        baseline = shape["configs"].get("twopass", next(iter(shape["configs"].values())))
        rows = []
        for config, entry in shape["configs"].items():
            median = entry["forward_backward_s"]["median"]
            peak = entry.get("cuda_alloc_peak_over_inputs_bytes")
            rows.append([
                config, f"{entry['forward_s']['median'] * 1e3:.1f}", f"{entry['backward_s']['median'] * 1e3:.1f}",
                f"{median * 1e3:.1f}", f"{median / baseline['forward_backward_s']['median']:.2f}x",
                "-" if peak is None else f"{peak / 2**20:.0f}",
                f"{max(entry['max_abs_dev_from_torch'].values()):.1e}",
            ])  # fmt: skip
        print(f"\nN={n} H={args.hidden} V={args.vocab} {args.dtype} on {args.device}")
        headers = ["kernel", "fwd ms", "bwd ms", "fwd+bwd ms", "vs twopass", "peak MiB", "max |dev|"]
        print(format_table(headers, rows))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
