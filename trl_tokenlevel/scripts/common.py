"""What the `trl-tokenlevel` training scripts share: parsing with tiny-job defaults, data loading, the tiny base model,
model init kwargs and the final save."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

# Local data files `--dataset_name` accepts, by extension, and the `datasets` builder that reads each.
LOCAL_DATA_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def quiet_known_warnings() -> None:
    """Silence the deprecation warnings every job printed without telling the user anything they can act on.

    Both come from TRL 1.16 itself, not from the user's flags: its configs default `gradient_checkpointing=True`, which
    transformers 5 renames to `activation_checkpointing` with a FutureWarning, and TRL reads the renamed
    `model.is_gradient_checkpointing`. The filters match those two messages only.
    """
    warnings.filterwarnings("ignore", message=r"`gradient_checkpointing` is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def machine_defaults(output_dir: str) -> dict:
    """Parser defaults every script sets, from the hardware that is there: TrainingArguments refuses bf16 without a
    GPU, and pinned memory only helps (and otherwise warns at every run) with an accelerator.

    Without any accelerator, `use_cpu=True`: under `accelerate launch --multi_gpu`/torchrun on a CPU machine it is what
    makes TrainingArguments join the gloo process group (without it every process trains alone, into one folder).
    """
    return {
        "bf16": torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        "dataloader_pin_memory": torch.cuda.is_available(),
        "use_cpu": not torch.accelerator.is_available(),
        "output_dir": output_dir,
    }


# The demo jobs train LoRA adapters on all linear layers: full fine-tuning's backward is too slow for CPU minutes.
DEMO_LORA_DEFAULTS = dict(use_peft=True, lora_r=16, lora_alpha=32, lora_target_modules=["all-linear"])


@dataclass
class BuiltinJobArguments:
    """Which built-in job runs when no `--model_name_or_path` is given."""

    tiny: bool = field(
        default=False,
        metadata={
            "help": "Without --model_name_or_path: train a tiny random model built offline on tiny toy data (a smoke "
            "test, seconds on CPU) instead of the SmolLM2-135M-Instruct demo job."
        },
    )
    heldout_split: str = field(
        default="test",
        metadata={
            "help": "Which problems the demo job's greedy accuracy is measured on: 'test' (the numbers it reports) or "
            "'valid' (to choose settings without looking at test; bench/demo_settings.py does so).",
            "choices": ["test", "valid"],
        },
    )


def parse_with_builtin_defaults(parser, argv, tiny_defaults: dict, demo_defaults: dict):
    """Parse once; without `--model_name_or_path` (a built-in job) parse again with that job's defaults: the demo model
    job's, or with `--tiny` the tiny job's (sized for a CPU minute). Flags and YAML files still override them."""
    quiet_known_warnings()
    parsed = parser.parse_args_and_config(args=argv)
    model_args = next(args for args in parsed if hasattr(args, "model_name_or_path"))
    job_args = next(args for args in parsed if isinstance(args, BuiltinJobArguments))
    if model_args.model_name_or_path is not None:
        if job_args.tiny:
            raise ValueError("--tiny builds its own tiny model: drop --model_name_or_path, or drop --tiny.")
        return parsed
    parser.set_defaults(**(tiny_defaults if job_args.tiny else demo_defaults))
    parsed = parser.parse_args_and_config(args=argv)
    if job_args.tiny and not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        # A tiny model gains nothing from several CPU threads, and on a loaded machine they thrash (measured: 11 s
        # with one thread, 3.7 min with two beside two busy processes). OMP_NUM_THREADS overrides this.
        torch.set_num_threads(1)
    return parsed


def load_named_dataset(name: str, config: str | None = None):
    """A `DatasetDict` from a local `.json`/`.jsonl`/`.csv`/`.parquet` file (its rows become the "train" split), a
    folder written by `save_to_disk`, or anything `datasets.load_dataset` takes (a Hub id, a folder of data files)."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    builder = LOCAL_DATA_BUILDERS.get(os.path.splitext(name)[1].lower())
    if builder is not None:
        if not os.path.isfile(name):
            raise FileNotFoundError(
                f"--dataset_name {name!r} looks like a local {builder} file, but there is no such file (relative paths "
                f"start in {os.getcwd()!r}). Check the path, or name a Hub dataset instead."
            )
        return load_dataset(builder, data_files=name)
    if os.path.isdir(name) and os.path.exists(os.path.join(name, "dataset_dict.json")):
        return load_from_disk(name)
    if os.path.isdir(name) and os.path.exists(os.path.join(name, "dataset_info.json")):
        return DatasetDict({"train": load_from_disk(name)})
    return load_dataset(name, name=config)


def load_train_and_heldout(script_args, dataset_args, load_builtin: Callable):
    """`(train, heldout, builtin)`: a dataset mixture, a named dataset or local file, or the built-in one split 16 rows
    off."""
    from trl import get_dataset

    if dataset_args.datasets:
        dataset = get_dataset(dataset_args)
    elif script_args.dataset_name:
        dataset = load_named_dataset(script_args.dataset_name, script_args.dataset_config)
    else:
        split = load_builtin().train_test_split(test_size=16, seed=0)
        return split["train"], split["test"], True
    if script_args.dataset_train_split not in dataset:
        raise ValueError(
            f"--dataset_train_split {script_args.dataset_train_split!r} is not a split of {script_args.dataset_name!r}; "
            f"its splits are {sorted(dataset)}. Pass --dataset_train_split with one of them."
        )
    train = dataset[script_args.dataset_train_split]
    heldout = dataset[script_args.dataset_test_split] if script_args.dataset_test_split in dataset else None
    return train, heldout, False


def model_init_kwargs(model_args, training_args) -> dict:
    kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    return {key: value for key, value in kwargs.items() if value is not None}


def build_tiny_base(training_args, texts, **model_kwargs):
    """Tokenizer trained on `texts` and a tiny model saved under `<output_dir>/tiny-base` (one writer under accelerate).

    Returns `(tokenizer, model_path)`; TRL reloads reference models from the path.
    """
    from trl_tokenlevel.tiny import build_tiny_model, build_tiny_tokenizer, save_tiny_pair

    tokenizer = build_tiny_tokenizer(texts)
    model_path = os.path.join(training_args.output_dir, "tiny-base")
    with training_args.main_process_first(desc="building the tiny base model"):
        if not os.path.exists(os.path.join(model_path, "config.json")):
            save_tiny_pair(
                build_tiny_model(tokenizer, hidden_size=96, num_layers=2, **model_kwargs), tokenizer, model_path
            )
    return tokenizer, model_path


def set_model_init_kwargs(training_args, kwargs: dict) -> None:
    if training_args.model_init_kwargs is not None:
        kwargs = {**kwargs, **training_args.model_init_kwargs}
    training_args.model_init_kwargs = kwargs or None


def train_and_save(trainer, training_args, script_args):
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    processes = trainer.accelerator.num_processes
    trainer.accelerator.print(
        f"Model saved to {training_args.output_dir}" + (f" ({processes} processes)" if processes > 1 else "")
    )
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    return trainer


def leave_distributed_run() -> None:
    """End a finished multi-process job (accelerate launch, torchrun) without Python's interpreter teardown.

    On CPU (gloo), tearing down the process group at interpreter exit aborted a finished run now and then, under load:
    "terminate called without an active exception", exit -6, after the model was saved. So once every rank is past a
    final barrier (no collective can still be in flight), each rank flushes its output and leaves with `os._exit(0)`.
    Single-process runs return normally. Atexit handlers do not run in the multi-process case; the trainer has closed
    its reporters and written its files by then.
    """
    import sys

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
