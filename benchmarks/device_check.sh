#!/usr/bin/env bash
# The GPU checks for a session that is lent a device machine, as one prepared call (~6 min).
#
#   here, once per checkout:  bash benchmarks/device_check.sh --prepare
#       (downloads the ml_collections wheel the device image lacks into .whl/, which
#       .gitignore lists: the tool copies it only when carried)
#   then the device tool:     run(command="bash benchmarks/device_check.sh", carry=[".whl"],
#                                 timeout_s=540), and give_back unless you rerun at once
#   backend parity:           run(command="bash benchmarks/device_check.sh --parity", ...):
#                                 cnnjax's layers and models on the GPU against the CPU
#
# The device image (docs: /work/.library/device/KINDS.md) has Python 3.12 with jax 0.11 (CUDA),
# flax, optax, orbax, torch and pytest, but no TensorFlow. These checks therefore use synthetic
# batches through the engine's own train step (benchmarks.train_step), never the tf.data
# pipeline. Each check prints its figures (JAX next to PyTorch on the same GPU, the training loss
# on the repeated batch as a smoke check, peak device memory) and leaves JSON under $OUT; each
# round's figures reach the log in $OUT as they are measured, so a check cut off by its cap (or
# the tool's timeout) still leaves what it measured. The
# loss is printed, not asserted: ResNet-50 at the benchmark's lr 0.1 can rise over its first
# steps, so check a rise against the CPU before reading it as an engine bug.
set -uo pipefail
cd "$(dirname "$0")/.."

ML_COLLECTIONS=ml_collections==1.1.0

if (($# > 1)); then  # a second argument would be dropped silently
  echo "device_check.sh: takes at most one argument (none, --prepare or --parity), got: $*" >&2
  exit 2
fi
case "${1:-}" in  # an unknown argument (a typo of --parity) must not spend the device's minutes
  "" | --prepare | --parity) ;;
  *)
    echo "device_check.sh: unknown argument '$1'; expected none (the GPU checks), --prepare or" \
      "--parity" >&2
    exit 2
    ;;
esac

if [[ "${1:-}" == "--prepare" ]]; then
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation py --platform any -d .whl "$ML_COLLECTIONS" &&
    ls -l .whl
  exit
fi

OUT=${OUT:-/tmp/device_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site:$PWD"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || { echo "carry .whl (run --prepare here first)"; exit 2; }
nvidia-smi -L
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, \
'optax', optax.__version__, jax.devices())"

if [[ "${1:-}" == "--parity" ]]; then  # layers and models on the GPU against the CPU (~5 min)
  # 420 s: inside the tool's timeout_s=450, so a case that overruns still leaves the log.
  timeout 420 python3 -m benchmarks.backend_parity --max_seconds="${PARITY_SECONDS:-300}" \
    --json_out="$OUT/backend_parity.json" 2>&1 | grep --line-buffered -v -e '^[WI][01]' |
    tee "$OUT/backend_parity.log"
  # The script's status, not grep's or tee's: 1 a case failed, 3 none failed but
  # PARITY_SECONDS left cases unrun (listed in the log), 124 the 420 s timeout.
  exit "${PIPESTATUS[0]}"
fi

# At most 8 files come back from $OUT: one JSON per check (6) and one log of them all.
LOG="$OUT/device_check.log"
status=0
check() {  # check NAME ARGS...: one benchmark (at most 80 s), its JSON in $OUT, output in $LOG
  local name=$1
  shift
  echo "=== $name: python3 -m benchmarks.train_step $*" | tee -a "$LOG"
  timeout 80 python3 -m benchmarks.train_step "$@" --json_out="$OUT/$name.json" 2>&1 |
    grep --line-buffered -v -e '^W0' -e '^W1' -e '^I0' -e '^I1' | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}  # the benchmark's (or timeout's 124), not grep's or tee's
  if ((rc == 124)); then
    echo "=== $name: stopped at the 80 s limit" | tee -a "$LOG"
  elif ((rc != 0)); then
    echo "=== $name: exit status $rc" | tee -a "$LOG"
  fi
  ((rc == 0)) || status=1
}
# Most important first, so a cut-off run still answers them. The issue's workload (ResNet-18 at
# 32x32, batch 128) in both layouts, JAX vs PyTorch eager on the same GPU:
check resnet18_32 --model=resnet18 --batch_size=128 --image_size=32 --steps=20 --warmup=5 \
  --rounds=2 --torch --torch_device=cuda
check resnet18_cifar_stem --model=resnet18 --stem=cifar --batch_size=128 --image_size=32 \
  --steps=20 --warmup=5 --rounds=2 --torch --torch_device=cuda
# ImageNet size, bfloat16 and float32 compute (PyTorch with CUDA autocast for bfloat16):
check resnet50_224_bf16 --model=resnet50 --batch_size=128 --image_size=224 --steps=10 \
  --warmup=3 --rounds=2 --dtype=bfloat16 --torch --torch_device=cuda
check resnet50_224_fp32 --model=resnet50 --batch_size=128 --image_size=224 --steps=10 \
  --warmup=3 --rounds=2 --torch --torch_device=cuda
# Gradient accumulation in a rolled scan (the accelerator default): peak memory against one batch.
check resnet50_224_accum4 --model=resnet50 --batch_size=128 --image_size=224 --steps=10 \
  --warmup=3 --rounds=1 --grad_accum_steps=4
# The same step under shard_map over a 1-device mesh.
check resnet50_224_shard_map --model=resnet50 --batch_size=128 --image_size=224 --steps=10 \
  --warmup=3 --rounds=1 --parallel=shard_map
exit $status
