#!/usr/bin/env bash
# One command for every performance benchmark on one GPU, at realistic shapes (Qwen2.5-0.5B shape with random
# weights: vocab 151936, hidden 896, 24 layers; bf16; gradient checkpointing), then the docs tables:
#
#     bash bench/gpu_suite.sh                # results to bench/results/gpu/ (or $OUT), tables to $OUT/benchmarks.md
#     DEVICE=cpu bash bench/gpu_suite.sh     # the same steps, CPU-sized (tiny model, one short shape): a smoke test
#
# Budget: about 10 minutes on one H100/H200 (each step has its own `timeout`, so an overrun loses that step's JSON,
# never the whole suite; the Triton fused pass's share is an estimate until a GPU run times it). Every benchmark follows bench/common.py's rules (fresh worker per configuration, >= 3
# alternating rounds, warm-up excluded, allocated and reserved peaks). Steps, most important first:
#   1. GPU parity tests of the kernels (bf16, CUDA), the Triton fused pass's included (compiles: est.) . ~1.5 min
#   1b. fused_kernel: the LM-head pass alone, token_kernel torch / triton / trl, N 2048 and 8192 ........ ~1 min
#   2. dpo_memory sweep 1x1024, 1x2048, 1x4096 pairs: stock, tdpo2 (fused), sparsepo (fused) ......... ~3.5 min
#   3. dpo_memory 2x1024: stock, the two-pass TDPO2 (TRL Triton kernels), TDPO2 with the fused pass's Triton
#      backend (token_kernel="triton"; CUDA only) and AlignDistil (fused) ................................ ~2 min
#   4. dpo_token_overhead 2x1024: stock, weighted, cdpo ............................................. ~1 min
#   5. grpo_token_overhead and sft_token_overhead, smallest useful subsets .......................... ~1.5 min
#   6. python bench/make_tables.py over the JSON of this run
# The device image may lack trl/datasets: wheels carried in .whl/ are installed into /tmp/site first (see README).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
START=$(date +%s)
PY=${PYTHON:-python3}

if compgen -G ".whl/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    # On some device images dill cannot pickle pyarrow's MonthDayNano type, which breaks datasets' fingerprint hashing
    # inside TRL's dataset preparation (stock DPOTrainer included): fall back to a random fingerprint, as datasets
    # itself does when a transform cannot be hashed.
    cat > /tmp/site/sitecustomize.py <<'PY'
import secrets
import datasets.fingerprint as _fp
_original_hash = _fp.Hasher.hash
def _safe_hash(cls, value):
    try:
        return _original_hash(value)
    except Exception:
        return secrets.token_hex(8)
_fp.Hasher.hash = classmethod(_safe_hash)
PY
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TQDM_DISABLE=1 PYTHONUNBUFFERED=1 \
    TRL_EXPERIMENTAL_SILENCE=1 HF_HUB_DISABLE_TELEMETRY=1

step() {  # step NAME TIMEOUT_S COMMAND...: run, log to $OUT/NAME.log, report the exit code and the time used
    local name=$1 limit=$2
    shift 2
    local t0=$(date +%s)
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "[$name] exit $rc after $(( $(date +%s) - t0 )) s (suite at $(( $(date +%s) - START )) s)" | tee -a "$OUT/suite.txt"
    tail -n 12 "$OUT/$name.log"
}

DEVICE=${DEVICE:-cuda}
if [ "$DEVICE" = cuda ]; then
    $PY -c "import torch, transformers, trl; print('torch', torch.__version__, torch.cuda.get_device_name(0),
'transformers', transformers.__version__, 'trl', trl.__version__)" 2>&1 | tee "$OUT/env.txt"
    step gpu_tests 180 $PY -m pytest -q -s -m gpu -p no:cacheprovider tests/ops/test_chunked.py \
        tests/ops/test_chunked_fused.py tests/ops/test_fused_triton.py
    SHAPE="" SWEEP=1x1024,1x2048,1x4096 PAIRS=2x1024 GRPO_SHAPE="" SFT_PRESET=qwen0.5b SCALE=1
    VARIANTS=stock,tdpo2_twopass,tdpo2_triton,aligndistil
else  # CPU smoke test of the same commands: tiny Qwen2 shape, one short sequence, generous timeouts
    SHAPE="--hidden 64 --layers 2 --heads 4 --kv-heads 2 --intermediate 128 --vocab 2048 --tokenizer-vocab 2048"
    SWEEP=1x64 PAIRS=1x64 GRPO_SHAPE="$SHAPE --batch 4 --completion-len 32 --prompt-len 16" SFT_PRESET=small SCALE=10
    VARIANTS=stock,tdpo2_twopass,aligndistil  # token_kernel="triton" needs CUDA
fi
step fused_kernel 150 $PY bench/fused_kernel.py --device $DEVICE --out "$OUT/fused_kernel_${DEVICE}.json"
DPO="--device $DEVICE $SHAPE --rounds 3 --warmup 2 --steps 3 --breakdown 0"
step dpo_memory_sweep $((240 * SCALE)) $PY bench/dpo_memory.py $DPO --configs stock,tdpo2,sparsepo --sweep $SWEEP \
    --out "$OUT/dpo_memory_${DEVICE}_sweep.json"
step dpo_memory_variants $((130 * SCALE)) $PY bench/dpo_memory.py $DPO --configs $VARIANTS \
    --sweep $PAIRS --out "$OUT/dpo_memory_${DEVICE}_variants.json"
step dpo_token_overhead $((70 * SCALE)) $PY bench/dpo_token_overhead.py $DPO --configs stock,weighted,cdpo \
    --sweep $PAIRS --out "$OUT/dpo_token_overhead_${DEVICE}.json"
step grpo_token_overhead $((50 * SCALE)) $PY bench/grpo_token_overhead.py --device $DEVICE $GRPO_SHAPE --rounds 3 \
    --warmup 1 --steps 2 --configs stock,entropy_quantile --out "$OUT/grpo_token_overhead_${DEVICE}.json"
step sft_token_overhead $((45 * SCALE)) $PY bench/sft_token_overhead.py --device $DEVICE --preset $SFT_PRESET \
    --rounds 3 --warmup 1 --steps 2 --configs stock otr --out "$OUT/sft_token_overhead_${DEVICE}.json"
step tables 20 $PY bench/make_tables.py --results "$OUT" --out "$OUT/benchmarks.md"
echo "suite total $(( $(date +%s) - START )) s" | tee -a "$OUT/suite.txt"
