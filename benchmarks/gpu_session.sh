#!/usr/bin/env bash
# The GPU measurements of BENCHMARKS.md in one go, for a short lease on a one-GPU machine:
#
#     OUT=/tmp/gpu_logs [PARTS="kernels train_bf16 ..."] bash benchmarks/gpu_session.sh [python]
#
# PARTS (default: all, in this order): env kernels train_bf16 tune train_bf16_b64 train_fp32 layers data_wait
# data_wait_host; "kernels" runs the compiled Pallas kernels' tests (tests/test_fused_blocks.py) before anything is timed,
# "tune" times the fused blocks' tilings alone (benchmarks/fused_blocks_tune.py; the last block's were never tuned).
#
# Each part runs under its own time limit and writes its log to $OUT/<part>.log, so a part that hangs or fails costs
# only its own figures. Parts: environment; the training step (formulations auto, plain_1ch, plain) and
# encoder inference in bf16 at batch 256 against PyTorch eager NCHW / channels_last and torch.compile (auto = fused_1ch
# on one GPU since 2026-11-26); batch 64 in bf16;
# float32 at batch 256 (the project step fed uint8 crops that it finishes itself, as training on a GPU runs since
# 2026-11-26; --finish host gives the float-fed step of the earlier figures); the per-layer profile; then the data-wait measurement (the default Grain pipeline with worker
# processes feeding the bf16 step), with the crops finished on the GPU (input.finish=auto) and on the host. About 9 minutes on an H200 with a cold compilation cache (2026-11-26: batch 1024
# added ~50 s of XLA autotuning per formulation, so it is left out here). Python packages that the
# machine lacks (grain, array-record, ml-collections, portpicker) are installed from wheels in ./.whl when present;
# fetch them where pip works, for the GPU machine's Python (3.12 on the machines used so far):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     grain==0.2.18 array-record==0.8.6 ml_collections==1.1.0 portpicker
set -u
PY=${1:-python3}
OUT=${OUT:-/tmp/gpu_logs}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# JAX and PyTorch share the card in one process: no preallocation of 75% of it by XLA.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

part() {  # part NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*" | tee "$OUT/$name.log"
  timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log"
  echo "=== $name rc=${PIPESTATUS[0]}" | tee -a "$OUT/$name.log"
}

PARTS=${PARTS:-env kernels train_bf16 tune train_bf16_b64 train_fp32 layers data_wait data_wait_host}
want() { [[ " $PARTS " == *" $1 "* ]]; }

want env && part env 30 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; nproc; \
  $PY -c 'import jax, flax, optax, torch, numpy; print(\"jax\", jax.__version__, jax.devices(), \"flax\", flax.__version__, \
  \"optax\", optax.__version__, \"torch\", torch.__version__, \"numpy\", numpy.__version__)'"
want kernels && part kernels 90 $PY -m pytest -q -p no:cacheprovider tests/test_fused_blocks.py -k compiled
want train_bf16 && part train_bf16 ${TRAIN_LIMIT:-240} $PY benchmarks/train_throughput.py --dtype bfloat16 \
  --batch-sizes 256 --formulations ${FORMULATIONS:-auto fused_subpixel plain} \
  --torch ${TORCH:-nchw channels_last compile} --compile-timeout 45 --repeats 5 ${INFERENCE:---inference-batch 1024}
want tune && part tune 100 $PY benchmarks/fused_blocks_tune.py --batch 256 --repeats 3 --unfused matmul \
  --configs "backward xla" "loop 2048/32 w4" "tile 64 w4" "unroll 256/64 w4" "loop 1024/64 w4 s1" "fwd 128 w8"
want train_bf16_b64 && part train_bf16_b64 90 $PY benchmarks/train_throughput.py --dtype bfloat16 --batch-sizes 64 --formulations auto \
  --torch nchw channels_last --skip-inference --repeats 5
want train_fp32 && part train_fp32 90 $PY benchmarks/train_throughput.py --dtype float32 --batch-sizes 256 --formulations auto \
  --torch nchw channels_last --skip-inference --repeats 5
want layers && part layers 100 $PY benchmarks/layer_profile.py --batch 256 --repeats 3
want data_wait && part data_wait 100 $PY benchmarks/data_wait.py --batch 256 --steps 12 --workers 12 --dtype bfloat16 \
  --crop-steps per_crop --images 512
want data_wait_host && part data_wait_host 80 $PY benchmarks/data_wait.py --batch 256 --steps 12 --workers 12 --dtype bfloat16 \
  --crop-steps per_crop --images 512 --finish host
