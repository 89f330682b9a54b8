#!/usr/bin/env bash
# One short GPU lease for formulation fused_1ch (2026-11-26): tune the fused blocks' Triton tiles, then time the whole
# training step with the fastest tiles against plain / plain_1ch and PyTorch eager, then the data wait, then dec3's
# layer profile. Logs in $OUT; python3 = the GPU machine's Python with JAX and PyTorch; wheels as gpu_session.sh.
#     OUT=/tmp/gpu_logs bash benchmarks/gpu_fused_lease.sh
set -u
OUT=${OUT:-/tmp/gpu_logs}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
part() {  # part NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*" | tee "$OUT/$name.log"
  timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | grep -v "cuda_timer.cc\|DeprecationWarning\|return rule(ctx" \
    | tee -a "$OUT/$name.log"
  echo "=== $name rc=${PIPESTATUS[0]}" | tee -a "$OUT/$name.log"
}
part tune ${TUNE_LIMIT:-110} python3 benchmarks/fused_blocks_tune.py --batch 256 --repeats 3 --write-best "$OUT/best.json" \
  ${TUNE_ARGS:-}
[ -s "$OUT/best.json" ] && TUNED="--fused-tuning $OUT/best.json" || TUNED=""
part train ${TRAIN_LIMIT:-150} python3 benchmarks/train_throughput.py --dtype bfloat16 --batch-sizes 256 \
  --formulations ${FORMULATIONS:-plain plain_1ch fused_1ch} --torch nchw channels_last --repeats 5 --skip-inference $TUNED
[[ " ${PARTS:-data_wait layers} " == *" data_wait "* ]] && part data_wait 80 python3 benchmarks/data_wait.py --batch 256 --steps 10 --workers 12 --dtype bfloat16 \
  --crop-steps per_crop --images 512 --formulation plain_1ch
[[ " ${PARTS:-data_wait layers} " == *" layers "* ]] && part layers 45 python3 benchmarks/layer_profile.py --batch 256 --repeats 3 --layers dec3 dec4
