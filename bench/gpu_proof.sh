#!/usr/bin/env bash
# The GPU proof in one call: the CUDA test suite, the GPU benchmark table, the denoising
# operations and the attack zoo's `strong` on CUDA, and a profile, written to one folder.
#
#   bench/gpu_proof.sh [OUT_DIR]        (default: gpu_proof_out)
#
# GPU_PROOF_BUDGET (seconds, default 480) bounds the whole run: every step gets at most what is
# left, the most important first (tests, then the table), so a slow step cannot take the rest.
# Without CUDA each part says so and the cuda-marked tests are skipped: it runs on any machine.
#
# OUT_DIR receives (10 files): env.txt, proof.log (each step's start, end and exit status, and
# the compile-cache warm-up's output), cuda_tests.log, gpu_bench.md (the table, then its rows
# with the training step under --amp bf16), gpu_bench_rows.jsonl, gpu_bench_amp_rows.jsonl, gpu_bench_bf16_rows.jsonl,
# denoise_ops.md, attacks.md, profile.md.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu_proof_out}
mkdir -p "$out"
out=$(cd "$out" && pwd)
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
deadline=$((SECONDS + ${GPU_PROOF_BUDGET:-480}))
archs=(ResNet-50 ResNet-152 ResNetDenoise-152 ResNeXtDenoiseAll-101)

log() { echo "== $(date +%T) [$SECONDS s] $*" | tee -a "$out/proof.log"; }

# step CAP FILE COMMAND...: run COMMAND for at most min(CAP, time left), output to FILE.
step() {
  local cap=$1 file=$2 left=$((deadline - SECONDS)) began=$SECONDS status
  shift 2
  if ((left < 15)); then
    log "skipped (budget spent): $*"
    return
  fi
  ((cap > left)) && cap=$left
  log "start (at most ${cap} s): $*"
  timeout --signal=INT --kill-after=10 "$cap" "$@" >>"$file" 2>&1
  status=$?
  log "exit $status after $((SECONDS - began)) s: $*"
}

{
  date -u
  python3 -c 'import sys, torch; print("python", sys.version.split()[0], "torch",
    torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())'
  command -v nvidia-smi >/dev/null && nvidia-smi
  nproc
} >"$out/env.txt" 2>&1
cuda=$(python3 -c 'import torch; print(int(torch.cuda.is_available()))')
log "CUDA available: $cuda"

# The fast attack's compile (Inductor, CUDA graphs) of the four models fills the compile cache
# in the background while the tests run; the timed runs below then load it instead of compiling.
if [[ $cuda == 1 ]]; then
  for a in "${archs[@]}"; do
    timeout 300 python3 bench/gpu_bench.py --warm-only --arch "$a" >>"$out/proof.log" 2>&1 &
  done
fi

step 300 "$out/cuda_tests.log" python3 -m pytest -m cuda tests/test_cuda.py -v -rs -p no:cacheprovider --durations=8
wait  # the warm-up

echo "# GPU benchmark table (bench/gpu_bench.py)" >"$out/gpu_bench.md"
if [[ $cuda == 1 ]]; then
  first=1
  for a in "${archs[@]}"; do
    header=()
    ((first)) || header=(--no-header)
    first=0
        step 120 "$out/gpu_bench.md" python3 bench/gpu_bench.py --arch "$a" "${header[@]}" --rows "$out/gpu_bench_rows.jsonl"
  done
  [[ -s $out/gpu_bench_rows.jsonl ]] && python3 bench/gpu_bench.py --summarize "$out/gpu_bench_rows.jsonl" >>"$out/gpu_bench.md" 2>&1
  # The training step under --amp (bf16: no loss scaling), beside the fp32 rows above.
  echo -e "\n## The training step under --amp bfloat16\n" >>"$out/gpu_bench.md"
  header=()
  for a in ResNet-50 ResNet-152; do
    step 120 "$out/gpu_bench.md" python3 bench/gpu_bench.py --arch "$a" --amp bfloat16 "${header[@]}" --rows "$out/gpu_bench_amp_rows.jsonl"
    header=(--no-header)
  done
  # The fast attack in bf16 (--fast-attack-dtype bfloat16: no loss scaling) beside fp16 x128.
  echo -e "\n## The fast attack in bf16 (ResNet-152)\n" >>"$out/gpu_bench.md"
  step 120 "$out/gpu_bench.md" python3 bench/gpu_bench.py --arch ResNet-152 --variants eager-fp32 compiled-amp compiled-bf16 --rows "$out/gpu_bench_bf16_rows.jsonl"
  [[ -s $out/gpu_bench_bf16_rows.jsonl ]] && python3 bench/gpu_bench.py --summarize "$out/gpu_bench_bf16_rows.jsonl" >>"$out/gpu_bench.md" 2>&1
else
  echo "no CUDA device: nothing measured" >>"$out/gpu_bench.md"
fi

if [[ $cuda == 1 ]]; then
  step 90 "$out/denoise_ops.md" python3 bench/denoise_ops.py --device cuda -d 152 --image-size 224 --batch 32 --rounds 5
  step 90 "$out/attacks.md" python3 bench/attacks.py --device cuda --num-blocks 3 8 36 3 --width 64 --image-size 224 --batch 32 --repeats 2 --only "strong-10" "apgd-ce-10" "apgd-t-10 (9 targets)"
  step 90 "$out/profile.md" python3 bench/gpu_bench.py --profile ResNetDenoise-152 --top 15
else
  for f in denoise_ops attacks profile; do echo "no CUDA device: not measured" >"$out/$f.md"; done
fi
log "done"
