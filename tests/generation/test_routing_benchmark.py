"""The routing benchmark's smoke mode runs end to end and writes JSON, markdown and a valid PNG."""

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.mark.slow
def test_routing_benchmark_quick(tmp_path):
    sys.path.insert(0, str(BENCH))
    try:
        import routing_benchmark
    finally:
        sys.path.remove(str(BENCH))
    out = tmp_path / "routing_quick.json"
    results = routing_benchmark.main(["--quick", "--out", str(out)])
    data = json.loads(out.read_text())
    families = {row["family"] for row in data["rows"]}
    assert {"small", "large", "r2r", "cascade"} <= families and data["goal"]["definition"]
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| method |" in out.with_suffix(".md").read_text()
    assert results["rows"][1]["large_token_fraction"] == 1.0


def test_png_writer_and_table_without_training(tmp_path):
    sys.path.insert(0, str(BENCH))
    try:
        import routing_benchmark
    finally:
        sys.path.remove(str(BENCH))
    rows = [
        {"method": m, "family": f, "accuracy": a, "large_token_fraction": x,
         "small_tokens_discarded_per_output_token": 0.0, "wall_time_s": 0.1}
        for m, f, a, x in [("small", "small", 0.8, 0.0), ("large", "large", 1.0, 1.0), ("r2r", "r2r", 0.99, 0.05)]
    ]  # fmt: skip
    routing_benchmark.plot({"rows": rows}, tmp_path / "plot.png")
    png = (tmp_path / "plot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and b"IEND" in png[-12:]
    assert routing_benchmark.markdown_table({"rows": rows}).count("\n") == 4
