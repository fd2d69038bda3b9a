#!/usr/bin/env bash
# Download, on a machine with PyPI, the wheels that the lent GPU machine's image lacks, into .whl/ (git-ignored through
# .git/info/exclude), so that `bash bench/gpu_suite.sh` can install them there offline:
#
#     bash bench/gpu_wheels.sh                 # trl, datasets, dill, multiprocess and pyarrow (about 57 MB)
#     NO_PYARROW=1 bash bench/gpu_wheels.sh    # without pyarrow (55 MB), when the image's pyarrow is >= 24
#
# Then name `.whl` in the device call's `carry`. The image (the device README's KINDS.md, read 2026-11-17) has torch,
# transformers, accelerate, peft, triton, pandas, xxhash, fsspec and pyarrow, but not trl, datasets, dill or
# multiprocess. datasets needs pyarrow >= 24 and the image's version is not recorded, so pyarrow travels by default.
# The versions are the ones this checkout's tests run with; everything is pure Python except pyarrow (CPython 3.12,
# manylinux x86-64, as the device's python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")" .whl
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"

packages=(trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19)
[ "${NO_PYARROW:-0}" = 1 ] || packages+=(pyarrow==26.0.1)
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${packages[@]}"
ls -la .whl
du -sh .whl
echo "Now run on the device: bash bench/gpu_suite.sh (with carry=['.whl']); the tree that travels must stay <= 64 MiB."
