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
        "claims": [{"claim": "toy beats base", "paper": "nobody 2026", "setting": "tiny | toy", "metric": "accuracy",
                    "result": difference, "verdict": verdict(difference, +1), "plot": "toy.png"}],
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
    assert "| toy beats base | nobody 2026 | tiny \\| toy | accuracy | 0.167 ± 0.143 (n=3) | **reproduced** | [plot](toy.png) |" in table
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
