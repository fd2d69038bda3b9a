"""`bench/longest_sequence.py`: the search on synthetic "fits(length)" functions (every threshold, cold and warm
starts, concurrent probes, nothing fits, everything fits, the budget running out, errors, non-monotone answers), the
classification of failed workers, and one end-to-end CPU run of real probe workers (emulated cap)."""

import itertools
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        import longest_sequence
    finally:
        sys.path.remove(str(BENCH))
    return longest_sequence


def threshold_probe(threshold: int, calls: list, non_fit: str = "oom"):
    """Fits up to `threshold` units; records every round's lengths."""

    def probe(units):
        calls.append(list(units))
        return ["fit" if n <= threshold else non_fit for n in units]

    return probe


@pytest.mark.parametrize("width", [1, 2, 3, 5])
@pytest.mark.parametrize("max_units", [1, 2, 7, 16, 33])
def test_cold_search_finds_every_threshold(bench, width, max_units):
    for threshold in range(0, max_units + 1):
        calls = []
        result = bench.search_longest(threshold_probe(threshold, calls), max_units=max_units, width=width)
        assert result["longest"] == threshold, (threshold, calls)
        assert result["complete"] and result["stopped_by"] is None and result["monotone"]
        assert result["reached_max"] == (threshold == max_units)
        assert result["shortest_failing"] == (None if threshold == max_units else threshold + 1)
        probed = [n for round_ in calls for n in round_]
        assert len(probed) == len(set(probed)), "a length was probed twice"
        assert all(1 <= n <= max_units for n in probed) and all(len(r) <= width for r in calls)


def test_cold_search_doubles_then_bisects(bench):
    calls = []
    result = bench.search_longest(threshold_probe(11, calls), max_units=64)
    assert [c[0] for c in calls] == [1, 2, 4, 8, 16, 12, 10, 11]  # 1..16 doubling, then bisection of (8, 16)
    assert result["longest"] == 11 and result["rounds"] == 8


def test_cold_search_from_a_later_start_halves_down(bench):
    calls = []
    result = bench.search_longest(threshold_probe(2, calls), max_units=64, start=8)
    assert [c[0] for c in calls][:3] == [8, 4, 2] and result["longest"] == 2


@pytest.mark.parametrize("width", [1, 2, 4])
def test_warm_search_from_every_guess(bench, width):
    for guess in (1, 5, 13, 20):
        for threshold in range(0, 21):
            calls = []
            result = bench.search_longest(threshold_probe(threshold, calls), max_units=20, width=width, guess=guess)
            assert result["longest"] == threshold and result["complete"], (guess, threshold, calls)


def test_warm_search_confirms_an_equal_answer_with_two_probes(bench):
    calls = []
    result = bench.search_longest(threshold_probe(13, calls), max_units=64, guess=13)
    assert calls == [[13], [14]] and result["longest"] == 13 and result["shortest_failing"] == 14
    calls = []
    bench.search_longest(threshold_probe(13, calls), max_units=64, width=2, guess=13)
    assert calls == [[13, 14]]  # one round with two concurrent probes


def test_warm_search_gallops_away_from_the_guess(bench):
    calls = []
    bench.search_longest(threshold_probe(30, calls), max_units=64, guess=13)
    assert [c[0] for c in calls][:4] == [13, 14, 16, 20]  # +1, +3, +7 from the guess
    calls = []
    bench.search_longest(threshold_probe(4, calls), max_units=64, guess=13)
    assert [c[0] for c in calls][:4] == [13, 12, 10, 6]  # -1, -3, -7


def test_concurrent_probes_take_fewer_rounds(bench):
    rounds = {}
    for width in (1, 4):
        rounds[width] = bench.search_longest(threshold_probe(37, []), max_units=64, width=width)["rounds"]
    assert rounds[4] < rounds[1]


def test_nothing_fits(bench):
    for kwargs in ({}, {"start": 8}, {"guess": 5}):
        calls = []
        result = bench.search_longest(threshold_probe(0, calls, "over_cap"), max_units=16, **kwargs)
        assert result["longest"] == 0 and result["shortest_failing"] == 1 and result["complete"]
        assert not result["reached_max"]


def test_everything_fits_up_to_the_maximum(bench):
    calls = []
    result = bench.search_longest(threshold_probe(100, calls), max_units=10)
    assert [c[0] for c in calls] == [1, 2, 4, 8, 10]  # the last doubling is clipped to the maximum
    assert result["longest"] == 10 and result["reached_max"] and result["shortest_failing"] is None


def test_budget_stops_with_partial_bounds(bench):
    clock = {"rounds": 0}

    def probe(units):
        clock["rounds"] += 1
        return ["fit" if n <= 11 else "oom" for n in units]

    result = bench.search_longest(probe, max_units=64, out_of_time=lambda: clock["rounds"] >= 6)
    assert not result["complete"] and result["stopped_by"] == "budget" and result["rounds"] == 6
    # bounds after 1, 2, 4, 8, 16 (fails), 12 (fails): the answer is bracketed by the partial bounds
    assert result["longest"] == 8 and result["shortest_failing"] == 12
    none_left = bench.search_longest(probe, max_units=64, out_of_time=lambda: True)
    assert none_left["rounds"] == 0 and none_left["longest"] == 0 and none_left["stopped_by"] == "budget"


def test_a_killed_probe_at_the_deadline_counts_as_budget(bench):
    state = {"late": False}

    def probe(units):
        if units[0] >= 4:
            state["late"] = True
            return ["timeout"]
        return ["fit"]

    result = bench.search_longest(probe, max_units=64, out_of_time=lambda: state["late"])
    assert result["stopped_by"] == "budget" and result["longest"] == 2 and not result["complete"]


def test_an_error_stops_the_search_and_is_not_a_non_fit(bench):
    def probe(units):
        return ["error" if n == 4 else "fit" for n in units]

    result = bench.search_longest(probe, max_units=64)
    assert result["stopped_by"] == "error" and not result["complete"]
    assert result["longest"] == 2 and result["shortest_failing"] is None
    late = bench.search_longest(probe, max_units=64, width=4, out_of_time=lambda: False)
    assert late["stopped_by"] == "error"
    at_deadline = bench.search_longest(lambda units: ["timeout", "error"][: len(units)], max_units=64, width=2,
                                       out_of_time=iter([False, True]).__next__)  # fmt: skip
    assert at_deadline["stopped_by"] == "error"  # an error is never hidden as "budget"


def test_a_fit_above_a_failure_is_flagged(bench):
    answers = {1: "fit", 2: "fit", 4: "oom", 3: "fit", 8: "fit"}

    def probe(units):
        return [answers.get(n, "oom") for n in units]

    result = bench.search_longest(probe, max_units=8, width=4)  # round 1 probes 1, 2, 4, 8
    assert not result["monotone"] and result["longest"] == 3 and result["shortest_failing"] == 4


def test_slot_widths_share_the_parallel_probes(bench):
    assert bench.slot_widths(5, 3) == [2, 2, 1]
    assert bench.slot_widths(1, 3) == [1, 1, 1]  # the runner's semaphore still bounds concurrency to 1
    assert bench.slot_widths(6, 2) == [3, 3]


def test_kept_probe_failures_are_classified(bench):
    """A kept process that overruns is a timeout, one that died of an out-of-memory error is "oom", any other death an
    error; no time left runs nothing."""
    import subprocess

    class Pool:
        def __init__(self, error):
            self.error, self.timeout, self.ran = error, None, False

        def run(self, payload):
            self.ran = True
            raise self.error

    cases = [
        (subprocess.TimeoutExpired("worker", 5, output="log"), "timeout"),
        (RuntimeError("worker stock failed (exit 1); log tail:\ntorch.OutOfMemoryError: CUDA out of memory."), "oom"),
        (RuntimeError("worker stock failed (exit 1); log tail:\nValueError: bad"), "error"),
    ]
    for error, outcome in cases:
        pool = Pool(error)
        assert bench.run_kept_probe(pool, {"config": "stock"}, 5.0)["outcome"] == outcome and pool.timeout == 5.0
    idle = Pool(AssertionError("must not run"))
    assert bench.run_kept_probe(idle, {"config": "stock"}, 0.0)["outcome"] == "timeout" and not idle.ran


def test_failed_workers_are_classified_from_their_log(bench):
    oom = bench.classify_failed_worker(1, "Traceback ...\ntorch.OutOfMemoryError: CUDA out of memory. Tried to")
    assert oom["outcome"] == "oom" and oom["exit_code"] == 1
    other = bench.classify_failed_worker(1, "Traceback ...\nValueError: max_length must be positive")
    assert other["outcome"] == "error" and "ValueError" in other["log_tail"]
    assert bench.classify_failed_worker(-9, "")["outcome"] == "error"  # killed without a trace: not a non-fit


def test_out_of_memory_errors_are_recognized(bench):
    import torch

    assert bench.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert bench.is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    assert not bench.is_out_of_memory(RuntimeError("shape mismatch"))
    assert not bench.is_out_of_memory(ValueError("out of memory"))  # only torch's errors count
    try:
        try:
            raise torch.OutOfMemoryError("CUDA out of memory")
        except torch.OutOfMemoryError as error:
            raise ValueError("while moving the model to the device") from error
    except ValueError as wrapped:
        assert bench.is_out_of_memory(wrapped)


@pytest.mark.parametrize("scope", ["run", "config"])
def test_cpu_run_end_to_end(bench, tmp_path, scope):
    """Real workers on a tiny model: stock fits everything up to 128 tokens at a huge emulated cap (64, 128); with a
    fresh process per probe ("run") TDPO2 starts warm from stock's 128 (1 probe), with one kept process per
    configuration ("config") it searches cold, in turn, in one process; every probe's rows are exactly the probed
    length."""
    out = tmp_path / "longest.json"
    argv = ["--hidden", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1", "--intermediate", "64",
            "--vocab", "1024", "--tokenizer-vocab", "1024", "--granularity", "64", "--max-length", "128",
            "--start", "64", "--memory-cap-gib", "50", "--configs", "stock,tdpo2", "--out", str(out),
            "--worker-scope", scope]  # fmt: skip
    assert bench.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["emulated"] and "EMULATED" in report["memory_cap"] and report["complete"]
    assert report["settings"]["worker_scope"] == scope
    stock, tdpo2 = report["configs"]["stock"], report["configs"]["tdpo2"]
    assert [p["length"] for p in stock["probes"]] == [64, 128]
    assert [p["length"] for p in tdpo2["probes"]] == ([128] if scope == "run" else [64, 128])
    if scope == "config":  # each configuration's probes ran one after the other in one process
        for entry in (stock, tdpo2):
            processes = [p["process"] for p in entry["probes"]]
            assert len({p["pid"] for p in processes}) == 1 and [p["run_index"] for p in processes] == [0, 1]
    for entry in (stock, tdpo2):
        assert entry["longest_fitting"] == 128 and entry["reached_max"] and entry["x_stock"] == 1.0
        for probe in entry["probes"]:
            assert probe["outcome"] == "fit" and probe["peak_measure"] == "VmHWM over construction"
            assert probe["sequence_tokens"]["min"] == probe["sequence_tokens"]["max"] == probe["length"]
            assert 0 < probe["peak_gib"] < 50


@pytest.mark.gpu
def test_cuda_cap_turns_out_of_memory_into_non_fits(bench, tmp_path):
    """The real cap on CUDA: under a 1 MiB cap the first allocation raises torch.OutOfMemoryError, which the worker
    reports as "oom" (not an error); under a 4 GiB cap the same tiny probes fit."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    tiny = ["--device", "cuda", "--hidden", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1",
            "--intermediate", "64", "--vocab", "1024", "--tokenizer-vocab", "1024", "--batch", "1",
            "--granularity", "64", "--max-length", "128", "--start", "64", "--parallel", "2",
            "--configs", "stock,tdpo2"]  # fmt: skip
    for (cap, expected), scope in itertools.product((("0.001", "oom"), ("4", "fit")), ("run", "config")):
        out = tmp_path / f"cap_{cap}_{scope}.json"
        assert bench.main([*tiny, "--memory-cap-gib", cap, "--worker-scope", scope, "--out", str(out)]) == 0
        report = json.loads(out.read_text())
        assert not report["emulated"] and report["complete"]
        for entry in report["configs"].values():
            assert {p["outcome"] for p in entry["probes"]} == {expected}, entry["probes"]
            assert entry["longest_fitting"] == (0 if expected == "oom" else 128)
            if expected == "oom":
                probe = entry["probes"][0]
                assert "OutOfMemoryError" in probe["error"] + probe.get("log_tail", "")
            else:
                assert all(p["peak_measure"] == "CUDA max_memory_reserved" for p in entry["probes"])
