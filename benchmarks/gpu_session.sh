#!/usr/bin/env bash
# Issue 13's GPU rows as one short run on a lent GPU machine (the `device` tool): the training
# table on CUDA beside easyfsl with the GPU's matmul peak and peak GPU memory (speed.py), DDP
# scaling on every GPU there (ddp_scaling.py, NCCL), and the CUDA-vs-CPU check of every method
# (device_check.py). About 5 minutes on one H200.
#
# That machine has CUDA PyTorch but not monai, pydicom, nibabel or easyfsl, and no internet:
# their wheels travel in .whl/ (ignored by git). Here, once:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#       monai==1.6.1 pydicom==3.0.2 nibabel==5.4.2 easyfsl==1.5.0
# then: run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=540)
# The figures come back in $OUT (speed-gpu.json, ddp-gpu.json, device_check.json and the logs).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/gpu-session}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
counts=""
for n in 1 2 4 8; do [ "$n" -le "$gpus" ] && counts="$counts --nproc $n"; done
status=0
timeout 200 python3 benchmarks/speed.py --device cuda --method protonet --method maml --method matching \
    --precision fp32 --precision bf16 --json "$OUT/speed-gpu.json" 2>&1 | tee "$OUT/speed-gpu.log" || status=1
timeout 100 python3 benchmarks/ddp_scaling.py --device cuda $counts --meta-batch 8 --steps 20 \
    --json "$OUT/ddp-gpu.json" 2>&1 | tee "$OUT/ddp-gpu.log" || status=1
timeout 150 python3 benchmarks/device_check.py --out /tmp/device-check 2>&1 | tee "$OUT/device_check.log" || status=1
cp /tmp/device-check/device_check.json "$OUT/" 2>/dev/null  # its run folders stay there: 8 files come back at most
exit $status
