"""The routing benchmark's accounting (accuracy, large-token share, per-request FLOPs with the router, cascades from
single-model outputs), its summary over seeds and its report files; the smoke run end to end (slow, demo model)."""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from trl_tokenlevel.data.builtin.tasks import Problem

BENCH = Path(__file__).resolve().parents[2] / "bench"


def load_benchmark():
    sys.path.insert(0, str(BENCH))
    try:
        import routing_benchmark
    finally:
        sys.path.remove(str(BENCH))
    return routing_benchmark


def fake_output(texts, large_mask, completion_mask):
    return SimpleNamespace(texts=texts, large_mask=torch.tensor(large_mask, dtype=torch.bool),
                           completion_mask=torch.tensor(completion_mask, dtype=torch.bool))  # fmt: skip


PROBLEMS = [Problem("copy", "Repeat: 1 2", "1 2", "a"), Problem("copy", "Repeat: 3 4", "3 4", "b")]
COST = {"small": 10, "large": 1000}


def test_score_counts_accuracy_share_and_per_request_flops():
    bench = load_benchmark()
    out = fake_output([" 1 2\n", " 3 5\n"], [[0, 1, 0, 0], [0, 0, 0, 0]], [[1, 1, 1, 1], [1, 1, 1, 0]])
    prompt_lengths = torch.tensor([5, 5])
    result = bench.score(out, slice(0, 2), PROBLEMS, prompt_lengths, COST, router_flops_per_token=torch.tensor([7, 7]))
    assert result["accuracy"] == 0.5 and result["correct"] == [True, False]
    assert result["large_share"] == pytest.approx(1 / 7)
    # Row 0: small 5 + 4 tokens, large 5 + (index 1) + 1 = 7 tokens, router 4 decisions; row 1: small 5 + 3, no large.
    row0 = 2 * 10 * 9 + 2 * 1000 * 7 + 7 * 4
    row1 = 2 * 10 * 8 + 7 * 3
    assert result["flops_per_prompt"] == pytest.approx((row0 + row1) / 2)
    assert result["router_flops_per_prompt"] == pytest.approx(7 * 3.5)
    large_only = bench.score(fake_output([" 1 2\n", " 3 4\n"], [[1] * 4, [1] * 4], [[1] * 4, [1] * 4]), slice(0, 2),
                             PROBLEMS, prompt_lengths, COST, small_runs=False)  # fmt: skip
    assert large_only["accuracy"] == 1.0 and large_only["large_share"] == 1.0
    assert large_only["flops_per_prompt"] == 2 * 1000 * 9
    second = bench.score(out, slice(1, 2), PROBLEMS, prompt_lengths, COST)
    assert second["accuracy"] == 0.0 and second["large_share"] == 0.0


def test_cascade_is_scored_from_the_two_single_model_outputs():
    bench = load_benchmark()
    small = fake_output([" 1 2\n", " 3 5\n"], [[0] * 4] * 2, [[1, 1, 1, 1], [1, 1, 1, 0]])
    large = fake_output([" 1 2\n", " 3 4\n"], [[1] * 4] * 2, [[1] * 4, [1] * 4])
    defer = torch.tensor([False, True])
    result = bench.cascade_score(small, large, defer, slice(0, 2), PROBLEMS, torch.tensor([5, 5]), COST)
    assert result["accuracy"] == 1.0 and result["deferral_rate"] == 0.5
    assert result["large_share"] == pytest.approx(4 / 8)
    # The deferred row pays its discarded small answer and the whole large answer.
    assert result["flops_per_prompt"] == pytest.approx((2 * 10 * 9 + 2 * 10 * 8 + 2 * 1000 * 9) / 2)


def test_per_row_router_uses_each_seeds_router_and_threshold():
    bench = load_benchmark()

    class Constant:
        def __init__(self, value):
            self.value = value

        def probability(self, hidden, token_ids, logits):
            return torch.full((len(token_ids),), self.value)

    routing = bench.PerRowRouter([Constant(0.3), Constant(0.3)], [0.2, 0.4], torch.tensor([0, 0, 1, 1]))
    x = SimpleNamespace(hidden=torch.zeros(4, 2), token_ids=torch.zeros(4, dtype=torch.long), logits=torch.zeros(4, 3))
    assert routing(x).tolist() == [1.0, 1.0, 0.0, 0.0]


def synthetic_results(seeds=3):
    shares = [0.1, 0.3]

    def row(acc, share, flops):
        return {"accuracy": acc, "large_share": share, "flops_per_prompt": flops, "router_flops_per_prompt": 1.0,
                "wall_s": 0.5}  # fmt: skip

    runs = []
    for seed in range(seeds):
        bump = 0.01 * seed
        runs.append({
            "seed": seed, "small": row(0.5 + bump, 0.0, 10.0), "large": row(0.9, 1.0, 100.0),
            "r2r_recall95": row(0.7 + bump, 0.2, 40.0),
            "shares": {str(s): {m: row(0.6 + s + (0.05 + 0.01 * seed if m == "r2r" else 0.0) + bump, s, 20 + 100 * s)
                                for m in bench_methods()} for s in shares},
        })  # fmt: skip
    return {
        "task": {"copy_length": 4, "answer_tokens": 9, "prompt_tokens": 30, "test_prompts_per_seed": 10},
        "models": {
            "small": {"parameters": 100, "hidden": 8, "layers": 2, "train_steps": 5},
            "large": {"parameters": 4000, "name": "large"},
            "router": {"parameters": 4, "width": 8, "share_of_small": 0.04},
        },  # fmt: skip
        "label_stats": {
            "prompts": 4,
            "tokens": 36,
            "mismatches": 6,
            "harmful_mismatches": 2,
            "harmless_mismatches": 4,
            "large_reference_accuracy": 0.75,
        },  # fmt: skip
        "cascade_rule": "post-hoc (learned)",
        "args": {"shares": shares},
        "runs": runs,
    }


def bench_methods():
    return load_benchmark().METHODS


def test_summary_table_and_png(tmp_path):
    bench = load_benchmark()
    results = synthetic_results()
    out = tmp_path / "routing.json"
    bench.write_outputs(results, out)
    summary = json.loads(out.read_text())["summary"]
    r2r = next(line for line in summary["lines"] if line["method"] == "r2r" and line["target_share"] == 0.1)
    assert r2r["accuracy"]["mean"] == pytest.approx(0.77) and r2r["accuracy"]["n"] == 3
    assert r2r["flops_vs_large"]["mean"] == pytest.approx(0.3)
    comparison = summary["r2r_vs_confidence"][0]
    assert comparison["r2r_minus_confidence_accuracy"]["mean"] == pytest.approx(0.06)
    assert comparison["verdict_r2r_beats_confidence"] == "reproduced"  # +0.05, +0.06, +0.07 over the seeds
    table = out.with_suffix(".md").read_text()
    assert table.count("| r2r |") == 2 and "4 harmless" in table
    png = out.with_suffix(".png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and b"IEND" in png[-12:]


@pytest.mark.slow
@pytest.mark.real_model
def test_routing_benchmark_quick(tmp_path):
    from trl_tokenlevel.models import DemoModelNotFoundError, demo_model_path

    try:
        demo_model_path(use_hub=False)
    except DemoModelNotFoundError:
        pytest.skip("demo model not installed")
    bench = load_benchmark()
    out = tmp_path / "routing_quick.json"
    results = bench.main(["--quick", "--out", str(out)])
    assert len(results["runs"]) == 2 and results["runs"][0]["large"]["large_share"] == 1.0
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| r2r |" in out.with_suffix(".md").read_text()
