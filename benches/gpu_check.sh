#!/usr/bin/env bash
# Every GPU check of the latency and kernel issues, in one run of at most ~8 minutes on one
# H100/H200, from a plain checkout. Results land in $OUT/results.tgz (default gpu-check-out/):
#   env.txt            GPU, driver, torch/triton versions
#   tests.txt          the GPU-only unit tests (Triton kernel, CUDA latency model)
#   profile_*.txt/json the latency model of resnet50 on the GPU, first run and from the cache (time each)
#   target_*.txt       latency target 0.5 (l1, flops 1): predicted and measured before/after
#   bench_*.json/txt   flops 0.5 with round_to none / 8 / auto: measured speedup vs MACs reduction
# Usage on the device:   bash benches/gpu_check.sh
# Dry run on a CPU:      DEVICE=cpu QUICK=1 bash benches/gpu_check.sh   (tiny models, same steps)
set -uo pipefail
cd "$(dirname "$0")/.."
# The device tool brings back at most 8 files from $OUT, so every result is written to $RES and
# packed into $OUT/results.tgz after each step: a run cut off by its time limit keeps what it finished.
OUT=${OUT:-gpu-check-out}
RES=${RES:-${TMPDIR:-/tmp}/fxprune-gpu-check}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
ONLY=${ONLY:-all}   # all | latency | kernels
rm -rf "$RES"; mkdir -p "$OUT" "$RES"
export FXPRUNE_CACHE="$RES/cache"
START=$(date +%s)
pack() { tar czf "$OUT/results.tgz.part" --exclude=cache -C "$RES" . && mv "$OUT/results.tgz.part" "$OUT/results.tgz"; }
step() { pack; echo "[$(( $(date +%s) - START ))s] $*" | tee -a "$RES/steps.txt"; }

if ! python -c "import fxprune.passes" 2>/dev/null; then
  python -m pip install --quiet --no-deps --no-build-isolation -e . > "$RES/install.txt" 2>&1 ||
    python -m pip install --quiet --no-deps --no-build-isolation . >> "$RES/install.txt" 2>&1 ||
    { echo "install failed: $RES/install.txt"; exit 1; }
fi
python - > "$RES/env.txt" 2>&1 <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__)
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton missing")
EOF
cat "$RES/env.txt"

if [ "$QUICK" = 1 ]; then
  MODELS="torchvision:resnet18"; SHAPE="--input-shape 1,3,64,64"; BATCHES="2"; BIG=2; DTYPE=float32; LAYOUT=""
else
  MODELS=${MODELS:-"torchvision:resnet50 torchvision:mobilenet_v2"}; SHAPE=""; BATCHES="64 1"; BIG=64; DTYPE=bfloat16
  LAYOUT="--channels-last"
fi

step "GPU-only unit tests"
if [ "$DEVICE" = cuda ]; then
  timeout 150 python -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_latency_model.py \
    -k "cuda or triton or gpu" --tb=short > "$RES/tests.txt" 2>&1
  tail -3 "$RES/tests.txt"
fi

if [ "$ONLY" != kernels ]; then
FIRST=${MODELS%% *}
NAME=$(echo "$FIRST" | cut -d: -f2)
step "profile $NAME (batch $BIG, $DTYPE) first run"
timeout 180 python -m fxprune.cli profile "$FIRST" $SHAPE --device "$DEVICE" --batch "$BIG" --dtype "$DTYPE" $LAYOUT \
  --json "$RES/profile_$NAME.json" > "$RES/profile_${NAME}_first.txt" 2>&1
tail -3 "$RES/profile_${NAME}_first.txt"
step "profile $NAME from the cache"
timeout 60 python -m fxprune.cli profile "$FIRST" $SHAPE --device "$DEVICE" --batch "$BIG" --dtype "$DTYPE" $LAYOUT \
  > "$RES/profile_${NAME}_cached.txt" 2>&1
tail -2 "$RES/profile_${NAME}_cached.txt"

for MODEL in $MODELS; do
  NAME=$(echo "$MODEL" | cut -d: -f2)
  for B in $BATCHES; do
    step "latency target 0.5: $NAME batch $B"
    timeout 150 python -m fxprune.cli compress "$MODEL" $SHAPE --method l1 --flops 1 --latency 0.5 --device "$DEVICE" \
      --batch "$B" --dtype "$DTYPE" $LAYOUT > "$RES/target_${NAME}_b$B.txt" 2>&1
    grep -E "latency|Error" "$RES/target_${NAME}_b$B.txt" | head -4
  done
done

for ROUND in none 8 auto; do
  step "flops 0.5, round_to $ROUND: $MODELS"
  timeout 200 python -m fxprune.cli bench $MODELS $SHAPE --flops 0.5 --round-to "$ROUND" --device "$DEVICE" --dtype "$DTYPE" \
    $LAYOUT --batch "$(echo $BATCHES | tr ' ' ,)" --json "$RES/bench_round_$ROUND.json" \
    > "$RES/bench_round_$ROUND.txt" 2>&1
  grep -E "slim|Error" "$RES/bench_round_$ROUND.txt" | head -6
done

if [ "$DEVICE" = cuda ] && [ "$QUICK" != 1 ]; then
  step "latency target 0.5 under torch.compile: resnet50 batch 64"
  timeout 200 python -m fxprune.cli compress torchvision:resnet50 --method l1 --flops 1 --latency 0.5 --device cuda --batch 64 \
    --dtype bfloat16 --channels-last --compile > "$RES/target_resnet50_b64_compile.txt" 2>&1
  grep -E "latency|Error" "$RES/target_resnet50_b64_compile.txt" | head -4
fi
fi

if [ "$ONLY" != latency ]; then
  step "masked conv sweep (docs/kernels.md): fused vs sliced vs eager, fp32/bf16, fwd and fwd+bwd"
  if [ "$QUICK" = 1 ]; then KARGS="--layers r50.l3.3x3 --dtypes float32 --rounds 2 --round-time 0.02 --batch 2"
  else KARGS="--batch 64 --rounds 3 --round-time 0.05 --gd"; fi
  timeout 240 python benches/micro/bench_kernels.py --device "$DEVICE" $KARGS \
    > "$RES/kernels.txt" 2>&1
  tail -4 "$RES/kernels.txt"
fi
step "done"
