"""bench/demo_settings.py: the selection rule, the parsing of the jobs' printed lines and the generated tables (no
model runs here; the runs themselves are the demo jobs, tested in tests/test_demo_jobs.py)."""

from __future__ import annotations

import pytest

from bench import demo_settings


def test_choose_takes_the_best_mean_balanced_validation_accuracy_and_breaks_ties_towards_the_smaller_rate():
    runs = [{"learning_rate": 1e-4, "balanced_after": a, "after": 0.0} for a in (0.5, 0.7)]
    runs += [{"learning_rate": 5e-4, "balanced_after": a, "after": 1.0} for a in (0.9, 0.2)]
    assert demo_settings.choose(runs) == 1e-4  # 0.60 vs 0.55 balanced; plain accuracy plays no part
    tied = [{"learning_rate": 5e-4, "balanced_after": 0.6}, {"learning_rate": 5e-5, "balanced_after": 0.6}]
    assert demo_settings.choose(tied) == 5e-5


def test_run_job_parses_the_printed_accuracies_and_the_first_wrong_fraction(monkeypatch):
    printed = (
        "Held-out greedy accuracy before training (48 problems): 64.6%\n"
        "  larger number first: 89.7% of 29, second: 26.3% of 19; balanced accuracy 58.0%\n"
        "Held-out greedy accuracy after training (48 problems): 50.0% (before training: 64.6%)\n"
        "  larger number first: 48.3% of 29, second: 52.6% of 19; balanced accuracy 50.5% (before training: 58.0%)\n"
        "Most negative token reward on the first wrong token: 23/37 held-out rejected answers (62%; a random token "
        "would hit 20%)\n"
    )

    class Completed:
        returncode, stdout, stderr = 0, printed, ""

    monkeypatch.setattr(demo_settings.subprocess, "run", lambda *args, **kwargs: Completed())
    run = demo_settings.run_job("dpo", [])
    assert (run["before"], run["after"], run["n"]) == (0.646, 0.5, 48)
    assert (run["balanced_before"], run["balanced_after"]) == (0.58, 0.505)
    assert run["by_position_after"] == {"first": 0.483, "n_first": 29, "second": 0.526, "n_second": 19}
    assert run["first_wrong"] == {"hits": 23, "total": 37, "fraction": pytest.approx(23 / 37, abs=1e-4), "chance": 0.2}


def test_run_job_reports_a_failed_job_with_its_stderr(monkeypatch):
    class Failed:
        returncode, stdout, stderr = 1, "", "ValueError: something named"

    monkeypatch.setattr(demo_settings.subprocess, "run", lambda *args, **kwargs: Failed())
    with pytest.raises(RuntimeError, match="something named"):
        demo_settings.run_job("sft", [])


def test_tables_show_every_rate_with_its_interval_and_the_measured_jobs():
    runs = [{"learning_rate": rate, "seed": seed, "before": 0.4, "after": 0.5 + 0.1 * seed, "balanced_before": 0.3,
             "balanced_after": 0.6, "wall_s": 60.0} for rate in (5e-5, 5e-4) for seed in range(3)]  # fmt: skip
    table = demo_settings.selection_table({"jobs": {"sft": {"runs": runs, "chosen_learning_rate": 5e-4}}})
    assert "| sft | 5e-05 | 60.0% ± 0.0% | 30.0% | 60.0% ± 24.8% | 40.0% | 3 | 60 |  |" in table
    assert "| sft | 0.0005 | 60.0% ± 0.0% | 30.0% | 60.0% ± 24.8% | 40.0% | 3 | 60 | yes |" in table
    environment = {"cpu_model": "CPU", "cpu_count": 2, "load_avg_1m_at_start": 0.5, "git_commit": "abc", "date": "d"}
    measured = {"environment": environment, "jobs": {"dpo": {"before": 0.646, "after": 0.5, "n": 48, "wall_s": 135.4,
                "cpu_s": 220.0, "balanced_before": 0.58, "balanced_after": 0.505,
                "first_wrong": {"hits": 23, "total": 37, "fraction": 0.6216, "chance": 0.2}}}}  # fmt: skip
    row = "| `trl-tokenlevel dpo` | TDPO2 (LoRA) | 2 min 15 s | 220 s | 64.6% → 50.0% | 58.0% → 50.5% | 23/37 (62%; chance 20%) |"
    assert row in demo_settings.measured_table(measured)
