"""`trl-tokenlevel` command line: `trl-tokenlevel dpo [--flags | --config file.yaml]`."""

from __future__ import annotations

import importlib
import os
import sys

COMMANDS = {
    "dpo": "Token-level DPO (TokenDPOTrainer); with no flags, the offline demo job (SmolLM2-135M, LoRA, TDPO2).",
    "grpo": "Token-level GRPO (TokenGRPOTrainer: 80/20, SPINE, UCAS, HAPO, GTPO, D3S, TW-GRPO, TEMPO, RTO, RMT, CHORD).",
    "sft": "Token-level SFT (TokenSFTTrainer: OTR, CHORD-phi, token weights, ssToken); with no flags, a demo job.",
    "route": "Small/large token routing: label | train-router | generate (R2R, EAD, cascades); tiny offline pair.",
}


def _usage() -> str:
    lines = ["usage: trl-tokenlevel <command> [options]", "", "commands:"]
    lines += [f"  {name:<6} {help_text}" for name, help_text in COMMANDS.items()]
    lines += ["", "Run `trl-tokenlevel <command> --help` for the command's flags (every config field is one)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"trl-tokenlevel: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    # The default jobs never need the network; real runs that name Hub models still can (the user's environment).
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    script = importlib.import_module(f"trl_tokenlevel.scripts.{command}")
    script.main(*script.parse_args(rest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
