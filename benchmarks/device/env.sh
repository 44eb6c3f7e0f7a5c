# Environment for the pinned stack unpacked by run_step.sh (torch 2.13.0, vLLM 0.29.0, Ray 2.60.0).
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export MODEL_DIR=${MODEL_DIR:-/tmp/model/qwen25vl3b}  # weightless Qwen2.5-VL-3B: use load_format="dummy"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 \
  DO_NOT_TRACK=1 RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
# flashinfer is not in the bundle: keep vLLM's sampler off it.
export VLLM_USE_FLASHINFER_SAMPLER=0
# Never use NVLink multicast on these shared hosts.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# The image's cuDNN is 9.19; torch 2.13.0 was built against 9.20 and refuses an older minor
# version at the first cuDNN call. Carrying cuDNN 9.20 does not fit the device's carry budget.
export PYTORCH_SKIP_CUDNN_COMPATIBILITY_CHECK=1
