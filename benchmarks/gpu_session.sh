#!/usr/bin/env bash
# Everything to run on a lent GPU machine, in one call of at most ~9.5 minutes (the step limits below add up to
# 570 s; a session has 15 minutes of device time, the machine's start included):
#   1. the GroupNorm paths' host time per call, and the kernels against torch (kernels alone) at the U-Net's
#      shapes of batch 4 and batch 1 with guidance (8 and 2 samples) and the VAE decoder's, and the spatial
#      transformer's norm written as tokens (channels-last) against norm + copy,
#   2. where the host's time goes per denoising step at batch 1 (gpu_host.py),
#   3. the SD 1.5 pipeline against diffusers, eager variants at batches 4 and 1 (NCHW, with the opt-in fused
#      add + LayerNorm and GEGLU kernels, channels-last), where each one's peak GPU memory is set (denoising or
#      decoding), profiles at both batches,
#   4. the CUDA tests (tests/test_cuda_graphs.py, tests/test_fused.py, tests/test_group_norm.py,
#      tests/test_offload.py).
# COMPILED=diffusers-compile,ours-compile adds the compiled variants at batch 4 (190 s more: over the budget with
# the rest; run it in a call of its own). Logs go to $OUT (the device tool's folder; ./gpu-logs elsewhere). Each
# step has its own time limit, so one that hangs costs the others nothing. EAGER / HOST override the variant lists
# of steps 3 and 2.
# diffusers is not installed there; on this machine, once (.whl/ is in .gitignore):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1 importlib_metadata
# then run `bash benchmarks/gpu_session.sh` through the device tool with carry [".whl"].
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-logs}"
mkdir -p "$OUT"
if ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton, diffusers; print('torch', torch.__version__, 'triton', triton.__version__,
'diffusers', diffusers.__version__)" | tee -a "$OUT/device.txt"
cd benchmarks
timeout 25 python3 gpu_group_norm.py --host-time 2>&1 | tee "$OUT/group_norm_host.txt"
timeout 40 python3 gpu_group_norm.py --gpu-time 2>&1 | tee "$OUT/group_norm.txt"
timeout 40 python3 gpu_group_norm.py --gpu-time --batch 2 2>&1 | tee "$OUT/group_norm_batch2.txt"
HOST_VARIANTS="diffusers,ours,ours-fused,ours-flash,diffusers-flash,ours-cl,ours-fused-qkv-flash"
timeout 120 python3 gpu_host.py --variants "${HOST:-$HOST_VARIANTS}" \
    --rounds 4 --profile ours --top 30 2>&1 | grep -v USDT | tee "$OUT/host.txt"
timeout 240 python3 gpu.py --variants "${EAGER:-diffusers,ours,ours-fused,ours-cl,ours-cl-graph}" \
    --batches 4,1 --repeats 5 --warmup 5 --no-vae-upcast --profile 3 --profile-batches 4,1 --time-limit 160 \
    --interleave --memory-phases 2>&1 \
    | tee "$OUT/eager.txt"
if [ -n "${COMPILED:-}" ]; then
    timeout 190 python3 gpu.py --variants "$COMPILED" --batches 4 --repeats 2 --warmup 3 --no-vae-upcast \
        --time-limit 150 --profile 3 --profile-compiled 2>&1 | tee "$OUT/compiled.txt"
fi
cd ..  # last: the CUDA tests (the timings above matter more when the call runs short); the parametrised kernel test
# compiles a Triton kernel per shape, dtype and flag (about 7 s per case on an H200): it goes after the others (the
# interpreter test runs in CI)
timeout 60 python3 -m pytest -q tests/test_cuda_graphs.py tests/test_fused.py tests/test_group_norm.py \
    tests/test_offload.py \
    -k "not fused_kernels_on_the_gpu and not interpreter" 2>&1 | tail -30 | tee "$OUT/tests.txt"
timeout 45 python3 -m pytest -q tests/test_group_norm.py -k fused_kernels_on_the_gpu 2>&1 | tail -30 \
    | tee -a "$OUT/tests.txt"
