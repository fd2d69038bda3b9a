"""mkdocs hook: publish the benchmark plots that the docs link to.

The claims table (`bench/results/claims/claims_table.md`, included in `claims.md`) and the routing page link to PNGs
that the benchmarks write under `bench/results/`. They are added to the site at its root under their own names, so the
same relative links work in the built site, and `mkdocs build --strict` can check them.
"""

from pathlib import Path

from mkdocs.structure.files import File

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"


def on_files(files, config):
    for path in [*sorted((RESULTS / "claims").glob("*.png")), RESULTS / "routing_benchmark.png"]:
        if path.is_file() and files.get_file_from_path(path.name) is None:
            files.append(File.generated(config, path.name, abs_src_path=str(path)))
    return files
