#!/usr/bin/env bash
# Every GPU benchmark scenario (issues 6 and 17) in one command, on one CUDA GPU (H100 / H200 class):
#
#     bash benchmarks/gpu_all.sh                        # -> benchmarks/results/gpu-<name>.{json,md} + gpu-summary.md
#     RESULTS_DIR=/tmp/gpu bash benchmarks/gpu_all.sh   # elsewhere
#     GPU_ALL_ONLY=llm,cnn bash benchmarks/gpu_all.sh   # a subset (names below), e.g. to split the run
#     bash benchmarks/gpu_all.sh --dry-run              # print every command, run nothing (or GPU_ALL_DRY_RUN=1)
#
# Scenarios (each in its own process; a failing one is reported and the others still run):
#   llm            TinyLlama-shaped 1.1B, bf16, 8x1024, 7 linears, r=16; eager + torch.compile, + SHiRA rows
#   cnn            ResNet-50, batch 64, 224 px, channels_last, bf16 autocast, every conv, r=8
#   llm-quant      llm with a quantized base (bitsandbytes NF4 if it imports, else torchao int8)
#   minilm         MiniLM-L6 training, batch 64x128, bf16, 36 linears, r=8, + --fusion and --dora rows
#   conv-mobilenet MobileNetV2 (ImageNet weights), batch 64, 224 px, bf16 autocast: PEFT vs our LoRA-conv vs LAVA-conv
#   conv-craft     the same with CRAFT's VGG16-BN backbone
#   mixed_serving  1/2/8/32 adapters in one batch: MiniLM classification + small Llama generate, vs PEFT adapter_names
#   switching      merged-adapter switch / load+merge, MiniLM and the 1.1B Llama, vs PEFT
#   load_time      from_pretrained + load_adapter of 1/10/100 adapters vs PEFT
#   fusion_micro   shared-input (q/k/v, gate/up) fusion alone, fused vs unfused
# then benchmarks/gpu_summary.py prints the headline ratios and writes gpu-summary.md.
#
# Needs a Python with CUDA torch, transformers, peft, the offline assets of lava-peft (MiniLM
# package, MobileNetV2 / CRAFT weights) and optionally bitsandbytes or torchao; set PYTHON to
# choose it (default: .venv/bin/python if present, else python3).  Results are always named
# gpu-<name>.*, so the CPU results files are never overwritten.  Exit status: the number of
# failed scenarios.
set -u
cd "$(dirname "$0")/.."
DRY="${GPU_ALL_DRY_RUN:-0}"
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg (only --dry-run)" >&2; exit 2 ;;
  esac
done
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT="${RESULTS_DIR:-benchmarks/results}"
ONLY=",${GPU_ALL_ONLY:-},"
ALL="llm,cnn,llm-quant,minilm,conv-mobilenet,conv-craft,mixed_serving,switching,load_time,fusion_micro"
ONLY_LIST="${GPU_ALL_ONLY:-}"
for name in ${ONLY_LIST//,/ }; do
  [[ ",$ALL," == *",$name,"* ]] || { echo "GPU_ALL_ONLY: unknown scenario '$name' (known: $ALL)" >&2; exit 2; }
done
if [ "$DRY" = 1 ]; then
  echo "# dry run: commands only (PYTHON=$PY, results in $OUT)"
else
  mkdir -p "$OUT"
  "$PY" - <<'EOF' || { echo "no CUDA device visible to torch ($PY); GPU benchmarks not run" >&2; exit 1; }
import torch
assert torch.cuda.is_available()
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
EOF
fi
fail=0
ran=""
wanted() { [ "$ONLY" = ",," ] || [[ "$ONLY" == *",$1,"* ]]; }
# execute NAME CMD...: run one scenario's command (or print it in a dry run), counting failures
execute() {
  local name="$1"; shift
  ran="$ran,$name"
  echo "=== $name: $*"
  [ "$DRY" = 1 ] && return 0
  local t0=$SECONDS
  if ! "$@"; then
    echo "!!! scenario $name failed" >&2; fail=$((fail + 1))
  fi
  echo "=== $name: $((SECONDS - t0)) s"
}
# bench NAME ARGS...: a training scenario of benchmarks.run
bench() {
  local name="$1"; shift
  wanted "$name" || return 0
  execute "$name" "$PY" -m benchmarks.run "$@" --device cuda --json "$OUT/gpu-$name.json"
}
# script NAME MODULE ARGS...: a stand-alone benchmark script writing --json / --md
script() {
  local name="$1" module="$2"; shift 2
  wanted "$name" || return 0
  execute "$name" "$PY" -m "$module" "$@" --device cuda --json "$OUT/gpu-$name.json" --md "$OUT/gpu-$name.md"
}

bench llm llm --compile --shira
bench cnn cnn
if wanted llm-quant; then
  QUANT=""
  if "$PY" -c "import bitsandbytes" 2>/dev/null; then QUANT=bnb-4bit
  elif "$PY" -c "import torchao" 2>/dev/null; then QUANT=torchao-int8
  fi
  if [ -n "$QUANT" ]; then
    bench llm-quant llm-quant --quant "$QUANT" --variants frozen,peft-lora,lava
  elif [ "$DRY" = 1 ]; then
    echo "# llm-quant would be skipped here: neither bitsandbytes nor torchao imports with $PY"
    bench llm-quant llm-quant --quant bnb-4bit --variants frozen,peft-lora,lava
  else
    echo "!!! neither bitsandbytes nor torchao imports: llm-quant skipped (pip install bitsandbytes)" >&2
    fail=$((fail + 1))
  fi
fi
bench minilm minilm --fusion --dora
bench conv-mobilenet conv --backbone mobilenet_v2
bench conv-craft conv --backbone craft_vgg16_bn
script mixed_serving benchmarks.mixed_serving --adapters 1,2,8,32 --workloads minilm,llama-generate
script switching benchmarks.switching --models minilm,llama
script load_time benchmarks.load_time --counts 1,10,100
if wanted fusion_micro; then  # fusion_micro names its markdown --out
  execute fusion_micro "$PY" -m benchmarks.fusion_micro --device cuda --json "$OUT/gpu-fusion_micro.json" \
    --out "$OUT/gpu-fusion_micro.md"
fi
# the headline ratios of every gpu-*.json in $OUT (missing scenarios are listed)
execute summary "$PY" -m benchmarks.gpu_summary --results "$OUT" --expect "${ran#,}" --out "$OUT/gpu-summary.md"
fail_scenarios=$fail
echo "results in $OUT (gpu-*.json, gpu-*.md, gpu-summary.md); failed scenarios: $fail_scenarios"
[ "$DRY" = 1 ] && echo "# all scenarios: $ALL"
exit "$fail_scenarios"
