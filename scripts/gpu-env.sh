# Sourced by scripts/gpu-check and scripts/bench-gpu on the GPU machine, once the devpack is unpacked
# into /tmp/site (docs/gpu.md): wsync from this tree, vLLM & co. from the pack.
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$root/service:$root/clients:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
export PATH="/tmp/site/bin:$PATH" VLLM_USE_FLASHINFER_SAMPLER=0 RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1
export RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
