"""Token-level routing between a small and a large model: label routing tokens, train a router, generate.

Built-in tiny default (CPU, seconds, offline; random tiny models, so the labels only exercise the pipeline):
```bash
trl-tokenlevel route label                # -> tokenlevel-route/labels (datasets.save_to_disk) + tiny model pair
trl-tokenlevel route train-router         # -> tokenlevel-route/router (router_config.json + router.safetensors)
trl-tokenlevel route generate             # -> tokenlevel-route/generations-r2r.jsonl + token_models-r2r.html
```

Real pair (same tokenizer family):
```bash
trl-tokenlevel route label \
    --small_model_name_or_path Qwen/Qwen3-0.6B --large_model_name_or_path Qwen/Qwen3-8B \
    --dataset_name openai/gsm8k --dataset_config main --prompt_column question \
    --reward_func my_rewards:accuracy_reward --max_new_tokens 512 --output_dir gsm8k-routing-labels
trl-tokenlevel route train-router --dataset_path gsm8k-routing-labels --learning_rate 5e-5 --output_dir router
trl-tokenlevel route generate --router_path router --method r2r --dataset_name openai/gsm8k \
    --dataset_config main --dataset_split test --prompt_column question
```
`--method ead --threshold 2.0` and `--method cascade --cascade_deferral_rate 0.3` use the same models without a router.
Every field is a flag; `--config file.yaml` works as in TRL.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from dataclasses import dataclass, field

import torch

SUBCOMMANDS = ("label", "train-router", "generate")
METHODS = ("r2r", "ead", "cascade", "small", "large")
META_NAME = "route_meta.json"


@dataclass
class RouteModelArguments:
    """The small/large model pair (same tokenizer). Both unset: a tiny random pair built offline."""

    small_model_name_or_path: str | None = field(default=None, metadata={"help": "Small model (SLM) path or Hub id."})
    large_model_name_or_path: str | None = field(default=None, metadata={"help": "Large model (LLM) path or Hub id."})
    dtype: str | None = field(default=None, metadata={"help": "Model dtype ('auto', 'bfloat16', 'float32', ...)."})
    device: str | None = field(default=None, metadata={"help": "Device for both models (default: cuda if available)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Passed to from_pretrained."})


@dataclass
class RouteLabelArguments:
    """`route label`: build R2R routing labels (`generation.routing.build_routing_dataset`)."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub dataset, a local .json/.jsonl file, or unset for the built-in prompts."}
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    dataset_split: str = field(default="train", metadata={"help": "Split to label."})
    prompt_column: str = field(default="prompt", metadata={"help": "Prompt column (text or messages)."})
    completion_column: str | None = field(
        default=None,
        metadata={"help": "Reference continuations to follow; unset: the large model's greedy completions."},
    )
    reward_func: str | None = field(
        default=None,
        metadata={
            "help": "Judge reward, 'module:function' or 'module.function' with TRL's reward signature "
            "(prompts, completions, **columns) -> list[float]. A divergent token is routing-worthy iff the large "
            "model's branch scores higher by more than --margin. Unset: continuations that differ as text."
        },
    )
    margin: float = field(default=0.0, metadata={"help": "Reward margin for routing-worthy tokens."})
    num_examples: int | None = field(default=None, metadata={"help": "Label only the first N examples."})
    max_new_tokens: int = field(default=64, metadata={"help": "Length of generated reference completions."})
    continuation_max_new_tokens: int = field(
        default=16, metadata={"help": "Large-model continuation per branch for the judge (R2R: one segment)."}
    )
    top_k: int = field(default=100, metadata={"help": "Top logits stored as router features (R2R: 100)."})
    batch_size: int = field(default=8, metadata={"help": "Examples per labelling batch."})
    output_dir: str = field(default="tokenlevel-route/labels", metadata={"help": "Where to save the dataset."})


@dataclass
class RouteTrainArguments:
    """`route train-router`: train and calibrate a `TokenRouter` on a labelled dataset."""

    dataset_path: str = field(default="tokenlevel-route/labels", metadata={"help": "Output of `route label`."})
    width: int | None = field(
        default=None,
        metadata={"help": "Router MLP width. Unset: R2R's 1024 scaled by the small model's hidden size / 1536, capped "
                  "so the router has at most 5% of the small model's parameters."},
    )  # fmt: skip
    num_blocks: int = field(default=6, metadata={"help": "Residual MLP blocks (R2R: 6)."})
    expansion: int = field(default=4, metadata={"help": "Block expansion (R2R: 4)."})
    dropout: float = field(default=0.1, metadata={"help": "Block dropout (R2R: 0.1)."})
    output_dir: str = field(default="tokenlevel-route/router", metadata={"help": "Where to save the router."})


@dataclass
class RouteGenerateArguments:
    """`route generate`: routed (or EAD / cascade / single-model) generation."""

    method: str = field(default="r2r", metadata={"help": "Decoding method.", "choices": list(METHODS)})
    router_path: str = field(default="tokenlevel-route/router", metadata={"help": "Router for --method r2r."})
    threshold: float | None = field(
        default=None,
        metadata={"help": "r2r: θ (default: the router's calibrated one). ead: τ in bits (default 2.0). cascade: θ "
                  "(default: calibrated on the prompts for --cascade_deferral_rate)."},
    )  # fmt: skip
    ead_window: int = field(default=5, metadata={"help": "EAD rolling window w."})
    ead_min_dwell: int = field(default=5, metadata={"help": "EAD minimum tokens between switches d_min."})
    cascade_rule: str = field(
        default="chow_quantile",
        metadata={"help": "Cascade score.", "choices": ["chow_sum", "chow_average", "chow_quantile"]},
    )
    cascade_alpha: float = field(default=0.2, metadata={"help": "Quantile α for chow_quantile."})
    cascade_deferral_rate: float = field(default=0.3, metadata={"help": "Target deferral rate to calibrate θ."})
    prompts: list[str] = field(default_factory=list, metadata={"help": "Prompts given on the command line."})
    dataset_name: str | None = field(default=None, metadata={"help": "Dataset of prompts (Hub, .json/.jsonl)."})
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    dataset_split: str = field(default="test", metadata={"help": "Split of prompts."})
    prompt_column: str = field(default="prompt", metadata={"help": "Prompt column."})
    num_examples: int | None = field(default=8, metadata={"help": "Generate for the first N prompts (None: all)."})
    batch_size: int = field(default=8, metadata={"help": "Prompts per batch."})
    max_new_tokens: int = field(default=64, metadata={"help": "Maximum new tokens."})
    do_sample: bool = field(default=False, metadata={"help": "Sample instead of greedy decoding."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0: off)."})
    top_p: float = field(default=1.0, metadata={"help": "Top-p sampling."})
    seed: int = field(default=0, metadata={"help": "Sampling seed."})
    output_dir: str = field(
        default="tokenlevel-route",
        metadata={"help": "generations-<method>.jsonl and token_models-<method>.html go here."},
    )


# --------------------------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------------------------


def _device(model_args: RouteModelArguments) -> str:
    return model_args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _build_tiny_pair(output_dir: str) -> tuple[str, str]:
    """A tiny random Llama pair sharing a tokenizer trained on the built-in prompts, saved under `output_dir`.

    The LM heads are untied: random tied models mostly repeat their last input token, so the two would always agree.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from trl_tokenlevel.data.builtin import load_tiny_preference_dataset
    from trl_tokenlevel.tiny import build_tiny_tokenizer, save_tiny_pair

    data = load_tiny_preference_dataset()
    tokenizer = build_tiny_tokenizer([r["prompt"] + r["chosen"] + r["rejected"] for r in data])
    paths = []
    for name, hidden, layers, seed in (("tiny-small", 32, 1, 0), ("tiny-large", 64, 2, 1)):
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                             num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=512, tie_word_embeddings=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                             bos_token_id=None)  # fmt: skip
        model = LlamaForCausalLM(config)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        paths.append(save_tiny_pair(model, tokenizer, os.path.join(output_dir, name)))
    return paths[0], paths[1]


def _resolve_model_paths(model_args: RouteModelArguments, meta_dir: str | None, output_dir: str) -> tuple[str, str]:
    small, large = model_args.small_model_name_or_path, model_args.large_model_name_or_path
    if small is None and large is None and meta_dir is not None:
        meta_file = os.path.join(meta_dir, META_NAME)
        if os.path.exists(meta_file):
            with open(meta_file) as handle:
                meta = json.load(handle)
            return meta["small_model_name_or_path"], meta["large_model_name_or_path"]
    if small is None and large is None:
        return _build_tiny_pair(output_dir)
    if small is None or large is None:
        raise ValueError("Set both --small_model_name_or_path and --large_model_name_or_path (or neither).")
    return small, large


def _load_model(path: str, model_args: RouteModelArguments):
    from transformers import AutoModelForCausalLM

    kwargs = {"trust_remote_code": model_args.trust_remote_code}
    if model_args.dtype is not None:
        kwargs["dtype"] = model_args.dtype if model_args.dtype == "auto" else getattr(torch, model_args.dtype)
    return AutoModelForCausalLM.from_pretrained(path, **kwargs).to(_device(model_args)).eval()


def _load_tokenizer(path: str, model_args: RouteModelArguments):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=model_args.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def _load_prompt_dataset(name, config, split, num_examples):
    from trl_tokenlevel.data.builtin import load_tiny_preference_dataset
    from trl_tokenlevel.scripts.common import LOCAL_DATA_BUILDERS, load_named_dataset

    if name is None:
        dataset = load_tiny_preference_dataset().select_columns(["prompt"])
    else:
        splits = load_named_dataset(name, config)
        # A local data file holds one split, "train", whatever --dataset_split says.
        dataset = splits["train"] if os.path.splitext(name)[1].lower() in LOCAL_DATA_BUILDERS else splits[split]
    if num_examples is not None:
        dataset = dataset.select(range(min(num_examples, len(dataset))))
    return dataset


def _import_function(spec: str):
    module, _, name = spec.partition(":") if ":" in spec else spec.rpartition(".")
    if not module or not name:
        raise ValueError(f"--reward_func must look like 'module:function' or 'module.function', got {spec!r}.")
    return getattr(importlib.import_module(module), name)


def _write_meta(path: str, **values) -> None:
    with open(os.path.join(path, META_NAME), "w") as handle:
        json.dump(values, handle, indent=2)


# --------------------------------------------------------------------------------------------------------------------
# Subcommands
# --------------------------------------------------------------------------------------------------------------------


def label(model_args: RouteModelArguments, args: RouteLabelArguments):
    from trl_tokenlevel.generation.routing import build_routing_dataset

    small_path, large_path = _resolve_model_paths(model_args, None, os.path.dirname(args.output_dir.rstrip("/")) or ".")
    tokenizer = _load_tokenizer(small_path, model_args)
    small, large = _load_model(small_path, model_args), _load_model(large_path, model_args)
    dataset = _load_prompt_dataset(args.dataset_name, args.dataset_config, args.dataset_split,
                                   args.num_examples if args.num_examples is not None
                                   else (32 if args.dataset_name is None else None))  # fmt: skip
    reward_fn = _import_function(args.reward_func) if args.reward_func else None
    labelled = build_routing_dataset(
        small, large, tokenizer, dataset,
        reward_fn=reward_fn, prompt_column=args.prompt_column, completion_column=args.completion_column,
        max_new_tokens=args.max_new_tokens, top_k=args.top_k, batch_size=args.batch_size,
        continuation_max_new_tokens=args.continuation_max_new_tokens, margin=args.margin,
    )  # fmt: skip
    labelled.save_to_disk(args.output_dir)
    tokens = sum(len(x) for x in labelled["labels"])
    mismatch = sum(sum(x) for x in labelled["mismatch"])
    positive = sum(sum(x) for x in labelled["labels"])
    summary = {"examples": len(labelled), "tokens": tokens, "mismatch": mismatch, "routing_worthy": positive}
    _write_meta(args.output_dir, small_model_name_or_path=small_path, large_model_name_or_path=large_path, **summary)
    print(f"Labelled {tokens} tokens of {len(labelled)} examples: {mismatch} mismatches, {positive} routing-worthy. "
          f"Saved to {args.output_dir}")  # fmt: skip
    return labelled


def train(model_args: RouteModelArguments, args: RouteTrainArguments, training_config):
    from datasets import load_from_disk

    from trl_tokenlevel.generation.routing import TokenRouter, train_router

    dataset = load_from_disk(args.dataset_path)
    small_path, large_path = _resolve_model_paths(model_args, args.dataset_path, args.output_dir)
    small = _load_model(small_path, model_args)
    top_k = len(dataset[0]["topk_logits"][0])
    router = TokenRouter.from_small_model(small, top_k=top_k, width=args.width, num_blocks=args.num_blocks,
                                          expansion=args.expansion, dropout=args.dropout)  # fmt: skip
    result = train_router(router, dataset, config=training_config)
    result.router.save_pretrained(args.output_dir)
    _write_meta(args.output_dir, small_model_name_or_path=small_path, large_model_name_or_path=large_path,
                validation=result.validation, epochs=len(result.history))  # fmt: skip
    print(f"Router ({router.num_parameters()} parameters, width {router.config.width}) saved to {args.output_dir}: "
          f"θ = {result.threshold:.4g}, validation {result.validation}")  # fmt: skip
    return result


def generate(model_args: RouteModelArguments, args: RouteGenerateArguments):
    from trl_tokenlevel.generation.cascade import calibrate_cascade, cascade_generate
    from trl_tokenlevel.generation.ead import ead_generate
    from trl_tokenlevel.generation.kv import cached_generate
    from trl_tokenlevel.generation.routing import TokenRouter, routed_generate
    from trl_tokenlevel.viz import write_token_heatmap

    if args.method == "r2r" and not os.path.isdir(args.router_path):
        raise FileNotFoundError(f"No router at {args.router_path!r}: run `trl-tokenlevel route train-router` first "
                                "(or pass --router_path, or use --method ead/cascade, which need no router).")  # fmt: skip
    small_path, large_path = _resolve_model_paths(model_args, args.router_path, args.output_dir)
    tokenizer = _load_tokenizer(small_path, model_args)
    small, large = _load_model(small_path, model_args), _load_model(large_path, model_args)
    if args.prompts:
        prompts = list(args.prompts)
    else:
        dataset = _load_prompt_dataset(args.dataset_name, args.dataset_config, args.dataset_split, args.num_examples)
        prompts = dataset[args.prompt_column]
    sampling = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                    top_k=args.top_k, top_p=args.top_p, generator=torch.Generator().manual_seed(args.seed),
                    tokenizer=tokenizer)  # fmt: skip
    router = threshold = None
    if args.method == "r2r":
        router = TokenRouter.from_pretrained(args.router_path, small_model=small, device=_device(model_args))
        threshold = args.threshold
    elif args.method == "ead":
        threshold = 2.0 if args.threshold is None else args.threshold
    elif args.method == "cascade":
        threshold = args.threshold
        if threshold is None:
            # Calibrated on the prompts themselves for a self-contained demo; calibrate on held-out prompts in practice.
            threshold = calibrate_cascade(small, prompts=prompts, target_deferral_rate=args.cascade_deferral_rate,
                                          rule=args.cascade_rule, alpha=args.cascade_alpha, **sampling)  # fmt: skip
    records, heat_rows, large_tokens, total_tokens = [], [], 0, 0
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start : start + args.batch_size]
        if args.method == "r2r":
            out = routed_generate(small, large, router, prompts=batch, threshold=threshold, **sampling)
        elif args.method == "ead":
            out = ead_generate(small, large, prompts=batch, threshold=threshold, window=args.ead_window,
                               min_dwell=args.ead_min_dwell, **sampling)  # fmt: skip
        elif args.method == "cascade":
            out = cascade_generate(small, large, prompts=batch, threshold=threshold, rule=args.cascade_rule,
                                   alpha=args.cascade_alpha, **sampling)  # fmt: skip
        else:
            out = cached_generate(small if args.method == "small" else large, prompts=batch,
                                  is_large=args.method == "large", **sampling)  # fmt: skip
        valid = out.completion_mask
        large_tokens += int((out.large_mask & valid).sum())
        total_tokens += int(valid.sum())
        for i, prompt in enumerate(batch):
            records.append({
                "prompt": prompt,
                "completion": out.texts[i],
                "large_token_fraction": float(out.row_large_fraction()[i]),
                "large_mask": out.large_mask[i][valid[i]].int().tolist(),
            })  # fmt: skip
        titles = [p if isinstance(p, str) else p[-1]["content"] for p in batch]
        heat_rows += out.token_rows(tokenizer, [t.strip()[-80:] for t in titles])
    os.makedirs(args.output_dir, exist_ok=True)
    # One file per method, so that comparing methods in one folder keeps every output.
    path = os.path.join(args.output_dir, f"generations-{args.method}.jsonl")
    with open(path, "w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    html = write_token_heatmap(os.path.join(args.output_dir, f"token_models-{args.method}.html"), heat_rows,
                               title=f"Which model produced each token ({args.method}; green = large)",
                               value_name="model", labels=("small model", "large model"))  # fmt: skip
    fraction = large_tokens / total_tokens if total_tokens else 0.0
    print(f"{args.method}: {len(records)} completions, large-model token fraction {fraction:.3f}. "
          f"Wrote {path} and {html}")  # fmt: skip
    return {"records": records, "large_token_fraction": fraction, "threshold": threshold}


def make_parser(subcommand: str, prog: str | None = None):
    from trl import TrlParser

    from trl_tokenlevel.generation.routing import RouterTrainingConfig

    if subcommand == "label":
        types = (RouteModelArguments, RouteLabelArguments)
    elif subcommand == "train-router":
        types = (RouteModelArguments, RouteTrainArguments, RouterTrainingConfig)
    elif subcommand == "generate":
        types = (RouteModelArguments, RouteGenerateArguments)
    else:
        raise ValueError(f"Unknown route subcommand {subcommand!r}; choose one of {', '.join(SUBCOMMANDS)}.")
    return TrlParser(types, prog=prog or f"trl-tokenlevel route {subcommand}")


def _usage() -> str:
    return (
        "usage: trl-tokenlevel route {label,train-router,generate} [options]\n\n"
        "  label         build R2R routing labels (small vs large next-token divergence, judged)\n"
        "  train-router  train and calibrate a token router on those labels\n"
        "  generate      routed (r2r), entropy-adaptive (ead), cascade or single-model generation\n\n"
        "With no model flags, each step uses a tiny random model pair built offline."
    )


def parse_args(argv: list[str] | None = None) -> tuple:
    """`(subcommand, *dataclasses)` for `main`; `("help",)` after printing the usage. `trl-tokenlevel route ...` calls
    `main(*parse_args(rest))`, like every script of the CLI."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return ("help",)
    subcommand, rest = argv[0], argv[1:]
    if subcommand not in SUBCOMMANDS:
        raise SystemExit(f"trl-tokenlevel route: unknown subcommand {subcommand!r}\n\n{_usage()}")
    return (subcommand, *make_parser(subcommand).parse_args_and_config(args=rest))


def main(subcommand: str, *args):
    if subcommand == "label":
        return label(*args)
    if subcommand == "train-router":
        return train(*args)
    if subcommand == "generate":
        return generate(*args)
    return None


if __name__ == "__main__":
    main(*parse_args())
