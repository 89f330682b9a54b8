#!/usr/bin/env bash
# The GPU measurements of BENCHMARKS.md in one go, for a short lease on a one-GPU machine:
#
#     OUT=/tmp/gpu_logs [PARTS="kernels train_bf16 ..."] bash benchmarks/gpu_session.sh [python]
#
# PARTS (default: all, in this order): env kernels train_bf16 alternatives tune train_bf16_b64 train_fp32 layers
# data_wait data_wait_host; also, when named: tune_last train_tuned (the last block's tilings, then the step with the
# fastest), anatomy (the project step against a bare Adam+BCE step), layers_dec3 (the two upsampling layers alone,
# plain and in the phase layout by XLA's convolution and as one product). alternatives: the step with fused_blocks.TUNING
# settings (ALTERNATIVES) against the default, in one run.
# "kernels" runs, before anything is timed, the compiled Pallas kernels' tests and the fused formulations' whole model
# against plain (tests/test_fused_blocks.py, tests/test_model.py; KERNELS_K narrows the -k expression); "tune" times
# the first block's tilings alone (benchmarks/fused_blocks_tune.py).
#
# Each part runs under its own time limit and writes its log to $OUT/<part>.log, so a part that hangs or fails costs
# only its own figures. Parts: environment; the training step (FORMULATIONS, default auto and plain) and encoder
# inference in bf16 at batch 256 against PyTorch (TORCH, default eager NCHW / channels_last and torch.compile; auto =
# fused_1ch on one GPU in bf16 since 2026-11-26, its first block's backward from the saved mask since 2026-11-27);
# batch 64 in bf16; float32 at batch 256 (the project step fed uint8 crops that it finishes itself, as training on a
# GPU runs since 2026-11-26; --finish host gives the float-fed step of the earlier figures); the per-layer profile;
# then the data-wait measurement in steady state (the default Grain pipeline with 12 worker processes feeding the bf16
# step of DATA_WAIT_FORMULATION), with the crops finished on the GPU (input.finish=auto) and on the host. All default
# parts exceed one 600 s call (their limits add up to ~24 min): name a few per call (2026-11-27 05:46 UTC, one
# command of three invocations, PARTS='env kernels alternatives', PARTS=anatomy and PARTS=tune: 357 s; then PARTS=
# 'train_bf16 data_wait layers', 224 s, the layer profile cut at its 100 s limit; then 'train_bf16_b64 train_fp32', 95
# s). A next lease's first call: PARTS='env kernels alternatives train_fp32' KERNELS_K='compiled or (fast_formulation
# and fused)' KERNELS_LIMIT=180 ALTERNATIVES_LIMIT=170 (the compiled kernels, whose products now follow jax's matmul
# precision, also at the default float32 precision, and the whole fused models against plain on the card,
# fused_subpixel+phase_conv=gemm among them; phase_conv=gemm against auto in the step; float32 with the kernels' TF32
# products): limits of 30+180+170+120 s. Then PARTS='layers_dec3 tune' (the largest layer alone in its three forms;
# the mask kernel's tilings, its weight-gradient kernel rewritten after the lease). All 16 compiled kernel tests
# passed at 05:46 (131 s; 3 more since), and gemm adds no kernel; the five-variant alternatives took 89 s, tune 8
# configurations ~45 s.
# Python packages that the machine lacks (grain, array-record, ml-collections, portpicker, pytest) are installed from
# wheels in ./.whl when present; fetch them where pip works, for the GPU machine's Python (3.12 so far):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     grain==0.2.18 array-record==0.8.6 ml_collections==1.1.0 portpicker pytest pluggy iniconfig pygments packaging
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

PARTS=${PARTS:-env kernels train_bf16 alternatives tune train_bf16_b64 train_fp32 layers data_wait data_wait_host}
want() { [[ " $PARTS " == *" $1 "* ]]; }

want env && part env 30 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; nproc; \
  $PY -c 'import jax, flax, optax, torch, numpy; print(\"jax\", jax.__version__, jax.devices(), \"flax\", flax.__version__, \
  \"optax\", optax.__version__, \"torch\", torch.__version__, \"numpy\", numpy.__version__)'"
# kernels: the compiled Triton kernels against the unfused ops, then the fused formulations' whole model (outputs and
# gradients) against plain, in float32 with full-precision convolutions (GPU float32 convs default to TF32).
want kernels && part kernels ${KERNELS_LIMIT:-240} env JAX_DEFAULT_MATMUL_PRECISION=highest $PY -m pytest -q \
  -p no:cacheprovider -p no:xdist tests/test_fused_blocks.py tests/test_model.py -k "${KERNELS_K:-compiled or (fast_formulation and fused)}"
want train_bf16 && part train_bf16 ${TRAIN_LIMIT:-240} $PY benchmarks/train_throughput.py --dtype bfloat16 \
  --batch-sizes 256 --formulations ${FORMULATIONS:-auto plain} \
  --torch ${TORCH:-nchw channels_last compile} --compile-timeout 45 --repeats 5 ${INFERENCE:---inference-batch 1024}
# alternatives: fused_blocks.TUNING settings against auto's default in one run. Timed on an H100 (bf16, batch 256,
# 2026-11-27 05:48 UTC): first_backward=saved 28,368 images/s (now the bf16 default), products 21,987, autodiff's
# xla 21,554 (the default before); last_pre_bias=kernel no faster (21,554 / 28,323). Not yet timed (written after that
# lease): phase_conv=gemm, fused_subpixel's all-phase 2×2 convolution of the largest layer as one matrix product of
# its windows (subpixel.all_phase_conv), against fused_subpixel with XLA's convolution and against auto.
want alternatives && part alternatives ${ALTERNATIVES_LIMIT:-300} $PY benchmarks/train_throughput.py --dtype bfloat16 \
  --batch-sizes 256 --torch channels_last --skip-inference --repeats 5 --formulations ${ALTERNATIVES:-auto \
  fused_subpixel fused_subpixel+phase_conv=gemm fused_subpixel+phase_conv=gemm+last_pre_bias=kernel}
want tune && part tune ${TUNE_LIMIT:-200} $PY benchmarks/fused_blocks_tune.py --batch 256 --repeats 3 --blocks first --unfused matmul \
  --configs "backward xla" "backward saved" "saved 2048/16" "saved 2048/64 w8" "saved 512/32" "saved 4096/32 w8" \
  "saved fwd 128 w8" "saved fwd 32 w4"
# tune_last: the last block's tilings alone (never tuned before 2026-11-27), the fastest written to
# $OUT/last_tuning.json; train_tuned: the bf16 step at batch 256 with that tiling, against PyTorch in the same run.
want tune_last && part tune_last 150 $PY benchmarks/fused_blocks_tune.py --batch 256 --repeats 3 --blocks last \
  --unfused matmul --write-best "$OUT/last_tuning.json"
want train_tuned && [[ -s $OUT/last_tuning.json ]] && part train_tuned 120 $PY benchmarks/train_throughput.py \
  --dtype bfloat16 --batch-sizes 256 --formulations auto --torch channels_last --skip-inference --repeats 5 \
  --fused-tuning "$OUT/last_tuning.json"
# anatomy: the project step against a bare jitted Adam+BCE step of the same formulation (what the step's finishing,
# metrics and guards cost on the GPU; not measured there yet), PyTorch in the same run.
want anatomy && part anatomy ${ANATOMY_LIMIT:-100} $PY benchmarks/train_throughput.py --dtype bfloat16 --batch-sizes 256 \
  --formulations auto --minimal-step --torch channels_last --skip-inference --repeats 5
want train_bf16_b64 && part train_bf16_b64 90 $PY benchmarks/train_throughput.py --dtype bfloat16 --batch-sizes 64 --formulations auto \
  --torch nchw channels_last --skip-inference --repeats 5
# float32: auto is plain on a GPU (fused_1ch ran slower there, 2026-11-27, when its kernels' products ran at full
# float32 precision; since then they take jax's default, TF32 like XLA's convolutions: not yet timed), fused_1ch with
# the first block's two backward passes beside it
want train_fp32 && part train_fp32 ${FP32_LIMIT:-120} $PY benchmarks/train_throughput.py --dtype float32 --batch-sizes 256 \
  --formulations auto fused_1ch fused_1ch+first_backward=saved \
  --torch nchw channels_last --skip-inference --repeats 5
want layers && part layers ${LAYERS_LIMIT:-100} $PY benchmarks/layer_profile.py --batch 256 --repeats 3
want layers_dec3 && part layers_dec3 ${LAYERS_DEC3_LIMIT:-100} $PY benchmarks/layer_profile.py --batch 256 --repeats 3 \
  --layers dec3 dec2 --forms plain phase_gemm phase_xla
# The data-wait parts feed DATA_WAIT_FORMULATION's step (default auto); "fastest" takes the jax formulation with the most
# images/s in this session's train_bf16.log (a faster step is the harder test of the pipeline), auto when there is none.
DWF=${DATA_WAIT_FORMULATION:-auto}
if [[ $DWF == fastest ]]; then
  DWF=$(awk -F'|' '/^\| train step \| 256 \| jax .*\(project step/ {split($4, w, " "); gsub(/,/, "", $5);
    if (w[2] !~ /\+/ && $5 + 0 > best) {best = $5 + 0; f = w[2]}} END {print (f == "" ? "auto" : f)}' \
    "$OUT/train_bf16.log" 2>/dev/null)
  DWF=${DWF:-auto}
fi
want data_wait && part data_wait ${DATA_WAIT_LIMIT:-100} $PY benchmarks/data_wait.py --batch 256 --steps ${DATA_WAIT_STEPS:-12} \
  --workers 12 --dtype bfloat16 --crop-steps per_crop --images 512 --formulation "$DWF"
want data_wait_host && part data_wait_host 80 $PY benchmarks/data_wait.py --batch 256 --steps ${DATA_WAIT_STEPS:-12} \
  --workers 12 --dtype bfloat16 --crop-steps per_crop --images 512 --finish host --formulation "$DWF"
exit 0  # each part has its own rc line in its log
