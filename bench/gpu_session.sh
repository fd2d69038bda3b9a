#!/usr/bin/env bash
# The one prepared script for a lent GPU machine: GPU-only tests, then the GPU benchmarks, results to $OUT.
# The machine has torch/transformers/accelerate/peft but not trl/datasets: carry them as wheels in .whl/ (see
# bench/README.md). Usage from the device tool: bash bench/gpu_session.sh   (with `.whl` carried)
set -u
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
# On the device image (Python 3.12) dill cannot pickle pyarrow's MonthDayNano type, which breaks datasets'
# fingerprint hashing inside TRL's dataset preparation (stock DPOTrainer included). For this session only, fall back
# to a random fingerprint, as datasets itself does when a transform cannot be hashed.
cat > /tmp/site/sitecustomize.py <<'PY'
import os, secrets
if os.environ.get("TOKENLEVEL_SAFE_FINGERPRINT"):
    import datasets.fingerprint as _fp
    _original_hash = _fp.Hasher.hash
    def _safe_hash(cls, value):
        try:
            return _original_hash(value)
        except Exception:
            return secrets.token_hex(8)
    _fp.Hasher.hash = classmethod(_safe_hash)
PY
export TOKENLEVEL_SAFE_FINGERPRINT=1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TQDM_DISABLE=1 PYTHONUNBUFFERED=1 \
    TRL_EXPERIMENTAL_SILENCE=1 HF_HUB_DISABLE_TELEMETRY=1
python3 -c "
import torch, transformers, trl, datasets, pyarrow, accelerate, peft
print('torch', torch.__version__, torch.cuda.get_device_name(0), 'transformers', transformers.__version__, 'trl',
      trl.__version__, 'datasets', datasets.__version__, 'pyarrow', pyarrow.__version__, 'peft', peft.__version__)
" 2>&1 | tee "$OUT/env.txt"
# bf16 / Triton parity of the chunked kernels against full-logits references.
timeout 90 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ops/test_chunked.py 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
# Issue 6: full-distribution token losses vs stock DPO vs naive full-logits TDPO2, Qwen2.5-0.5B shape, 4 x 1024 tokens.
timeout 300 python3 bench/dpo_memory.py --device cuda --rounds 1 --steps 6 --out "$OUT/dpo_memory_cuda.json" \
    > "$OUT/dpo_memory_cuda.log" 2>&1; tail -25 "$OUT/dpo_memory_cuda.log"
# Issue 2: token-scalar losses vs stock DPO at the same shape.
timeout 170 python3 bench/dpo_token_overhead.py --device cuda --rounds 1 --steps 6 \
    --out "$OUT/dpo_token_overhead_cuda.json" > "$OUT/dpo_token_overhead_cuda.log" 2>&1; tail -20 "$OUT/dpo_token_overhead_cuda.log"
