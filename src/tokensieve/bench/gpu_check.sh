#!/usr/bin/env bash
# FlashAttention on a GPU, in one go (docs/flash-attention.md):
#   1. installs a flash-attn wheel built for the torch found here, if one exists (else says so and goes on with SDPA);
#   2. runs the FlashAttention contract of every method x family cell on CUDA in bfloat16 with the real kernel
#      (tests/gpu_flash_check.py);
#   3. runs `tokensieve bench speed` on the LLaVA-1.5-7B (32 decoder layers, the whole CLIP tower) and
#      Qwen2.5-VL-7B (all 28 decoder layers, the whole ViT, 672 px) shapes in bfloat16 under that attention, and
#      the two video shapes (Video-LLaVA-7B's 8 frames, a Qwen2.5-VL-7B 16-frame clip) at 32 tokens per frame.
# Everything lands in one folder: log.txt, contract.xml, speed-<shape>.json / .png / .md.
#
#   bash src/tokensieve/bench/gpu_check.sh [OUT_DIR]        # from a checkout; default out/gpu-check-<UTC time>
#
# PYTHON: the interpreter, with a CUDA build of torch (default python3); tokensieve and its test needs are
# installed into it with pip when missing. FLASH_ATTN_WHEEL: a flash-attn wheel file to install instead of
# asking pip. Meant to take 8 to 12 minutes on one H100 or H200.
set -uo pipefail
cd "$(dirname "$0")/../../.." || exit 1
OUT=${1:-out/gpu-check-$(date -u +%Y%m%d-%H%M)}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
step() { echo; echo "== $(date -u +%H:%M:%S) $*"; }

step "machine"
$PY -c "
import sys, torch
assert torch.cuda.is_available(), 'torch sees no CUDA GPU'
print(f'python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}')
" || { echo "this check needs a CUDA GPU and a CUDA build of torch (set PYTHON)"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

step "tokensieve"
if ! $PY -c "import tokensieve, pytest" 2>/dev/null; then
  $PY -m pip install -q -e ".[dev]" || { echo "could not install tokensieve into $PY"; exit 1; }
fi
$PY -c "import transformers, tokensieve; print('transformers', transformers.__version__, 'tokensieve', tokensieve.__file__)"

step "flash-attn"
flash_runs() {
  $PY -c "
import torch
from flash_attn import flash_attn_func
from transformers.utils import is_flash_attn_2_available
q = torch.randn(1, 16, 4, 64, device='cuda', dtype=torch.bfloat16)
flash_attn_func(q, q, q, causal=True)
assert is_flash_attn_2_available()
" 2>/dev/null
}
if ! flash_runs; then
  if [ -n "${FLASH_ATTN_WHEEL:-}" ]; then
    $PY -m pip install -q --no-deps "$FLASH_ATTN_WHEEL"
  else
    # flash-attn's setup fetches the prebuilt wheel made for this torch, CUDA and Python from the project's
    # releases; FLASH_ATTENTION_SKIP_CUDA_BUILD keeps it from compiling the kernels (an hour) when none matches.
    FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE timeout 300 $PY -m pip install -q --no-build-isolation --no-deps flash-attn
  fi
fi
if flash_runs; then
  ATTN=flash_attention_2
  echo "flash-attn $($PY -c 'import flash_attn; print(flash_attn.__version__)') runs here"
else
  ATTN=sdpa
  $PY -m pip uninstall -q -y flash-attn 2>/dev/null
  echo "no flash-attn wheel matches torch $($PY -c 'import torch; print(torch.__version__)') here: going on with SDPA"
fi

step "contract on CUDA, bfloat16, $ATTN"
TOKENSIEVE_GPU_ATTN=$ATTN timeout 240 $PY -m pytest -p no:cacheprovider -q -x tests/gpu_flash_check.py \
  --junitxml "$OUT/contract.xml" || echo "the contract FAILED (above); the benchmarks run anyway"

bench() {  # shape, decoder layers, vision layers, extra arguments
  step "bench speed $1: $2 decoder + $3 vision layers, bfloat16, $ATTN"
  timeout 200 $PY -m tokensieve.cli bench speed --shape "$1" --device cuda --dtype bfloat16 --attn "$ATTN" \
    --layers "$2" --vision-layers "$3" --budgets 192 128 64 --repeats 5 --new-tokens 16 "${@:4}" \
    --json "$OUT/speed-$1.json" --plot "$OUT/speed-$1.png" | tee "$OUT/speed-$1.md"
}
bench llava-1.5-7b 32 24
bench qwen2.5-vl-7b 28 32 --resolution 672
bench video-llava-7b 32 24 --budgets 32   # 87.5% compression of each frame (a later --budgets wins)
bench qwen2.5-vl-7b-video 28 32 --budgets 32

step "done"
ls -l "$OUT"
