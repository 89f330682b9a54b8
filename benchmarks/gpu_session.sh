#!/usr/bin/env bash
# The GPU measurements of BENCHMARKS.md in one go, for a short lease on a one-GPU machine:
#
#     OUT=/tmp/gpu_logs bash benchmarks/gpu_session.sh [python]
#
# Each part runs under its own time limit and writes its log to $OUT/<part>.log, so a part that hangs or fails costs
# only its own figures. Parts: environment; the training step (formulations auto = plain, plain_1ch, subpixel) and
# encoder inference in bf16 at batch 256 against PyTorch eager NCHW / channels_last and torch.compile; batch 64 in bf16;
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

part env 30 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; nproc; \
  $PY -c 'import jax, flax, optax, torch, numpy; print(\"jax\", jax.__version__, jax.devices(), \"flax\", flax.__version__, \
  \"optax\", optax.__version__, \"torch\", torch.__version__, \"numpy\", numpy.__version__)'"
part train_bf16 200 $PY benchmarks/train_throughput.py --dtype bfloat16 --batch-sizes 256 \
  --formulations auto plain_1ch subpixel --torch nchw channels_last compile --compile-timeout 60 --repeats 5 \
  --inference-batch 1024
part train_bf16_b64 90 $PY benchmarks/train_throughput.py --dtype bfloat16 --batch-sizes 64 --formulations auto \
  --torch nchw channels_last --skip-inference --repeats 5
part train_fp32 90 $PY benchmarks/train_throughput.py --dtype float32 --batch-sizes 256 --formulations auto \
  --torch nchw channels_last --skip-inference --repeats 5
part layers 60 $PY benchmarks/layer_profile.py --batch 256
part data_wait 100 $PY benchmarks/data_wait.py --batch 256 --steps 12 --workers 12 --dtype bfloat16 \
  --crop-steps per_crop --images 512
part data_wait_host 80 $PY benchmarks/data_wait.py --batch 256 --steps 12 --workers 12 --dtype bfloat16 \
  --crop-steps per_crop --images 512 --finish host
