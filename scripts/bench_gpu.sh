#!/usr/bin/env bash
# GPU benchmarks of docs/benchmarks.md ("GPU"), in the order they matter; each step has its own time
# limit, so one slow step leaves the others' numbers. Logs go to $OUT (default bench-gpu/).
#
#   scripts/bench_gpu.sh [STEPS...]      STEPS: torch train remat eager scan-off (default: torch train)
#
# torch:    lmdir bench compare-torch, paper config, bf16 (JAX bf16 compute | PyTorch bf16 autocast +
#           torch.compile), batch 8 x 128^2: JAX's step and the baseline in one command (on an H200
#           JAX's first step alone compiles for 2 minutes; docs/benchmarks.md, "GPU")
# train:    lmdir bench train, paper config, bf16, batch 32 x 128^2, scanned blocks
# remat:    XLA memory analysis of the paper step at batch 8 x 256^2, remat none and block
# eager:    compare-torch as `torch`, PyTorch without torch.compile
# scan-off: compile time of the paper step with unrolled blocks (slow: minutes)
set -u
OUT=${OUT:-bench-gpu}
mkdir -p "$OUT"
LMDIR=${LMDIR:-"python3 -m lmdir_jax.cli"}
export PYTHONUNBUFFERED=1
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(torch train)

step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, log to $OUT/NAME.txt
    local name=$1 limit=$2
    shift 2
    echo "### $(date -u +%H:%M:%S) $*" | tee -a "$OUT/$name.txt"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | grep -v '^\s*$' | tee -a "$OUT/$name.txt"
    echo "### exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s" | tee -a "$OUT/$name.txt"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c 'import sys, jax, flax, torch; print(sys.version.split()[0], "jax", jax.__version__, "flax", flax.__version__, "torch", torch.__version__, jax.devices())'
} 2>&1 | tee "$OUT/env.txt"

for s in "${steps[@]}"; do
    case $s in
    train) step train 300 $LMDIR bench train --config paper --steps 20 --warmup 3 ;;
    torch) step torch 420 $LMDIR bench compare-torch --config paper --dtype bfloat16 --compile \
               --size 128 --batch 8 --steps 10 --warmup 3 --rounds 3 ;;
    remat) for r in none block; do
               step remat 150 $LMDIR bench train --config paper --compile-only --config.data.batch_size=8 \
                   --config.data.patch_size=256 --config.model.remat=$r
           done ;;
    eager) step eager 240 $LMDIR bench compare-torch --config paper --dtype bfloat16 \
               --size 128 --batch 8 --steps 10 --warmup 3 --rounds 3 ;;
    scan-off) step scan-off 540 $LMDIR bench train --config paper --compile-only \
                  --config.model.scan_blocks=False ;;
    *) echo "unknown step $s" >&2; exit 2 ;;
    esac
done
