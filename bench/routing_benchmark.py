"""Small/large token routing on a controlled task: accuracy vs large-model token share for R2R, EAD and cascades.

The task ("code lookup") is a table of `--keys` random 4-letter keys, each with a random 2-digit code:

    prompt:  "code bccj :"        answer: " the code is 2 8 ."  (+ EOS)

Every key is one token of a byte-level BPE tokenizer from `trl_tokenlevel.tiny`, so the answer is 7 tokens: 5 easy
format tokens (the same in every answer) and 2 hard ones (the code digits, memorised per key). A narrow "small" Llama
(hidden 8, 2 layers) and a wider "large" Llama (hidden 64, 2 layers) are trained on the whole table for the same
number of steps; the large one memorises it, the small one misses some digits. This is a knowledge-lookup setting
built so that only a minority of tokens are hard, which is the premise R2R relies on; the numbers say nothing about
real LLM pairs.

Keys are split (after the language models are trained on all of them) into router-labelling keys, calibration keys
and evaluation keys. Methods, all greedy, evaluated on the evaluation keys:

    small / large   one model alone (`generation.kv.cached_generate`)
    r2r             router trained on labels from `build_routing_dataset` (judge: the large model continues both
                    branches, exact-match reward against the key's code), θ calibrated for recall 0.95 on the
                    calibration keys, plus a sweep of fixed θ
    ead             entropy-adaptive switching, sweep of τ (bits), w = d_min = 1 (answers are 7 tokens) and the
                    spec's suggested w = d_min = 5
    cascade         Chow-Quantile α = 0 (the minimum token log-prob) deferral, θ calibrated on the calibration keys
                    for target deferral rates

Reported per method: exact-match accuracy, large-model token fraction (`TokenRoutingOutput.large_token_fraction`:
share of output tokens produced by the large model; for cascades the small model's discarded tokens are extra cost,
listed separately), a compute proxy (parameter-weighted tokens encoded by both models, relative to large-only at the
same batch size: it counts the large model's catch-up prefills) and the wall time of generating all evaluation
answers, batched (64) and, for small / large / calibrated R2R, one prompt at a time. Writes
`bench/results/routing_benchmark.json`, `.md` and `.png` (accuracy vs large-model fraction, drawn by a small built-in
PNG writer: matplotlib is not needed). On tiny CPU models the wall time is per-call overhead, not model size: two
models and a router per step are slower than one model, whatever the sizes.

    python bench/routing_benchmark.py                 # default: 2-3 CPU minutes on 2 (busy) cores
    python bench/routing_benchmark.py --quick         # smoke run (tiny table, few steps; numbers meaningless)
    python bench/routing_benchmark.py --plot-only bench/results/routing_benchmark.json   # redraw the PNG
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import struct
import sys
import time
import zlib
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

CONSONANTS = "bcdfghjklmnpqrstvwxz"

# --------------------------------------------------------------------------------------------------------------------
# Task
# --------------------------------------------------------------------------------------------------------------------


def make_table(num_keys: int, seed: int) -> dict[str, str]:
    rng = random.Random(seed)
    keys: set[str] = set()
    while len(keys) < num_keys:
        keys.add("".join(rng.choice(CONSONANTS) for _ in range(4)))
    return {key: " ".join(rng.choice("0123456789") for _ in range(2)) for key in sorted(keys)}


def prompt_text(key: str) -> str:
    return f"code {key} :"


def answer_text(code: str) -> str:
    return f" the code is {code} ."


def exact_match(prompts, completions, answer, **kwargs) -> list[float]:
    """TRL-style reward: 1 if the completion is exactly the answer (whitespace-trimmed)."""
    return [float(c.strip() == a.strip()) for c, a in zip(completions, answer)]


def build_task(num_keys: int, seed: int):
    from trl_tokenlevel.tiny import build_tiny_tokenizer

    table = make_table(num_keys, seed)
    texts = [prompt_text(k) + answer_text(v) for k, v in table.items()] * 2
    tokenizer = build_tiny_tokenizer(texts, vocab_size=300 + 4 * num_keys)
    tokenizer.padding_side = "left"
    keys = list(table)
    prompt_ids = [tokenizer(prompt_text(k))["input_ids"] for k in keys]
    answer_ids = [tokenizer(answer_text(table[k]))["input_ids"] + [tokenizer.eos_token_id] for k in keys]
    shapes = {(len(p), len(a)) for p, a in zip(prompt_ids, answer_ids)}
    if len(shapes) != 1:
        raise RuntimeError(f"Keys did not tokenise to single tokens (prompt/answer lengths {shapes}); raise the vocab.")
    ids = torch.tensor([p + a for p, a in zip(prompt_ids, answer_ids)])
    labels = ids.clone()
    labels[:, : len(prompt_ids[0])] = -100
    return table, tokenizer, ids, labels, len(prompt_ids[0])


def split_keys(keys: list[str], seed: int, label_share: float, calibration_share: float):
    order = list(keys)
    random.Random(seed + 1).shuffle(order)
    n_label = int(label_share * len(order))
    n_cal = int(calibration_share * len(order))
    return order[:n_label], order[n_label : n_label + n_cal], order[n_label + n_cal :]


def train_lm(model, ids, labels, steps: int, lr: float, batch: int, seed: int, log_every: int = 100):
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        index = torch.randint(0, len(ids), (batch,), generator=generator)
        loss = model(input_ids=ids[index], labels=labels[index]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"    step {step:4d}  loss {loss.item():.4f}  {time.perf_counter() - start:6.1f}s", flush=True)
    model.eval()
    return time.perf_counter() - start


# --------------------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------------------


def evaluate(name: str, run, prompts: list[str], answers: list[str], batch: int, **info) -> dict:
    """Run `run(prompts_batch) -> TokenRoutingOutput` over the prompts; accuracy, large fraction, wall time."""
    correct = large = total = discarded = small_encoded = large_encoded = 0
    start = time.perf_counter()
    for i in range(0, len(prompts), batch):
        out = run(prompts[i : i + batch])
        correct += sum(t.strip() == a.strip() for t, a in zip(out.texts, answers[i : i + batch]))
        large += int((out.large_mask & out.completion_mask).sum())
        total += int(out.completion_mask.sum())
        discarded += int(out.stats.get("small_tokens_discarded", 0))
        small_encoded += int(out.stats.get("small_encoded_tokens", 0))
        large_encoded += int(out.stats.get("large_encoded_tokens", 0))
    wall = time.perf_counter() - start
    row = {
        "method": name,
        "accuracy": correct / len(prompts),
        "large_token_fraction": large / total if total else 0.0,
        "small_tokens_discarded_per_output_token": discarded / total if total else 0.0,
        "wall_time_s": wall,
        "batch_size": batch,
        "small_encoded_tokens": small_encoded,
        "large_encoded_tokens": large_encoded,
        **info,
    }
    print(f"  {name:<34} acc {row['accuracy']:.3f}  large {row['large_token_fraction']:.3f}  {wall:6.2f}s", flush=True)
    return row


def run_benchmark(args) -> dict:
    from trl_tokenlevel.generation.cascade import calibrate_cascade, cascade_generate
    from trl_tokenlevel.generation.ead import ead_generate
    from trl_tokenlevel.generation.kv import cached_generate
    from trl_tokenlevel.generation.routing import (
        RouterTrainingConfig,
        TokenRouter,
        build_routing_dataset,
        router_probabilities,
        routing_metrics,
        routed_generate,
        routing_tensors,
        train_router,
    )
    from trl_tokenlevel.tiny import build_tiny_model

    torch.set_num_threads(args.threads)
    total_start = time.perf_counter()
    table, tokenizer, ids, labels, prompt_len = build_task(args.keys, args.seed)
    print(f"Task: {len(table)} keys, vocab {len(tokenizer)}, prompt {prompt_len} + answer {ids.shape[1] - prompt_len} "
          "tokens", flush=True)  # fmt: skip
    models, timings = {}, {}
    for name, hidden, layers, lr in (("small", args.small_hidden, args.small_layers, args.small_lr),
                                     ("large", args.large_hidden, args.large_layers, args.large_lr)):  # fmt: skip
        model = build_tiny_model(tokenizer, hidden_size=hidden, num_layers=layers, seed=args.seed + 1)
        params = sum(p.numel() for p in model.parameters())
        print(f"Training {name}: hidden {hidden}, {layers} layer(s), {params} parameters, {args.steps} steps",
              flush=True)
        timings[f"train_{name}_s"] = train_lm(model, ids, labels, args.steps, lr, args.batch, args.seed)
        models[name] = (model, params)
    small, large = models["small"][0], models["large"][0]

    label_keys, cal_keys, eval_keys = split_keys(list(table), args.seed, args.label_share, args.calibration_share)
    prompts = [prompt_text(k) for k in eval_keys]
    answers = [answer_text(table[k]) for k in eval_keys]
    generate_kwargs = dict(tokenizer=tokenizer, max_new_tokens=ids.shape[1] - prompt_len + 1)
    rows = []
    print(f"Evaluating on {len(eval_keys)} keys (router labels: {len(label_keys)}, calibration: {len(cal_keys)})")
    rows.append(evaluate("small", lambda p: cached_generate(small, prompts=p, **generate_kwargs), prompts, answers,
                         args.eval_batch, family="small"))  # fmt: skip
    rows.append(evaluate("large", lambda p: cached_generate(large, prompts=p, is_large=True, **generate_kwargs),
                         prompts, answers, args.eval_batch, family="large"))  # fmt: skip

    # ---- R2R: labels, router, calibration
    from datasets import Dataset

    def labelled(keys):
        data = Dataset.from_dict(
            {"prompt": [prompt_text(k) for k in keys], "answer": [answer_text(table[k]) for k in keys]}
        )
        return build_routing_dataset(small, large, tokenizer, data, reward_fn=exact_match,
                                     max_new_tokens=generate_kwargs["max_new_tokens"], top_k=args.router_top_k,
                                     batch_size=64, continuation_max_new_tokens=8, progress=False)  # fmt: skip

    start = time.perf_counter()
    train_labels, cal_labels = labelled(label_keys), labelled(cal_keys)
    timings["label_s"] = time.perf_counter() - start
    train_tensors, cal_tensors = routing_tensors(train_labels), routing_tensors(cal_labels)
    label_stats = {
        "label_tokens": int(len(train_tensors["labels"])),
        "label_mismatch": int(sum(sum(m) for m in train_labels["mismatch"])),
        "label_routing_worthy": int(train_tensors["labels"].sum()),
        "calibration_tokens": int(len(cal_tensors["labels"])),
        "calibration_routing_worthy": int(cal_tensors["labels"].sum()),
    }
    print(f"  labels: {label_stats}", flush=True)
    torch.manual_seed(args.seed)
    router = TokenRouter.from_small_model(small, top_k=args.router_top_k, width=args.router_width,
                                          num_blocks=args.router_blocks)  # fmt: skip
    config = RouterTrainingConfig(learning_rate=args.router_lr, batch_size=256, num_epochs=args.router_epochs,
                                  patience=10, target_recall=0.95, seed=args.seed)  # fmt: skip
    start = time.perf_counter()
    result = train_router(router, train_tensors, cal_tensors, config, progress=False)
    timings["router_train_s"] = time.perf_counter() - start
    calibrated = result.threshold
    print(f"  router: θ = {calibrated:.4g} (calibration {result.validation})", flush=True)
    probs = router_probabilities(router, cal_tensors)
    thresholds = sorted({calibrated, *args.r2r_thresholds}, reverse=True)
    for theta in thresholds:
        tag = " (calibrated, recall 0.95)" if theta == calibrated else ""
        rows.append(evaluate(f"r2r θ={theta:.3g}{tag}",
                             lambda p, t=theta: routed_generate(small, large, router, prompts=p, threshold=t,
                                                                **generate_kwargs),
                             prompts, answers, args.eval_batch, family="r2r", threshold=theta,
                             calibrated=theta == calibrated,
                             calibration_metrics=routing_metrics(probs, cal_tensors["labels"], theta)))  # fmt: skip

    # ---- EAD
    for window, dwell in ((1, 1), (5, 5)):
        for tau in args.ead_thresholds:
            rows.append(evaluate(f"ead τ={tau:g} bits w={window} d={dwell}",
                                 lambda p, t=tau, w=window, d=dwell: ead_generate(small, large, prompts=p, threshold=t,
                                                                                  window=w, min_dwell=d,
                                                                                  **generate_kwargs),
                                 prompts, answers, args.eval_batch, family=f"ead w={window}", threshold=tau,
                                 window=window, min_dwell=dwell))  # fmt: skip

    # ---- Cascades
    cal_prompts = [prompt_text(k) for k in cal_keys]
    for rate in args.cascade_rates:
        theta = calibrate_cascade(small, prompts=cal_prompts, target_deferral_rate=rate, rule="chow_quantile",
                                  alpha=0.0, **generate_kwargs)  # fmt: skip
        rows.append(evaluate(f"cascade min-logprob rate={rate:g}",
                             lambda p, t=theta: cascade_generate(small, large, prompts=p, threshold=t,
                                                                 rule="chow_quantile", alpha=0.0, **generate_kwargs),
                             prompts, answers, args.eval_batch, family="cascade", threshold=theta,
                             target_deferral_rate=rate))  # fmt: skip

    # ---- Batch size 1: the large model runs only at routed steps (in a batch it catches up every row, see kv.py)
    if args.batch1:
        rows.append(evaluate("small (batch 1)", lambda p: cached_generate(small, prompts=p, **generate_kwargs),
                             prompts, answers, 1, family="small", batch1=True))  # fmt: skip
        rows.append(evaluate("large (batch 1)", lambda p: cached_generate(large, prompts=p, is_large=True,
                                                                          **generate_kwargs),
                             prompts, answers, 1, family="large", batch1=True))  # fmt: skip
        rows.append(evaluate(f"r2r θ={calibrated:.3g} (calibrated, batch 1)",
                             lambda p: routed_generate(small, large, router, prompts=p, threshold=calibrated,
                                                       **generate_kwargs),
                             prompts, answers, 1, family="r2r", threshold=calibrated, calibrated=True,
                             batch1=True))  # fmt: skip

    # Compute proxy: parameter-weighted encoded tokens (padding and finished rows included), relative to large-only
    # at the same batch size.
    params = {name: p for name, (_, p) in models.items()}
    for row in rows:
        row["param_tokens"] = (params["small"] * row["small_encoded_tokens"]
                               + params["large"] * row["large_encoded_tokens"])  # fmt: skip
    for row in rows:
        reference = next(r for r in rows if r["family"] == "large" and r["batch_size"] == row["batch_size"])
        row["compute_vs_large"] = row["param_tokens"] / reference["param_tokens"]

    large_acc = rows[1]["accuracy"]
    goal = [r for r in rows if r["family"] not in ("small", "large") and r["large_token_fraction"] < 0.30
            and r["accuracy"] >= large_acc - 0.02]  # fmt: skip
    timings["total_s"] = time.perf_counter() - total_start
    return {
        "task": {"keys": len(table), "vocab": len(tokenizer), "prompt_tokens": prompt_len,
                 "answer_tokens": ids.shape[1] - prompt_len, "label_keys": len(label_keys),
                 "calibration_keys": len(cal_keys), "eval_keys": len(eval_keys)},  # fmt: skip
        "models": {name: {"parameters": params} for name, (_, params) in models.items()},
        "args": vars(args),
        "label_stats": label_stats,
        "router": {"threshold": calibrated, "validation": result.validation, "epochs": len(result.history)},
        "timings_s": timings,
        "rows": rows,
        "goal": {
            "definition": "accuracy >= large-only accuracy - 0.02 at large-model token fraction < 0.30",
            "met_by": [r["method"] for r in goal],
            "met": bool(goal),
        },
    }


# --------------------------------------------------------------------------------------------------------------------
# Report: markdown table and a PNG plot without matplotlib
# --------------------------------------------------------------------------------------------------------------------


def markdown_table(results: dict) -> str:
    lines = ["| method | batch | accuracy | large-model token fraction | discarded small tokens / output token | "
             "compute vs large | wall s |", "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in results["rows"]:
        compute = r.get("compute_vs_large")
        lines.append(f"| {r['method']} | {r.get('batch_size', '')} | {r['accuracy']:.3f} | "
                     f"{r['large_token_fraction']:.3f} | {r['small_tokens_discarded_per_output_token']:.3f} | "
                     f"{'' if compute is None else f'{compute:.3f}'} | {r['wall_time_s']:.2f} |")  # fmt: skip
    return "\n".join(lines)


# 5x7 glyphs, one string of 7 five-pixel rows per character ('#' = ink).
_GLYPHS = {
    "0": ".###.#...##..###.#.###..##...#.###.", "1": "..#...##....#....#....#....#...###.",
    "2": ".###.#...#....#...#...#...#...#####", "3": "####.....#...#....#.....##...#.###.",
    "4": "...#...##..#.#.#..#.#####...#....#.", "5": "######....####.....#....##...#.###.",
    "6": "..##..#...#....####.#...##...#.###.", "7": "#####....#...#...#...#....#....#...",
    "8": ".###.#...##...#.###.#...##...#.###.", "9": ".###.#...##...#.####....#...#..##..",
    "A": ".###.#...##...#######...##...##...#", "B": "####.#...##...#####.#...##...#####.",
    "C": ".###.#...##....#....#....#...#.###.", "D": "###..#..#.#...##...##...##..#.###..",
    "E": "######....#....####.#....#....#####", "F": "######....#....####.#....#....#....",
    "G": ".###.#...##....#.####...##...#.####", "H": "#...##...##...#######...##...##...#",
    "I": ".###...#....#....#....#....#...###.", "K": "#...##..#.#.#..##...#.#..#..#.#...#",
    "L": "#....#....#....#....#....#....#####", "M": "#...###.###.#.##.#.##...##...##...#",
    "N": "#...###..##.#.##..###...##...##...#", "O": ".###.#...##...##...##...##...#.###.",
    "P": "####.#...##...#####.#....#....#....", "Q": ".###.#...##...##...##.#.##..#..##.#",
    "R": "####.#...##...#####.#.#..#..#.#...#", "S": ".####.....#.....###.....#....#####.",
    "T": "#####..#....#....#....#....#....#..", "U": "#...##...##...##...##...##...#.###.",
    "V": "#...##...##...##...##...#.#.#...#..",
    ":": ".......#..............#............",
    "W": "#...##...##...##.#.##.#.##.#..#.#..", "Y": "#...##...#.#.#...#....#....#....#..",
    "=": "..........#####.....#####..........", ".": "..............................##...",
    "-": "................###................", " ": "." * 35, "%": "##...##..#...#...#...#...#..##...##",
    "/": "....#....#...#...#...#...#....#....", "<": "...#...#...#...#.....#.....#.....#.",
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


def plot(results: dict, path: Path) -> None:
    """Accuracy (y) vs large-model token fraction (x), one colour per method family; lines join each sweep."""
    width, height, left, right, top, bottom = 900, 600, 90, 220, 50, 80
    canvas = Canvas(width, height)
    x_of = lambda f: round(left + f * (width - left - right))  # noqa: E731
    accuracies = [r["accuracy"] for r in results["rows"]]
    low = max(0.0, math.floor(min(accuracies) * 10) / 10 - 0.05)
    y_of = lambda a: round(height - bottom - (a - low) / (1.0 - low) * (height - top - bottom))  # noqa: E731
    axis, grid = (0, 0, 0), (225, 225, 225)
    for i in range(11):
        f = i / 10
        canvas.line(x_of(f), top, x_of(f), height - bottom, grid)
        canvas.text(x_of(f) - 12, height - bottom + 10, f"{f:.1f}", scale=2)
    for i in range(int(round((1.0 - low) * 20)) + 1):
        a = low + i * 0.05
        canvas.line(left, y_of(a), width - right, y_of(a), grid)
        canvas.text(left - 62, y_of(a) - 7, f"{a:.2f}", scale=2)
    canvas.line(left, top, left, height - bottom, axis, 2)
    canvas.line(left, height - bottom, width - right, height - bottom, axis, 2)
    canvas.line(x_of(0.3), top, x_of(0.3), height - bottom, (120, 120, 120))
    large_acc = next(r["accuracy"] for r in results["rows"] if r["family"] == "large")
    canvas.line(left, y_of(large_acc - 0.02), width - right, y_of(large_acc - 0.02), (120, 120, 120))
    canvas.text(left, 15, "ACCURACY VS LARGE-MODEL TOKEN FRACTION", scale=2)
    canvas.text(left + 150, height - 35, "LARGE-MODEL TOKEN FRACTION", scale=2)
    families: dict[str, list] = {}
    for r in results["rows"]:
        if not r.get("batch1"):
            families.setdefault(r["family"], []).append(r)
    legend_y = top
    # Single-model points last, so that sweeps starting at the small model do not hide it.
    for family in sorted(families, key=lambda f: f in ("small", "large")):
        color = _COLORS.get(family, (0, 0, 0))
        points = sorted((x_of(r["large_token_fraction"]), y_of(r["accuracy"])) for r in families[family])
        for (x0, y0), (x1, y1) in zip(points, points[1:]):
            canvas.line(x0, y0, x1, y1, color, 2)
        for x, y in points:
            canvas.disc(x, y, 5, color)
    for family in families:
        color = _COLORS.get(family, (0, 0, 0))
        canvas.disc(width - right + 25, legend_y + 7, 6, color)
        canvas.text(width - right + 40, legend_y, family.replace("ead ", "EAD "), scale=2)
        legend_y += 28
    canvas.text(width - right + 10, legend_y + 20, "GREY: 30% AND", scale=1)
    canvas.text(width - right + 10, legend_y + 32, "LARGE ACC - 2 PTS", scale=1)
    path.write_bytes(canvas.png())


# --------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=512)
    parser.add_argument("--steps", type=int, default=700, help="Training steps of each language model.")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--small-hidden", type=int, default=8)
    parser.add_argument("--small-layers", type=int, default=2)
    parser.add_argument("--small-lr", type=float, default=1e-2)
    parser.add_argument("--large-hidden", type=int, default=64)
    parser.add_argument("--large-layers", type=int, default=2)
    parser.add_argument("--large-lr", type=float, default=5e-3)
    parser.add_argument("--label-share", type=float, default=0.4)
    parser.add_argument("--calibration-share", type=float, default=0.15)
    parser.add_argument("--router-top-k", type=int, default=100)
    parser.add_argument("--router-width", type=int, default=256)
    parser.add_argument("--router-blocks", type=int, default=2)
    parser.add_argument("--router-lr", type=float, default=1e-3)
    parser.add_argument("--router-epochs", type=int, default=60)
    parser.add_argument("--r2r-thresholds", type=float, nargs="*", default=[0.999, 0.99, 0.9, 0.5, 0.1])
    parser.add_argument("--ead-thresholds", type=float, nargs="*", default=[0.25, 0.5, 1.0, 2.0])
    parser.add_argument("--cascade-rates", type=float, nargs="*", default=[0.1, 0.2, 0.3, 0.4])
    parser.add_argument("--eval-batch", type=int, default=64)
    parser.add_argument("--no-batch1", dest="batch1", action="store_false",
                        help="Skip the batch-size-1 rows (small, large, calibrated R2R).")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot-only", metavar="JSON", help="Redraw the PNG of an existing result file and exit.")
    parser.add_argument("--quick", action="store_true", help="Smoke run: 64 keys, 30 steps, tiny router.")
    parser.add_argument("--out", default=str(BENCH_DIR / "results" / "routing_benchmark.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.keys, args.steps, args.router_epochs, args.router_width = 64, 30, 2, 32
        args.r2r_thresholds, args.ead_thresholds, args.cascade_rates = [0.5], [1.0], [0.3]
        args.batch1 = False
    return args


def main(argv=None) -> dict:
    from common import machine_info

    args = parse_args(argv)
    if args.plot_only:
        results = json.loads(Path(args.plot_only).read_text())
        plot(results, Path(args.plot_only).with_suffix(".png"))
        return results
    results = run_benchmark(args)
    results["machine"] = machine_info("cpu")
    results["machine"]["loadavg_at_end"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    table = markdown_table(results)
    goal = results["goal"]
    summary = (f"Goal ({goal['definition']}): {'MET by ' + ', '.join(goal['met_by']) if goal['met'] else 'NOT met'}.")
    out.with_suffix(".md").write_text(f"{table}\n\n{summary}\n")
    plot(results, out.with_suffix(".png"))
    print("\n" + table + "\n\n" + summary)
    print(f"\nWrote {out}, {out.with_suffix('.md')} and {out.with_suffix('.png')}")
    return results


if __name__ == "__main__":
    main()
