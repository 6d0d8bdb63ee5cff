#!/usr/bin/env bash
# The whole GPU check in one command, on a machine with a CUDA GPU:
#
#   scripts/gpu_check.sh [OUT_DIR]                          # every stage, logs in OUT_DIR
#   STAGES="gpu-tests demo" scripts/gpu_check.sh "$OUT"     # a subset, in the order given
#
# Stages (default: all, in this order):
#   gpu-tests   pytest -v -m gpu tests      the real kernels on CUDA
#   tests       pytest -v -m "not gpu" tests the rest; with CUDA present their `device` fixture is
#                                           cuda (real kernels), and CPU-pinned tests run the torch path
#   demo        python -m flashfusemoe.demo
#   jax-demo    python -m jax_bridge.demo
#   layer       python -m benchmarks.layer --shape all
#   layer-skew  python -m benchmarks.layer --shape all --skew
#   train       python -m benchmarks.train
#   train-jax   python -m benchmarks.train --framework jax                (Flax model, both MoE layers)
#   train-jax-compare  ... --framework jax --moe bridge --compare-torch   (loss curves vs torch fused)
#   hf          python -m benchmarks.hf      transformers training step per experts implementation
#   bridge      scripts/bridge_latency.py --floor, then --backward on each custom-call mechanism
#               (--buffer-callback, then --ffi)
#   bridge-ffi  the bridge's tests and python -m jax_bridge.compare with FLASHFUSEMOE_JAX_FFI=1
#               (jax_bridge.ffi instead of buffer_callback)
#   ep          torchrun --nproc-per-node ${EP_GPUS:-1} -m benchmarks.ep   expert parallelism (NCCL)
#   plots       python -m benchmarks.plot OUT_DIR --out OUT_DIR/plots
# Each stage logs to OUT_DIR/<stage>.log; benchmark JSON/markdown land in OUT_DIR/<stage>/.
# A failing stage does not stop the others; the exit status is non-zero if any stage failed.
# Extra arguments per stage: LAYER_ARGS, TRAIN_ARGS, TRAIN_JAX_ARGS, HF_ARGS, EP_ARGS, PYTEST_ARGS (e.g.
# PYTEST_ARGS="-x"); EP_GPUS: GPUs for the ep stage (default 1: the G=1 smoke run); STAGE_TIMEOUT:
# seconds each stage may run before it is stopped and counted as failed (default: no limit).
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-out/gpu-check-$(date +%Y%m%d-%H%M%S)}
STAGES=${STAGES:-"gpu-tests tests demo jax-demo layer layer-skew train train-jax train-jax-compare hf bridge bridge-ffi ep plots"}
PYTHON=${PYTHON:-python3}
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
mkdir -p "$OUT_DIR"

failed=()
run_stage() {  # run_stage NAME CMD...
  local name=$1
  shift
  echo
  echo "=== [$name] $* ($(date +%H:%M:%S))"
  local t0=$SECONDS
  if [ -n "${STAGE_TIMEOUT:-}" ]; then
    timeout --kill-after=10 "$STAGE_TIMEOUT" "$@" 2>&1 | tee "$OUT_DIR/$name.log"
  else
    "$@" 2>&1 | tee "$OUT_DIR/$name.log"
  fi
  local rc=$?
  echo "=== [$name] exit $rc after $((SECONDS - t0)) s"
  if [ "$rc" -ne 0 ]; then
    failed+=("$name")
  fi
}

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "git: ${FLASHFUSEMOE_GIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
  "$PYTHON" - <<'EOF'
import platform
import torch
print("python", platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda)
for mod in ("triton", "jax", "jaxlib", "flax", "numpy", "matplotlib"):
    try:
        print(mod, __import__(mod).__version__)
    except Exception as exc:
        print(mod, "not importable:", exc)
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        print(f"gpu {i}: {torch.cuda.get_device_name(i)}, capability {torch.cuda.get_device_capability(i)}")
else:
    print("NO CUDA DEVICE: GPU tests will be skipped and benchmarks fall back to --tiny")
try:
    import jax
    print("jax devices", jax.devices())
except Exception as exc:
    print("jax devices: unavailable:", exc)
EOF
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || true
} 2>&1 | tee "$OUT_DIR/versions.log"

for stage in $STAGES; do
  case $stage in
    # -v names each test as it finishes, so a failure is named even in a log cut short before
    # pytest's summary (-rfE repeats failures and errors there).
    gpu-tests) run_stage "$stage" "$PYTHON" -m pytest -v -rfE -m gpu ${PYTEST_ARGS:-} tests ;;
    tests) run_stage "$stage" "$PYTHON" -m pytest -v -rfE -m "not gpu" ${PYTEST_ARGS:-} tests ;;
    demo) run_stage "$stage" "$PYTHON" -m flashfusemoe.demo ;;
    jax-demo) run_stage "$stage" "$PYTHON" -m jax_bridge.demo ;;
    layer) run_stage "$stage" "$PYTHON" -m benchmarks.layer --shape all --out "$OUT_DIR/$stage" ${LAYER_ARGS:-} ;;
    layer-skew)
      run_stage "$stage" "$PYTHON" -m benchmarks.layer --shape all --skew --out "$OUT_DIR/$stage" ${LAYER_ARGS:-} ;;
    train) run_stage "$stage" "$PYTHON" -m benchmarks.train --out "$OUT_DIR/$stage" ${TRAIN_ARGS:-} ;;
    train-jax)
      run_stage "$stage" "$PYTHON" -m benchmarks.train --framework jax \
        --out "$OUT_DIR/$stage" ${TRAIN_JAX_ARGS:-} ;;
    train-jax-compare)
      run_stage "$stage" "$PYTHON" -m benchmarks.train --framework jax \
        --moe bridge --compare-torch --out "$OUT_DIR/$stage" ${TRAIN_JAX_ARGS:-} ;;
    hf) run_stage "$stage" "$PYTHON" -m benchmarks.hf --out "$OUT_DIR/$stage" ${HF_ARGS:-} ;;
    bridge) run_stage "$stage" bash -c "$PYTHON scripts/bridge_latency.py --floor \
      && $PYTHON scripts/bridge_latency.py --backward --buffer-callback \
      && $PYTHON scripts/bridge_latency.py --backward --ffi" ;;
    bridge-ffi) run_stage "$stage" env FLASHFUSEMOE_JAX_FFI=1 bash -c "$PYTHON -m pytest -v -rfE ${PYTEST_ARGS:-} \
      tests/jax_bridge tests/benchmarks/test_flax_model.py && $PYTHON -m jax_bridge.compare" ;;
    ep) run_stage "$stage" "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "${EP_GPUS:-1}" \
      -m benchmarks.ep --out "$OUT_DIR/$stage" ${EP_ARGS:-} ;;
    plots) run_stage "$stage" "$PYTHON" -m benchmarks.plot "$OUT_DIR" --out "$OUT_DIR/plots" ;;
    *)
      echo "unknown stage '$stage' (known: gpu-tests tests demo layer layer-skew train train-jax train-jax-compare hf bridge bridge-ffi ep jax-demo plots)"
      failed+=("$stage")
      ;;
  esac
done

echo
echo "logs and results in $OUT_DIR"
if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED stages: ${failed[*]}"
  exit 1
fi
echo "all stages passed: $STAGES"
