#!/usr/bin/env bash
# The speed check of the Triton decode kernels and the update, for a lent card, in about 4 minutes:
#   OUT=/some/dir bash tools/gpu_speed.sh
# Parts run in order of importance; each writes under $OUT as soon as it ends, so a timeout keeps what finished.
# Six files come back:
#   env.txt             versions, nvidia-smi, and each part's start time, exit status and seconds
#   tests.txt           on CUDA: the decode, graph-replay and Triton-kernel tests, and the output head's CUDA test
#   bench.json          decode ms/step at batch 1, 64, 128 on the Triton kernels, on the torch kernels (base) and
#   bench.txt           HF generate; one GRPO step (G = 8, 8 prompts, 512 tokens) now and as before (torch
#                       kernels, fp32 output head): s/step, parts, completions/s, peak memory; greedy agreement
#   profile_update.txt  grpo.update's phases and kernels, before (fp32 head) and after, micro-batch 8 and 16
#   profile_decode.txt  the decode step's kernels per kernel set, kv_bucket at rollout length, the attention
#                       kernel alone against SDPA and the copy bandwidth
# TRL's GRPOTrainer is left out (26.61 s/step on the H200, results/gpu-h200); TRL=1 adds bench's trl section, which
# measures only where trl and datasets import (this script installs nothing: tools/gpu_check.sh shows how). On a CPU the same parts run at tiny sizes, the Triton kernels in
# Triton's interpreter: a check that the script runs end to end, not a measurement.
set -u
OUT=${OUT:-gpu_speed_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if python -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  GPU=1
  BENCH=(--baseline --hf_repeats 1 --repeats 2)
  DECODE=()
else
  GPU=0
  export TRITON_INTERPRET=1  # before any kernel is defined
  BENCH=(--baseline --kernels triton --batches 1,8 --new_tokens 4 --repeats 1 --equiv_tokens 8 --grpo_prompts 2
         --grpo_group 2 --grpo_new_tokens 4 --summary_new_tokens 3)
  DECODE=(--batch 8 --new_tokens 4 --buckets 8,16 --repeats 1 --kernels torch,triton)
fi
SECTIONS=decode,grpo,equiv
[ "${TRL:-0}" = 1 ] && SECTIONS=$SECTIONS,trl

part() {  # part NAME LOG COMMAND...: run, log its output, record start, exit status and seconds in env.txt
  local name=$1 log=$2 t0=$SECONDS
  shift 2
  echo "$(date +%T) $name: start" >> "$OUT/env.txt"
  "$@" > "$log" 2>&1
  local rc=$?
  echo "exit $rc" >> "$log"
  echo "$(date +%T) $name: exit $rc, $((SECONDS - t0)) s" >> "$OUT/env.txt"
}

{ python -c "import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, transformers.__version__, \
torch.cuda.is_available())"; python -c "import triton; print('triton', triton.__version__)"; nvidia-smi; } \
  > "$OUT/env.txt" 2>&1
part tests "$OUT/tests.txt" python -m pytest -q tests/test_decode.py tests/test_graph_replay.py tests/test_tritondecode.py \
  tests/test_grpo.py::test_chunked_head_on_cuda_equals_its_cpu_emulation \
  --deselect tests/test_tritondecode.py::test_kernels_compile_for_hopper_with_wide_loads_and_no_spills
part bench "$OUT/bench.txt" python -m tools.bench --out "$OUT/bench.json" --sections $SECTIONS "${BENCH[@]}"
part profile_update "$OUT/profile_update_stdout.txt" python -m tools.profile_update --out "$OUT/profile_update.txt"
part profile_decode "$OUT/profile_decode_stdout.txt" python -m tools.profile_decode --out "$OUT/profile_decode.txt" \
  "${DECODE[@]}"
# the profiles' own files hold their results; their logs only matter when a part failed
for p in profile_update profile_decode; do
  tail -1 "$OUT/${p}_stdout.txt" | grep -q "exit 0" || tail -40 "$OUT/${p}_stdout.txt" >> "$OUT/env.txt"
  rm "$OUT/${p}_stdout.txt"
done
echo "$(date +%T) done, GPU=$GPU, $SECONDS s" >> "$OUT/env.txt"
# a summary for the caller's terminal (the files hold everything)
tail -3 "$OUT/tests.txt"; sed -n '/^$/,$p' "$OUT/bench.txt"; grep -v "^    " "$OUT/profile_update.txt"
grep -v "^    " "$OUT/profile_decode.txt"; cat "$OUT/env.txt" | grep -E "^[0-9]{2}:"
