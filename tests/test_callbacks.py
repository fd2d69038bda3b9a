"""`TokenHeatmapCallback`: pages every N steps for the DPO, GRPO and SFT trainers, the values they draw, TensorBoard
events (read back with TensorBoard's own reader) and the page as headless Chromium renders it."""

from __future__ import annotations

import math
import re
import shutil
import subprocess

import pytest
import torch

from trl_tokenlevel.callbacks import TokenHeatmapCallback
from trl_tokenlevel.viz import ColorScale, HeatmapPanel, TokenRow, token_heatmap_page

COMMON = dict(max_steps=2, learning_rate=1e-2, logging_steps=1, save_strategy="no", bf16=False, seed=0,
              gradient_checkpointing=False, dataloader_pin_memory=False, disable_tqdm=True)  # fmt: skip


def read_tensorboard_text(log_dir, tag="token_heatmaps") -> dict[int, str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    accumulator.Reload()
    assert f"{tag}/text_summary" in accumulator.Tags()["tensors"], accumulator.Tags()
    return {
        event.step: event.tensor_proto.string_val[0].decode() for event in accumulator.Tensors(f"{tag}/text_summary")
    }


def count_token_spans(page: str) -> int:
    return len(re.findall(r"class=['\"]tok['\"]", page))


def test_dpo_pages_every_n_steps_and_tensorboard(
    tiny_model_path, tiny_tokenizer, tiny_preference_dataset, tmp_path, monkeypatch
):
    pytest.importorskip("tensorboard")
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    from trl_tokenlevel import TokenDPOConfig, TokenDPOTrainer

    args = TokenDPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_length=64,
                          report_to=["tensorboard"], **COMMON)  # fmt: skip
    trainer = TokenDPOTrainer(model=tiny_model_path, args=args, processing_class=tiny_tokenizer,
                              train_dataset=tiny_preference_dataset.select(range(8)))  # fmt: skip
    examples = tiny_preference_dataset.select(range(8, 10))
    callback = TokenHeatmapCallback(trainer, examples, every_n_steps=1)
    trainer.add_callback(callback)
    trainer.train()

    pages = sorted(p.name for p in (tmp_path / "token_heatmaps").iterdir())
    assert pages == ["step-000000.html", "step-000001.html", "step-000002.html"]
    # Before the first step the policy is the reference: every implicit token reward is exactly 0.
    panels = callback.panels_fn(trainer, callback.examples)  # the trained policy, as on the last page
    first = (tmp_path / "token_heatmaps" / "step-000000.html").read_text()
    assert re.findall(r"title='reward = (-?[\d.]+)'", first) and all(
        float(v) == 0.0 for v in re.findall(r"title='reward = (-?[\d.]+)'", first)
    )
    last = (tmp_path / "token_heatmaps" / "step-000002.html").read_text()
    assert any(float(v) != 0.0 for v in re.findall(r"title='reward = (-?[\d.]+)'", last))
    # Two rows per pair (chosen, rejected); one span per completion token.
    (panel,) = panels
    assert len(panel.rows) == 4 and last.count("class='row'") == 4
    assert count_token_spans(last) == sum(len(row.tokens) for row in panel.rows)
    # The rows are the trainer's own token rewards of the examples' completions.
    assert [r.values for r in panel.rows][0] == pytest.approx(_dpo_rewards(trainer, examples)[0], abs=1e-6)

    texts = read_tensorboard_text(tmp_path / "tb")
    assert sorted(texts) == [0, 1, 2]
    assert "Implicit token reward" in texts[2] and "chosen:" in texts[2]


def _dpo_rewards(trainer, examples):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from trl_tokenlevel.data import tokenize_preference_dataset

    tokenized = tokenize_preference_dataset(examples, trainer.processing_class)
    batch = DataCollatorForPreference(pad_token_id=trainer.processing_class.pad_token_id)(list(tokenized))
    rewards = trainer.compute_token_rewards(batch).cpu()
    mask = batch["completion_mask"][:, 1:].bool()
    return [rewards[i][mask[i]].tolist() for i in range(len(rewards))]


def test_sft_panels_are_the_model_probabilities(tiny_model_path, tiny_tokenizer, tmp_path):
    from trl_tokenlevel import TokenSFTConfig, TokenSFTTrainer
    from trl_tokenlevel.data.builtin.sft import load_tiny_sft_dataset
    from trl_tokenlevel.data.sft_columns import tokenize_sft_dataset

    dataset = load_tiny_sft_dataset()
    args = TokenSFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_length=64, report_to="none",
                          token_loss_type="chord_phi", **COMMON)  # fmt: skip
    trainer = TokenSFTTrainer(model=tiny_model_path, args=args, train_dataset=dataset.select(range(8)),
                              processing_class=tiny_tokenizer)  # fmt: skip
    examples = dataset.select(range(8, 11))
    callback = TokenHeatmapCallback(trainer, examples, every_n_steps=5)
    trainer.add_callback(callback)
    trainer.train()
    assert [p.rsplit("/", 1)[1] for p in callback.written] == ["step-000000.html", "step-000002.html"]

    panels = {panel.value_name: panel for panel in callback.panels_fn(trainer, callback.examples)}
    assert set(panels) == {"p(y_t)", "entropy", "weight"}
    # Reference: the model's own mean cross-entropy over the loss tokens, one example at a time.
    tokenized = tokenize_sft_dataset(examples, tiny_tokenizer)
    for row, ids, labels in zip(panels["p(y_t)"].rows, tokenized["input_ids"], tokenized["labels"]):
        with torch.no_grad():
            loss = trainer.model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
        assert -sum(math.log(p) for p in row.values) / len(row.values) == pytest.approx(loss.item(), rel=1e-4)
        assert len(row.tokens) == sum(label != -100 for label in labels)
    for p_row, w_row in zip(panels["p(y_t)"].rows, panels["weight"].rows):
        assert w_row.values == pytest.approx([p * (1 - p) for p in p_row.values], abs=1e-6)
    assert all(v > 0 for row in panels["entropy"].rows for v in row.values)


def test_sft_sstoken_panels_show_the_kept_mask(tiny_model_path, tiny_tokenizer, tmp_path):
    from trl_tokenlevel import TokenSFTConfig, TokenSFTTrainer
    from trl_tokenlevel.data.builtin.sft import load_tiny_sft_dataset

    dataset = load_tiny_sft_dataset()
    args = TokenSFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_length=64, report_to="none",
                          token_selection="sstoken", sstoken_ratio=0.5,
                          model_init_kwargs={"attn_implementation": "eager"}, **COMMON)  # fmt: skip
    trainer = TokenSFTTrainer(model=tiny_model_path, args=args, train_dataset=dataset.select(range(8)),
                              processing_class=tiny_tokenizer)  # fmt: skip
    callback = TokenHeatmapCallback(trainer, dataset.select(range(8, 10)), every_n_steps=1)
    trainer.add_callback(callback)
    trainer.train()
    first = open(callback.written[0]).read()
    # The history model starts as a copy of the policy (the two log-probs come from different kernels: 1e-4 apart).
    assert all(abs(float(v)) < 1e-4 for v in re.findall(r"title='REL = (-?[\d.]+)'", first))
    panels = {panel.value_name: panel for panel in callback.panels_fn(trainer, callback.examples)}
    # After two steps the policy has moved away from its EMA history model.
    assert any(abs(v) > 1e-4 for row in panels["REL"].rows for v in row.values)
    for row in panels["kept"].rows:
        assert set(row.values) <= {0.0, 1.0}
        assert sum(row.values) == math.ceil(0.5 * len(row.values))  # ssToken keeps ceil(ρ·N) per response
    page = open(callback.written[-1]).read()
    assert "ssToken kept tokens" in page and ">dropped<" in page and ">kept<" in page


def test_grpo_entropy_and_selection(tiny_model_path, tiny_tokenizer, tmp_path):
    from trl_tokenlevel.data.builtin.grpo import load_tiny_grpo_dataset
    from trl_tokenlevel.rewards.grpo_rewards import addition_reward
    from trl_tokenlevel.trainers.token_grpo_config import TokenGRPOConfig
    from trl_tokenlevel.trainers.token_grpo_trainer import TokenGRPOTrainer

    dataset = load_tiny_grpo_dataset()
    args = TokenGRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2,
                           max_completion_length=8, report_to="none", token_selection="entropy_quantile",
                           **{**COMMON, "max_steps": 1})  # fmt: skip
    trainer = TokenGRPOTrainer(model=tiny_model_path, reward_funcs=addition_reward, args=args,
                               train_dataset=dataset.select(range(8)), processing_class=tiny_tokenizer)  # fmt: skip
    callback = TokenHeatmapCallback(trainer, dataset.select(range(8, 11)), every_n_steps=1)
    trainer.add_callback(callback)
    trainer.train()
    assert len(callback.written) == 2  # step 0 and step 1
    entropy, selected = callback.panels_fn(trainer, callback.examples)
    values = [v for row in entropy.rows for v in row.values]
    mask = [v for row in selected.rows for v in row.values]
    assert 0 < len(values) <= 3 * 8 and all(0 < v <= math.log(len(tiny_tokenizer)) + 1e-4 for v in values)
    # Tokens at or above the linearly interpolated 0.8-quantile: every sorted index from ceil(0.8·(N − 1)) on (ties may
    # add more), and every kept token has at least the entropy of every dropped one.
    kept = [v for v, m in zip(values, mask) if m == 1.0]
    dropped = [v for v, m in zip(values, mask) if m == 0.0]
    assert len(kept) >= len(values) - math.ceil(round(0.8 * (len(values) - 1), 9))
    assert min(kept) >= max(dropped, default=-1.0)


def test_reporters_receive_the_page(tiny_model_path, tiny_tokenizer, tiny_preference_dataset, tmp_path, monkeypatch):
    """W&B gets the HTML page and Trackio the Markdown, through the reporter callbacks the trainer already has."""
    from transformers.integrations import TrackioCallback, WandbCallback

    from trl_tokenlevel import TokenDPOConfig, TokenDPOTrainer

    logged = []

    class FakeRun:
        pass

    class FakeWandb:
        run = FakeRun()

        @staticmethod
        def Html(page):  # noqa: N802 (wandb's name)
            return ("html", page)

        @staticmethod
        def log(values):
            logged.append(("wandb", values))

    class FakeTrackio:
        @staticmethod
        def Markdown(text):  # noqa: N802 (trackio's name)
            return ("markdown", text)

        @staticmethod
        def log(values, step):
            logged.append(("trackio", values, step))

    wandb_callback, trackio_callback = WandbCallback.__new__(WandbCallback), TrackioCallback.__new__(TrackioCallback)
    wandb_callback._wandb, trackio_callback._trackio, trackio_callback._initialized = FakeWandb, FakeTrackio, True
    args = TokenDPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_length=64, report_to="none",
                          **{**COMMON, "max_steps": 1})  # fmt: skip
    trainer = TokenDPOTrainer(model=tiny_model_path, args=args, processing_class=tiny_tokenizer,
                              train_dataset=tiny_preference_dataset.select(range(4)))  # fmt: skip
    trainer.callback_handler.callbacks += [wandb_callback, trackio_callback]
    callback = TokenHeatmapCallback(trainer, tiny_preference_dataset.select(range(4, 5)))
    callback.render(7)
    assert logged[0][0] == "wandb" and logged[0][1]["train/global_step"] == 7
    kind, page = logged[0][1]["token_heatmaps"]
    assert kind == "html" and page == open(callback.written[0]).read()
    assert logged[1][0] == "trackio" and logged[1][2] == 7 and logged[1][1]["token_heatmaps"][0] == "markdown"


def test_other_trainers_need_a_panels_fn():
    with pytest.raises(TypeError, match="panels_fn"):
        TokenHeatmapCallback(object(), [{"prompt": "x"}])


def test_legend_matches_the_value_range():
    mask = [TokenRow("r", ["a", "b"], [0.0, 1.0])]
    assert ColorScale(mask).legend(("small model", "large model")) == [
        ("small model", (255, 255, 255)),
        ("large model", (64, 255, 64)),
    ]
    zeros = [TokenRow("r", ["a", "b"], [0.0, 0.0])]
    assert ColorScale(zeros).kind == "sequential" and ColorScale(zeros, binary=True).kind == "binary"
    entropy = [TokenRow("r", ["a", "b"], [0.5, 2.0])]
    assert [text for text, _ in ColorScale(entropy).legend()] == ["0", "2"]
    rewards = [TokenRow("r", ["a", "b"], [-0.5, 0.25])]
    assert [text for text, _ in ColorScale(rewards).legend()] == ["-0.5", "0", "0.5"]
    page = token_heatmap_page([HeatmapPanel("routing", mask, "large model", ("small model", "large model"))], "t")
    assert "-1" not in page and ">small model<" in page


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (apt-get install chromium)")
def test_page_renders_in_headless_chromium(tmp_path):
    rows = [TokenRow(f"row {i}", [f"tok{j} " for j in range(5 + i)], [(-1) ** j * j / 10 for j in range(5 + i)])
            for i in range(3)]  # fmt: skip
    mask_rows = [TokenRow("mask", ["a", "b", "c"], [0.0, 1.0, 0.0])]
    page = token_heatmap_page([HeatmapPanel("rewards", rows, "reward"), HeatmapPanel("mask", mask_rows, "m")], "test")
    path = tmp_path / "page.html"
    path.write_text(page)
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=900,700"]
    dom = subprocess.run([*flags, "--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=120).stdout
    # The browser parsed every token span: 5 + 6 + 7 reward tokens and 3 mask tokens.
    assert count_token_spans(dom) == 21
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, f"--screenshot={shot}", path.as_uri()], capture_output=True, timeout=120, check=True)
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 5000
    image = pytest.importorskip("PIL.Image").open(shot).convert("RGB")
    colours = set(image.getdata())
    assert (64, 255, 64) in colours or any(r < 100 and g == 255 for r, g, b in colours)  # a saturated green token
