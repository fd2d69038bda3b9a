#!/usr/bin/env bash
# One command for every performance benchmark on one GPU, at realistic shapes (Qwen2.5-0.5B shape with random
# weights: vocab 151936, hidden 896, 24 layers; bf16; gradient checkpointing), then the docs tables:
#
#     bash bench/gpu_suite.sh                # results to bench/results/gpu/ (or $OUT), tables to $OUT/benchmarks.md
#     DEVICE=cpu bash bench/gpu_suite.sh     # the same steps, CPU-sized (tiny model, short shapes): a smoke test
#     BENCH_GIT_COMMIT=$(git rev-parse HEAD) bash bench/gpu_suite.sh   # from a copy of the tree without .git
#
# Every benchmark follows bench/common.py's rules: each configuration in worker processes of its own (here
# `--worker-scope config`: one process per configuration, started in parallel with the others and kept for all its
# rounds and shapes), >= 3 alternating rounds, warm-up excluded, allocated and reserved GPU peaks, JSON written after
# every round (a step stopped by its time limit keeps the rounds it finished; fused_kernel writes after each N).
#
# Time budget on one H100/H200: at most 476 s, whatever happens. Steps run most important first, and each step ends
# by its cumulative deadline (the sum of its own and the earlier steps' caps): time an early step does not use goes
# to the later ones, and an overrun only loses the least important tail. Worst case = setup caps (pip 20 + env 15)
# + sum of step caps (439) + one kill grace (2) = 476 s, under 8 minutes. The caps of steps 6-8 are below their
# estimates on purpose: they run on whatever the earlier steps leave unused (the estimated total is ~424 s).
#
#   step (most important first)                                           cap s   expected s (ESTIMATE)
#   setup: wheels from .whl/ into /tmp/site, library versions               35      ~12
#   1. gpu_tests: GPU parity tests of the kernels (bf16; Triton compiled)   75      ~65
#   2. fused_kernel: LM-head pass alone, torch/triton/twopass, N 2048+8192  30      ~25
#   3. dpo_memory sweep 1x1024,1x2048,1x4096: stock, tdpo2, sparsepo       100      ~80
#   4. dpo_memory 2x1024: stock, tdpo2 (torch), tdpo2_twopass,              80      ~75
#      tdpo2_triton, aligndistil (the evidence for token_kernel="auto")
#   5. longest_sequence: stock, tdpo2, tdpo2_triton, tdpo2_twopass, 1 pair  60      ~60
#      under an 8 GiB cap each (kept worker per configuration, all at once;
#      --budget-s 55: partial bounds rather than an overrun)
#   6. dpo_token_overhead 2x1024: stock, weighted, cdpo                     35      ~38
#   7. grpo_token_overhead: stock, entropy_quantile (16 x <= 512 tokens)    25      ~29
#   8. sft_token_overhead: stock, otr (8 x 1024 tokens)                     30      ~39
#   9. make_tables.py over the JSON of this run                              4       ~1
#   total                                                                  474+2    ~424
#
# How the expected times were estimated (nothing here has run on a GPU yet; the first GPU run's $OUT/suite.txt
# replaces these guesses):
# - Worker processes: 19 (3+5+4+3+2+2, longest_sequence's included; before: 27+12+9+6+6 = 60 without it, one per
#   configuration x round x shape). A process's
#   fixed cost (imports, CUDA context, first trainer construction, exit) is ~15-20 s, from the H200 runs in
#   bench/results/*_cuda_h200.json (dpo_token_overhead: 188 s wall for 8 workers that measured ~6 s each). Here the
#   workers of a benchmark start together, while the parent builds the model, so a benchmark pays it about once.
#   Measured on this 2-core CPU: `python -c "import torch, transformers, trl, datasets"` 2.7 s, 4.2-5.3 s with the DPO
#   trainers and trl_tokenlevel (counted ~8 s on the GPU image: CUDA libraries, cold disk); building and saving the
#   494M-parameter model 8.2 s (then linked in 0.01 s from $BENCH_MODEL_CACHE by the later benchmarks).
# - Each run in a kept worker rebuilds its trainer: 0.35-0.42 s on this CPU at the real shape (494M, 1x1024, imports
#   warm), counted ~1 s on a GPU (two 1 GB checkpoints to move to the device).
# - Step times from the H200 runs (stock at 4x1024 pairs: 205-215 ms; token methods 1.2-1.45x), scaled by tokens and
#   by 1.3 for an H100: ~0.12, 0.16, 0.33 s at 1x1024, 1x2048, 1x4096, ~0.17 s at 2x1024; 5 steps per run (warm-up
#   included), plus 2-4 s for the first step in each worker (CUDA libraries, cuBLAS).
# - gpu_tests: 16 s for the 4 non-Triton GPU tests on the H200; the compiled Triton cases (a nested pytest) are a
#   guess. fused_kernel: ~108 LM-head passes of 10-15 TFLOP each, plus imports and Triton (cached by gpu_tests).
#
# The device image may lack trl/datasets: wheels carried in .whl/ are installed into /tmp/site first (see README).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
: > "$OUT/suite.txt"
START=$(date +%s)
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
# Built random models, shared by the benchmarks of this run (same config and seed: linked, not built again).
if [ -z "${BENCH_MODEL_CACHE:-}" ]; then
    BENCH_MODEL_CACHE=$(mktemp -d /tmp/bench_models.XXXXXX)
    trap 'rm -rf "$BENCH_MODEL_CACHE"' EXIT
fi
export BENCH_MODEL_CACHE

elapsed() { echo $(( $(date +%s) - START )); }

# Only where they are missing: a machine that already has them (this one, for the CPU smoke test) keeps its own.
if compgen -G ".whl/*.whl" > /dev/null && ! $PY -c "import trl, datasets" 2> /dev/null; then
    timeout 20 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
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
# Library versions (and the device); this also brings the libraries into the page cache for the workers.
timeout 15 $PY -c "import torch, transformers, trl, datasets; print('torch', torch.__version__,
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu', 'transformers', transformers.__version__,
'trl', trl.__version__, 'datasets', datasets.__version__)" 2>&1 | tee "$OUT/env.txt"
echo "[setup] $(elapsed) s" | tee -a "$OUT/suite.txt"

SCALE=${SCALE:-1}    # multiplies every step cap (the CPU smoke test on a small shared machine needs more)
DEADLINE=$(elapsed)
step() {  # step NAME CAP_S COMMAND...: run until the cumulative deadline, log to $OUT/NAME.log, report exit and time
    local name=$1 cap=$(( $2 * SCALE ))
    shift 2
    DEADLINE=$(( DEADLINE + cap ))
    local limit=$(( DEADLINE - $(elapsed) ))
    if [ "$limit" -lt 5 ]; then
        echo "[$name] skipped: $limit s left before its deadline (suite at $(elapsed) s)" | tee -a "$OUT/suite.txt"
        return
    fi
    local t0=$(date +%s)
    timeout -k 2 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "[$name] exit $rc after $(( $(date +%s) - t0 )) s of $limit (cap $cap; suite at $(elapsed) s)" \
        | tee -a "$OUT/suite.txt"
    tail -n 12 "$OUT/$name.log"
}

KEPT="--worker-scope config"  # also on CPU, so that the smoke test runs the GPU layout
# Kept workers hold a CUDA context each, at the same time: a GPU in an exclusive compute mode allows one per device.
MODE=$(nvidia-smi --query-gpu=compute_mode --format=csv,noheader 2>/dev/null | head -n 1)
if [ "$DEVICE" = cuda ] && [ -n "$MODE" ] && [ "$MODE" != Default ]; then
    KEPT="--worker-scope run"
    echo "[setup] compute mode $MODE: a fresh worker per run (slower; later steps may not fit)" | tee -a "$OUT/suite.txt"
fi
if [ "$DEVICE" = cuda ]; then
    SHAPE="" SWEEP=1x1024,1x2048,1x4096 PAIRS=2x1024 GRPO_SHAPE="" SFT_PRESET=qwen0.5b
    VARIANTS=stock,tdpo2,tdpo2_twopass,tdpo2_triton,aligndistil
    LONGEST="--batch 1 --memory-cap-gib 8 --granularity 2048 --start 8192 --budget-s 55"
    step gpu_tests 75 $PY -m pytest -q -s -m gpu -p no:cacheprovider tests/ops/test_chunked.py \
        tests/ops/test_chunked_fused.py tests/ops/test_fused_triton.py
else  # CPU smoke test of the same commands: tiny Qwen2 shape, two short shapes in the sweep
    SHAPE="--hidden 64 --layers 2 --heads 4 --kv-heads 2 --intermediate 128 --vocab 2048 --tokenizer-vocab 2048"
    SWEEP=1x32,1x64 PAIRS=1x64 GRPO_SHAPE="$SHAPE --batch 4 --completion-len 32 --prompt-len 16" SFT_PRESET=small
    VARIANTS=stock,tdpo2,tdpo2_twopass,aligndistil  # token_kernel="triton" needs CUDA
    LONGEST="--granularity 512 --max-length 1024 --start 512 --budget-s 50"  # emulated cap (see its docstring)
    SCALE=${SCALE_CPU:-3}
    echo "[gpu_tests] skipped on CPU" | tee -a "$OUT/suite.txt"
fi
step fused_kernel 30 $PY bench/fused_kernel.py --device $DEVICE --out "$OUT/fused_kernel_${DEVICE}.json"
DPO="--device $DEVICE $SHAPE $KEPT --rounds 3 --warmup 2 --steps 3 --breakdown 0"
step dpo_memory_sweep 100 $PY bench/dpo_memory.py $DPO --configs stock,tdpo2,sparsepo --sweep $SWEEP \
    --out "$OUT/dpo_memory_${DEVICE}_sweep.json"
step dpo_memory_variants 80 $PY bench/dpo_memory.py $DPO --configs $VARIANTS --sweep $PAIRS \
    --out "$OUT/dpo_memory_${DEVICE}_variants.json"
step longest_sequence 60 $PY bench/longest_sequence.py --device $DEVICE $LONGEST $KEPT \
    --out "$OUT/longest_sequence_${DEVICE}.json"
step dpo_token_overhead 35 $PY bench/dpo_token_overhead.py $DPO --configs stock,weighted,cdpo --sweep $PAIRS \
    --out "$OUT/dpo_token_overhead_${DEVICE}.json"
step grpo_token_overhead 25 $PY bench/grpo_token_overhead.py --device $DEVICE $GRPO_SHAPE $KEPT --rounds 3 \
    --warmup 1 --steps 2 --configs stock,entropy_quantile --out "$OUT/grpo_token_overhead_${DEVICE}.json"
step sft_token_overhead 30 $PY bench/sft_token_overhead.py --device $DEVICE --preset $SFT_PRESET $KEPT \
    --rounds 3 --warmup 1 --steps 2 --configs stock otr --out "$OUT/sft_token_overhead_${DEVICE}.json"
step tables 4 $PY bench/make_tables.py --results "$OUT" --out "$OUT/benchmarks.md"
echo "suite total $(elapsed) s" | tee -a "$OUT/suite.txt"
