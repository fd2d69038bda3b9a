"""`trl-tokenlevel route label | train-router | generate` on the built-in tiny defaults."""

import json

import pytest

from trl_tokenlevel.scripts import route

REWARD_CALLS = []


def run(argv):
    """What `trl-tokenlevel route <argv>` does."""
    return route.main(*route.parse_args(argv))


def count_reward(prompts, completions, **kwargs):
    REWARD_CALLS.append(len(completions))
    return [float(len(c)) for c in completions]


def test_label_train_generate_chain(tmp_path, capsys):
    labels, router = str(tmp_path / "labels"), str(tmp_path / "router")
    labelled = run(["label", "--output_dir", labels, "--num_examples", "6", "--max_new_tokens", "6",
                           "--continuation_max_new_tokens", "3", "--top_k", "8",
                           "--reward_func", "tests.generation.test_route_script:count_reward"])  # fmt: skip
    assert len(labelled) == 6 and REWARD_CALLS
    meta = json.loads((tmp_path / "labels" / "route_meta.json").read_text())
    assert meta["small_model_name_or_path"].endswith("tiny-small") and meta["mismatch"] > 0

    result = run(["train-router", "--dataset_path", labels, "--output_dir", router, "--width", "16",
                         "--num_blocks", "1", "--num_epochs", "2", "--learning_rate", "1e-3"])  # fmt: skip
    assert (tmp_path / "router" / "router.safetensors").exists()
    assert result.router.config.top_k == 8

    out_dir = tmp_path / "gen"  # one folder for every method: each writes its own files
    for method in ("r2r", "ead", "cascade", "small", "large"):
        extra = ["--threshold", "0.0"] if method == "r2r" else []
        generated = run(["generate", "--router_path", router, "--method", method, "--num_examples", "3",
                                "--max_new_tokens", "4", "--output_dir", str(out_dir), *extra])  # fmt: skip
        rows = [json.loads(line) for line in (out_dir / f"generations-{method}.jsonl").read_text().splitlines()]
        assert len(rows) == 3 and (out_dir / f"token_models-{method}.html").exists()
        expected = {"r2r": 1.0, "small": 0.0, "large": 1.0}
        if method in expected:
            assert generated["large_token_fraction"] == expected[method]
    assert len(list(out_dir.glob("generations-*.jsonl"))) == 5 and len(list(out_dir.glob("token_models-*.html"))) == 5
    assert "large-model token fraction" in capsys.readouterr().out


def test_usage_and_errors(capsys):
    assert run([]) is None and "train-router" in capsys.readouterr().out
    from trl_tokenlevel.cli import COMMANDS, main

    if "route" in COMMANDS:  # once the CLI lists the command
        assert main(["route"]) == 0
    with pytest.raises(SystemExit, match="unknown subcommand"):
        run(["distill"])
    with pytest.raises(FileNotFoundError, match="train-router"):
        run(["generate", "--router_path", "/nonexistent/router"])
    with pytest.raises(ValueError, match="both"):
        run(["label", "--small_model_name_or_path", "x"])
