"""The claims suite: result validation and table generation (fast), and every experiment's `--quick` form (real model)."""

import json

import pytest

from bench.claims import suite
from bench.claims.common import mean_ci, paired_difference, validate_result, verdict


def _result(name="toy", quick=False):
    difference = paired_difference([0.5, 0.6, 0.7], [0.4, 0.4, 0.5])
    return {
        "experiment": name,
        "config": {"steps": 3},
        "seeds": [0, 1, 2],
        "metrics": {"toy/accuracy": mean_ci([0.5, 0.6, 0.7])},
        "claims": [
            {
                "claim": "toy beats base",
                "paper": "nobody 2026",
                "setting": "tiny | toy",
                "metric": "accuracy",
                "result": difference,
                "verdict": verdict(difference, +1),
                "plot": "toy.png",
            }
        ],
        "wall_time_s": 120.0,
        "quick": quick,
    }


def test_validate_result_names_the_bad_field():
    validate_result(_result())
    broken = _result()
    del broken["claims"][0]["verdict"]
    with pytest.raises(ValueError, match=r"claims\[0\] lacks \['verdict'\]"):
        validate_result(broken)
    broken = _result()
    broken["metrics"]["toy/accuracy"] = 0.5
    with pytest.raises(ValueError, match=r"metrics\['toy/accuracy'\]"):
        validate_result(broken)
    broken = _result()
    broken["claims"][0]["verdict"] = "passed"
    with pytest.raises(ValueError, match="verdict"):
        validate_result(broken)


def test_report_builds_table_and_readme_section_from_json_only(tmp_path):
    (tmp_path / "toy.json").write_text(json.dumps(_result()))
    (tmp_path / "toy_quick.json").write_text(json.dumps(_result("skipped", quick=True)))
    readme = tmp_path / "README.md"
    readme.write_text(f"# Bench\n\nintro\n\n{suite.BEGIN}\nstale\n{suite.END}\n\n## After\n")
    table = suite.report(tmp_path, readme).read_text()
    assert (
        "| toy beats base | nobody 2026 | tiny \\| toy | accuracy | 0.167 ± 0.143 (n=3) | **reproduced** | [plot](toy.png) |"
        in table
    )
    assert "skipped" not in table
    text = readme.read_text()
    assert "stale" not in text and "## After" in text and "intro" in text
    assert f"[plot]({tmp_path.name}/toy.png)" not in text  # links are relative to the README's folder
    assert "[plot](toy.png)" in text  # here the README sits beside the JSON
    suite.report(tmp_path, readme)
    assert readme.read_text() == text  # regenerating is idempotent


def test_experiments_are_discovered():
    names = suite.available_experiments()
    assert {"preference", "signals"} <= set(names)
    assert not {"common", "suite", "__main__"} & set(names)


@pytest.fixture(scope="module")
def fresh_pair_cache(tmp_path_factory):
    """The on-policy pair pool is sampled afresh once for this module (not read from the user cache), then shared."""
    from bench.claims import preference

    path = tmp_path_factory.mktemp("claims_pairs") / "pairs.json"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(preference, "_pairs_cache_path", lambda config: path)
        yield path


@pytest.mark.real_model
@pytest.mark.parametrize("name", suite.available_experiments())
def test_quick_form_completes_and_writes_valid_json(name, demo_model_folder, fresh_pair_cache, tmp_path):
    path = suite.run_experiment(name, quick=True, seeds=[0], out_dir=tmp_path)
    result = json.loads(path.read_text())
    validate_result(result)
    assert result["experiment"] == name and result["quick"] is True
    for claim in result["claims"]:
        if claim["plot"]:
            assert (tmp_path / claim["plot"]).stat().st_size > 0


def test_credit_location_splits_blame_around_the_first_wrong_token():
    from bench.claims.preference import credit_location

    values = [[0.5, -3.0, -1.0, 0.0], [-2.0, 1.0, -2.0], [0.1, 0.2]]
    location = credit_location(values, [1, 2, None])  # the third row is correct: skipped
    # Row 0: most negative at 1 (hit); mass 3 at, 1 after. Row 1: tie at 0 and 2, max() keeps the first (miss).
    assert location["top1"] == pytest.approx(0.5)
    assert location["chance"] == pytest.approx((1 / 4 + 1 / 3) / 2)
    assert location["at"] == pytest.approx((3 / 4 + 2 / 4) / 2)
    assert location["before"] == pytest.approx((0 + 2 / 4) / 2)
    assert location["after"] == pytest.approx((1 / 4 + 0) / 2)


def test_precision_at_k_ranks_by_sign():
    from bench.claims.signals import precision_at_k

    values = [[0.9, 0.1, 0.5], [0.2, 0.8, 0.7, 0.1]]
    assert precision_at_k(values, [0, 2], +1, 1) == pytest.approx((0.5, (1 / 3 + 1 / 4) / 2))
    assert precision_at_k(values, [0, 2], +1, 3)[0] == 1.0
    assert precision_at_k(values, [1, 3], -1, 1)[0] == 1.0  # most negative first
    with pytest.raises(ValueError, match="No rejected answer"):
        precision_at_k(values, [None, None], +1, 1)


def test_frontier_gap_interpolates_the_baseline_at_equal_kl():
    from bench.claims.preference import frontier_gap

    dpo = [(0.2, 0.3), (0.1, 0.1)]  # unsorted on purpose
    assert frontier_gap([(0.15, 0.3)], dpo) == pytest.approx(0.1)
    assert frontier_gap([(0.05, 0.2), (0.4, 0.3)], dpo) == pytest.approx((0.1 + 0.0) / 2)  # clamped at both ends


def test_zero_spread_over_seeds_is_inconclusive():
    same = paired_difference([0.3, 0.3, 0.3], [0.1, 0.1, 0.1])  # seeds did not vary the measurement
    assert same["ci95"] == pytest.approx(0.0)
    assert verdict(same, +1) == "inconclusive"
    assert verdict(paired_difference([0.3, 0.35, 0.32], [0.1, 0.1, 0.1]), +1) == "reproduced"
    assert verdict(paired_difference([0.3, 0.35, 0.32], [0.1, 0.1, 0.1]), -1) == "not reproduced"
    from bench.claims.common import format_interval

    assert format_interval(same) == "0.200 ± n/a (n=3, same value every seed)"


def test_table_shows_old_zero_spread_verdicts_as_inconclusive(tmp_path):
    result = _result()
    result["claims"][0]["result"] = paired_difference([0.3, 0.3, 0.3], [0.1, 0.1, 0.1])
    result["claims"][0]["verdict"] = "reproduced"  # as written by the verdict rule before zero spread was handled
    (tmp_path / "toy.json").write_text(json.dumps(result))
    table = suite.report(tmp_path, tmp_path / "missing_README.md").read_text()
    assert "**inconclusive**" in table and "**reproduced**" not in table
