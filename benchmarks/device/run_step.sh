#!/bin/bash
# Device-side steps, from the project root on the device machine:
#   bash .device-pinned/kit/run_step.sh stage cN    copy the carried piece .device-pinned/cN/* to /tmp/stage
#   bash .device-pinned/kit/run_step.sh torch       unpack torch and NCCL to /tmp/site, then check
#                                                   that torch 2.13 sees the GPU with the image's CUDA libraries
#   bash .device-pinned/kit/run_step.sh install     unpack the rest (torchvision, triton, vllm, ray, small wheels, model)
#   bash .device-pinned/kit/run_step.sh check       import check + model-folder check + GPU memory
# After install, every later command on the same warm machine starts with:
#   source .device-pinned/kit/env.sh
K=$(cd "$(dirname "$0")" && pwd)
source "$K/env.sh"
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
case "$1" in
stage)
  mkdir -p /tmp/stage && cp .device-pinned/$2/* /tmp/stage/ && ls /tmp/stage | tr '\n' ' ' && du -sh /tmp/stage ;;
torch)
  python3 "$K/unpack.py" "$K" torch || exit 2
  python3 -m pip list 2>/dev/null | grep -iE "^(nvidia|cuda)" | tr -s ' ' | tr '\n' ';'; echo
  python3 -c "import torch; print(torch.__version__, torch.__file__, torch.version.cuda, torch.cuda.is_available(), torch.cuda.get_device_name(0)); x=torch.randn(1024,1024,device='cuda'); print((x@x).sum()); print('cudnn', torch.backends.cudnn.version())" > "$OUT/torch_check.log" 2>&1; rc=$?
  tail -15 "$OUT/torch_check.log"
  if [ $rc != 0 ]; then  # which CUDA library is missing or too old
    N=$(python3 -c "import sys; print([p for p in sys.path if p.endswith('site-packages') and 'tmp' not in p][0])")/nvidia
    LD_LIBRARY_PATH=$(ls -d $N/*/lib | paste -sd:) ldd /tmp/site/torch/lib/libtorch_cuda.so | grep -E "not found|nvidia" | cut -c1-160
  fi
  exit $rc ;;
install)
  python3 "$K/unpack.py" "$K" rest || exit 2
  du -sh /tmp/site; ls /tmp/model/qwen25vl3b ;;
check)
  python3 "$K/import_check.py" > "$OUT/import.log" 2>&1; rc=$?
  grep -E '"ok": false|fa2|IMPORT_SUMMARY' "$OUT/import.log" | cut -c1-600
  python3 "$K/verify_model_dir.py" "$MODEL_DIR" > "$OUT/verify.log" 2>&1; grep -E 'n_image_pad|VERIFY_OK|Error' "$OUT/verify.log"
  python3 -c "import torch, torchvision, vllm, ray, transformers, triton; print(torch.__version__, torchvision.__version__, vllm.__version__, ray.__version__, transformers.__version__, triton.__version__, torch.cuda.mem_get_info())"
  # Ray Serve LLM, for benchmarks/serve_prototype.py (#28)
  python3 -c "import ray.serve, ray.serve.llm, vllm.entrypoints.openai.api_server; print('SERVE_IMPORT_OK')" 2>&1 | tail -2
  exit $rc ;;
*) echo "usage: run_step.sh stage cN | torch | install | check"; exit 2 ;;
esac
