#!/usr/bin/env bash
# All GPU benchmark scenarios of issue 6 in one command, on one CUDA GPU (H100 class):
#
#     bash benchmarks/gpu_all.sh            # writes benchmarks/results/{llm,llm-quant,cnn}.{json,md}
#
# Needs a Python with CUDA torch, transformers, peft (and optionally bitsandbytes or
# torchao for the quantized-base row); set PYTHON to choose it (default: .venv/bin/python
# if present, else python3).  Each scenario runs in its own process; a failing
# scenario is reported and the others still run.  Exit status: the number of failed
# scenarios.
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT="${RESULTS_DIR:-benchmarks/results}"
mkdir -p "$OUT"
"$PY" - <<'EOF' || { echo "no CUDA device visible to torch ($PY); GPU benchmarks not run" >&2; exit 1; }
import torch, sys
assert torch.cuda.is_available()
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
EOF
fail=0
run() {
  local name="$1"; shift
  echo "=== $name: $PY -m benchmarks.run $* --device cuda --json $OUT/$name.json"
  if ! "$PY" -m benchmarks.run "$@" --device cuda --json "$OUT/$name.json"; then
    echo "!!! scenario $name failed" >&2; fail=$((fail + 1))
  fi
}
# TinyLlama-shaped 1.1B, bf16, 8x1024, all 7 linears, r=16: eager and torch.compile (per decoder layer),
# plus SHiRA rows (ours vs HF PEFT's SHiRA, the same r·(O+I) entries per layer)
run llm llm --compile --shira
# CNN: ResNet-50, batch 64, 224 px, channels_last, bf16 autocast, every conv, r=8
run cnn cnn
# Quantized base: bitsandbytes NF4 if it imports, else torchao int8 weight-only
QUANT=""
if "$PY" -c "import bitsandbytes" 2>/dev/null; then QUANT=bnb-4bit
elif "$PY" -c "import torchao" 2>/dev/null; then QUANT=torchao-int8
fi
if [ -n "$QUANT" ]; then
  run llm-quant llm-quant --quant "$QUANT" --variants frozen,peft-lora,lava
else
  echo "!!! neither bitsandbytes nor torchao imports: llm-quant skipped (pip install bitsandbytes)" >&2
  fail=$((fail + 1))
fi
echo "results in $OUT; failed scenarios: $fail"
exit "$fail"
