"""AWRS on the demo model with a real constraint: constraint evaluations per token vs full-vocabulary masking.

Constraint: the answer must be a fixed-schema JSON object `{"sum": <1-4 digits>}` followed by the end of the turn.
Checked on text: a token is allowed iff the decoded completion with it is a prefix of a string of that language (the
end-of-turn token only once the object is complete). The prompt asks SmolLM2-135M-Instruct (the demo model, chat
template) for the sum of two 2-digit numbers as such an object.

Three decoders, all sampling at temperature 1 with `model.generate` and a logits processor:

    unconstrained   plain sampling (how often is the output valid on its own?)
    masking         locally constrained decoding: the constraint on all |V| = 49,152 tokens at every step, then
                    sampling from the renormalised allowed distribution
    awrs            `AWRSLogitsProcessor`: the same constrained distribution, the constraint evaluated only along the
                    Gumbel order (and the importance weight returned)

Reported: constraint evaluations per generated token (rows that finished are padded without checks), validity of the outputs, the mean per-sequence log
weight (AWRS) against the exact log Z sum (masking), and the time spent in the constraint (measured; a Python
constraint, so the |V| evaluations of masking dominate its step time).

    python bench/awrs_benchmark.py               # ~2-5 min on 2 busy CPU cores
    python bench/awrs_benchmark.py --prompts 4 --max-new-tokens 12
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import LogitsProcessor  # noqa: E402

PREFIX = '{"sum": '
COMPLETE = re.compile(r'\{"sum": \d{1,4}\}')


def valid_prefix(text: str) -> bool:
    """Is `text` a prefix of some `{"sum": <1-4 digits>}`?"""
    if len(text) <= len(PREFIX):
        return PREFIX.startswith(text)
    if not text.startswith(PREFIX):
        return False
    rest = text[len(PREFIX) :]
    return re.fullmatch(r"\d{0,4}", rest) is not None or re.fullmatch(r"\d{1,4}\}", rest) is not None


class JsonSchemaConstraint:
    """`accept(prefix_ids, token)`: decoded strings of single tokens are cached, so a check is a string operation."""

    def __init__(self, tokenizer, end_ids: set[int]):
        self.tokenizer = tokenizer
        self.end_ids = end_ids
        self._pieces: dict[int, str] = {}
        self._texts: dict[tuple, str] = {}

    def piece(self, token: int) -> str:
        if token not in self._pieces:
            self._pieces[token] = self.tokenizer.decode([token])
        return self._pieces[token]

    def text(self, prefix) -> str:
        key = tuple(prefix)
        if key not in self._texts:
            self._texts[key] = self.tokenizer.decode(list(prefix))
        return self._texts[key]

    def __call__(self, prefix, token: int) -> bool:
        done = self.text(prefix)
        if token in self.end_ids:
            return COMPLETE.fullmatch(done) is not None
        if token in self.tokenizer.all_special_ids:
            return False
        return valid_prefix(done + self.piece(token))


class MaskingProcessor(LogitsProcessor):
    """Locally constrained decoding by masking: evaluate every token, sample from the allowed renormalised
    distribution (one-hot output, like `AWRSLogitsProcessor`); records the exact log Z per step."""

    def __init__(self, constraint, eos_token_id, generator):
        from trl_tokenlevel.generation.awrs import as_constraint

        self.constraint = as_constraint(constraint)
        self.eos_token_id = eos_token_id
        self.generator = generator
        self.prompt_length = None
        self.log_z = []

    @torch.no_grad()
    def __call__(self, input_ids, scores):
        from trl_tokenlevel.generation.awrs import masked_sample

        if self.prompt_length is None:
            self.prompt_length = input_ids.shape[1]
        out = torch.full_like(scores, float("-inf"))
        log_z = torch.empty(len(input_ids), dtype=torch.float64)
        for row in range(len(input_ids)):
            prefix = input_ids[row, self.prompt_length :].tolist()
            if self.eos_token_id in prefix:  # finished row: padding, not checked (as in AWRSLogitsProcessor)
                out[row, self.eos_token_id] = 0.0
                log_z[row] = 0.0
                continue
            draw = masked_sample(scores[row], self.constraint, prefix, generator=self.generator)
            out[row, draw.token if draw.token >= 0 else 0] = 0.0
            log_z[row] = draw.log_weight
        self.log_z.append(log_z)
        return out


class TimedConstraint:
    def __init__(self, accept):
        self.accept = accept
        self.seconds = 0.0

    def __call__(self, prefix, token):
        start = time.perf_counter()
        result = self.accept(prefix, token)
        self.seconds += time.perf_counter() - start
        return result


def run(args) -> dict:
    from trl_tokenlevel.data.builtin.tasks import make_problems
    from trl_tokenlevel.generation.awrs import AWRSLogitsProcessor, TokenConstraint
    from trl_tokenlevel.models import load_demo_model

    torch.set_num_threads(args.threads)
    model, tokenizer = load_demo_model(use_hub=False)
    model.eval()
    end_ids = {tokenizer.eos_token_id}
    problems = make_problems("add", args.prompts, split="test", seed=args.seed, digits=2)
    messages = [[{"role": "user", "content": f"What is {p.question.rstrip(' =')}? Reply with only a JSON object "
                  'of the form {"sum": <number>}.'}] for p in problems]  # fmt: skip
    texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages]
    enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    prompt_length = enc["input_ids"].shape[1]
    vocab = model.get_output_embeddings().out_features
    results = {}
    for method in ("unconstrained", "masking", "awrs"):
        torch.manual_seed(args.seed)
        generator = torch.Generator().manual_seed(args.seed)
        accept = TimedConstraint(JsonSchemaConstraint(tokenizer, end_ids))
        constraint = TokenConstraint(accept=accept)
        processors = []
        if method == "masking":
            processors = [MaskingProcessor(constraint, tokenizer.eos_token_id, generator)]
        elif method == "awrs":
            processors = [AWRSLogitsProcessor(constraint, eos_token_id=tokenizer.eos_token_id, generator=generator)]
        start = time.perf_counter()
        out = model.generate(**enc, logits_processor=processors, do_sample=method == "unconstrained",
                             temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=args.max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
        wall = time.perf_counter() - start
        completions = out[:, prompt_length:]
        mask = torch.ones_like(completions, dtype=torch.bool)
        for row in range(len(completions)):  # valid tokens: up to and including the first EOS
            hits = (completions[row] == tokenizer.eos_token_id).nonzero()
            if len(hits):
                mask[row, hits[0, 0] + 1 :] = False
        answers = [tokenizer.decode(c[m].tolist(), skip_special_tokens=True) for c, m in zip(completions, mask)]
        finished = [bool((c[m] == tokenizer.eos_token_id).any()) for c, m in zip(completions, mask)]
        valid = [COMPLETE.fullmatch(a) is not None and f for a, f in zip(answers, finished)]
        correct = [v and json.loads(a)["sum"] == int(p.answer) for a, v, p in zip(answers, valid, problems)]
        tokens = int(mask.sum())
        row = {
            "generated_tokens": tokens,
            "valid": sum(valid) / len(valid),
            "correct": sum(correct) / len(correct),
            "constraint_calls": constraint.calls,
            "calls_per_token": constraint.calls / tokens,  # finished rows are padded without checks
            "constraint_seconds": accept.seconds,
            "wall_s": wall,
            "examples": answers[:4],
        }
        if method == "awrs":
            processor = processors[0]
            steps = torch.stack(processor.log_weights, dim=1)[:, : mask.shape[1]]
            row["max_calls_per_step"] = max(processor.calls_per_step) / len(completions)
            row["mean_log_weight"] = float(torch.where(mask[:, : steps.shape[1]], steps, 0).sum(1).mean())
        if method == "masking":
            steps = torch.stack(processors[0].log_z, dim=1)[:, : mask.shape[1]]
            row["mean_exact_log_z"] = float(torch.where(mask[:, : steps.shape[1]], steps, 0).sum(1).mean())
        results[method] = row
        print(f"{method:<14} valid {row['valid']:.2f}  correct {row['correct']:.2f}  calls/token "
              f"{row['calls_per_token']:.1f}  constraint {accept.seconds:.1f}s  wall {wall:.1f}s  {answers[:2]}",
              flush=True)  # fmt: skip
    return {"vocab_size": vocab, "prompts": len(problems), "max_new_tokens": args.max_new_tokens,
            "constraint": 'JSON {"sum": <1-4 digits>} then end of turn', "results": results}  # fmt: skip


def markdown(data: dict) -> str:
    lines = [
        f"Constraint: {data['constraint']}; demo model, {data['prompts']} prompts (2-digit sums), temperature 1, "
        f"vocabulary {data['vocab_size']:,}.",
        "",
        "| decoder | constraint calls / token | valid outputs | correct sums | constraint time s | wall s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for method, row in data["results"].items():
        lines.append(f"| {method} | {row['calls_per_token']:.1f} | {row['valid']:.2f} | {row['correct']:.2f} | "
                     f"{row['constraint_seconds']:.1f} | {row['wall_s']:.1f} |")  # fmt: skip
    awrs, masking = data["results"]["awrs"], data["results"]["masking"]
    lines += ["", f"Mean per-sequence log weight: AWRS estimate {awrs['mean_log_weight']:.3f}, masking's exact log Z "
              f"{masking['mean_exact_log_z']:.3f} (different samples; equal in expectation of the weight, not of its "
              "log)."]  # fmt: skip
    return "\n".join(lines)


def main(argv=None):
    from bench.common import machine_info

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=14)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(BENCH_DIR / "results" / "awrs_benchmark.json"))
    args = parser.parse_args(argv)
    data = run(args)
    data["machine"] = machine_info("cpu")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2))
    out.with_suffix(".md").write_text(markdown(data) + "\n")
    print(markdown(data))
    return data


if __name__ == "__main__":
    main()
